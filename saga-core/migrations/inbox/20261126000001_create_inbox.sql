-- The participants' inbox: one row per idempotency key, with the recorded outcome.
-- Applied with search_path set to the inbox schema (default `saga_inbox`).

CREATE TABLE inbox (
    idempotency_key text        PRIMARY KEY,
    saga_id         uuid        NOT NULL,
    command         text        NOT NULL,
    outcome         jsonb,
    created_at      timestamptz NOT NULL DEFAULT now()
);
