//! Command line and environment configuration: every flag is also an env var.

use std::net::SocketAddr;
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

    /// How long a soft-deleted user is kept before it is purged (e.g. 30d, 12h).
    #[arg(long, env = "USER_SERVICE_DELETE_RETENTION", default_value = "30d", value_parser = humantime::parse_duration, global = true)]
    pub delete_retention: Duration,

    /// Longest time one RPC may take before it fails with DEADLINE_EXCEEDED.
    #[arg(long, env = "USER_SERVICE_REQUEST_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration, global = true)]
    pub request_timeout: Duration,

    /// How often the database is probed for the health service.
    #[arg(long, env = "USER_SERVICE_HEALTH_INTERVAL", default_value = "2s", value_parser = humantime::parse_duration, global = true)]
    pub health_interval: Duration,
}

impl Settings {
    /// Settings for a server on `database_url` with every other value at its default.
    pub fn for_database(database_url: impl Into<String>) -> Self {
        let mut s = Cli::parse_from(["user-service"]).settings;
        s.database_url = database_url.into();
        s
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}
