-- The message in a table of its own, its row's last column, never updated: SQLite builds a
-- whole record in memory to insert a zeroblob that other columns follow, which for a 50 MiB
-- message cost 100 MB at every submission.  The body is removed once every recipient's fate
-- is known (the submission row keeps the header block for notices).
CREATE TABLE submission_bodies (
    id INTEGER PRIMARY KEY REFERENCES submissions (id) ON DELETE CASCADE,
    message BLOB NOT NULL
);
INSERT INTO submission_bodies (id, message)
    SELECT id, message FROM submissions WHERE length(message) > 0;
ALTER TABLE submissions DROP COLUMN message;
