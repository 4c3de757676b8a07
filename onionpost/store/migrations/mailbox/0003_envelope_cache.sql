-- The IMAP ENVELOPE of a body as the gateway renders it: derived from the header, so it can
-- be dropped at any time; kept apart from mailbox_bodies so that reading it never walks the
-- overflow pages of a large message.
CREATE TABLE mailbox_envelopes (
    body_id INTEGER PRIMARY KEY REFERENCES mailbox_bodies (id) ON DELETE CASCADE,
    data    BLOB NOT NULL
);
