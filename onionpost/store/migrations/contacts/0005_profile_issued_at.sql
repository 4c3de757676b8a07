-- The issue time of the signed profile a contact's display_name came from (0: none yet), so
-- that an older profile (a late message, a stale cached bundle) never replaces a newer one.
-- display_name itself is only ever written from a profile that verified for the contact's
-- pinned identity key.

ALTER TABLE contacts ADD COLUMN profile_issued_at INTEGER NOT NULL DEFAULT 0;
