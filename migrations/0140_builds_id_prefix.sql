-- The dashboard's search by the first characters of a build id (the tables show ten): a prefix LIKE
-- walks this index whatever the database's collation.
CREATE INDEX IF NOT EXISTS builds_id_prefix_idx ON builds (id text_pattern_ops);
