-- T3: CPU samples are bounded per build and /api/stats must not scan them. Each build keeps how many
-- samples it has, when the last one came and the CPU time they add up to (core-seconds, each sample
-- counting cpu% / 100 x the gap since the previous one, at most 60 s), updated with every sample.
ALTER TABLE builds
    ADD COLUMN cpu_samples integer NOT NULL DEFAULT 0,
    ADD COLUMN cpu_sample_at timestamptz,
    ADD COLUMN cpu_seconds double precision NOT NULL DEFAULT 0;

UPDATE builds b SET cpu_samples = t.n, cpu_sample_at = t.last, cpu_seconds = t.seconds
FROM (
    SELECT build_id, count(*) AS n, max(ts) AS last, sum(cpu_percent / 100.0 * least(gap, 60)) AS seconds
    FROM (
        SELECT build_id, ts, cpu_percent,
               coalesce(extract(epoch FROM ts - lag(ts) OVER (PARTITION BY build_id ORDER BY ts)), 0) AS gap
        FROM cpu_snapshots
    ) s
    GROUP BY build_id
) t
WHERE b.id = t.build_id;
