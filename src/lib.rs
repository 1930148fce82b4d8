//! user-service: the owner of a system's end users, spoken to over gRPC.

#![forbid(unsafe_code)]

pub mod app;
pub mod auth;
pub mod config;
pub mod domain;
pub mod grpc;
pub mod proto;
pub mod storage;
pub mod telemetry;
