-- Mail waiting to be filed into the user's mailbox (Dovecot, through LMTP).
--
-- A row and its spool file (<data>/filing/<key hex>.eml, written and fsynced before the row
-- commits) are the durable copy between "onionpost has it" and "Dovecot has it".  The key
-- goes into the filed message as an X-Onionpost-Filing header, so after a crash between
-- LMTP's 250 and the row's removal the filer can ask Dovecot whether it already holds it.
CREATE TABLE filing_queue (
    id          INTEGER PRIMARY KEY,
    key         BLOB NOT NULL UNIQUE,    -- 16 bytes
    user        TEXT NOT NULL,
    folder      TEXT NOT NULL,           -- INBOX or Sent
    source      BLOB,                    -- message id from the inbox, when it came from there
    mark_seen   INTEGER NOT NULL DEFAULT 0,
    unless_message_id TEXT,              -- skip if the folder already holds this Message-ID
    not_before  INTEGER NOT NULL,
    state       INTEGER NOT NULL DEFAULT 0, -- 0 queued, 1 handed to LMTP, 2 filed, flags due
    attempts    INTEGER NOT NULL DEFAULT 0,
    next_try_at INTEGER NOT NULL,
    last_error  TEXT NOT NULL DEFAULT '',
    created_at  INTEGER NOT NULL
);

CREATE INDEX filing_queue_due ON filing_queue (next_try_at);
CREATE INDEX filing_queue_source ON filing_queue (user, source);
