-- Requirements (scheduling.md): what a build needs of the Mac that runs it, matched against what workers
-- declare at register. `requirements` is the build's requirements as shown (canonical text);
-- `requirement_match` the same as comparable bounds, written by the controller from the parsed text:
-- {"xcode": [lo, hi], "macos": [lo, hi], "arch": "arm64", "memory_gb": 16, "labels": ["fast-disk"]},
-- versions as version_key() numbers.
ALTER TABLE builds ADD COLUMN requirements jsonb;
ALTER TABLE builds ADD COLUMN requirement_match jsonb;

-- A dotted version as one comparable number: major·10^8 + minor·10^4 + patch (each part capped at
-- 9999, parts past the third ignored); NULL when the text does not start with a version. The controller
-- encodes requirement versions the same way (queue/requirements.rs).
CREATE FUNCTION version_key(v text) RETURNS bigint IMMUTABLE PARALLEL SAFE LANGUAGE sql AS $$
    SELECT sum(LEAST(p::numeric, 9999) * (10000::numeric ^ (3 - i)))::bigint
    FROM unnest((string_to_array(substring(v FROM '^\s*(\d+(?:\.\d+)*)'), '.'))[1:3]) WITH ORDINALITY AS t(p, i)
$$;

-- What a worker's capabilities document declares, in the shape requirement_match compares with.
-- Accepted: xcode_version or xcode_versions (list), macos_version, arch, maxMemoryGB or memory_gb, labels
-- (the deployed Swift worker sends platforms, maxConcurrentBuilds, maxMemoryGB, maxCPUPercent,
-- xcode_version). A property a worker does not declare satisfies no requirement on it.
CREATE FUNCTION worker_caps(c jsonb) RETURNS jsonb IMMUTABLE PARALLEL SAFE LANGUAGE sql AS $$
    SELECT jsonb_strip_nulls(jsonb_build_object(
        'xcode', (SELECT jsonb_agg(k) FROM (
            SELECT version_key(x) AS k FROM (
                SELECT c->>'xcode_version' AS x WHERE jsonb_typeof(c->'xcode_version') IN ('string', 'number')
                UNION ALL
                SELECT e #>> '{}' FROM jsonb_array_elements(
                    CASE WHEN jsonb_typeof(c->'xcode_versions') = 'array' THEN c->'xcode_versions' ELSE '[]' END) e
                WHERE jsonb_typeof(e) IN ('string', 'number')) xs) ks WHERE k IS NOT NULL),
        'macos', (SELECT jsonb_agg(k) FROM (
            SELECT version_key(c->>'macos_version') AS k
            WHERE jsonb_typeof(c->'macos_version') IN ('string', 'number')) ks WHERE k IS NOT NULL),
        'arch', CASE WHEN jsonb_typeof(c->'arch') = 'string' THEN lower(c->>'arch') END,
        'memory_gb', CASE WHEN jsonb_typeof(c->'maxMemoryGB') = 'number' THEN c->'maxMemoryGB'
                          WHEN jsonb_typeof(c->'memory_gb') = 'number' THEN c->'memory_gb' END,
        'labels', CASE WHEN jsonb_typeof(c->'labels') = 'array' THEN c->'labels' END))
$$;
ALTER TABLE workers ADD COLUMN caps jsonb GENERATED ALWAYS AS (worker_caps(capabilities)) STORED;

-- Whether a worker with `caps` satisfies every requirement in `m` (a build's requirement_match).
CREATE FUNCTION build_matches(m jsonb, caps jsonb) RETURNS boolean IMMUTABLE PARALLEL SAFE LANGUAGE sql AS $$
    SELECT COALESCE(m IS NULL OR (
        (NOT m ? 'xcode' OR EXISTS (SELECT 1 FROM jsonb_array_elements_text(COALESCE(caps->'xcode', '[]')) v
            WHERE v::bigint BETWEEN (m->'xcode'->>0)::bigint AND (m->'xcode'->>1)::bigint))
        AND (NOT m ? 'macos' OR EXISTS (SELECT 1 FROM jsonb_array_elements_text(COALESCE(caps->'macos', '[]')) v
            WHERE v::bigint BETWEEN (m->'macos'->>0)::bigint AND (m->'macos'->>1)::bigint))
        AND (NOT m ? 'arch' OR caps->>'arch' = m->>'arch')
        AND (NOT m ? 'memory_gb' OR (caps->>'memory_gb')::numeric >= (m->>'memory_gb')::numeric)
        AND (NOT m ? 'labels' OR COALESCE(caps->'labels', '[]') @> (m->'labels'))), false)
$$;

-- "Is any queued build picky?" (an empty claim then does not mean the queue is empty for everyone).
CREATE INDEX builds_queued_requirements_idx ON builds (queue)
    WHERE requirement_match IS NOT NULL AND state IN ('pending', 'scheduled', 'retryable');
