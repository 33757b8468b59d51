-- Cheaper webhook deliveries, per delivery (issue #25, W1c).
--
-- The claim of a delivery was a non-HOT update: it changed `state` (in the due index's predicate) and
-- `run_at` (its key), so every claimed row got a new entry in all three indexes, then the record of
-- the outcome a second set. The lease is now its own column, outside every index: a claim sets
-- `leased_until` and `attempts` only, a HOT update (the row stays `pending`, and the due index does not
-- change); a claimed row is one whose lease has not run out (shown as `delivering`). A delivery whose
-- instance died is claimable again once `leased_until` has passed, as before with `run_at`.
ALTER TABLE webhook_deliveries ADD COLUMN leased_until timestamptz;

-- Deliveries in flight now: the same lease, in the new column.
UPDATE webhook_deliveries SET state = 'pending', leased_until = run_at WHERE state = 'delivering';

DROP INDEX webhook_deliveries_due_idx;
CREATE INDEX webhook_deliveries_due_idx ON webhook_deliveries (run_at) WHERE state = 'pending';

-- Room on each page for the claim's HOT version of every row the fan-out wrote there: a claim takes the
-- due rows in order, so all rows of a page are claimed together (at 80 % only about a third of the
-- claims were HOT in a psql check, at 50 % all). The record of the outcome (not HOT: it moves the row
-- out of the due index) finds the claim's old versions pruned and stays on the page too.
ALTER TABLE webhook_deliveries SET (fillfactor = 50);
