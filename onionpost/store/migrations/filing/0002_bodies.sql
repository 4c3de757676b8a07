-- The message of a filing kept in the database instead of a spool file.
--
-- A submission's Sent copy (and its INBOX copy when the user wrote to themself) is stored in
-- the same transaction as the submission, so a group commit of many SMTP submissions makes
-- all of them durable with the one fsync of its COMMIT: a spool file needs its own fsync and
-- one of the directory, per message, which do not batch.  The filer writes the file it hands
-- to LMTP from this row before each attempt (a scratch copy, not fsynced: the row is the
-- durable one).  Rows with a spool file have no body here.
CREATE TABLE filing_bodies (
    id      INTEGER PRIMARY KEY REFERENCES filing_queue (id) ON DELETE CASCADE,
    message BLOB NOT NULL
);
