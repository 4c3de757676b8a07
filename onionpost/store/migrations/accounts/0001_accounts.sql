-- Who may log in to the local IMAP/SMTP gateway, and the scrypt hash of their password.
-- The scrypt cost is stored with each hash so it can be raised later without a migration.
CREATE TABLE gateway_accounts (
    user       TEXT PRIMARY KEY COLLATE NOCASE,   -- the local part, also the login name
    address    TEXT NOT NULL UNIQUE COLLATE NOCASE,
    scrypt_n   INTEGER NOT NULL,
    scrypt_r   INTEGER NOT NULL,
    scrypt_p   INTEGER NOT NULL,
    salt       BLOB NOT NULL,
    digest     BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
) WITHOUT ROWID;
