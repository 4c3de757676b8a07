-- Invites (a person opens a mailbox here from their own machine) and pairings (a device of a
-- person joins their identity), both by one-time code. The inbox never stores a code's
-- secret: an invite is found by the hash of its claim, a pairing by a slot id derived from
-- the secret, and a pairing's two messages are sealed with keys the inbox cannot derive.

CREATE TABLE invites (
    claim_hash  BLOB PRIMARY KEY CHECK (length(claim_hash) = 32),
    local       TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL,
    quota_bytes INTEGER,            -- NULL: the inbox's default
    max_devices INTEGER,            -- NULL: no limit beyond the protocol's 64
    used_at     INTEGER,
    mailbox_id  BLOB,               -- the mailbox it opened (an answer lost in transit is resent)
    uik_pk      BLOB
) WITHOUT ROWID;
CREATE INDEX invites_by_local ON invites (local);

CREATE TABLE pairings (
    slot        BLOB PRIMARY KEY CHECK (length(slot) = 16),
    mailbox_id  BLOB NOT NULL,
    device_id   BLOB NOT NULL,      -- the existing device that offered it
    offer       BLOB NOT NULL,      -- its ephemeral X25519 public key
    join_pk     BLOB,               -- the new device's ephemeral key, once it joined
    join_box    BLOB,               -- its sealed request
    grant_box   BLOB,               -- the existing device's sealed answer
    state       TEXT NOT NULL DEFAULT 'offered'
        CHECK (state IN ('offered', 'joined', 'granted', 'aborted')),
    created_at  INTEGER NOT NULL,
    expires_at  INTEGER NOT NULL
) WITHOUT ROWID;

-- Per-mailbox limits set by an invite, and when each device last talked to the inbox.
CREATE TABLE mailbox_limits (
    mailbox_id  BLOB PRIMARY KEY,
    max_devices INTEGER
) WITHOUT ROWID;

CREATE TABLE device_seen (
    mailbox_id  BLOB NOT NULL,
    device_id   BLOB NOT NULL,
    seen_at     INTEGER NOT NULL,
    PRIMARY KEY (mailbox_id, device_id)
) WITHOUT ROWID;
