-- Message ids already filed, so that a message is filed exactly once even across crashes.
-- The same table the "mailbox" component created (0002_seen_ids) when the mailbox was in
-- SQLite: a data directory upgraded from then keeps its rows (gateway/mailbox_upgrade.py drops
-- every other mailbox table), a new one gets it here.
CREATE TABLE IF NOT EXISTS mailbox_seen_ids (
    user       TEXT NOT NULL,
    msg_id     BLOB NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (user, msg_id)
) WITHOUT ROWID;

CREATE INDEX IF NOT EXISTS mailbox_seen_ids_expiry ON mailbox_seen_ids (expires_at);
