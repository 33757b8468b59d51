-- Issue #25, PostgreSQL CPU per build: the same CHECK constraints in a form that costs less at every statement.
--
-- PostgreSQL 15 reads a table's CHECK constraints from their stored node text (`stringToNode`) and plans them
-- (`expression_planner`, which folds an ARRAY[...] of literals into one array constant) at the start of
-- every INSERT or UPDATE statement on the table, before it checks the first row. A profile of one P12 build
-- cycle put that at about 6 % of the backend's CPU, most of it on `builds` (written by the submit, the claim
-- and the completion) and `workers` (the claim and the completion). `x IN ('a', 'b')` is stored as an
-- ARRAY expression of one constant node per value; `x = ANY ('{a,b}'::text[])` is stored as the single array
-- constant the planner would fold it into: the same test on every row, about half the text to read and
-- nothing left to fold. The constraints keep their names (errors name the same constraint). They are added
-- NOT VALID, so this migration holds its exclusive locks only for the catalog change, not for a scan of the
-- tables; 0301 validates them under a lock that lets the queue work on (the old constraints had already
-- checked every row, so that cannot fail).
ALTER TABLE builds
    DROP CONSTRAINT builds_state_check,
    ADD CONSTRAINT builds_state_check
        CHECK (state = ANY ('{scheduled,pending,assigned,building,retryable,completed,failed,cancelled}'::text[])) NOT VALID,
    DROP CONSTRAINT builds_check,
    ADD CONSTRAINT builds_check
        CHECK ((state = ANY ('{assigned,building}'::text[])) = (lease_owner IS NOT NULL AND lease_token IS NOT NULL)) NOT VALID,
    DROP CONSTRAINT builds_queue_check,
    ADD CONSTRAINT builds_queue_check CHECK (queue = ANY ('{ios,android}'::text[])) NOT VALID;

ALTER TABLE workers
    DROP CONSTRAINT workers_admin_state_check,
    ADD CONSTRAINT workers_admin_state_check
        CHECK (admin_state = ANY ('{active,draining,disabled,revoked}'::text[])) NOT VALID,
    DROP CONSTRAINT workers_status_check,
    ADD CONSTRAINT workers_status_check CHECK (status = ANY ('{idle,busy,offline}'::text[])) NOT VALID,
    DROP CONSTRAINT workers_health_check,
    ADD CONSTRAINT workers_health_check CHECK (health = ANY ('{ok,quarantined}'::text[])) NOT VALID;
