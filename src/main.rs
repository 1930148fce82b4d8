use std::process::ExitCode;

use clap::Parser;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use user_service::app::{self, BoxError};
use user_service::config::{Cli, Command};
use user_service::{storage, telemetry};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // Flushes the trace exporter when main returns.
    let _telemetry = match telemetry::init(cli.log_format, cli.otlp_endpoint.as_deref()) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("user-service: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(Command::Token {
        secret_file,
        projects,
        scope,
        ttl,
        subject,
        issuer,
        audience,
    }) = &cli.command
    {
        let s = &cli.settings;
        let Some(secret_file) = secret_file.as_ref().or(s.auth_jwt_secret_file.as_ref()) else {
            eprintln!("user-service token: --secret-file (or --auth-jwt-secret-file) is required");
            return ExitCode::from(2);
        };
        let request = user_service::auth::mint::TokenRequest {
            secret_file,
            projects,
            scope,
            ttl: *ttl,
            subject,
            issuer: issuer.as_deref().or(s.auth_issuer.as_deref()),
            audience: audience.as_deref().or(s.auth_audience.as_deref()),
        };
        return match user_service::auth::mint::mint(&request) {
            Ok(token) => {
                println!("{token}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("user-service token: {e}");
                ExitCode::from(2)
            }
        };
    }
    let result = match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => app::run(cli.settings, shutdown_signal()).await,
        Command::Migrate => migrate(&cli.settings.database_url).await,
        Command::Token { .. } => Ok(()),
        Command::Healthcheck { addr, timeout } => {
            return match tokio::time::timeout(timeout, healthcheck(addr)).await {
                Ok(Ok(())) => ExitCode::SUCCESS,
                Ok(Err(e)) => {
                    eprintln!("unhealthy: {e}");
                    ExitCode::FAILURE
                }
                Err(_) => {
                    eprintln!("unhealthy: no answer within {timeout:?}");
                    ExitCode::FAILURE
                }
            };
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // One line, whatever the log format: the reason the process stopped.
        Err(e) => {
            eprintln!("user-service: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn migrate(url: &str) -> Result<(), BoxError> {
    let db = storage::connect(url, 2).await?;
    storage::migrate(&db).await?;
    tracing::info!("migrations applied");
    Ok(())
}

async fn healthcheck(addr: String) -> Result<(), BoxError> {
    let addr = if addr.contains("://") {
        addr
    } else {
        format!("http://{addr}")
    };
    let channel = tonic::transport::Channel::from_shared(addr)?
        .connect()
        .await?;
    let mut client = HealthClient::new(channel);
    let status = client
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await?
        .into_inner()
        .status();
    if status == ServingStatus::Serving {
        Ok(())
    } else {
        Err(format!("server reports {status:?}").into())
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
