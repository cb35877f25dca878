-- The operators' lists (`saga list`, the console) read newest first, by status, by name or
-- by business key, and must stay fast with millions of finished sagas in the log. None of
-- these columns changes at a step (status changes only when the saga's state does), so a
-- step's update stays heap-only (HOT).
--
-- Built in the migration's transaction: on a log of millions of sagas this holds the
-- orchestrators' writes for the seconds each index takes to build (about 1 s a million rows).
CREATE INDEX instances_created ON instances (created_at, id);
CREATE INDEX instances_status_created ON instances (status, created_at, id);
CREATE INDEX instances_saga_created ON instances (saga, created_at, id);
CREATE INDEX instances_key ON instances (business_key) WHERE business_key IS NOT NULL;
