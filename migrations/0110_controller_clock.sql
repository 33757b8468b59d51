-- The controller's own contact with the database (fleet-health.md: leases that survive the
-- controller's own outages). Every instance stamps `last_contact` about once a second. A gap longer
-- than the outage threshold means no instance reached the database (PostgreSQL was down, or no
-- instance ran), so heartbeats could not be delivered: the instance that first sees the gap stops
-- the lease clock for it (extends live leases and shifts workers' last_seen_at) in the same
-- transaction that stamps the row. One row; absent until an instance first stamps it.
CREATE TABLE controller_clock (
    id           integer PRIMARY KEY CHECK (id = 1),
    last_contact timestamptz NOT NULL
);
