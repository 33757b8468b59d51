-- R41: upload routes authenticate a VM token before reading the body, without knowing the build
-- yet; this keeps that look-up (and a flood of bogus tokens) off a scan of `builds`.
CREATE INDEX IF NOT EXISTS builds_held_vm_token ON builds (vm_token_hash)
    WHERE state IN ('assigned', 'building');
