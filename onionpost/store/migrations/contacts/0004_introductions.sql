-- Introductions a person received (`A introduces you to C`, protocol §16), after every
-- signature checked and only from a contact.  `uik_pk` is the identity key the introducer
-- vouches for: accepting pins it (or checks it against the pin).  `admit_token` is
-- registered at the person's own inbox on acceptance (C presents it there), so blocking C
-- withdraws it too; `present_token` is what this person presents at C's inbox.
-- One row per (introducer, introduced): a newer introduction replaces an older one.

CREATE TABLE introductions (
    id INTEGER PRIMARY KEY,
    user TEXT NOT NULL,
    introducer TEXT NOT NULL,
    address TEXT NOT NULL,
    uik_pk BLOB NOT NULL,
    admit_token BLOB NOT NULL,
    present_token BLOB NOT NULL,
    received_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    accepted_at INTEGER,
    UNIQUE (user, introducer, address)
);
CREATE INDEX introductions_address ON introductions (user, address);
