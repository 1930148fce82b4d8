//! Command line and environment configuration: every flag is also an env var.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "user-service",
    version,
    about = "User-management microservice spoken to over gRPC (users.v1.UserService).",
    long_about = "User-management microservice spoken to over gRPC (users.v1.UserService).\n\n\
                  Without a subcommand it serves. Data lives in a SQLite file in the working \
                  directory unless DATABASE_URL points at PostgreSQL; migrations are applied \
                  at start-up."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub settings: Settings,

    /// Log output format.
    #[arg(long, env = "USER_SERVICE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    /// Export the spans of every RPC as OpenTelemetry traces to this OTLP/HTTP
    /// collector (e.g. http://otel-collector:4318; sent to /v1/traces),
    /// continuing the W3C trace context (`traceparent`) of each call.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", global = true)]
    pub otlp_endpoint: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve gRPC (the default).
    Serve,
    /// Apply pending database migrations and exit.
    Migrate,
    /// Ask a running server's health service; exit 0 only if it answers SERVING.
    Healthcheck {
        /// Address of the server.
        #[arg(
            long,
            env = "USER_SERVICE_HEALTHCHECK_ADDR",
            default_value = "http://127.0.0.1:50051"
        )]
        addr: String,
        /// Give up after this long.
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Print a signed HS256 token for operators and scripts, e.g.
    /// TOKEN=$(user-service token --secret-file secret --project acme --scope "users.read users.write").
    Token {
        /// The shared secret (the server's --auth-jwt-secret-file when omitted).
        #[arg(long)]
        secret_file: Option<PathBuf>,
        /// A project the token grants; repeat for several, or '*' for all.
        #[arg(long = "project", required = true)]
        projects: Vec<String>,
        /// Space-separated scopes: users.read, users.write, users.admin.
        #[arg(long)]
        scope: String,
        /// How long the token is valid.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// The caller's identity (`sub`), as logs and audit events name it.
        #[arg(long, default_value = "operator")]
        subject: String,
        /// The `iss` claim (the server's --auth-issuer when omitted).
        #[arg(long)]
        issuer: Option<String>,
        /// The `aud` claim (the server's --auth-audience when omitted).
        #[arg(long)]
        audience: Option<String>,
    },
}

/// What the server needs to run.
#[derive(Clone, Debug, clap::Args)]
pub struct Settings {
    /// Address to listen on for gRPC.
    #[arg(
        long,
        env = "USER_SERVICE_LISTEN",
        default_value = "127.0.0.1:50051",
        global = true
    )]
    pub listen: SocketAddr,

    /// Database: a sqlite:// file (created when missing) or a postgres:// URL.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "sqlite://user-service.db?mode=rwc",
        hide_env_values = true,
        global = true
    )]
    pub database_url: String,

    /// Most database connections the pool opens.
    #[arg(
        long,
        env = "USER_SERVICE_DB_MAX_CONNECTIONS",
        default_value_t = 16,
        global = true
    )]
    pub db_max_connections: u32,

    /// How long connecting to the database, or waiting for a free pooled
    /// connection, may take before a call fails with UNAVAILABLE.
    #[arg(long, env = "USER_SERVICE_DB_TIMEOUT", default_value = "5s", value_parser = positive_duration, global = true)]
    pub db_timeout: Duration,

    /// How long a soft-deleted user is kept before it is purged (e.g. 30d, 12h).
    #[arg(long, env = "USER_SERVICE_DELETE_RETENTION", default_value = "30d", value_parser = humantime::parse_duration, global = true)]
    pub delete_retention: Duration,

    /// Longest time one RPC may take before it fails with DEADLINE_EXCEEDED.
    #[arg(long, env = "USER_SERVICE_REQUEST_TIMEOUT", default_value = "30s", value_parser = positive_duration, global = true)]
    pub request_timeout: Duration,

    /// After SIGTERM/SIGINT: how long the server keeps accepting calls while
    /// its health already says NOT_SERVING (so load balancers move away).
    #[arg(long, env = "USER_SERVICE_SHUTDOWN_DELAY", default_value = "2s", value_parser = humantime::parse_duration, global = true)]
    pub shutdown_delay: Duration,

    /// Then: how long calls in flight may take to finish before the server
    /// stops anyway. Open streams end at once with UNAVAILABLE and the
    /// token to resume them.
    #[arg(long, env = "USER_SERVICE_SHUTDOWN_GRACE", default_value = "25s", value_parser = humantime::parse_duration, global = true)]
    pub shutdown_grace: Duration,

    /// How often the database is probed for the health service.
    #[arg(long, env = "USER_SERVICE_HEALTH_INTERVAL", default_value = "1s", value_parser = positive_duration, global = true)]
    pub health_interval: Duration,

    /// HS256 tokens: a file holding the shared secret (trailing whitespace
    /// is ignored).
    #[arg(long, env = "USER_SERVICE_AUTH_JWT_SECRET_FILE", global = true)]
    pub auth_jwt_secret_file: Option<PathBuf>,

    /// RS256/ES256 tokens: a file holding the issuer's public keys (JWKS).
    #[arg(long, env = "USER_SERVICE_AUTH_JWKS_FILE", global = true)]
    pub auth_jwks_file: Option<PathBuf>,

    /// RS256/ES256 tokens: the issuer's JWKS URL, fetched at start, every 10
    /// minutes, and when a token names an unknown kid (at most every 30 s).
    #[arg(long, env = "USER_SERVICE_AUTH_JWKS_URL", global = true)]
    pub auth_jwks_url: Option<String>,

    /// Required `iss` of every token (not checked when unset).
    #[arg(long, env = "USER_SERVICE_AUTH_ISSUER", global = true)]
    pub auth_issuer: Option<String>,

    /// Required `aud` of every token (not checked when unset).
    #[arg(long, env = "USER_SERVICE_AUTH_AUDIENCE", global = true)]
    pub auth_audience: Option<String>,

    /// Clock skew allowed when checking `exp` and `nbf`.
    #[arg(long, env = "USER_SERVICE_AUTH_LEEWAY", default_value = "30s", value_parser = humantime::parse_duration, global = true)]
    pub auth_leeway: Duration,

    /// Serve without authentication on a non-loopback address (every caller
    /// may do everything in every project). Only for trusted networks.
    #[arg(long, env = "USER_SERVICE_INSECURE_NO_AUTH", global = true)]
    pub insecure_no_auth: bool,

    /// Serve TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(
        long,
        env = "USER_SERVICE_TLS_CERT",
        requires = "tls_key",
        global = true
    )]
    pub tls_cert: Option<PathBuf>,

    /// The private key (PEM) of --tls-cert.
    #[arg(
        long,
        env = "USER_SERVICE_TLS_KEY",
        requires = "tls_cert",
        global = true
    )]
    pub tls_key: Option<PathBuf>,

    /// Require client certificates signed by this CA (PEM): mutual TLS.
    #[arg(
        long,
        env = "USER_SERVICE_TLS_CLIENT_CA",
        requires = "tls_cert",
        global = true
    )]
    pub tls_client_ca: Option<PathBuf>,

    /// Largest request message accepted (larger ones are RESOURCE_EXHAUSTED
    /// before they are decoded).
    #[arg(long, env = "USER_SERVICE_MAX_REQUEST_BYTES", default_value_t = 4 * 1024 * 1024, global = true)]
    pub max_request_bytes: usize,

    /// Most concurrent calls (HTTP/2 streams) one connection may have open.
    #[arg(
        long,
        env = "USER_SERVICE_MAX_CONCURRENT_STREAMS",
        default_value_t = 256,
        global = true
    )]
    pub max_concurrent_streams: u32,

    /// Most UserService calls the server works on at once; more wait in a
    /// queue (see --max-queued-calls). Health and reflection are not counted.
    #[arg(
        long,
        env = "USER_SERVICE_MAX_IN_FLIGHT",
        default_value_t = 64,
        value_parser = clap::value_parser!(u32).range(1..),
        global = true
    )]
    pub max_in_flight: u32,

    /// Most calls waiting for one of the --max-in-flight slots; a call that
    /// finds the queue full, or waits longer than --max-queue-wait, is
    /// refused at once with RESOURCE_EXHAUSTED (reason OVERLOADED). A waiting
    /// call costs a few hundred bytes; the default lets 4 connections x 32
    /// streams queue without a refusal.
    #[arg(
        long,
        env = "USER_SERVICE_MAX_QUEUED_CALLS",
        default_value_t = 256,
        global = true
    )]
    pub max_queued_calls: u32,

    /// Longest a call waits in the queue before it is refused as OVERLOADED.
    #[arg(long, env = "USER_SERVICE_MAX_QUEUE_WAIT", default_value = "500ms", value_parser = humantime::parse_duration, global = true)]
    pub max_queue_wait: Duration,

    /// Serve Prometheus metrics on this address (http://ADDR/metrics); off
    /// when unset.
    #[arg(long, env = "USER_SERVICE_METRICS_LISTEN", global = true)]
    pub metrics_listen: Option<SocketAddr>,

    /// How often soft-deleted users past their retention are purged.
    #[arg(long, env = "USER_SERVICE_PURGE_INTERVAL", default_value = "60s", value_parser = positive_duration, global = true)]
    pub purge_interval: Duration,

    /// How long change events are kept (EventService); older ones are
    /// compacted away, every --purge-interval.
    #[arg(long, env = "USER_SERVICE_EVENT_RETENTION", default_value = "7d", value_parser = positive_duration, global = true)]
    pub event_retention: Duration,

    /// Publish every change event to this NATS server's JetStream (e.g.
    /// nats://127.0.0.1:4222); off when unset.
    #[arg(long, env = "USER_SERVICE_EVENTS_NATS_URL", global = true)]
    pub events_nats_url: Option<String>,

    /// Subject prefix of published events: each goes to `{prefix}.{project}`;
    /// the relay creates a stream for `{prefix}.>` if none covers it.
    #[arg(long, env = "USER_SERVICE_EVENTS_NATS_SUBJECT_PREFIX", default_value = "users.events", value_parser = subject_prefix, global = true)]
    pub events_nats_subject_prefix: String,
}

impl Settings {
    /// The authentication part of the settings.
    pub fn auth(&self) -> crate::auth::AuthSettings {
        crate::auth::AuthSettings {
            jwt_secret_file: self.auth_jwt_secret_file.clone(),
            jwks_file: self.auth_jwks_file.clone(),
            jwks_url: self.auth_jwks_url.clone(),
            issuer: self.auth_issuer.clone(),
            audience: self.auth_audience.clone(),
            leeway: self.auth_leeway,
        }
    }

    /// The load-shedding limits.
    pub fn call_limits(&self) -> crate::grpc::overload::Limits {
        crate::grpc::overload::Limits {
            max_in_flight: self.max_in_flight as usize,
            max_queued: self.max_queued_calls as usize,
            max_wait: self.max_queue_wait,
            request_timeout: self.request_timeout,
        }
    }

    /// Settings for a server on `database_url` with every other value at its default.
    pub fn for_database(database_url: impl Into<String>) -> Self {
        let mut s = Cli::parse_from(["user-service"]).settings;
        s.database_url = database_url.into();
        s
    }
}

/// A NATS subject prefix: dot-separated tokens, no wildcards or spaces.
fn subject_prefix(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.split('.').all(|t| {
            !t.is_empty()
                && t.chars()
                    .all(|c| c.is_ascii_graphic() && c != '*' && c != '>')
        });
    if ok {
        Ok(s.to_owned())
    } else {
        Err("must be dot-separated tokens without spaces or wildcards, e.g. users.events".into())
    }
}

/// A duration that must not be zero (an interval or a timeout).
fn positive_duration(s: &str) -> Result<Duration, String> {
    match humantime::parse_duration(s) {
        Ok(d) if d.is_zero() => Err("must be more than zero".into()),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}
