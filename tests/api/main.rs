//! Integration tests: the real server over real HTTP against a real PostgreSQL (a fresh database per
//! test), plus the queue engine called directly where time has to move.

mod support;

mod alerting;
mod audit;
mod bad_input;
mod cli;
mod cli_operator;
mod cli_operator_ux;
mod dashboard;
mod dashboard_cache;
mod dashboard_operator;
mod downloads;
mod durability;
mod events;
mod fleet;
mod fleet_health;
mod g0_worker;
mod hardening_input;
mod hardening_transport;
mod identity;
mod import;
mod long_poll;
mod observability;
mod openapi;
mod openapi_contract;
mod operator;
mod pool_release;
mod queue_engine;
mod resilience;
mod restart;
mod reviews;
mod s3;
mod scale;
mod scheduling;
mod spare_keys;
mod staging;
mod submit_keys;
mod token_worker;
mod webhooks;
