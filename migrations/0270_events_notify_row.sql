-- Issue #25, PostgreSQL CPU per build: the events wake-up without a transition table.
--
-- The statement-level trigger of 0050 copied every inserted event into a transition table and ran a
-- query over it (EXISTS) only to stay silent for statements that inserted nothing. A row-level trigger
-- fires for inserted rows only, so it needs neither: it just NOTIFYs. The wake-ups are the same —
-- NOTIFY folds identical payloads of one transaction into one and delivers only at commit, so a
-- committing transaction that emitted still wakes each listener once, and one that emitted nothing
-- (or rolled back) stays silent.
DROP TRIGGER events_notify ON events;
DROP FUNCTION events_notify();

CREATE FUNCTION events_notify() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('expo_events', '');
    RETURN NULL;
END $$;
CREATE TRIGGER events_notify AFTER INSERT ON events FOR EACH ROW EXECUTE FUNCTION events_notify();
