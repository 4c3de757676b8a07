-- The outbox: a row per (sealed message, destination). The table is the truth; the scheduler
-- only decides when to look at it. A row leaves 'queued' exactly once.

CREATE TABLE outbox (
    id INTEGER PRIMARY KEY,
    mailbox_id BLOB NOT NULL,
    device_id BLOB NOT NULL,
    destination TEXT NOT NULL,
    msg_id BLOB NOT NULL,
    digest BLOB NOT NULL,
    envelope BLOB NOT NULL,
    message_ref TEXT NOT NULL DEFAULT '',
    -- The submitting device's idempotency key: a device that crashed after handing a message
    -- over and re-seals it on restart gets the existing row back instead of a second copy.
    submission_key TEXT NOT NULL,
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
    receipt TEXT,
    UNIQUE (mailbox_id, submission_key)
);
CREATE INDEX outbox_due ON outbox (state, next_attempt_at);
CREATE INDEX outbox_by_mailbox ON outbox (mailbox_id, state);
