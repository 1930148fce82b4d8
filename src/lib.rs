//! user-service: the owner of a system's end users, spoken to over gRPC.

// Unsafe code is denied everywhere; the one exception (storage/nodelay.rs,
// a setsockopt that sqlx offers no hook for) allows it and says why.
#![deny(unsafe_code)]

pub mod app;
pub mod auth;
pub mod config;
pub mod domain;
pub mod grpc;
pub mod linger;
pub mod metrics;
pub mod proto;
pub mod relay;
pub mod storage;
pub mod telemetry;
