-- Since 0240 a delivery in flight is a `pending` row under a lease (shown as `delivering`); no row is
-- stored as `delivering` any more. An instance still running the code from before 0240 (a rolling
-- upgrade) would claim by writing that state, and no current claim takes such a row back: its delivery
-- would be stranded once that instance stops. The state is refused instead, so an old instance's claim
-- fails loudly and leaves the rows to the current ones (stop old instances before upgrading).
UPDATE webhook_deliveries SET state = 'pending', leased_until = run_at WHERE state = 'delivering';
ALTER TABLE webhook_deliveries DROP CONSTRAINT webhook_deliveries_state_check;
ALTER TABLE webhook_deliveries ADD CONSTRAINT webhook_deliveries_state_check
    CHECK (state IN ('pending', 'delivered', 'failed'));
