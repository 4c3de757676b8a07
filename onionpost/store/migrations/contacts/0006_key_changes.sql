-- Key changes done right (`onionpost contacts accept-key` / `reject-key`).  A changed identity
-- key is no longer only recorded and refused: mail signed by the new key is verified against
-- the new key and held in the Quarantine folder, so the row keeps what accepting it needs
-- (the verified pin of the new key, its device list, its bundle if one was fetched), how many
-- messages were held, whether the INBOX notice was made, and how it was resolved.
-- outcome: NULL while pending, 'accepted' or 'rejected' once resolved_at is set.  Rows written
-- before this migration have no new_pin: accepting one pins the new identity key alone, and
-- the first verified bundle or message fills in its devices.

ALTER TABLE identity_changes ADD COLUMN new_pin BLOB;
ALTER TABLE identity_changes ADD COLUMN new_device_list BLOB;
ALTER TABLE identity_changes ADD COLUMN new_bundle BLOB;
ALTER TABLE identity_changes ADD COLUMN held INTEGER NOT NULL DEFAULT 0;
ALTER TABLE identity_changes ADD COLUMN noticed INTEGER NOT NULL DEFAULT 0;
ALTER TABLE identity_changes ADD COLUMN outcome TEXT;
