-- The device's decrypted mailbox: folders, messages (with stable per-folder UIDs), bodies.

-- Monotonic counters that must never repeat, even after a folder is deleted (UIDVALIDITY).
CREATE TABLE mailbox_counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE mailbox_folders (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,  -- never reused: the IMAP MAILBOXID
    user          TEXT NOT NULL,
    name          TEXT NOT NULL,                      -- "INBOX", "Sent", "Work/Projects"
    special_use   TEXT,                               -- "\Sent", "\Drafts", ... or NULL
    uidvalidity   INTEGER NOT NULL,
    uidnext       INTEGER NOT NULL DEFAULT 1,
    modseq        INTEGER NOT NULL DEFAULT 1,         -- highest mod-sequence of the folder
    expunge_floor INTEGER NOT NULL DEFAULT 0,         -- tombstones up to here were pruned
    subscribed    INTEGER NOT NULL DEFAULT 1,
    created_at    INTEGER NOT NULL,
    UNIQUE (user, name)
);

-- Message bytes, shared by copies of one message (COPY does not duplicate a 50 MiB blob).
CREATE TABLE mailbox_bodies (
    id          INTEGER PRIMARY KEY,
    size        INTEGER NOT NULL,
    header_size INTEGER NOT NULL,   -- bytes up to and including the blank line
    data        BLOB NOT NULL
);

CREATE TABLE mailbox_messages (
    folder_id     INTEGER NOT NULL REFERENCES mailbox_folders (id) ON DELETE CASCADE,
    uid           INTEGER NOT NULL,
    body_id       INTEGER NOT NULL REFERENCES mailbox_bodies (id),
    internal_date INTEGER NOT NULL,
    sysflags      INTEGER NOT NULL DEFAULT 0,  -- bits: \Seen 1, \Answered 2, \Flagged 4,
                                               --       \Deleted 8, \Draft 16
    keywords      TEXT NOT NULL DEFAULT '',    -- space-separated, sorted
    recent        INTEGER NOT NULL DEFAULT 1,
    modseq        INTEGER NOT NULL,
    message_id    TEXT,                        -- the Message-ID header, for Sent dedup
    PRIMARY KEY (folder_id, uid)
) WITHOUT ROWID;

CREATE INDEX mailbox_messages_modseq ON mailbox_messages (folder_id, modseq);
CREATE INDEX mailbox_messages_body ON mailbox_messages (body_id);
CREATE INDEX mailbox_messages_message_id ON mailbox_messages (folder_id, message_id)
    WHERE message_id IS NOT NULL;

-- Tombstones of expunged UIDs, so an IMAP session can learn what vanished since its modseq.
CREATE TABLE mailbox_expunged (
    folder_id INTEGER NOT NULL REFERENCES mailbox_folders (id) ON DELETE CASCADE,
    uid       INTEGER NOT NULL,
    modseq    INTEGER NOT NULL,
    PRIMARY KEY (folder_id, uid)
) WITHOUT ROWID;

CREATE INDEX mailbox_expunged_modseq ON mailbox_expunged (folder_id, modseq);
