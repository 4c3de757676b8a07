-- Keep what the inbox must and no more (docs/threat-model.md, "What the inbox database holds").
-- Envelope digests are only ever compared (duplicates), so only their keyed hash is kept:
-- whoever holds a message and reads this file cannot confirm that this inbox received it.
-- A duplicate's receipt is derived again from the redelivered envelope, so it is not stored
-- (an unkeyed hash of the digest, it would have allowed that confirmation all the same).
UPDATE sealed SET digest = record_hash(digest);
UPDATE seen_digests SET digest = record_hash(digest);
ALTER TABLE seen_digests DROP COLUMN receipt;
-- A contact token's label was the contact's address in clear, and nothing read it.
ALTER TABLE tokens DROP COLUMN label;

-- onionpost: compact after (the clear values must not linger in freed pages or the WAL)
