use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tonic::Code;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
use user_service::proto::users::v1 as pb;
use user_service::proto::users::v1::user_service_client::UserServiceClient;

use crate::both_engines;
use crate::harness::*;

pub const BIN: &str = env!("CARGO_BIN_EXE_user-service");

async fn health(s: &TestServer, service: &str) -> i32 {
    HealthClient::new(s.channel.clone())
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .map(|r| r.into_inner().status)
        .unwrap_or(-1)
}

async fn health_reports_overall_and_per_service(e: Engine) {
    let s = TestServer::start(e).await;
    assert_eq!(health(&s, "").await, ServingStatus::Serving as i32);
    assert_eq!(
        health(&s, "users.v1.UserService").await,
        ServingStatus::Serving as i32
    );
    let unknown = HealthClient::new(s.channel.clone())
        .check(HealthCheckRequest {
            service: "nope.Service".into(),
        })
        .await;
    assert_eq!(unknown.unwrap_err().code(), Code::NotFound);
}

async fn reflection_v1_and_v1alpha_list_every_service(e: Engine) {
    let s = TestServer::start(e).await;
    let want = [
        "users.v1.UserService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ];
    {
        use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::v1::{ServerReflectionRequest, ServerReflectionResponse};
        let mut c = ServerReflectionClient::new(s.channel.clone());
        let reqs = vec![
            ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::ListServices(String::new())),
            },
            ServerReflectionRequest {
                host: String::new(),
                message_request: Some(MessageRequest::FileContainingSymbol(
                    "users.v1.UserService".into(),
                )),
            },
        ];
        let mut stream = c
            .server_reflection_info(tokio_stream::iter(reqs))
            .await
            .unwrap()
            .into_inner();
        let first: ServerReflectionResponse = stream.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = first.message_response else {
            panic!("expected a service list")
        };
        let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
        for w in want {
            assert!(names.iter().any(|n| n == w), "{w} missing from {names:?}");
        }
        let second = stream.message().await.unwrap().unwrap();
        let Some(MessageResponse::FileDescriptorResponse(files)) = second.message_response else {
            panic!("expected descriptors")
        };
        assert!(!files.file_descriptor_proto.is_empty());
    }
    {
        use tonic_reflection::pb::v1alpha::ServerReflectionRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::v1alpha::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::v1alpha::server_reflection_response::MessageResponse;
        let mut c = ServerReflectionClient::new(s.channel.clone());
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = c
            .server_reflection_info(tokio_stream::iter(vec![req]))
            .await
            .unwrap()
            .into_inner();
        let first = stream.message().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = first.message_response else {
            panic!("expected a service list")
        };
        let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
        assert!(
            names.iter().any(|n| n == "users.v1.UserService"),
            "{names:?}"
        );
    }
}

async fn data_survives_a_restart(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let u = create(&mut c, user("durable@example.com")).await;
    let db = s.stop().await;
    let s2 = TestServer::start_on(db, |_| {}).await;
    let mut c2 = s2.client();
    assert_eq!(get(&mut c2, &u.name).await.unwrap(), u);
}

both_engines!(
    health_reports_overall_and_per_service,
    reflection_v1_and_v1alpha_list_every_service,
    data_survives_a_restart,
);

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn healthcheck(addr: &str) -> bool {
    Command::new(BIN)
        .args(["healthcheck", "--addr", addr, "--timeout", "2s"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap()
        .success()
}

/// Waits (at most 20 s) until the server at `addr` answers SERVING.
pub fn wait_healthy(addr: &str) {
    let start = Instant::now();
    while !healthcheck(addr) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{addr} never became healthy"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A plaintext channel to a server started as a process.
pub async fn connect_to(addr: &str) -> tonic::transport::Channel {
    tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .expect("uri")
        .connect()
        .await
        .expect("connect")
}

/// A server process with a metrics endpoint, killed when dropped.
pub struct Process {
    pub name: &'static str,
    child: Child,
    pub addr: String,
    pub metrics: String,
}

impl Process {
    /// Starts `serve` on `db_url` with `args` and waits until it serves.
    pub async fn start(name: &'static str, db_url: &str, args: &[&str]) -> Self {
        let addr = format!("127.0.0.1:{}", free_port());
        let metrics = format!("127.0.0.1:{}", free_port());
        let child = Command::new(BIN)
            .env("RUST_LOG", "warn")
            .args(["serve", "--listen", &addr, "--database-url", db_url])
            .args(["--metrics-listen", &metrics])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the server binary");
        let mut p = Process {
            name,
            child,
            addr,
            metrics,
        };
        p.wait_serving().await;
        p
    }

    /// Waits (at most 20 s) for SERVING; fails at once if the process exits.
    async fn wait_serving(&mut self) {
        let start = Instant::now();
        while !healthcheck(&self.addr) {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                panic!("server {} exited before serving: {status}", self.name);
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "server {} never served",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn client(&self) -> Client {
        UserServiceClient::with_interceptor(connect_to(&self.addr).await, Bearer::default())
    }

    /// SIGKILL, and wait for the process to be gone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The Prometheus text this process serves on /metrics.
    pub async fn scrape(&self) -> String {
        let start = Instant::now();
        let text = loop {
            match scrape(&self.metrics).await {
                Ok(text) => break text,
                Err(_) if start.elapsed() < Duration::from_secs(5) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!("metrics of {} at {}: {e}", self.name, self.metrics),
            }
        };
        assert!(
            text.starts_with("HTTP/1.1 200"),
            "metrics of {}: {}",
            self.name,
            text.lines().next().unwrap_or_default()
        );
        text
    }

    /// The sum of the samples of `metric` whose labels include every one of
    /// `labels` (`name="value"`); 0 while there is none.
    pub async fn metric(&self, metric: &str, labels: &[&str]) -> f64 {
        metric_value(&self.scrape().await, metric, labels)
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The whole HTTP/1.1 response to `GET /metrics`.
async fn scrape(addr: &str) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await?;
    let mut text = String::new();
    s.read_to_string(&mut text).await?;
    Ok(text)
}

/// See `Process::metric`.
pub fn metric_value(text: &str, metric: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter_map(|l| l.strip_prefix(metric))
        .filter(|rest| rest.starts_with([' ', '{']))
        .filter(|rest| labels.iter().all(|l| rest.contains(l)))
        .map(|rest| {
            let value = rest.split_whitespace().next_back().unwrap_or_default();
            value
                .parse::<f64>()
                .unwrap_or_else(|e| panic!("{metric} {value:?}: {e}"))
        })
        .sum()
}

/// The binary as an operator runs it: JSON logs with one line per RPC that
/// carries method, project and code but no personal data; the healthcheck
/// subcommand; a clean exit on SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_logs_without_personal_data_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let child = Command::new(BIN)
        .current_dir(dir.path())
        .env("USER_SERVICE_LISTEN", &addr)
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "info")
        .args(["--log-format", "json"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_healthy(&addr);
    // The embedded default: a SQLite file in the working directory.
    assert!(dir.path().join("user-service.db").exists());

    let mut c = pb::user_service_client::UserServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    c.create_user(pb::CreateUserRequest {
        parent: "projects/logco".into(),
        user: Some(pb::User {
            email: "secret.person@example.com".into(),
            phone_number: "+4741234567".into(),
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let _ = c
        .get_user(pb::GetUserRequest {
            name: "projects/logco/users/missing".into(),
        })
        .await;

    let pid = child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "exit status {:?}", out.status);
    let logs = String::from_utf8_lossy(&out.stderr);
    assert!(
        !logs.contains("secret.person"),
        "email leaked into logs:\n{logs}"
    );
    assert!(
        !logs.contains("41234567"),
        "phone leaked into logs:\n{logs}"
    );
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON: {l}: {e}")))
        .collect();
    let rpc = |method: &str, code: &str| {
        lines.iter().any(|l| {
            l["fields"]["message"] == "rpc finished"
                && l["fields"]["code"] == code
                && l["fields"]["latency_ms"].is_number()
                && l["span"]["method"] == method
                && l["span"]["project"] == "logco"
        })
    };
    assert!(rpc("/users.v1.UserService/CreateUser", "Ok"), "{logs}");
    assert!(rpc("/users.v1.UserService/GetUser", "NotFound"), "{logs}");
    assert!(
        !healthcheck(&addr),
        "healthcheck must fail once the server is gone"
    );
}

#[test]
fn migrate_subcommand_and_help() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/m.db?mode=rwc", dir.path().display());
    let st = Command::new(BIN)
        .args(["migrate", "--database-url", &url])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    assert!(dir.path().join("m.db").exists());
    // Twice is fine.
    assert!(
        Command::new(BIN)
            .args(["migrate", "--database-url", &url])
            .stderr(Stdio::null())
            .status()
            .unwrap()
            .success()
    );
    let help = Command::new(BIN).arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--listen",
        "--database-url",
        "DATABASE_URL",
        "USER_SERVICE_LISTEN",
        "healthcheck",
        "migrate",
    ] {
        assert!(help.contains(flag), "{flag} missing from --help:\n{help}");
    }
    // A bad database URL fails loudly.
    let bad = Command::new(BIN)
        .args(["migrate", "--database-url", "nope://x"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
}

/// A TCP proxy in front of PostgreSQL that the test can cut and restore.
struct Proxy {
    port: u16,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Proxy {
    async fn start(port: u16, upstream: String) -> Self {
        let listener = TcpListener::bind(("127.0.0.1", port)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    break;
                };
                let upstream = upstream.clone();
                conns.spawn(async move {
                    if let Ok(mut out) = tokio::net::TcpStream::connect(upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut out).await;
                    }
                });
            }
        });
        Proxy {
            port,
            task: Some(task),
        }
    }

    /// Closes the listener and every proxied connection.
    async fn cut(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }
}

async fn wait_health(s: &TestServer, want: ServingStatus) {
    let start = Instant::now();
    while health(s, "").await != want as i32
        || health(s, "users.v1.UserService").await != want as i32
    {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "health never became {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_follows_the_database_and_rpcs_say_unavailable() {
    let Some(_) = postgres_url() else { return };
    let mut db = TestDb::new(Engine::Postgres).await;
    let mut url = url::Url::parse(&db.url).unwrap();
    let upstream = format!("{}:{}", url.host_str().unwrap(), url.port().unwrap_or(5432));
    let mut proxy = Proxy::start(0, upstream.clone()).await;
    url.set_port(Some(proxy.port)).unwrap();
    db.url = url.to_string();
    // The defaults of health probing; a short wait for connections.
    let s = TestServer::start_on(db, |st| st.db_timeout = Duration::from_secs(1)).await;
    let mut c = s.client();
    let u = create(&mut c, user("outage@example.com")).await;

    proxy.cut().await;
    let cut = Instant::now();
    wait_health(&s, ServingStatus::NotServing).await;
    let noticed = cut.elapsed();
    eprintln!("NOT_SERVING {noticed:?} after the database went away");
    assert!(noticed < Duration::from_millis(2500), "{noticed:?}");
    let t = Instant::now();
    let st = get(&mut c, &u.name).await.expect_err("database is down");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    assert_eq!(st.code(), Code::Unavailable, "{st:?}");
    assert_eq!(reason(&st), "DATABASE_UNAVAILABLE");
    assert!(
        !st.message().contains("127.0.0.1"),
        "internal details leaked: {st:?}"
    );

    let _back = Proxy::start(proxy.port, upstream).await;
    wait_health(&s, ServingStatus::Serving).await;
    assert_eq!(get(&mut c, &u.name).await.unwrap(), u);
}

/// Without authentication the binary serves loopback only (with a warning);
/// any other address is refused with a one-line reason unless
/// --insecure-no-auth is given.
#[test]
fn no_auth_serves_loopback_only() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}/x.db?mode=rwc", dir.path().display());
    let port = free_port();
    let out = Command::new(BIN)
        .args([
            "--listen",
            &format!("0.0.0.0:{port}"),
            "--database-url",
            &url,
        ])
        .env("RUST_LOG", "off")
        .output()
        .unwrap();
    assert!(!out.status.success(), "served 0.0.0.0 without auth");
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains("refusing to serve on 0.0.0.0"), "{err}");
    assert!(err.contains("--insecure-no-auth"), "{err}");

    let port = free_port();
    let mut child = Command::new(BIN)
        .args([
            "--listen",
            &format!("0.0.0.0:{port}"),
            "--database-url",
            &url,
        ])
        .arg("--insecure-no-auth")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let addr = format!("127.0.0.1:{port}");
    wait_healthy(&addr);
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
    let mut logs = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut logs)
        .unwrap();
    assert!(logs.contains("--insecure-no-auth given"), "{logs}");
}

/// Every write leaves one audit event (target `audit`) with the caller's
/// sub, project, RPC, resource, request_id and outcome, refused writes too,
/// and no personal data.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_leave_an_audit_trail() {
    let keys = AuthKeys::new();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let child = Command::new(BIN)
        .current_dir(dir.path())
        .env("USER_SERVICE_LISTEN", &addr)
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "warn,audit=info")
        .arg("--auth-jwt-secret-file")
        .arg(&keys.secret_file)
        .args(["--log-format", "json"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_healthy(&addr);
    let channel = connect_to(&addr).await;
    let token = keys.token_as("billing-svc", &["auditco"], "users.read users.write");
    let mut c = pb::user_service_client::UserServiceClient::with_interceptor(
        channel,
        Bearer::new(Some(&token)),
    );
    let created = c
        .create_user(pb::CreateUserRequest {
            parent: "projects/auditco".into(),
            request_id: "req-7".into(),
            user: Some(pb::User {
                email: "secret.person@example.com".into(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    c.disable_user(pb::DisableUserRequest {
        name: created.name.clone(),
        ..Default::default()
    })
    .await
    .unwrap();
    let denied = c
        .delete_user(pb::DeleteUserRequest {
            name: "projects/other/users/x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), Code::PermissionDenied);
    // Reads are not audited.
    c.get_user(pb::GetUserRequest {
        name: created.name.clone(),
    })
    .await
    .unwrap();
    c.batch_create_users(pb::BatchCreateUsersRequest {
        parent: "projects/auditco".into(),
        request_id: "batch-1".into(),
        requests: vec![pb::CreateUserRequest {
            user: Some(pb::User {
                email: "another.person@example.com".into(),
                ..Default::default()
            }),
            ..Default::default()
        }],
    })
    .await
    .unwrap();
    // Import needs users.admin: refused, and recorded.
    let import = || {
        tokio_stream::iter(vec![pb::ImportUsersRequest {
            parent: "projects/auditco".into(),
            users: vec![pb::User {
                email: "third.person@example.com".into(),
                ..Default::default()
            }],
        }])
    };
    let refused = c.import_users(import()).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    // With it, each committed chunk is recorded.
    let admin = keys.token_as("importer", &["auditco"], "users.admin");
    let channel = connect_to(&addr).await;
    let mut a = pb::user_service_client::UserServiceClient::with_interceptor(
        channel,
        Bearer::new(Some(&admin)),
    );
    let mut acks = a.import_users(import()).await.unwrap().into_inner();
    while acks.message().await.unwrap().is_some() {}

    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let out = child.wait_with_output().unwrap();
    let logs = String::from_utf8_lossy(&out.stderr);
    assert!(
        !logs.contains("secret.person"),
        "personal data in logs:\n{logs}"
    );
    let events: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["target"] == "audit")
        .collect();
    assert_eq!(events.len(), 6, "{logs}");
    let f = |i: usize, k: &str| events[i]["fields"][k].as_str().unwrap_or("").to_owned();
    assert_eq!(f(0, "rpc"), "CreateUser");
    assert_eq!(f(0, "caller"), "billing-svc");
    assert_eq!(f(0, "project"), "auditco");
    assert_eq!(f(0, "resource"), created.name);
    assert_eq!(f(0, "request_id"), "req-7");
    assert_eq!(f(0, "outcome"), "OK");
    assert_eq!(f(1, "rpc"), "DisableUser");
    assert_eq!(f(1, "resource"), created.name);
    assert_eq!(f(2, "rpc"), "DeleteUser");
    assert_eq!(f(2, "project"), "other");
    assert_eq!(f(2, "outcome"), "PERMISSION_DENIED");
    assert_eq!(f(3, "rpc"), "BatchCreateUsers");
    assert_eq!(f(3, "request_id"), "batch-1");
    assert_eq!(f(3, "outcome"), "OK");
    assert_eq!(f(4, "rpc"), "ImportUsers");
    assert_eq!(f(4, "caller"), "billing-svc");
    assert_eq!(f(4, "outcome"), "PERMISSION_DENIED");
    assert_eq!(f(5, "rpc"), "ImportUsers");
    assert_eq!(f(5, "caller"), "importer");
    assert_eq!(f(5, "project"), "auditco");
    assert_eq!(f(5, "outcome"), "OK");
    assert!(f(5, "detail").contains("created 1"), "{}", f(5, "detail"));
}

/// SIGTERM: health says NOT_SERVING at once while calls are still served for
/// the delay; then an open export ends with UNAVAILABLE carrying the token
/// to resume it; the process exits 0; a restart on the same file serves
/// quickly and the export resumes with no gap and no duplicate.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_streams_resume_elsewhere() {
    const TOTAL: usize = 4000;
    let dir = tempfile::tempdir().unwrap();
    let spawn = |addr: &str| {
        Command::new(BIN)
            .current_dir(dir.path())
            .env("USER_SERVICE_LISTEN", addr)
            .env_remove("DATABASE_URL")
            .env("RUST_LOG", "warn")
            .args(["--shutdown-delay", "1s", "--shutdown-grace", "5s"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let addr = format!("127.0.0.1:{}", free_port());
    let child = spawn(&addr);
    wait_healthy(&addr);
    let channel = connect_to(&addr).await;
    let mut c = pb::user_service_client::UserServiceClient::new(channel.clone());
    // 4000 users of 8 KB: far more than flow control and socket buffers
    // let the server send ahead of a client that stops reading.
    let users: Vec<pb::User> = (0..TOTAL)
        .map(|i| pb::User {
            email: format!("d{i}@example.com"),
            bio: "b".repeat(4000),
            note: "n".repeat(4000),
            ..Default::default()
        })
        .collect();
    let msgs: Vec<pb::ImportUsersRequest> = users
        .chunks(250)
        .enumerate()
        .map(|(i, part)| pb::ImportUsersRequest {
            parent: if i == 0 {
                "projects/drain".into()
            } else {
                String::new()
            },
            users: part.to_vec(),
        })
        .collect();
    let mut acks = c
        .import_users(tokio_stream::iter(msgs))
        .await
        .unwrap()
        .into_inner();
    while acks.message().await.unwrap().is_some() {}

    let export = |token: String| pb::StreamUsersRequest {
        parent: "projects/drain".into(),
        batch_size: 100,
        resume_token: token,
        ..Default::default()
    };
    let mut stream = c
        .stream_users(export(String::new()))
        .await
        .unwrap()
        .into_inner();
    let mut seen = std::collections::HashSet::new();
    let first = stream.message().await.unwrap().unwrap();
    let mut last_token = first.resume_token.clone();
    seen.extend(first.users.into_iter().map(|u| u.name));

    assert!(
        Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
    // NOT_SERVING at once, yet calls are still answered during the delay.
    let mut health = HealthClient::new(channel.clone());
    let t = Instant::now();
    loop {
        let s = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("reachable during the delay")
            .into_inner()
            .status;
        if s == ServingStatus::NotServing as i32 {
            break;
        }
        assert!(t.elapsed() < Duration::from_millis(500), "still SERVING");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    c.count_users(pb::CountUsersRequest {
        parent: "projects/drain".into(),
        ..Default::default()
    })
    .await
    .expect("served during the delay");

    // After the delay (the client meanwhile reads nothing) the export ends
    // with the token to resume it.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let err = loop {
        match stream.message().await {
            Ok(Some(m)) => {
                last_token = m.resume_token.clone();
                seen.extend(m.users.into_iter().map(|u| u.name));
            }
            Ok(None) => panic!(
                "the export ended as if complete after {} users, {:?} after SIGTERM",
                seen.len(),
                t.elapsed()
            ),
            Err(e) => break e,
        }
    };
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    let details = tonic_types::StatusExt::get_error_details(&err);
    let info = details.error_info().expect("ErrorInfo");
    assert_eq!(info.reason, "SHUTTING_DOWN");
    assert_eq!(info.metadata["resume_token"], last_token);
    assert!(seen.len() < TOTAL);

    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "exit status {:?}", out.status);
    assert!(
        !dir.path().join("user-service.db-wal").exists()
            || std::fs::metadata(dir.path().join("user-service.db-wal"))
                .unwrap()
                .len()
                == 0,
        "the WAL was not checkpointed"
    );

    // Restart on the same file and resume.
    let addr = format!("127.0.0.1:{}", free_port());
    let t = Instant::now();
    let mut again = spawn(&addr);
    while !healthcheck(&addr) {
        assert!(t.elapsed() < Duration::from_secs(20), "never served again");
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!("restart to SERVING after a clean stop: {:?}", t.elapsed());
    let mut c = pb::user_service_client::UserServiceClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let mut rest = c
        .stream_users(export(last_token))
        .await
        .unwrap()
        .into_inner();
    while let Some(m) = rest.message().await.unwrap() {
        for u in m.users {
            assert!(seen.insert(u.name), "a user came twice");
        }
    }
    assert_eq!(seen.len(), TOTAL, "a gap after resuming");
    let _ = again.kill();
    let _ = again.wait();
}
