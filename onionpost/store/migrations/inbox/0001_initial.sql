-- The inbox role: mailboxes and their published keys, spooled sealed mail, anti-spam state.
-- Only ciphertext is stored here: `sealed.data` is an L2 envelope the inbox cannot open.

CREATE TABLE mailboxes (
    mailbox_id BLOB PRIMARY KEY CHECK (length(mailbox_id) = 16),
    local TEXT NOT NULL UNIQUE,
    uik_pk BLOB NOT NULL,
    binding BLOB NOT NULL,
    device_list BLOB NOT NULL,
    device_list_version INTEGER NOT NULL,
    profile BLOB,
    accepts_strangers INTEGER NOT NULL DEFAULT 1,
    pow_bits INTEGER,
    quota_bytes INTEGER,
    created_at INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE devices (
    mailbox_id BLOB NOT NULL REFERENCES mailboxes (mailbox_id) ON DELETE CASCADE,
    device_id BLOB NOT NULL,
    name TEXT NOT NULL,
    dsk_seq INTEGER NOT NULL,
    dsk_pk BLOB NOT NULL,
    revoked_at INTEGER,
    PRIMARY KEY (mailbox_id, device_id)
) WITHOUT ROWID;

CREATE TABLE rotations (
    mailbox_id BLOB NOT NULL,
    device_id BLOB NOT NULL,
    seq INTEGER NOT NULL,
    record BLOB NOT NULL,
    PRIMARY KEY (mailbox_id, device_id, seq),
    FOREIGN KEY (mailbox_id, device_id) REFERENCES devices (mailbox_id, device_id) ON DELETE CASCADE
) WITHOUT ROWID;

CREATE TABLE prekeys (
    mailbox_id BLOB NOT NULL,
    device_id BLOB NOT NULL,
    spk_id INTEGER NOT NULL,
    dsk_seq INTEGER NOT NULL,
    record BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    not_after INTEGER NOT NULL,
    PRIMARY KEY (mailbox_id, device_id, spk_id),
    FOREIGN KEY (mailbox_id, device_id) REFERENCES devices (mailbox_id, device_id) ON DELETE CASCADE
) WITHOUT ROWID;
CREATE INDEX prekeys_by_id ON prekeys (mailbox_id, spk_id);

-- One row per accepted L2 per mailbox; removed when every device has acknowledged it or it expires.
CREATE TABLE sealed (
    id INTEGER PRIMARY KEY,
    mailbox_id BLOB NOT NULL REFERENCES mailboxes (mailbox_id) ON DELETE CASCADE,
    digest BLOB NOT NULL,
    size INTEGER NOT NULL,
    received_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    data BLOB NOT NULL,
    UNIQUE (mailbox_id, digest)
);
CREATE INDEX sealed_by_expiry ON sealed (expires_at);

-- Per-device delivery queue; `id` only grows, so it is also the device's fetch cursor.
CREATE TABLE spool (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sealed_id INTEGER NOT NULL REFERENCES sealed (id) ON DELETE CASCADE,
    mailbox_id BLOB NOT NULL,
    device_id BLOB NOT NULL,
    added_at INTEGER NOT NULL,
    UNIQUE (device_id, sealed_id),
    FOREIGN KEY (mailbox_id, device_id) REFERENCES devices (mailbox_id, device_id) ON DELETE CASCADE
);
CREATE INDEX spool_by_device ON spool (mailbox_id, device_id, id);

-- Digests of everything accepted, kept until the envelope's own expiry: a redelivery after
-- the devices have fetched and acknowledged a message is still recognised as a duplicate.
CREATE TABLE seen_digests (
    mailbox_id BLOB NOT NULL,
    digest BLOB NOT NULL,
    receipt TEXT NOT NULL,
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (mailbox_id, digest)
) WITHOUT ROWID;
CREATE INDEX seen_digests_by_expiry ON seen_digests (expires_at);

-- Contact tokens: holders deliver without proof of work. Only a keyed hash is stored.
CREATE TABLE tokens (
    mailbox_id BLOB NOT NULL REFERENCES mailboxes (mailbox_id) ON DELETE CASCADE,
    token_hash BLOB NOT NULL,
    label TEXT NOT NULL DEFAULT '',
    created_at INTEGER NOT NULL,
    revoked_at INTEGER,
    PRIMARY KEY (mailbox_id, token_hash)
) WITHOUT ROWID;

CREATE TABLE rate_counters (
    scope TEXT NOT NULL,
    key BLOB NOT NULL,
    window_start INTEGER NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (scope, key, window_start)
) WITHOUT ROWID;

CREATE TABLE challenges (
    challenge BLOB PRIMARY KEY,
    mailbox_id BLOB NOT NULL,
    device_id BLOB NOT NULL,
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE sessions (
    token_hash BLOB PRIMARY KEY,
    mailbox_id BLOB NOT NULL,
    device_id BLOB NOT NULL,
    expires_at INTEGER NOT NULL
) WITHOUT ROWID;
