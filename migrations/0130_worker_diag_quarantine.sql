-- A critical diagnostics report quarantines a worker on its own account, apart from a quarantine for
-- infrastructure failures (`health`/`quarantined_until`): a later healthy or warning report lifts only
-- this one, so it can never cut a timed quarantine short. The worker is quarantined while either applies.
ALTER TABLE workers
    ADD COLUMN diag_critical_at timestamptz,
    ADD COLUMN diag_reason      text;

-- Quarantines stored by a critical report before this migration (`quarantined_until` NULL) move over.
UPDATE workers SET diag_critical_at = now(), diag_reason = quarantine_reason,
    health = 'ok', quarantine_reason = NULL
 WHERE health = 'quarantined' AND quarantined_until IS NULL;
