-- Delay notices look only at submissions older than delay_notice_seconds: an index range
-- instead of a scan of every queued recipient after each sealing.
CREATE INDEX submissions_user_created ON submissions (user, created_at);
