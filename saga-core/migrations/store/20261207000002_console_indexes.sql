-- The operators' lists (`saga list`, the console) read newest first, by name or by business
-- key, and must stay fast with millions of finished sagas in the log. None of these columns
-- changes after the start, so a step's update stays heap-only (HOT).
CREATE INDEX instances_created ON instances (created_at, id);
CREATE INDEX instances_saga_created ON instances (saga, created_at, id);
CREATE INDEX instances_key ON instances (business_key) WHERE business_key IS NOT NULL;
