-- A row handed back for re-sealing (the recipient's keys changed) gets a state of its own,
-- 'reseal', instead of 'bounced' with the code 5.7.5: it is not an outcome, the submitting
-- device seals the message again and the row goes back to 'queued' (onionpost/queuestate.py,
-- docs/queues.md).  The node API still reports it as 'bounced' with 5.7.5.
--
-- SQLite cannot change a CHECK constraint in place, so the table is rebuilt.  Foreign keys
-- are on while migrations run, and dropping the old outbox would cascade to the envelopes
-- of queued rows, so the envelope table is renamed with it (its reference follows the
-- rename), rebuilt against the new outbox, and dropped before the old outbox is.
ALTER TABLE outbox_envelopes RENAME TO outbox_envelopes_old;
ALTER TABLE outbox RENAME TO outbox_old;
DROP INDEX outbox_due;
DROP INDEX outbox_by_mailbox;

CREATE TABLE outbox (
    id INTEGER PRIMARY KEY,
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
    CASE WHEN state = 'bounced' AND last_error_code = '5.7.5' THEN 'reseal' ELSE state END,
    finished_at
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
