//! Prometheus metrics (the `metrics` facade, exposed by
//! metrics-exporter-prometheus on `--metrics-listen`).
//!
//! Every name is defined here once; the rest of the code calls the small
//! functions below. Without `--metrics-listen` no recorder is installed and
//! each call is a no-op.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
use prost::Message;

const HANDLED: &str = "grpc_server_handled_total";
const HANDLING_SECONDS: &str = "grpc_server_handling_seconds";
const IN_FLIGHT: &str = "grpc_server_in_flight";
const SHED: &str = "user_service_calls_shed_total";
const DB_UP: &str = "user_service_database_up";
const POOL: &str = "user_service_db_pool_connections";
const POOL_MAX: &str = "user_service_db_pool_max_connections";
const READERS_IN_USE: &str = "user_service_sqlite_readers_in_use";
const CREATE_BATCH: &str = "user_service_create_batch_size";
const PURGED: &str = "user_service_purged_users_total";
const PUBLISHED: &str = "user_service_events_published_total";
const IMPORTED: &str = "user_service_imported_users_total";
const EXPORTED: &str = "user_service_exported_users_total";

/// Latency buckets, seconds: 100 µs to 30 s, fine enough below 100 ms for
/// a p99 read off the histogram to mean something.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01,
    0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Users per group commit.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// Serves `/metrics` on `addr` from now on. Fails if the address cannot be
/// bound or a recorder is already installed in this process.
pub fn install(addr: SocketAddr) -> Result<(), crate::app::BoxError> {
    let (recorder, exporter) = PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Full(HANDLING_SECONDS.into()), LATENCY_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full(CREATE_BATCH.into()), BATCH_BUCKETS)?
        .build()
        .map_err(|e| format!("cannot serve metrics on {addr}: {e}"))?;
    metrics::set_global_recorder(recorder)
        .map_err(|_| "a metrics recorder is already installed in this process")?;
    describe();
    tokio::spawn(async move {
        if let Err(e) = exporter.await {
            tracing::error!(error = ?e, "the metrics endpoint stopped");
        }
    });
    tracing::info!(%addr, "serving Prometheus metrics on /metrics");
    Ok(())
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        HANDLED,
        "RPCs completed, by method and the status code the client received"
    );
    describe_histogram!(
        HANDLING_SECONDS,
        Unit::Seconds,
        "RPC latency from the request's arrival to its last byte (trailers), by method and code"
    );
    describe_gauge!(IN_FLIGHT, "RPCs started and not yet finished, by method");
    describe_counter!(
        SHED,
        "UserService calls refused as OVERLOADED (queue full or waited too long)"
    );
    describe_gauge!(DB_UP, "1 while the database answers the health probe");
    describe_gauge!(
        POOL,
        "database pool connections by state (in_use, idle), sampled every health interval"
    );
    describe_gauge!(POOL_MAX, "most connections the database pool opens");
    describe_gauge!(
        READERS_IN_USE,
        "SQLite read-only connections in use, by pool (point, list, export)"
    );
    describe_histogram!(CREATE_BATCH, "CreateUser calls committed per group commit");
    describe_counter!(
        PURGED,
        "soft-deleted users this process purged after their retention"
    );
    describe_counter!(
        IMPORTED,
        "ImportUsers users settled, by outcome (created, failed)"
    );
    describe_counter!(EXPORTED, "users sent by StreamUsers");
    describe_counter!(
        PUBLISHED,
        "change events the relay published to NATS and JetStream acknowledged"
    );
}

/// The gRPC methods this server serves, "/package.Service/Method": label
/// values come only from this set (anything else is "unknown"), so a
/// client cannot grow the metrics without bound.
fn known_methods() -> &'static HashSet<String> {
    static KNOWN: OnceLock<HashSet<String>> = OnceLock::new();
    KNOWN.get_or_init(|| {
        let sets: [&[u8]; 4] = [
            crate::proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ];
        let mut known = HashSet::new();
        for set in sets {
            let Ok(set) = prost_types::FileDescriptorSet::decode(set) else {
                continue;
            };
            for file in set.file {
                let package = file.package();
                for service in &file.service {
                    for method in &service.method {
                        known.insert(format!("/{package}.{}/{}", service.name(), method.name()));
                    }
                }
            }
        }
        known
    })
}

/// The labels of one RPC: service and method, or "unknown" for a path this
/// server does not serve.
#[derive(Clone, Debug)]
pub struct RpcLabels {
    service: &'static str,
    method: &'static str,
}

impl RpcLabels {
    pub fn of_path(path: &str) -> Self {
        let known = known_methods();
        match known.get(path).and_then(|p| p[1..].split_once('/')) {
            // Strings of a set that lives as long as the process.
            Some((service, method)) => RpcLabels { service, method },
            None => RpcLabels {
                service: "unknown",
                method: "unknown",
            },
        }
    }

    fn labels(&self) -> [(&'static str, &'static str); 2] {
        [("grpc_service", self.service), ("grpc_method", self.method)]
    }
}

pub fn rpc_started(rpc: &RpcLabels) {
    gauge!(IN_FLIGHT, &rpc.labels()).increment(1.0);
}

/// An RPC ended with `code`, as its client received it.
pub fn rpc_finished(rpc: &RpcLabels, code: tonic::Code, latency: Duration) {
    gauge!(IN_FLIGHT, &rpc.labels()).decrement(1.0);
    let [s, m] = rpc.labels();
    let labels = [s, m, ("grpc_code", crate::grpc::audit::code_name(code))];
    counter!(HANDLED, &labels).increment(1);
    histogram!(HANDLING_SECONDS, &labels).record(latency.as_secs_f64());
}

pub fn call_shed() {
    counter!(SHED).increment(1);
}

pub fn database_up(up: bool) {
    gauge!(DB_UP).set(if up { 1.0 } else { 0.0 });
}

/// The sea-orm pool's connections.
pub fn pool_use(in_use: usize, idle: usize, max: u32) {
    gauge!(POOL, "state" => "in_use").set(in_use as f64);
    gauge!(POOL, "state" => "idle").set(idle as f64);
    gauge!(POOL_MAX).set(f64::from(max));
}

/// SQLite readers of one pool (`point`, `list`, `export`) in use.
pub fn readers_in_use(pool: &'static str, n: usize) {
    gauge!(READERS_IN_USE, "pool" => pool).set(n as f64);
}

pub fn create_batch(users: usize) {
    histogram!(CREATE_BATCH).record(users as f64);
}

pub fn events_published(n: i64) {
    counter!(PUBLISHED).increment(n.max(0) as u64);
}

pub fn purged(users: u64) {
    counter!(PURGED).increment(users);
}

pub fn imported(created: u64, failed: u64) {
    counter!(IMPORTED, "outcome" => "created").increment(created);
    counter!(IMPORTED, "outcome" => "failed").increment(failed);
}

pub fn exported(users: u64) {
    counter!(EXPORTED).increment(users);
}
