-- `expo-controller import-ts`: what each imported build looked like in the TypeScript controller's database
-- (a digest of its row and of its log and sample row ids) and the log sequence the import left. A later run
-- re-imports a build whose old row changed since (the "trial import while the old controller runs, final
-- import after stopping it" flow), but only while this controller has not touched it (log_seq unchanged).
ALTER TABLE builds ADD COLUMN import_fingerprint bytea;
ALTER TABLE builds ADD COLUMN import_log_seq bigint;
