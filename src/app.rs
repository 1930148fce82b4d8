//! Start-up: connect, migrate, wire health, reflection and the service, serve
//! until shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tonic::transport::server::TcpIncoming;

use crate::linger::Lingering;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;
use tracing::{info, warn};

use tower::layer::util::{Identity as NoLayer, Stack};
use tower_http::catch_panic::CatchPanicLayer;

use crate::auth::AuthLayer;
use crate::config::Settings;
use crate::domain::events::{EventRepository, Events};
use crate::domain::{Groups, UserRepository, Users};
use crate::grpc::events::{EventServiceImpl, EventServiceServer};
use crate::grpc::groups::{GroupServiceImpl, GroupServiceServer};
use crate::grpc::overload::{Limits, LoadShedLayer};
use crate::grpc::trace::RpcTraceLayer;
use crate::grpc::{MAX_RESPONSE_BYTES, UserServiceImpl, UserServiceServer, panic_response};
use crate::proto::FILE_DESCRIPTOR_SET;
use crate::storage::{self, SeaOrmRepository};

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The name the health service reports the user service under.
pub const SERVICE_NAME: &str = "users.v1.UserService";
/// Served beside UserService, on the same database.
pub const GROUP_SERVICE_NAME: &str = "users.v1.GroupService";
pub const EVENT_SERVICE_NAME: &str = "users.v1.EventService";

/// Connects to the database and applies migrations.
pub async fn open_database(settings: &Settings) -> Result<SeaOrmRepository, BoxError> {
    let url = &settings.database_url;
    let postgres = url.starts_with("postgres");
    // Migrations may build indexes for minutes: on PostgreSQL they run on a
    // connection of their own, without the serving pool's statement timeout.
    let db = if postgres {
        // Two: one holds the advisory lock, the other migrates.
        let admin = storage::connect(url, 2)
            .await
            .map_err(|e| format!("cannot open the database: {e}"))?;
        storage::migrate(&admin)
            .await
            .map_err(|e| format!("cannot migrate the database: {e}"))?;
        admin.close().await.ok();
        // A statement may run as long as a call may, and a little more.
        let limit = settings.request_timeout + std::time::Duration::from_secs(5);
        storage::connect_with(
            url,
            settings.db_max_connections,
            Some(limit),
            settings.db_timeout,
        )
        .await
        .map_err(|e| format!("cannot open the database: {e}"))?
    } else {
        let db = storage::connect_with(url, settings.db_max_connections, None, settings.db_timeout)
            .await
            .map_err(|e| format!("cannot open the database: {e}"))?;
        storage::migrate(&db)
            .await
            .map_err(|e| format!("cannot migrate the database: {e}"))?;
        db
    };
    Ok(SeaOrmRepository::new(db, crate::grpc::events::encode_event)
        .with_sqlite_readers(url)
        .with_heavy_read_limit((settings.db_max_connections / 2).max(1) as usize))
}

/// Binds `settings.listen` and serves until `shutdown` resolves.
pub async fn run(
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), BoxError> {
    let listener = TcpListener::bind(settings.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", settings.listen))?;
    serve(settings, listener, shutdown).await
}

/// Serves on an already bound listener (tests bind 127.0.0.1:0 first).
pub async fn serve(
    settings: Settings,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), BoxError> {
    let addr: SocketAddr = listener.local_addr()?;
    let auth = settings.auth();
    check_exposure(addr, auth.enabled(), settings.insecure_no_auth)?;
    let tls = tls_config(&settings)?;
    if let Some(metrics) = settings.metrics_listen {
        crate::metrics::install(metrics)?;
    }
    let verifier = auth.verifier().await?;
    let repo = open_database(&settings).await?;
    let groups = Arc::new(Groups::new(repo.clone()));
    let events = Arc::new(Events::new(repo.clone(), settings.event_retention));
    let users = Arc::new(Users::new(repo, settings.delete_retention));

    let (mut reporter, health) = tonic_health::server::health_reporter();
    set_health(&reporter, ServingStatus::Serving).await;

    let prober = tokio::spawn(watch_database(
        users.clone(),
        reporter.clone(),
        settings.health_interval,
    ));
    let purger = tokio::spawn(purge_loop(
        users.clone(),
        events.clone(),
        settings.purge_interval,
    ));
    let mut tasks = vec![prober.abort_handle(), purger.abort_handle()];
    if let Some(url) = &settings.events_nats_url {
        let relay = crate::relay::Relay::new(
            events.clone(),
            url.clone(),
            settings.events_nats_subject_prefix.clone(),
            settings.database_url.clone(),
            settings.event_retention,
        );
        tasks.push(tokio::spawn(relay.run()).abort_handle());
    }
    let background = Background(tasks);

    // Reflection knows the error detail types too, so tools such as grpcurl
    // can decode google.rpc.BadRequest and friends.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection()
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let reflection_v1alpha = reflection()
        .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET)
        .build_v1alpha()?;

    // Raised when the server stops taking calls: open streams end then.
    let (drain_tx, drain_rx) = tokio::sync::watch::channel(false);
    let service = UserServiceServer::new(UserServiceImpl::new(users.clone(), drain_rx.clone()))
        .max_decoding_message_size(settings.max_request_bytes)
        .max_encoding_message_size(MAX_RESPONSE_BYTES);
    let group_service = GroupServiceServer::new(GroupServiceImpl::new(groups))
        .max_decoding_message_size(settings.max_request_bytes)
        .max_encoding_message_size(MAX_RESPONSE_BYTES);
    let event_service =
        EventServiceServer::new(EventServiceImpl::new(events.clone(), drain_rx.clone()))
            .max_decoding_message_size(settings.max_request_bytes)
            .max_encoding_message_size(MAX_RESPONSE_BYTES);
    info!(%addr, tls = tls.is_some(), auth = auth.enabled(), "serving users.v1.UserService");
    let mut builder = Server::builder();
    if let Some(tls) = tls {
        builder = builder
            .tls_config(tls)
            .map_err(|e| format!("cannot use the TLS settings: {e}"))?;
    }
    // Raised a moment after `drain_tx`: the server stops taking connections
    // and closes each once its calls are done.
    let (stop_tx, mut stopped) = tokio::sync::watch::channel(false);
    // Connections closing (see `linger`): waited for before the process exits.
    let closes = tokio_util::task::TaskTracker::new();
    let server = builder
        // A backstop behind the load-shed layer's own --request-timeout
        // (which answers DEADLINE_EXCEEDED first): also bounds the
        // authentication in front of it.
        .timeout(settings.request_timeout + std::time::Duration::from_secs(5))
        .max_concurrent_streams(settings.max_concurrent_streams)
        .http2_max_header_list_size(HEADER_LIST_BYTES)
        .layer(layers(verifier, settings.call_limits()))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(service)
        .add_service(group_service)
        .add_service(event_service)
        // Without TCP_NODELAY a response written in several pieces waits for
        // the client's delayed ACK (40 ms on Linux) between them.
        .serve_with_incoming_shutdown(
            {
                let closes = closes.clone();
                tokio_stream::StreamExt::map(
                    TcpIncoming::from(listener).with_nodelay(Some(true)),
                    move |accepted| accepted.map(|s| Lingering::new(s, closes.clone())),
                )
            },
            async move {
                let _ = stopped.wait_for(|d| *d).await;
            },
        );
    tokio::pin!(server);
    tokio::pin!(shutdown);
    // A clean stop: NOT_SERVING at once, calls still taken for the delay,
    // then no new connections, open streams told to resume elsewhere, and
    // the calls in flight given the grace period.
    let result = tokio::select! {
        r = &mut server => r,
        () = &mut shutdown => {
            // The prober must not turn health back to SERVING meanwhile.
            background.abort();
            set_health(&reporter, ServingStatus::NotServing).await;
            info!(delay = ?settings.shutdown_delay, "shutting down: NOT_SERVING, still serving for the delay");
            match tokio::time::timeout(settings.shutdown_delay, &mut server).await {
                Ok(r) => r,
                Err(_) => {
                    let _ = drain_tx.send(true);
                    // Open streams end first, with their resume token, and
                    // the clients read those trailers before the connection
                    // closes: a socket closed while the peer's last frames
                    // are unread is reset, and the reset can destroy the
                    // trailers still on their way.
                    match tokio::time::timeout(STREAM_LINGER, &mut server).await {
                        Ok(r) => r,
                        Err(_) => finish_calls(&mut server, &stop_tx, &mut reporter, &settings).await,
                    }
                }
            }
        }
    };
    background.abort();
    set_health(&reporter, ServingStatus::NotServing).await;
    closes.close();
    let _ = tokio::time::timeout(crate::linger::LINGER, closes.wait()).await;
    result?;
    if let Err(e) = users.repository().checkpoint().await {
        warn!(error = %e, "WAL checkpoint at stop failed");
    }
    info!("stopped");
    Ok(())
}

/// Stops taking connections and gives the calls in flight the grace period.
async fn finish_calls<F>(
    server: &mut std::pin::Pin<&mut F>,
    stop_tx: &tokio::sync::watch::Sender<bool>,
    reporter: &mut HealthReporter,
    settings: &Settings,
) -> Result<(), tonic::transport::Error>
where
    F: std::future::Future<Output = Result<(), tonic::transport::Error>>,
{
    let _ = stop_tx.send(true);
    // Health Watch streams end too (they would hold the grace period open).
    reporter.clear_service_status("").await;
    reporter.clear_service_status(SERVICE_NAME).await;
    reporter.clear_service_status(GROUP_SERVICE_NAME).await;
    reporter.clear_service_status(EVENT_SERVICE_NAME).await;
    info!(grace = ?settings.shutdown_grace, "shutting down: no new connections; finishing calls in flight");
    match tokio::time::timeout(settings.shutdown_grace, server.as_mut()).await {
        Ok(r) => r,
        Err(_) => {
            warn!("calls still running after the grace period: stopping them");
            Ok(())
        }
    }
}

/// How long open streams have, after being told to end, before connections
/// start closing (see `serve`).
const STREAM_LINGER: std::time::Duration = std::time::Duration::from_millis(250);

/// Background tasks of one server, stopped when it stops.
struct Background(Vec<tokio::task::AbortHandle>);

impl Background {
    fn abort(&self) {
        self.0.iter().for_each(tokio::task::AbortHandle::abort);
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.abort();
    }
}

type PanicHandler = fn(Box<dyn std::any::Any + Send>) -> http::Response<tonic::body::Body>;

/// The layers in front of every service.
pub type Layers = Stack<
    LoadShedLayer,
    Stack<AuthLayer, Stack<CatchPanicLayer<PanicHandler>, Stack<RpcTraceLayer, NoLayer>>>,
>;

/// Outermost first: the trace sees every outcome (and counts it in the
/// metrics), a panic anywhere below answers INTERNAL, only authenticated
/// calls go further, and those beyond the server's capacity are shed before
/// any work is spent on them (and the rest bounded by --request-timeout).
pub fn layers(verifier: Option<Arc<crate::auth::Verifier>>, limits: Limits) -> Layers {
    tower::ServiceBuilder::new()
        .layer(RpcTraceLayer)
        .layer(CatchPanicLayer::custom(panic_response as PanicHandler))
        .layer(AuthLayer::new(verifier))
        .layer(LoadShedLayer::new(limits))
        .into_inner()
}

/// Most bytes of request headers (a bearer token is at most 8 KiB).
const HEADER_LIST_BYTES: u32 = 16 * 1024;

/// Without authentication the server only serves on a loopback address,
/// unless the operator insists.
fn check_exposure(addr: SocketAddr, auth: bool, insecure: bool) -> Result<(), BoxError> {
    if auth {
        return Ok(());
    }
    if addr.ip().is_loopback() {
        warn!(
            %addr,
            "no authentication configured: any process on this machine may read and change \
             every project; set --auth-jwt-secret-file, --auth-jwks-file or --auth-jwks-url \
             before serving other machines"
        );
        return Ok(());
    }
    if insecure {
        warn!(
            %addr,
            "no authentication configured and --insecure-no-auth given: anyone who reaches \
             this address may read and change every project"
        );
        return Ok(());
    }
    Err(format!(
        "refusing to serve on {addr} without authentication: set --auth-jwt-secret-file, \
         --auth-jwks-file or --auth-jwks-url (or --insecure-no-auth on a trusted network)"
    )
    .into())
}

/// The TLS configuration the settings ask for, if any.
fn tls_config(settings: &Settings) -> Result<Option<ServerTlsConfig>, BoxError> {
    let (Some(cert), Some(key)) = (&settings.tls_cert, &settings.tls_key) else {
        return Ok(None);
    };
    let read = |p: &std::path::PathBuf, what: &str| {
        std::fs::read(p).map_err(|e| format!("cannot read the {what} {}: {e}", p.display()))
    };
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(
        read(cert, "TLS certificate")?,
        read(key, "TLS key")?,
    ));
    if let Some(ca) = &settings.tls_client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(read(ca, "client CA")?));
    }
    Ok(Some(tls))
}

async fn set_health(reporter: &HealthReporter, status: ServingStatus) {
    reporter.set_service_status("", status).await;
    reporter.set_service_status(SERVICE_NAME, status).await;
    reporter
        .set_service_status(GROUP_SERVICE_NAME, status)
        .await;
    reporter
        .set_service_status(EVENT_SERVICE_NAME, status)
        .await;
}

/// Probes the database: NOT_SERVING while it does not answer.
async fn watch_database<R: UserRepository>(
    users: Arc<Users<R>>,
    reporter: HealthReporter,
    every: std::time::Duration,
) {
    let mut serving = true;
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        // A database that does not answer within the interval is down (a
        // ping to a stopped server can otherwise wait for the TCP timeout).
        let probe = every.clamp(
            std::time::Duration::from_millis(100),
            std::time::Duration::from_secs(1),
        );
        let up = matches!(
            tokio::time::timeout(probe, users.repository().ping()).await,
            Ok(Ok(()))
        );
        if up != serving {
            serving = up;
            if up {
                info!("database reachable again: SERVING");
                set_health(&reporter, ServingStatus::Serving).await;
            } else {
                warn!("database unreachable: NOT_SERVING");
                set_health(&reporter, ServingStatus::NotServing).await;
            }
        }
        crate::metrics::database_up(up);
        users.repository().report_pool_use();
    }
}

/// Erases soft-deleted users whose retention has run out, every `every`.
/// Replicas may purge at the same time: each user is deleted in a statement
/// that re-checks its purge time, so only one of them counts it.
async fn purge_loop<R: UserRepository + EventRepository>(
    users: Arc<Users<R>>,
    events: Arc<Events<R>>,
    every: std::time::Duration,
) {
    let mut interval = tokio::time::interval(every);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    interval.tick().await;
    loop {
        interval.tick().await;
        match users.purge_expired().await {
            Ok(0) => {}
            Ok(n) => {
                crate::metrics::purged(n);
                info!(purged = n, "purged soft-deleted users past retention");
            }
            Err(e) => warn!(error = %e, "purge failed"),
        }
        // Safe on several replicas at once: each compaction removes a prefix
        // of a log and raises its mark in one transaction.
        match events.compact().await {
            Ok(0) => {}
            Ok(n) => info!(compacted = n, "compacted change events past retention"),
            Err(e) => warn!(error = %e, "event compaction failed"),
        }
    }
}
