//! Integration tests: a real server on an ephemeral port, a real database per
//! test (SQLite always, PostgreSQL when TEST_DATABASE_URL is set), and the
//! generated client.

mod harness;

mod auth;
mod bulk;
mod collation;
mod consistency;
mod crash;
mod create;
mod events;
mod filter_property;
mod fuzz;
mod groups;
mod isolation;
mod lifecycle;
mod limits;
mod list;
mod metrics;
mod otlp;
mod outage;
mod overload;
mod pg_tls;
mod plans;
mod read;
mod replicas;
mod runtime;
mod server;
mod tls;
mod update;
mod wire;
