//! Spawns the real server on 127.0.0.1:0 with a database of its own and hands
//! back a typed client.

use std::time::Duration;

use sea_orm::{ConnectionTrait, Database};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_types::StatusExt;
use user_service::config::Settings;
use user_service::proto::users::v1 as pb;
use user_service::proto::users::v1::event_service_client::EventServiceClient;
use user_service::proto::users::v1::group_service_client::GroupServiceClient;
use user_service::proto::users::v1::user_service_client::UserServiceClient;

pub use pb::User;

/// Adds `authorization: Bearer <token>` to every call (nothing without one).
#[derive(Clone, Default)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Bearer {
    pub fn new(token: Option<&str>) -> Self {
        Bearer(token.map(|t| format!("Bearer {t}").parse().expect("ascii token")))
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// The client every test uses: the generated stub on a channel, with the
/// server's default token when it requires one.
pub type Client = UserServiceClient<InterceptedService<Channel, Bearer>>;

/// The GroupService stub, as `Client`.
pub type Groups = GroupServiceClient<InterceptedService<Channel, Bearer>>;

/// The EventService stub, as `Client`.
pub type Events = EventServiceClient<InterceptedService<Channel, Bearer>>;

/// A shared HS256 secret in a file of its own, and tokens signed with it.
pub struct AuthKeys {
    _dir: tempfile::TempDir,
    pub secret_file: std::path::PathBuf,
}

impl AuthKeys {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let secret_file = dir.path().join("jwt-secret");
        let secret: String = (0..48).map(|_| fastrand::alphanumeric()).collect();
        std::fs::write(&secret_file, format!("{secret}\n")).expect("write secret");
        AuthKeys {
            _dir: dir,
            secret_file,
        }
    }

    /// A token for `projects` ("*" for all) with space-separated `scope`,
    /// valid for an hour, subject `test`.
    pub fn token(&self, projects: &[&str], scope: &str) -> String {
        self.token_as("test", projects, scope)
    }

    pub fn token_as(&self, subject: &str, projects: &[&str], scope: &str) -> String {
        let projects: Vec<String> = projects.iter().map(|p| (*p).to_owned()).collect();
        user_service::auth::mint::mint(&user_service::auth::mint::TokenRequest {
            secret_file: &self.secret_file,
            projects: &projects,
            scope,
            ttl: Duration::from_secs(3600),
            subject,
            issuer: None,
            audience: None,
        })
        .expect("mint token")
    }
}

impl Default for AuthKeys {
    fn default() -> Self {
        Self::new()
    }
}

/// Every scope, spelled as a token's `scope` claim.
pub const ALL_SCOPES: &str = "users.read users.write users.admin";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Engine {
    Sqlite,
    Postgres,
}

/// Generates one `#[tokio::test]` per engine for each named `async fn(Engine)`.
/// PostgreSQL tests need TEST_DATABASE_URL; without it they are skipped, except
/// under CI=true, where that is a failure.
#[macro_export]
macro_rules! both_engines {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name($crate::harness::Engine::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    if $crate::harness::postgres_url().is_some() {
                        super::$name($crate::harness::Engine::Postgres).await
                    }
                }
            )*
        }
    };
}

/// The PostgreSQL server to test against, if any.
pub fn postgres_url() -> Option<String> {
    match std::env::var("TEST_DATABASE_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ => {
            assert!(
                std::env::var("CI").is_err(),
                "CI is set but TEST_DATABASE_URL is not: the PostgreSQL tests would not run"
            );
            eprintln!("TEST_DATABASE_URL not set: PostgreSQL test skipped");
            None
        }
    }
}

/// A database of one test: a SQLite file in a temporary directory, or a fresh
/// PostgreSQL schema dropped when the test ends.
pub struct TestDb {
    pub url: String,
    _dir: Option<tempfile::TempDir>,
    pg_schema: Option<(String, String)>,
}

impl TestDb {
    pub async fn new(engine: Engine) -> Self {
        match engine {
            Engine::Sqlite => {
                let dir = tempfile::tempdir().expect("tempdir");
                let url = format!("sqlite://{}/users.db?mode=rwc", dir.path().display());
                TestDb {
                    url,
                    _dir: Some(dir),
                    pg_schema: None,
                }
            }
            Engine::Postgres => {
                let base = postgres_url().expect("TEST_DATABASE_URL");
                let schema = format!("t_{}", uuid::Uuid::now_v7().simple());
                let admin = Database::connect(&base).await.expect("connect postgres");
                admin
                    .execute_unprepared(&format!("CREATE SCHEMA {schema}"))
                    .await
                    .expect("create schema");
                let sep = if base.contains('?') { '&' } else { '?' };
                TestDb {
                    url: format!("{base}{sep}options[search_path]={schema}"),
                    _dir: None,
                    pg_schema: Some((base, schema)),
                }
            }
        }
    }
}

impl TestDb {
    /// A database the test made and removes itself.
    pub fn at(url: String) -> Self {
        TestDb {
            url,
            _dir: None,
            pg_schema: None,
        }
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some((base, schema)) = self.pg_schema.take() {
            // Drop runs inside the test's runtime: clean up from a thread of
            // its own.
            let _ = std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async {
                    if let Ok(db) = Database::connect(&base).await {
                        let _ = db
                            .execute_unprepared(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                            .await;
                    }
                });
            })
            .join();
        }
    }
}

pub struct TestServer {
    pub channel: Channel,
    /// The token `client()` sends (None: the server runs without auth).
    pub token: Option<String>,
    pub addr: std::net::SocketAddr,
    shutdown: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
    pub db: TestDb,
}

impl TestServer {
    pub async fn start(engine: Engine) -> Self {
        Self::start_with(engine, |_| {}).await
    }

    pub async fn start_with(engine: Engine, tweak: impl FnOnce(&mut Settings)) -> Self {
        let db = TestDb::new(engine).await;
        Self::start_on(db, tweak).await
    }

    pub async fn start_on(db: TestDb, tweak: impl FnOnce(&mut Settings)) -> Self {
        let mut settings = Settings::for_database(db.url.clone());
        settings.db_max_connections = 8;
        // Tests fire bursts of calls to check correctness, not shedding
        // (tests/it/overload.rs sets its own limits).
        settings.max_in_flight = 1024;
        settings.max_queued_calls = 4096;
        // No load balancer to warn: stop at once.
        settings.shutdown_delay = Duration::ZERO;
        tweak(&mut settings);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (tx, rx) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            user_service::app::serve(settings, listener, async {
                let _ = rx.await;
            })
            .await
            .expect("server failed");
        });
        let channel = Channel::from_shared(format!("http://{addr}"))
            .expect("uri")
            .connect_timeout(Duration::from_secs(5))
            .connect_lazy();
        let server = TestServer {
            channel,
            token: None,
            addr,
            shutdown: Some(tx),
            task: Some(task),
            db,
        };
        server.wait_serving().await;
        server
    }

    /// The listener accepts at once; the service answers once migrations ran.
    async fn wait_serving(&self) {
        let mut health = tonic_health::pb::health_client::HealthClient::new(self.channel.clone());
        for _ in 0..300 {
            let req = tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            };
            if let Ok(r) = health.check(req).await
                && r.into_inner().status == 1
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("server did not become SERVING");
    }

    /// A server that requires tokens signed with `keys`; `client()` sends
    /// one granting every project and scope.
    pub async fn start_authed(engine: Engine, keys: &AuthKeys) -> Self {
        Self::start_authed_with(engine, keys, |_| {}).await
    }

    pub async fn start_authed_with(
        engine: Engine,
        keys: &AuthKeys,
        tweak: impl FnOnce(&mut Settings),
    ) -> Self {
        let secret = keys.secret_file.clone();
        let mut s = Self::start_with(engine, move |s| {
            s.auth_jwt_secret_file = Some(secret);
            tweak(s);
        })
        .await;
        s.token = Some(keys.token_as("admin", &["*"], ALL_SCOPES));
        s
    }

    pub fn client(&self) -> Client {
        UserServiceClient::with_interceptor(
            self.channel.clone(),
            Bearer::new(self.token.as_deref()),
        )
    }

    /// A GroupService client with the server's default token.
    pub fn groups(&self) -> Groups {
        GroupServiceClient::with_interceptor(
            self.channel.clone(),
            Bearer::new(self.token.as_deref()),
        )
    }

    /// A GroupService client that sends `token` (or nothing).
    pub fn groups_with(&self, token: Option<&str>) -> Groups {
        GroupServiceClient::with_interceptor(self.channel.clone(), Bearer::new(token))
    }

    /// An EventService client with the server's default token.
    pub fn events(&self) -> Events {
        EventServiceClient::with_interceptor(
            self.channel.clone(),
            Bearer::new(self.token.as_deref()),
        )
    }

    /// An EventService client that sends `token` (or nothing).
    pub fn events_with(&self, token: Option<&str>) -> Events {
        EventServiceClient::with_interceptor(self.channel.clone(), Bearer::new(token))
    }

    /// A client that sends `token` (or nothing).
    pub fn client_with(&self, token: Option<&str>) -> Client {
        UserServiceClient::with_interceptor(self.channel.clone(), Bearer::new(token))
    }

    /// A client on a connection of its own (HTTP/2 flow control is shared by
    /// the calls of one connection).
    pub async fn own_client(&self) -> Client {
        let channel = Channel::from_shared(format!("http://{}", self.addr))
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        UserServiceClient::with_interceptor(channel, Bearer::new(self.token.as_deref()))
    }

    /// Stops the server and waits for it to finish.
    pub async fn stop(mut self) -> TestDb {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        std::mem::replace(
            &mut self.db,
            TestDb {
                url: String::new(),
                _dir: None,
                pg_schema: None,
            },
        )
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

pub const PROJECT: &str = "projects/acme";

/// A valid user with only an email.
pub fn user(email: &str) -> User {
    User {
        email: email.to_owned(),
        ..Default::default()
    }
}

pub async fn create(c: &mut Client, u: User) -> User {
    create_in(c, PROJECT, u).await
}

pub async fn create_in(c: &mut Client, parent: &str, u: User) -> User {
    c.create_user(pb::CreateUserRequest {
        parent: parent.to_owned(),
        user: Some(u),
        ..Default::default()
    })
    .await
    .expect("create_user")
    .into_inner()
}

pub async fn get(c: &mut Client, name: &str) -> Result<User, Status> {
    c.get_user(pb::GetUserRequest {
        name: name.to_owned(),
    })
    .await
    .map(|r| r.into_inner())
}

/// The ErrorInfo reason of an error status.
pub fn reason(s: &Status) -> String {
    let d = s.get_error_details();
    let info = d.error_info().expect("every error carries an ErrorInfo");
    assert_eq!(info.domain, "user-service");
    info.reason.clone()
}

/// The fields named by the BadRequest of an error status, sorted.
pub fn bad_fields(s: &Status) -> Vec<String> {
    let d = s.get_error_details();
    let mut f: Vec<String> = d
        .bad_request()
        .map(|b| b.field_violations.iter().map(|v| v.field.clone()).collect())
        .unwrap_or_default();
    f.sort();
    f
}

/// Asserts the code and reason of an error.
#[track_caller]
pub fn assert_error<T: std::fmt::Debug>(
    r: Result<T, Status>,
    code: Code,
    want_reason: &str,
) -> Status {
    let s = r.expect_err("expected an error");
    assert_eq!(s.code(), code, "status: {s:?}");
    assert_eq!(reason(&s), want_reason, "status: {s:?}");
    s
}

/// A timestamp as nanoseconds, for comparisons.
pub fn nanos(t: &Option<prost_types::Timestamp>) -> i128 {
    let t = t.as_ref().expect("timestamp set");
    i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos)
}

/// CountUsers of `PROJECT` with `filter`, deleted users included.
pub async fn count_all(c: &mut Client, filter: &str) -> i64 {
    c.count_users(pb::CountUsersRequest {
        parent: PROJECT.into(),
        filter: filter.into(),
        show_deleted: true,
    })
    .await
    .expect("count")
    .into_inner()
    .total_size
}
