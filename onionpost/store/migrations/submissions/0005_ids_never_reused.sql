-- Submission ids are never given out twice (AUTOINCREMENT), for the reason outbox 0005 gives:
-- the sealing job holds submission ids across its awaits (a page of due submissions, the
-- hand-overs it marks after the page), and a person removed by the CLI (another process)
-- deletes their submissions meanwhile; with a plain INTEGER PRIMARY KEY the next submission
-- would take the newest deleted id, and the job's marks for the deleted one (queued with an
-- outbox row, bounced, delivered) could land on a recipient of the new one.
--
-- Rebuilt as outbox 0004/0005 are: the two tables that refer to submissions are renamed
-- with it (their references follow the rename), rebuilt against the new table, and dropped
-- before the old one, so nothing cascades away.
ALTER TABLE submission_bodies RENAME TO submission_bodies_old;
ALTER TABLE submission_recipients RENAME TO submission_recipients_old;
ALTER TABLE submissions RENAME TO submissions_old;
DROP INDEX submission_recipients_due;
DROP INDEX submissions_user_created;

CREATE TABLE submissions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    user TEXT NOT NULL,
    headers BLOB NOT NULL,
    message_ref TEXT NOT NULL DEFAULT '',
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL,
    content_type INTEGER NOT NULL DEFAULT 0
);
INSERT INTO submissions (id, user, headers, message_ref, created_at, expires_at, content_type)
    SELECT id, user, headers, message_ref, created_at, expires_at, content_type
    FROM submissions_old;

CREATE TABLE submission_recipients (
    submission_id INTEGER NOT NULL REFERENCES submissions (id) ON DELETE CASCADE,
    address TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'queued', 'delivered', 'bounced', 'cancelled')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    last_error TEXT,
    last_error_code TEXT,
    outbox_id INTEGER,
    notified INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (submission_id, address)
) WITHOUT ROWID;
INSERT INTO submission_recipients (submission_id, address, state, attempts, next_attempt_at,
    last_error, last_error_code, outbox_id, notified)
    SELECT submission_id, address, state, attempts, next_attempt_at, last_error,
        last_error_code, outbox_id, notified
    FROM submission_recipients_old;

CREATE TABLE submission_bodies (
    id INTEGER PRIMARY KEY REFERENCES submissions (id) ON DELETE CASCADE,
    message BLOB NOT NULL
);
INSERT INTO submission_bodies (id, message) SELECT id, message FROM submission_bodies_old;

DROP TABLE submission_bodies_old;
DROP TABLE submission_recipients_old;
DROP TABLE submissions_old;
CREATE INDEX submission_recipients_due ON submission_recipients (state, next_attempt_at);
CREATE INDEX submissions_user_created ON submissions (user, created_at);
