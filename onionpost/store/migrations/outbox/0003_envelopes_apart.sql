-- The envelope in a table of its own, its row's last column, never updated: SQLite builds a
-- whole record in memory to insert a zeroblob that other columns follow, and to update any
-- column of a row, so a 50 MiB envelope in the outbox row cost 100 MB at every claim,
-- deferral and outcome.  The row's envelope is removed when the row finishes.
CREATE TABLE outbox_envelopes (
    id INTEGER PRIMARY KEY REFERENCES outbox (id) ON DELETE CASCADE,
    envelope BLOB NOT NULL
);
INSERT INTO outbox_envelopes (id, envelope)
    SELECT id, envelope FROM outbox WHERE state = 'queued' AND length(envelope) > 0;
ALTER TABLE outbox DROP COLUMN envelope;
