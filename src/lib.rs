//! expo-controller: the controller of Expo Free Agent.
//!
//! * [`queue`] — the durable build queue on PostgreSQL (the row is the job).
//! * [`jobs`] — maintenance jobs that keep the queue moving (rescue, deadlines, promotion).
//! * [`ops`] — operator operations shared by the `/api/v2` handlers and the operator CLI.
//! * [`api`] — the HTTP contract served to workers, submitters and operators.
//! * [`dashboard`] — the operator's web dashboard at `/dashboard`.
//! * [`storage`] — sources, certs and results, streamed to an object store.
//! * [`webhooks`] — signed webhook subscriptions and their durable deliveries.
//! * [`import`] — `import-ts`: moving a TypeScript controller's database and files over.

pub mod api;
pub mod audit;
pub mod cli;
pub mod config;
pub mod dashboard;
pub mod db;
pub mod events;
pub mod identity;
pub mod ids;
pub mod import;
pub mod jobs;
pub mod metrics;
pub mod ops;
pub mod queue;
pub mod server;
pub mod storage;
pub mod text;
pub mod transport;
pub mod webhooks;
