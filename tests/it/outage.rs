//! Database outages against a throwaway PostgreSQL cluster the test starts
//! itself (initdb in a temporary directory, on a free port): while the
//! cluster is stopped, calls fail fast with UNAVAILABLE and health turns
//! NOT_SERVING; once it is back, both recover without a restart of the server.

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tonic::transport::Channel;
use tonic::{Code, Status};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus};
use user_service::proto::users::v1 as pb;
use user_service::proto::users::v1::user_service_client::UserServiceClient;

use crate::harness::{Bearer, Client, PROJECT, get, reason, user};
use crate::server::{BIN, connect_to, free_port, wait_healthy};

/// Health must say NOT_SERVING this soon after the database stops.
const NOT_SERVING_WITHIN: Duration = Duration::from_secs(2);
/// A call fails within this while the database is down: `--db-timeout 1s`
/// and a margin.
const FAILS_WITHIN: Duration = Duration::from_secs(3);
/// A call that takes this long hangs.
const HANGS: Duration = Duration::from_secs(10);
/// Health and calls recover this soon after the database is back.
const RECOVERS_WITHIN: Duration = Duration::from_secs(5);

/// The directory holding initdb and pg_ctl, if PostgreSQL is installed.
fn pg_bindir() -> Option<PathBuf> {
    let pg_config = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    // Debian and Ubuntu: /usr/lib/postgresql/<major>/bin, newest first.
    let mut installed: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let major: u32 = e.file_name().to_str()?.parse().ok()?;
            Some((major, e.path().join("bin")))
        })
        .collect();
    installed.sort();
    let path = std::env::var_os("PATH").unwrap_or_default();
    pg_config
        .into_iter()
        .chain(installed.into_iter().rev().map(|(_, dir)| dir))
        .chain(std::env::split_paths(&path))
        .find(|dir| dir.join("initdb").is_file() && dir.join("pg_ctl").is_file())
}

fn running_as_root() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// A PostgreSQL cluster in a temporary directory, stopped (immediate mode)
/// and removed when dropped, also when the test panics.
struct Cluster {
    bin: PathBuf,
    /// initdb and postgres refuse to run as root: run them as `postgres`.
    as_postgres: bool,
    root: String,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Cluster {
    fn init(bin: PathBuf) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("pg-outage-")
            .tempdir()
            .expect("tempdir");
        let as_postgres = running_as_root();
        if as_postgres {
            let st = Command::new("chown")
                .arg("postgres")
                .arg(dir.path())
                .status()
                .expect("run chown");
            assert!(
                st.success(),
                "chown postgres {}: {st}",
                dir.path().display()
            );
        }
        let cluster = Cluster {
            bin,
            as_postgres,
            root: dir.path().to_str().expect("a UTF-8 temp path").to_owned(),
            port: free_port(),
            _dir: dir,
        };
        cluster.run_ok(
            "initdb",
            &[
                "-D",
                &cluster.data(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ],
        );
        cluster
    }

    fn data(&self) -> String {
        format!("{}/data", self.root)
    }

    fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn run(&self, tool: &str, args: &[&str]) -> std::io::Result<Output> {
        let exe = self.bin.join(tool);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        };
        cmd.args(args)
            .current_dir(&self.root)
            .stdin(Stdio::null())
            .output()
    }

    fn run_ok(&self, tool: &str, args: &[&str]) {
        let out = self
            .run(tool, args)
            .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}\n{}{}\nserver log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(format!("{}/log", self.root)).unwrap_or_default()
        );
    }

    /// Starts the cluster on its port (the same one every time) and waits
    /// until it accepts connections.
    fn start(&self) {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port, self.root
        );
        let log = format!("{}/log", self.root);
        self.run_ok(
            "pg_ctl",
            &["-D", &self.data(), "-o", &opts, "-w", "-l", &log, "start"],
        );
    }

    fn stop(&self, mode: &str) {
        self.run_ok("pg_ctl", &["-D", &self.data(), "-m", mode, "-w", "stop"]);
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Fails harmlessly when the cluster is not running.
        let _ = self.run(
            "pg_ctl",
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        );
    }
}

/// The server binary, killed when dropped.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn overall_health(h: &mut HealthClient<Channel>) -> i32 {
    let req = HealthCheckRequest {
        service: String::new(),
    };
    match tokio::time::timeout(Duration::from_secs(1), h.check(req)).await {
        Ok(Ok(r)) => r.into_inner().status,
        _ => -1,
    }
}

/// Polls health every 50 ms until it is `want`; how long after `since` it
/// was, at most `within`.
async fn wait_health(
    h: &mut HealthClient<Channel>,
    want: ServingStatus,
    since: Instant,
    within: Duration,
) -> Duration {
    loop {
        let now = overall_health(h).await;
        let took = since.elapsed();
        assert!(
            took <= within,
            "health was {now} {took:?} after the change, want {want:?} within {within:?}"
        );
        if now == want as i32 {
            return took;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asserts a call made while the database is down fails with UNAVAILABLE
/// (DATABASE_UNAVAILABLE) within FAILS_WITHIN, and returns how long it took.
async fn fails_fast<T: std::fmt::Debug>(
    what: &str,
    call: impl Future<Output = Result<T, Status>>,
) -> Duration {
    let t = Instant::now();
    let result = tokio::time::timeout(HANGS, call)
        .await
        .unwrap_or_else(|_| panic!("{what} hung for {HANGS:?} with the database down"));
    let took = t.elapsed();
    let st = result.expect_err("the database is down");
    assert_eq!(st.code(), Code::Unavailable, "{what}: {st:?}");
    assert_eq!(reason(&st), "DATABASE_UNAVAILABLE", "{what}: {st:?}");
    assert!(took <= FAILS_WITHIN, "{what} failed only after {took:?}");
    took
}

/// Retries `call` while it says UNAVAILABLE (a pooled connection from before
/// the outage may fail once), for at most RECOVERS_WITHIN.
async fn eventually<T>(what: &str, mut call: impl AsyncFnMut() -> Result<T, Status>) -> T {
    let t = Instant::now();
    loop {
        let result = tokio::time::timeout(HANGS, call())
            .await
            .unwrap_or_else(|_| panic!("{what} hung after the database returned"));
        match result {
            Ok(v) => return v,
            Err(st) if st.code() == Code::Unavailable && t.elapsed() < RECOVERS_WITHIN => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(st) => panic!(
                "{what} {:?} after the database returned: {st:?}",
                t.elapsed()
            ),
        }
    }
}

fn create_req(email: &str, request_id: &str) -> pb::CreateUserRequest {
    pb::CreateUserRequest {
        parent: PROJECT.into(),
        user: Some(user(email)),
        request_id: request_id.into(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outage_of_a_throwaway_cluster_fails_fast_and_recovers() {
    let Some(bin) = pg_bindir() else {
        assert!(
            std::env::var("CI").is_err(),
            "CI is set but there is no initdb: the outage test would not run"
        );
        eprintln!("no initdb found: PostgreSQL outage test skipped");
        return;
    };
    let cluster = Cluster::init(bin);
    cluster.start();
    let addr = format!("127.0.0.1:{}", free_port());
    let _server = Server(
        Command::new(BIN)
            .env("RUST_LOG", "warn")
            .args(["serve", "--listen", &addr, "--database-url", &cluster.url()])
            .args(["--db-timeout", "1s", "--health-interval", "500ms"])
            .args(["--request-timeout", "5s"])
            .stdout(Stdio::null())
            .spawn()
            .expect("start the server binary"),
    );
    wait_healthy(&addr);
    let channel = connect_to(&addr).await;
    let mut health = HealthClient::new(channel.clone());
    let mut c: Client = UserServiceClient::with_interceptor(channel, Bearer::default());
    let first = c
        .create_user(create_req("before@example.com", ""))
        .await
        .expect("create with the database up")
        .into_inner();
    let mut users = vec![first];

    // Twice: recovery is repeatable.
    for round in 1..=2 {
        let stopped = Instant::now();
        cluster.stop("fast");
        let not_serving = wait_health(
            &mut health,
            ServingStatus::NotServing,
            stopped,
            NOT_SERVING_WITHIN,
        )
        .await;
        // Twice each: the first call may meet a dead pooled connection, the
        // second has to wait for a connection that cannot be made.
        let down = format!("down{round}@example.com");
        let mut get_took = Duration::ZERO;
        let mut create_took = Duration::ZERO;
        for attempt in 0..2 {
            let took = fails_fast("GetUser", get(&mut c, &users[0].name)).await;
            get_took = get_took.max(took);
            let req = create_req(&down, &format!("down-{round}-{attempt}"));
            let took = fails_fast("CreateUser", c.create_user(req)).await;
            create_took = create_took.max(took);
        }

        cluster.start();
        let back = Instant::now();
        let serving = wait_health(&mut health, ServingStatus::Serving, back, RECOVERS_WITHIN).await;
        for u in &users {
            let got = eventually("GetUser", async || get(&mut c, &u.name).await).await;
            assert_eq!(&got, u);
        }
        // The calls that failed stored nothing: the same email is free.
        let req = create_req(&down, &format!("up-{round}"));
        let created = eventually("CreateUser", async || {
            c.create_user(req.clone()).await.map(|r| r.into_inner())
        })
        .await;
        assert_eq!(created.email, down);
        let calls_back = back.elapsed();
        users.push(created);
        eprintln!(
            "outage {round}: NOT_SERVING {not_serving:?} after the stop; slowest UNAVAILABLE: \
             GetUser {get_took:?}, CreateUser {create_took:?}; SERVING {serving:?} and calls \
             answered {calls_back:?} after the restart"
        );
    }
}
