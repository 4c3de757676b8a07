-- What a submission's body is (protocol §9.1 content_type): 0 an RFC 5322 mail from a mail
-- client or `onionpost send`; 2 a signed introduction (`onionpost contacts introduce`), which
-- is sealed for its one recipient only (no copy for the sender's other devices) and whose
-- `headers` are a short made-up header block, so a bounce can say what it was.
ALTER TABLE submissions ADD COLUMN content_type INTEGER NOT NULL DEFAULT 0;
