-- Every person on a node has their own address book: contacts and identity changes are keyed
-- by (user, address).  Before this, the users of a household shared one row per address, so
-- the contact token one person registered for a correspondent was granted to that
-- correspondent again in another person's mail, and the answer to the other person bounced.
--
-- Existing rows were shared, so each is copied to every user of this device: everyone with a
-- gateway login, and everyone who has received mail here (mailbox_seen_ids).  These tables
-- belong to the accounts and seen components, which store/__init__.py lists (and so
-- migrates) before contacts.  (This migration read the SQLite mailbox's folders when mail was
-- kept in SQLite; a new database has no such table, so the seen ids stand for it.)  Pins, device lists, bundles, the token a contact
-- gave us (valid at their inbox whoever presents it), verified and blocked are kept for
-- everyone.  The token we registered for a contact (token_from_them) belongs to one user's
-- mailbox and we cannot tell whose, so when there are several users it is cleared: each user
-- registers a fresh one with their next message to that contact, and the old one stays valid
-- for whoever the contact already uses it with.

ALTER TABLE contacts RENAME TO contacts_shared;

CREATE TABLE contacts (
    user TEXT NOT NULL,
    address TEXT NOT NULL,
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
    blocked INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (user, address)
) WITHOUT ROWID;

INSERT INTO contacts (user, address, uik_pk, pin, device_list, bundle, bundle_fetched_at,
                      token_to_them, token_from_them, display_name, first_seen, last_seen,
                      verified, blocked)
WITH users (name) AS (
    SELECT user FROM gateway_accounts UNION SELECT user FROM mailbox_seen_ids
)
SELECT users.name, c.address, c.uik_pk, c.pin, c.device_list, c.bundle, c.bundle_fetched_at,
       c.token_to_them,
       CASE WHEN (SELECT count(*) FROM users) > 1 THEN NULL ELSE c.token_from_them END,
       c.display_name, c.first_seen, c.last_seen, c.verified, c.blocked
FROM contacts_shared AS c CROSS JOIN users;

DROP TABLE contacts_shared;

ALTER TABLE identity_changes RENAME TO identity_changes_shared;

CREATE TABLE identity_changes (
    id INTEGER PRIMARY KEY,
    user TEXT NOT NULL,
    address TEXT NOT NULL,
    old_uik BLOB NOT NULL,
    new_uik BLOB NOT NULL,
    seen_at INTEGER NOT NULL,
    resolved_at INTEGER
);
CREATE INDEX identity_changes_by_user ON identity_changes (user, address);

INSERT INTO identity_changes (user, address, old_uik, new_uik, seen_at, resolved_at)
WITH users (name) AS (
    SELECT user FROM gateway_accounts UNION SELECT user FROM mailbox_seen_ids
)
SELECT users.name, i.address, i.old_uik, i.new_uik, i.seen_at, i.resolved_at
FROM identity_changes_shared AS i CROSS JOIN users
ORDER BY i.id, users.name;

DROP TABLE identity_changes_shared;
