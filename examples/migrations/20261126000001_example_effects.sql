-- Every effect a participant of the examples applies, appended in the same transaction.
CREATE TABLE IF NOT EXISTS example_effects (
    id         bigserial   PRIMARY KEY,
    saga_id    uuid        NOT NULL,
    service    text        NOT NULL,
    action     text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS example_effects_saga ON example_effects (saga_id, id);
