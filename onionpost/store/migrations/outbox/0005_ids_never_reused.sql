-- Outbox row ids are never given out twice (AUTOINCREMENT), as spool ids already are.
--
-- The outbox worker keeps row ids in memory while it works: the rows it is delivering, and
-- the delivered marks that ride the next commit.  With a plain INTEGER PRIMARY KEY, SQLite
-- gives a new row the highest id plus one, so when the highest rows are deleted (a person
-- removed from the node, by the CLI in another process or by the node API) the next message
-- queued takes an id the worker still holds, and the worker's outcome for the deleted row
-- (delivered, deferred, bounced) would land on the new one: a message marked delivered that
-- never went out.  With AUTOINCREMENT an id is used once; an outcome for a deleted row then
-- matches nothing.  sqlite_sequence starts from the highest id copied below.
--
-- The table is rebuilt as in 0004 (SQLite cannot add AUTOINCREMENT in place), the envelope
-- table with it so that dropping the old outbox does not cascade to queued envelopes.
ALTER TABLE outbox_envelopes RENAME TO outbox_envelopes_old;
ALTER TABLE outbox RENAME TO outbox_old;
DROP INDEX outbox_due;
DROP INDEX outbox_by_mailbox;

CREATE TABLE outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    mailbox_id BLOB NOT NULL,
    device_id BLOB NOT NULL,
    -- The destination inbox's onion label while the row is queued; '' once it finished.
    onion TEXT NOT NULL,
    -- Keyed hash of the submitting device's idempotency key (device id and its own key): a
    -- device that crashed after handing a message over and re-seals it on restart gets the
    -- existing row back instead of a second copy.
    submission_hash BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    next_attempt_at INTEGER NOT NULL,
    -- A worker's claim on the row while it delivers; cleared at start-up (a crash mid-delivery
    -- must not delay the row).
    leased_until INTEGER,
    attempts INTEGER NOT NULL DEFAULT 0,
    last_error TEXT,
    last_error_code TEXT,
    last_attempt_at INTEGER,
    state TEXT NOT NULL DEFAULT 'queued'
        CHECK (state IN ('queued', 'delivered', 'bounced', 'cancelled', 'reseal')),
    finished_at INTEGER,
    UNIQUE (mailbox_id, submission_hash)
);

INSERT INTO outbox (id, mailbox_id, device_id, onion, submission_hash, created_at, expires_at,
    next_attempt_at, leased_until, attempts, last_error, last_error_code, last_attempt_at,
    state, finished_at)
SELECT id, mailbox_id, device_id, onion, submission_hash, created_at, expires_at,
    next_attempt_at, leased_until, attempts, last_error, last_error_code, last_attempt_at,
    state, finished_at
FROM outbox_old;

CREATE TABLE outbox_envelopes (
    id INTEGER PRIMARY KEY REFERENCES outbox (id) ON DELETE CASCADE,
    envelope BLOB NOT NULL
);
INSERT INTO outbox_envelopes (id, envelope) SELECT id, envelope FROM outbox_envelopes_old;

DROP TABLE outbox_envelopes_old;
DROP TABLE outbox_old;
CREATE INDEX outbox_due ON outbox (state, next_attempt_at);
CREATE INDEX outbox_by_mailbox ON outbox (mailbox_id, state);
