-- T8: a build token's retry counts the retries of the build's whole family (the first build and every
-- retry made from it or from one of its retries), walking builds by original_build_id under a lock on
-- the family's first build. Without an index each step of that walk read the whole builds table.
CREATE INDEX IF NOT EXISTS builds_original_build_id_idx ON builds (original_build_id)
    WHERE original_build_id IS NOT NULL;
