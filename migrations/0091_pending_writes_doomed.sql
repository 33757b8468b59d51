-- A pending key the sweep (or a refused request's cleanup) has chosen to delete: from the commit that
-- sets it, no linking statement may claim the key (they claim only keys present and not doomed, under
-- a row lock), so an object being deleted is never named by a row that commits afterwards.
ALTER TABLE pending_writes ADD COLUMN doomed boolean NOT NULL DEFAULT false;
