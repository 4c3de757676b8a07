-- Keep what the outbox must and no more (docs/threat-model.md, "What the inbox database holds").
-- Delivery needs only the destination inbox's onion, and only while a row is queued: the
-- recipient's local part, the message's ids, its Message-ID header and the envelope's digest
-- were kept in clear and read by nothing that needs them (the device knows its recipients).
-- The device's idempotency key names the recipient, so only its keyed hash is kept.
ALTER TABLE outbox RENAME TO outbox_old;
DROP INDEX outbox_due;
DROP INDEX outbox_by_mailbox;

CREATE TABLE outbox (
    id INTEGER PRIMARY KEY,
    mailbox_id BLOB NOT NULL,
    device_id BLOB NOT NULL,
    -- The destination inbox's onion label while the row is queued; '' once it finished.
    onion TEXT NOT NULL,
    envelope BLOB NOT NULL,
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
        CHECK (state IN ('queued', 'delivered', 'bounced', 'cancelled')),
    finished_at INTEGER,
    UNIQUE (mailbox_id, submission_hash)
);

INSERT INTO outbox (id, mailbox_id, device_id, onion, envelope, submission_hash, created_at,
    expires_at, next_attempt_at, leased_until, attempts, last_error, last_error_code,
    last_attempt_at, state, finished_at)
SELECT id, mailbox_id, device_id,
    CASE WHEN state = 'queued' THEN substr(destination, instr(destination, '@') + 1, 56)
        ELSE '' END,
    envelope, record_hash(submission_key), created_at, expires_at, next_attempt_at,
    leased_until, attempts, last_error, last_error_code, last_attempt_at, state, finished_at
FROM outbox_old;

DROP TABLE outbox_old;
CREATE INDEX outbox_due ON outbox (state, next_attempt_at);
CREATE INDEX outbox_by_mailbox ON outbox (mailbox_id, state);

-- onionpost: compact after (the clear values must not linger in freed pages or the WAL)
