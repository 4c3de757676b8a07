-- Mail a mail client submitted, waiting to be sealed for each recipient. Sealing needs the
-- recipient's current keys, which may be unreachable for a while, so the plaintext waits
-- here (on the user's own device) until every recipient is handed to the inbox's outbox.

CREATE TABLE submissions (
    id INTEGER PRIMARY KEY,
    user TEXT NOT NULL,
    message BLOB NOT NULL,
    headers BLOB NOT NULL,
    message_ref TEXT NOT NULL DEFAULT '',
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
);

CREATE TABLE submission_recipients (
    submission_id INTEGER NOT NULL REFERENCES submissions (id) ON DELETE CASCADE,
    address TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'queued', 'delivered', 'bounced', 'cancelled')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    last_error TEXT,
    last_error_code TEXT,
    outbox_id INTEGER,
    notified INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (submission_id, address)
) WITHOUT ROWID;
CREATE INDEX submission_recipients_due ON submission_recipients (state, next_attempt_at);
