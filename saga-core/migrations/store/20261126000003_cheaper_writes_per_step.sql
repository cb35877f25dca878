-- Cheaper writes per step (docs/PERFORMANCE.md).
--
-- Events and timers are written only by the store, under a lock on the saga's row, and purge
-- deletes them with their instance: the foreign keys' per-row checks bought nothing.
ALTER TABLE events DROP CONSTRAINT IF EXISTS events_saga_id_fkey;
ALTER TABLE timers DROP CONSTRAINT IF EXISTS timers_saga_id_fkey;

-- Each step updates its saga's `last_seq` and `updated_at`. With no index on a column a step
-- changes, the update is a heap-only tuple (HOT): no index entry is written for it. Purge goes
-- by `finished_at`, set once when the saga finishes; the unfinished index by `created_at`.
ALTER TABLE instances ADD COLUMN finished_at timestamptz;
UPDATE instances SET finished_at = updated_at
    WHERE status IN ('completed', 'compensated', 'cancelled');
DROP INDEX instances_unfinished;
CREATE INDEX instances_unfinished ON instances (status, created_at)
    WHERE status NOT IN ('completed', 'compensated', 'cancelled');
DROP INDEX instances_finished;
CREATE INDEX instances_finished ON instances (finished_at) WHERE finished_at IS NOT NULL;
-- Room on each page for the updated versions of its rows.
ALTER TABLE instances SET (fillfactor = 80);

-- The outbox holds only rows not yet published (or published and about to be deleted): the
-- poller finds the unclaimed ones by walking the primary key. Without an index on `claimed_until`, a claim is a heap-only update and an
-- inserted row writes one index entry instead of two.
DROP INDEX outbox_claimable;
ALTER TABLE outbox SET (fillfactor = 80);
