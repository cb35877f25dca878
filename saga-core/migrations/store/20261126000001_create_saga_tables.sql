-- The saga tables. Applied with search_path set to the configured schema (default `saga`).

CREATE TABLE instances (
    id           uuid        PRIMARY KEY,
    saga         text        NOT NULL,
    version      integer     NOT NULL,
    status       text        NOT NULL,
    business_key text,
    reason       text,
    last_seq     bigint      NOT NULL,
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL
);

-- Idempotent starts: one saga per (name, business key).
CREATE UNIQUE INDEX instances_business_key ON instances (saga, business_key)
    WHERE business_key IS NOT NULL;
-- Operators and `wait` look at unfinished sagas; finished ones stay out of this index.
CREATE INDEX instances_unfinished ON instances (status, updated_at)
    WHERE status NOT IN ('completed', 'compensated');
-- Retention: purge finished sagas by age.
CREATE INDEX instances_finished ON instances (updated_at)
    WHERE status IN ('completed', 'compensated');

CREATE TABLE events (
    saga_id     uuid        NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
    seq         bigint      NOT NULL,
    kind        text        NOT NULL,
    data        jsonb       NOT NULL,
    recorded_at timestamptz NOT NULL,
    PRIMARY KEY (saga_id, seq)
);

CREATE TABLE outbox (
    id            bigserial   PRIMARY KEY,
    saga_id       uuid        NOT NULL,
    destination   text        NOT NULL,
    message_id    uuid        NOT NULL,
    headers       jsonb       NOT NULL,
    body          bytea       NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    -- Rows handed to a relay in memory are claimed for a lease; the poller takes the rest.
    claimed_until timestamptz NOT NULL
);
CREATE INDEX outbox_claimable ON outbox (claimed_until);

CREATE TABLE timers (
    saga_id  uuid        NOT NULL REFERENCES instances (id) ON DELETE CASCADE,
    key      text        NOT NULL,
    timer    jsonb       NOT NULL,
    set_at   timestamptz NOT NULL,
    due_at   timestamptz NOT NULL,
    fired_at timestamptz,
    PRIMARY KEY (saga_id, key)
);
-- Only pending timers are scanned for due ones.
CREATE INDEX timers_pending ON timers (due_at) WHERE fired_at IS NULL;
