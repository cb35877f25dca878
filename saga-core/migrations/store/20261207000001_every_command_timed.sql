-- Every dispatched command has an orchestrator-side timeout now. A saga whose command was
-- dispatched before, by a step without a timeout, would wait forever if its answer were lost:
-- give the last command of each active saga a timeout a minute from now. Should that command
-- have its answer already, the timer is stale and the engine ignores it.
INSERT INTO timers (saga_id, key, timer, set_at, due_at)
SELECT i.id,
       'timeout:' || (d.data->>'step') || ':' || (d.data->>'direction') || ':' || (d.data->>'attempt'),
       jsonb_build_object('kind', 'timeout', 'step', d.data->'step',
                          'direction', d.data->'direction', 'attempt', d.data->'attempt'),
       now(), now() + interval '1 minute'
FROM instances i
CROSS JOIN LATERAL (
    SELECT e.data FROM events e
    WHERE e.saga_id = i.id AND e.kind = 'dispatched'
    ORDER BY e.seq DESC LIMIT 1
) d
WHERE i.status IN ('running', 'compensating')
ON CONFLICT (saga_id, key) DO NOTHING;
