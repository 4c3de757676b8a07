-- Found by the queue benchmark: acknowledging looked for orphaned envelopes with a scan of the
-- spool per envelope (quadratic in a large backlog), and the quota check summed every spooled
-- envelope's row (dragging in its blob pages) on each delivery.
CREATE INDEX spool_by_sealed ON spool (sealed_id);
CREATE INDEX sealed_usage ON sealed (mailbox_id, size);
