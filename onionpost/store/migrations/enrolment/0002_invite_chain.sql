-- Invite chains: who invited each mailbox, how many invites each may still hand out, and
-- what an open invite carries.  A mailbox without a chain row was invited by the admin (or
-- opened before chains existed) and may invite nobody.

CREATE TABLE chain (
    mailbox_id  BLOB PRIMARY KEY,
    invited_by  BLOB,               -- the inviting mailbox; NULL: the inbox's admin
    allowance   INTEGER NOT NULL DEFAULT 0 CHECK (allowance >= 0),
    joined_at   INTEGER NOT NULL
) WITHOUT ROWID;
CREATE INDEX chain_by_inviter ON chain (invited_by);

ALTER TABLE invites ADD COLUMN invited_by BLOB;     -- NULL: issued by the admin
ALTER TABLE invites ADD COLUMN can_invite INTEGER NOT NULL DEFAULT 0;
