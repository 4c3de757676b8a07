-- What each person last told their inbox about strangers (`onionpost contacts policy`), so
-- `onionpost status` can show it on a machine that does not run the inbox.  The inbox's own
-- setting (mailboxes.accepts_strangers in inbox.db) is what is enforced; no row means the
-- person never changed it (strangers may write, with a proof of work).

CREATE TABLE mail_policy (
    user TEXT PRIMARY KEY,
    accepts_strangers INTEGER NOT NULL,
    set_at INTEGER NOT NULL
) WITHOUT ROWID;
