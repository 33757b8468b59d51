-- R50: an unregistered worker stays offline, and is never handed work, until it registers again.
ALTER TABLE workers ADD COLUMN unregistered_at timestamptz;
