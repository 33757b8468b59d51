-- Validates the CHECK constraints 0290 added NOT VALID. VALIDATE CONSTRAINT scans the table under a SHARE
-- UPDATE EXCLUSIVE lock, which lets inserts, claims and completions go on; it cannot fail, because the
-- constraints 0290 replaced had checked the same thing on every row.
ALTER TABLE builds
    VALIDATE CONSTRAINT builds_state_check,
    VALIDATE CONSTRAINT builds_check,
    VALIDATE CONSTRAINT builds_queue_check;

ALTER TABLE workers
    VALIDATE CONSTRAINT workers_admin_state_check,
    VALIDATE CONSTRAINT workers_status_check,
    VALIDATE CONSTRAINT workers_health_check;
