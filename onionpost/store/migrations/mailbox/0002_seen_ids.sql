-- Message ids already filed, so that a message is filed exactly once even across crashes.
-- Written in the same transaction as the message itself (MailboxStore.file_message).
CREATE TABLE mailbox_seen_ids (
    user       TEXT NOT NULL,
    msg_id     BLOB NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (user, msg_id)
) WITHOUT ROWID;

CREATE INDEX mailbox_seen_ids_expiry ON mailbox_seen_ids (expires_at);
