-- The device's address book: pinned identity keys (trust on first use), the newest key
-- material seen for each contact, and delivery tokens in both directions.

CREATE TABLE contacts (
    address TEXT PRIMARY KEY,
    uik_pk BLOB NOT NULL,
    pin BLOB NOT NULL,
    device_list BLOB,
    bundle BLOB,
    bundle_fetched_at INTEGER,
    token_to_them BLOB,
    token_from_them BLOB,
    display_name TEXT NOT NULL DEFAULT '',
    first_seen INTEGER NOT NULL,
    last_seen INTEGER NOT NULL,
    verified INTEGER NOT NULL DEFAULT 0,
    blocked INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;

-- A contact whose identity key changed: kept, loudly, until the user accepts the new key.
CREATE TABLE identity_changes (
    id INTEGER PRIMARY KEY,
    address TEXT NOT NULL,
    old_uik BLOB NOT NULL,
    new_uik BLOB NOT NULL,
    seen_at INTEGER NOT NULL,
    resolved_at INTEGER
);
