-- Purge of the inbox: rows are deleted by age, and the horizon of the latest purge is kept, so
-- that a late delivery or fence of a saga whose rows may have been purged is answered "cannot
-- tell" instead of being taken for a key never seen (see `Inbox::purge`).
CREATE TABLE inbox_purged (
    one           boolean     PRIMARY KEY DEFAULT true CHECK (one),
    purged_before timestamptz NOT NULL
);
-- Purge goes by age; rows are appended in time order, so a BRIN index costs next to nothing.
CREATE INDEX inbox_created_at ON inbox USING brin (created_at);
