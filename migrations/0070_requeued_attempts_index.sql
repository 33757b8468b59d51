-- R51's requeue cool-off is checked on every empty poll of an idle worker (is a queued build held
-- back from this worker?) and inside every claim. Requeued attempts are rare, but the only index by
-- worker held every attempt of the worker, so the look-up read the worker's whole history and grew
-- with every build it ran (0.25–0.8 ms per empty poll in P12). This index holds only the requeued ones.
CREATE INDEX IF NOT EXISTS build_attempts_requeued_idx ON build_attempts (worker_id, finished_at)
    WHERE outcome = 'requeued';
