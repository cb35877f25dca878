-- `cancelled` is a finished status too: keep it out of the unfinished index and in the
-- finished one (used by purge).
DROP INDEX instances_unfinished;
CREATE INDEX instances_unfinished ON instances (status, updated_at)
    WHERE status NOT IN ('completed', 'compensated', 'cancelled');
DROP INDEX instances_finished;
CREATE INDEX instances_finished ON instances (updated_at)
    WHERE status IN ('completed', 'compensated', 'cancelled');
