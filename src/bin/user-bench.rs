//! user-bench: a load generator for user-service.
//!
//! It starts the server itself (a child process on a temporary SQLite file, or
//! on `--database-url`) or drives one at `--target`, seeds users, and runs
//! scenarios over N HTTP/2 connections with M requests in flight on each. The
//! `ceiling` scenario drives a trivial UserService (GetUser returns a fixed
//! user, no database) in a child process of its own, with the same harness:
//! the framework's limit on this machine, which the other figures are divided by.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use clap::{Parser, ValueEnum};
use hdrhistogram::Histogram;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Response, Status};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use user_service::proto::users::v1 as pb;
use user_service::proto::users::v1::user_service_client::UserServiceClient;
use user_service::proto::users::v1::user_service_server::{UserService, UserServiceServer};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, ValueEnum)]
enum Scenario {
    /// GetUser by name of a random seeded user.
    Get,
    /// LookupUser by the email of a random seeded user.
    Lookup,
    /// CreateUser with a fresh email each time.
    Create,
    /// UpdateUser of a random seeded user (display_name and one metadata key).
    Update,
    /// ListUsers: first page of 50 with the filter `tags:"cohort-N"` (a tenth
    /// of the seeded users each), N at random.
    List,
    /// SearchUsers: first page of 50 for the prefix `user<k>` of a random
    /// seeded user's email (k a random prefix of its number).
    Search,
    /// CountUsers with the filter `state = ACTIVE AND tags:"cohort-N"`.
    Count,
    /// GetUser against a trivial in-memory UserService: the framework's limit.
    Ceiling,
    /// ImportUsers of `--import-users` new users over one stream, in
    /// messages of 1000; then the same rows inserted raw into an empty
    /// database of the same engine (the ceilings it is divided by): only the
    /// users into a table with the primary key and the four unique
    /// identifier indexes, and users, terms and events in the full schema.
    Import,
    /// StreamUsers of every user of the project (batches of 500) to this
    /// client, with the server's peak RSS; then the same rows read raw with
    /// keyset queries (the ceiling).
    Stream,
    /// Finding users among those the import stored (1 call in flight): the
    /// first page of 50 of each query shape of `FIND_QUERIES`, timed over
    /// `--find-rounds` calls each.
    Find,
    /// WatchEvents from revision 0 of the bench project to its head (every
    /// event the seeding and the scenarios before appended), to this client.
    Watch,
    /// Groups at scale: imports `--group-members` users, adds them all to one
    /// group (AddGroupMembers, 1000 a call), then times ListGroupMembers'
    /// first and last pages, and AddGroupMembers of 1000 users into that
    /// group and into an empty one (1 call in flight).
    Groups,
}

#[derive(Debug, Parser)]
#[command(
    name = "user-bench",
    about = "Load generator for user-service",
    version
)]
struct Args {
    /// Scenarios to run, in order, comma-separated.
    #[arg(
        value_enum,
        value_delimiter = ',',
        default_value = "ceiling,get,lookup,create,update"
    )]
    scenarios: Vec<Scenario>,

    /// Drive a running server at this address instead of starting one.
    #[arg(long)]
    target: Option<String>,

    /// Database of the self-hosted server (default: a temporary SQLite file).
    #[arg(long, env = "BENCH_DATABASE_URL")]
    database_url: Option<String>,

    /// Users to seed before the scenarios run.
    #[arg(long, default_value_t = 100_000)]
    users: usize,

    /// HTTP/2 connections.
    #[arg(long, default_value_t = 4)]
    connections: usize,

    /// Requests in flight per connection.
    #[arg(long, default_value_t = 32)]
    in_flight: usize,

    /// Users the import scenario loads.
    #[arg(long, default_value_t = 1_000_000)]
    import_users: usize,

    /// Timed calls per query shape of the find scenario.
    #[arg(long, default_value_t = 50)]
    find_rounds: usize,

    /// Members of the large group of the groups scenario.
    #[arg(long, default_value_t = 1_000_000)]
    group_members: usize,

    /// Timed calls per measurement of the groups scenario.
    #[arg(long, default_value_t = 50)]
    group_rounds: usize,

    /// Concurrent CreateUser calls per connection while seeding (4 x 8
    /// stays under the server's default --max-in-flight).
    #[arg(long, default_value_t = 8)]
    seed_in_flight: usize,

    /// Measured time per scenario.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,

    /// Unmeasured load before each scenario.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    warmup: Duration,

    /// The user-service binary to self-host (default: next to this one).
    #[arg(long)]
    server_bin: Option<PathBuf>,

    /// Do not run h2load beside user-bench's own generator for the ceiling,
    /// get and lookup scenarios.
    #[arg(long)]
    no_h2load: bool,

    /// Internal: serve the ceiling UserService on this address.
    #[arg(long, hide = true)]
    serve_ceiling: Option<SocketAddr>,
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

// The server's allocator, so that the ceiling differs from it only in what
// a call does.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if let Some(addr) = args.serve_ceiling {
        return match serve_ceiling(addr).await {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("ceiling server: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    match run(args).await {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("user-bench: some requests failed");
            std::process::ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("user-bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// A server process this run started; killed on drop.
struct ServerProcess {
    child: Child,
    addr: String,
}

impl ServerProcess {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_addr() -> Result<String, BoxError> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.to_string())
}

/// `/proc/<pid>/status` field in KiB.
fn proc_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with(field))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Resets the peak RSS of a process (Linux: writing 5 to clear_refs).
fn reset_peak(pid: u32) {
    let _ = std::fs::write(format!("/proc/{pid}/clear_refs"), "5");
}

fn mib(kib: Option<u64>) -> String {
    kib.map(|k| format!("{:.1} MiB", k as f64 / 1024.0))
        .unwrap_or_else(|| "n/a".into())
}

async fn connect(addr: &str) -> Result<Channel, BoxError> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect()
        .await?)
}

/// Polls health until SERVING; returns how long it took since `since`.
async fn wait_serving(addr: &str, since: Instant) -> Result<Duration, BoxError> {
    loop {
        if let Ok(ch) = connect(addr).await {
            let mut h = HealthClient::new(ch);
            if let Ok(r) = h
                .check(HealthCheckRequest {
                    service: String::new(),
                })
                .await
                && r.into_inner().status == 1
            {
                return Ok(since.elapsed());
            }
        }
        if since.elapsed() > Duration::from_secs(60) {
            return Err("server did not become SERVING within 60 s".into());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

fn spawn_server(bin: &PathBuf, dir: &std::path::Path, db: &str) -> Result<ServerProcess, BoxError> {
    let addr = free_addr()?;
    let child = Command::new(bin)
        .current_dir(dir)
        .env("RUST_LOG", "warn")
        .args(["serve", "--listen", &addr, "--database-url", db])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    Ok(ServerProcess { child, addr })
}

fn spawn_ceiling() -> Result<ServerProcess, BoxError> {
    let addr = free_addr()?;
    let child = Command::new(std::env::current_exe()?)
        .args(["--serve-ceiling", &addr])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()?;
    Ok(ServerProcess { child, addr })
}

#[derive(Default)]
struct Stats {
    ok: u64,
    errors: BTreeMap<String, u64>,
    hist: Option<Histogram<u64>>,
    elapsed: Duration,
}

impl Stats {
    fn rps(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64()
    }

    fn quantile_ms(&self, q: f64) -> f64 {
        self.hist
            .as_ref()
            .map(|h| h.value_at_quantile(q) as f64 / 1000.0)
            .unwrap_or_default()
    }
}

/// The seeded population.
struct Seeded {
    names: Vec<String>,
    emails: Vec<String>,
}

fn seed_user(run: &str, i: u64) -> pb::User {
    pb::User {
        email: format!("user{i}.{run}@bench.example.com"),
        display_name: format!("Bench User {i}"),
        given_name: "Bench".into(),
        family_name: format!("User{i}"),
        tags: vec!["bench".into(), format!("cohort-{}", i % 10)],
        metadata: [("plan".to_string(), "pro".to_string())].into(),
        ..Default::default()
    }
}

const PROJECT: &str = "projects/bench";

/// A user as a migration from another system brings it: tag `even` or
/// `odd`, `metadata.shard` 0-15 and `metadata.plan` free, pro or team (the
/// find scenario's data).
fn import_user(run: &str, i: usize) -> pb::User {
    pb::User {
        email: format!("imported{i}.{run}@legacy.example.com"),
        email_verified: true,
        display_name: format!("User {i}"),
        given_name: "Imported".into(),
        family_name: format!("User{i}"),
        external_id: format!("legacy-{run}-{i}"),
        tags: vec![if i.is_multiple_of(2) { "even" } else { "odd" }.into()],
        metadata: [
            ("shard".to_string(), (i % 16).to_string()),
            (
                "plan".to_string(),
                ["free", "pro", "team"][i % 3].to_string(),
            ),
        ]
        .into(),
        ..Default::default()
    }
}

/// The find scenario's query shapes: (label, search query, filter,
/// order_by). A search query makes it a SearchUsers call, else ListUsers.
const FIND_QUERIES: &[(&str, &str, &str, &str)] = &[
    ("one tag (half the users)", "", "tags:\"even\"", ""),
    (
        "one metadata value (1/16)",
        "",
        "metadata.shard = \"5\"",
        "",
    ),
    (
        "tag AND plan (1/6)",
        "",
        "tags:\"even\" AND metadata.plan = \"pro\"",
        "",
    ),
    (
        "tag AND shard (1/16)",
        "",
        "tags:\"even\" AND metadata.shard = \"4\"",
        "",
    ),
    ("NOT tag", "", "NOT tags:\"even\"", ""),
    ("email suffix", "", "email = \"*@legacy.example.com\"", ""),
    ("search prefix", "user 12", "", ""),
    ("search prefix, rare", "user 98765", "", ""),
    (
        "worst: tag AND shard, empty",
        "",
        "tags:\"even\" AND metadata.shard = \"5\"",
        "",
    ),
    (
        "worst: display_name prefix",
        "",
        "display_name = \"User 12*\"",
        "",
    ),
    ("worst: tag by email", "", "tags:\"even\"", "email"),
];

/// Times each of `FIND_QUERIES`, one call in flight, after one untimed call.
async fn run_find(channel: Channel, rounds: usize) -> Result<bool, BoxError> {
    let mut client = UserServiceClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
    let mut ok = true;
    for &(label, query, filter, order_by) in FIND_QUERIES {
        let mut times = Vec::with_capacity(rounds);
        let mut found = 0;
        for round in 0..=rounds {
            let t0 = Instant::now();
            let users = if query.is_empty() {
                client
                    .list_users(pb::ListUsersRequest {
                        parent: PROJECT.into(),
                        page_size: 50,
                        filter: filter.into(),
                        order_by: order_by.into(),
                        ..Default::default()
                    })
                    .await
                    .map(|r| r.into_inner().users.len())
            } else {
                client
                    .search_users(pb::SearchUsersRequest {
                        parent: PROJECT.into(),
                        query: query.into(),
                        page_size: 50,
                        filter: filter.into(),
                        order_by: order_by.into(),
                        ..Default::default()
                    })
                    .await
                    .map(|r| r.into_inner().users.len())
            };
            let elapsed = t0.elapsed();
            match users {
                Ok(n) => found = n,
                Err(status) => {
                    println!("  {label}: {status}");
                    ok = false;
                    break;
                }
            }
            if round > 0 {
                times.push(elapsed);
            }
        }
        times.sort();
        let q = |f: f64| {
            times
                .get(((times.len() as f64 * f).ceil() as usize).saturating_sub(1))
                .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
        };
        println!(
            "  {label:<30} {found:>2} users  p50 {:>8.2} ms  p99 {:>8.2} ms  max {:>8.2} ms",
            q(0.5),
            q(0.99),
            q(1.0)
        );
    }
    Ok(ok)
}

/// The messages of an import of `n` users, 1000 per message.
fn import_messages(run: &str, n: usize) -> Vec<pb::ImportUsersRequest> {
    (0..n)
        .step_by(1000)
        .enumerate()
        .map(|(k, start)| pb::ImportUsersRequest {
            parent: if k == 0 {
                PROJECT.into()
            } else {
                String::new()
            },
            users: (start..(start + 1000).min(n))
                .map(|i| import_user(run, i))
                .collect(),
        })
        .collect()
}

/// What a one-shot bulk scenario moved, and how long it took.
struct Moved {
    users: u64,
    failed: u64,
    elapsed: Duration,
    /// Imports: how long the first and the last 100,000 users took to be
    /// acknowledged (when at least 200,000 were sent).
    ends: Option<(Duration, Duration)>,
}

impl Moved {
    fn per_sec(&self) -> f64 {
        self.users as f64 / self.elapsed.as_secs_f64()
    }
}

async fn run_import(
    channel: Channel,
    messages: Vec<pb::ImportUsersRequest>,
) -> Result<Moved, BoxError> {
    let mut client = UserServiceClient::new(channel);
    let total: i64 = messages.iter().map(|m| m.users.len() as i64).sum();
    const END: i64 = 100_000;
    let t0 = Instant::now();
    let mut acks = client
        .import_users(tokio_stream::iter(messages))
        .await?
        .into_inner();
    let (mut users, mut failed) = (0, 0);
    // When the first END users and all but the last END were acknowledged
    // (a chunk straddling the mark counts at its acknowledgement).
    let (mut first, mut before_last) = (None, None);
    while let Some(a) = acks.message().await? {
        users += a.created_count as u64;
        failed += a.failures.len() as u64;
        let settled = a.committed_through + 1;
        if settled >= END && first.is_none() {
            first = Some(t0.elapsed());
        }
        if settled >= total - END && before_last.is_none() {
            before_last = Some(t0.elapsed());
        }
    }
    let elapsed = t0.elapsed();
    let ends = match (first, before_last) {
        (Some(f), Some(b)) if total >= 2 * END => Some((f, elapsed - b)),
        _ => None,
    };
    Ok(Moved {
        users,
        failed,
        elapsed,
        ends,
    })
}

/// The domain users of import chunk `k` (`chunk` users), as the service
/// would store them: one create time per chunk, time-ordered ids.
fn import_chunk_users(
    run: &str,
    n: usize,
    k: usize,
    chunk: usize,
) -> Vec<user_service::domain::User> {
    use user_service::domain::{NewUser, ProjectId, State, Timestamp, Violations};
    let project = ProjectId::parse_parent(PROJECT).expect("bench project");
    let now = Timestamp::now();
    (k * chunk..((k + 1) * chunk).min(n))
        .map(|i| {
            let mut v = Violations::default();
            let profile = user_service::grpc::convert::parse_profile(
                &import_user(run, i),
                "user",
                &|_| true,
                &mut v,
            );
            NewUser {
                project: project.clone(),
                id: None,
                profile,
                initial_state: State::Active,
            }
            .into_user(now)
        })
        .collect()
}

/// An empty, migrated database of the same engine as `url` for the raw
/// import ceiling: a file beside the bench's, or a schema of its own.
async fn ceiling_database(
    url: &str,
    dir: &std::path::Path,
    rows: user_service::storage::ceiling::Rows,
) -> Result<String, BoxError> {
    use sea_orm::ConnectionTrait;
    let name = format!("raw_ceiling_{rows:?}").to_lowercase();
    let raw = if url.starts_with("sqlite:") {
        format!("sqlite://{}/{name}.db?mode=rwc", dir.display())
    } else {
        let admin = user_service::storage::connect(url, 1).await?;
        admin
            .execute_unprepared(&format!(
                "DROP SCHEMA IF EXISTS {name} CASCADE; CREATE SCHEMA {name}"
            ))
            .await?;
        let sep = if url.contains('?') { '&' } else { '?' };
        format!("{url}{sep}options[search_path]={name}")
    };
    // Migrating on PostgreSQL holds a lock on one connection and runs on
    // another.
    let db = user_service::storage::connect(&raw, 2).await?;
    user_service::storage::migrate(&db).await?;
    db.close().await?;
    Ok(raw)
}

async fn run_stream(channel: Channel) -> Result<Moved, BoxError> {
    let mut client = UserServiceClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
    let t0 = Instant::now();
    let mut s = client
        .stream_users(pb::StreamUsersRequest {
            parent: PROJECT.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut users = 0;
    while let Some(m) = s.message().await? {
        users += m.users.len() as u64;
    }
    Ok(Moved {
        users,
        failed: 0,
        elapsed: t0.elapsed(),
        ends: None,
    })
}

/// Replays the bench project's change log through WatchEvents up to the
/// head it had when the watch started.
async fn run_watch(channel: Channel) -> Result<Moved, BoxError> {
    use user_service::proto::users::v1::event_service_client::EventServiceClient;
    let mut client = EventServiceClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
    let head = client
        .list_events(pb::ListEventsRequest {
            parent: PROJECT.into(),
            page_size: 1,
            ..Default::default()
        })
        .await?
        .into_inner()
        .head_revision;
    let t0 = Instant::now();
    let mut s = client
        .watch_events(pb::WatchEventsRequest {
            parent: PROJECT.into(),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut events = 0;
    while let Some(m) = s.message().await? {
        events += m.events.len() as u64;
        if m.head_revision >= head {
            break;
        }
    }
    Ok(Moved {
        users: events,
        failed: 0,
        elapsed: t0.elapsed(),
        ends: None,
    })
}

/// A unary call as it goes on the wire: the method's path and the request,
/// already framed. The generator sends bytes built before the clock starts
/// for the call, so that encoding stays out of what it measures.
struct Call {
    path: &'static str,
    body: Bytes,
}

impl Call {
    fn new<M: prost::Message>(method: &'static str, request: &M) -> Self {
        let len = request.encoded_len();
        let mut b = BytesMut::with_capacity(5 + len);
        b.put_u8(0);
        b.put_u32(len as u32);
        request.encode(&mut b).expect("a BytesMut grows");
        Call {
            path: method,
            body: b.freeze(),
        }
    }
}

/// An HTTP/2 connection of the generator (the `h2` crate directly: no
/// tonic channel, no buffer task, no decoding of the response message).
async fn h2_connect(addr: &str) -> Result<h2::client::SendRequest<Bytes>, BoxError> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (send, conn) = h2::client::Builder::new()
        .initial_window_size(1 << 20)
        .initial_connection_window_size(1 << 24)
        .handshake(tcp)
        .await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(send)
}

/// The gRPC status of a finished call, by name; `Ok(())` for OK.
async fn h2_call(
    send: &h2::client::SendRequest<Bytes>,
    authority: &http::uri::Authority,
    call: Call,
) -> Result<(), String> {
    let failed = |e: h2::Error| format!("h2: {e}");
    let uri = http::uri::Builder::new()
        .scheme("http")
        .authority(authority.clone())
        .path_and_query(http::uri::PathAndQuery::from_static(call.path))
        .build()
        .map_err(|e| format!("uri: {e}"))?;
    let req = http::Request::post(uri)
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .map_err(|e| format!("request: {e}"))?;
    let mut ready = send.clone().ready().await.map_err(failed)?;
    let (response, mut stream) = ready.send_request(req, false).map_err(failed)?;
    stream.send_data(call.body, true).map_err(failed)?;
    let (parts, mut body) = response.await.map_err(failed)?.into_parts();
    let status = |h: &http::HeaderMap| {
        h.get("grpc-status")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<i32>().ok())
    };
    // A trailers-only answer (an error) carries its status in the headers.
    let mut code = status(&parts.headers);
    if code.is_none() {
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(failed)?;
            let _ = body.flow_control().release_capacity(chunk.len());
        }
        code = body
            .trailers()
            .await
            .map_err(failed)?
            .as_ref()
            .and_then(status);
    }
    match code {
        Some(0) => Ok(()),
        Some(n) => Err(format!("{:?}", tonic::Code::from_i32(n))),
        None => Err(format!("no grpc-status (HTTP {})", parts.status)),
    }
}

/// Longest the generator waits for one call.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `op` from `connections x in_flight` workers: `warmup` unmeasured, then
/// `duration` measured.
async fn load<F>(addr: &str, args: &Args, op: F) -> Result<Stats, BoxError>
where
    F: Fn(u64) -> Call + Clone + Send + Sync + 'static,
{
    let mut connections = Vec::with_capacity(args.connections);
    for _ in 0..args.connections {
        connections.push(h2_connect(addr).await?);
    }
    let start = Instant::now();
    let measure_from = start + args.warmup;
    let end = measure_from + args.duration;
    let seq = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for send in &connections {
        for _ in 0..args.in_flight {
            let send = send.clone();
            let authority: http::uri::Authority = addr.parse()?;
            let op = op.clone();
            let seq = seq.clone();
            tasks.push(tokio::spawn(async move {
                let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("hist");
                let mut ok = 0u64;
                let mut errors: BTreeMap<String, u64> = BTreeMap::new();
                loop {
                    let call = op(seq.fetch_add(1, Ordering::Relaxed));
                    let t0 = Instant::now();
                    if t0 >= end {
                        break;
                    }
                    // A call the server never answers counts as an error
                    // instead of stalling the run.
                    let r = tokio::time::timeout(CALL_TIMEOUT, h2_call(&send, &authority, call))
                        .await
                        .unwrap_or_else(|_| Err("no answer within 30 s".into()));
                    let t1 = Instant::now();
                    if t0 >= measure_from && t1 <= end {
                        match r {
                            Ok(()) => {
                                ok += 1;
                                let _ = hist.record((t1 - t0).as_micros() as u64);
                            }
                            Err(s) => *errors.entry(s).or_default() += 1,
                        }
                    } else if let Err(s) = r {
                        *errors.entry(s).or_default() += 1;
                    }
                }
                (ok, errors, hist)
            }));
        }
    }
    let mut stats = Stats {
        elapsed: args.duration,
        ..Default::default()
    };
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("hist");
    for t in tasks {
        match t.await {
            Ok((ok, errors, h)) => {
                stats.ok += ok;
                for (k, v) in errors {
                    *stats.errors.entry(k).or_default() += v;
                }
                let _ = hist.add(h);
            }
            Err(e) => *stats.errors.entry(format!("worker: {e}")).or_default() += 1,
        }
    }
    stats.hist = Some(hist);
    Ok(stats)
}

async fn seed(channels: &[Channel], args: &Args, run: &str) -> Result<Seeded, BoxError> {
    let total = args.users as u64;
    let next = Arc::new(AtomicU64::new(0));
    let workers = channels.len() * args.seed_in_flight;
    let mut tasks = Vec::new();
    for w in 0..workers {
        let client = UserServiceClient::new(channels[w % channels.len()].clone());
        let next = next.clone();
        let run = run.to_owned();
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let u = client
                    .clone()
                    .create_user(pb::CreateUserRequest {
                        parent: PROJECT.into(),
                        user: Some(seed_user(&run, i)),
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                out.push((u.name, u.email));
            }
            Ok::<_, Status>(out)
        }));
    }
    let mut seeded = Seeded {
        names: Vec::with_capacity(args.users),
        emails: Vec::with_capacity(args.users),
    };
    for t in tasks {
        for (n, e) in t.await?? {
            seeded.names.push(n);
            seeded.emails.push(e);
        }
    }
    Ok(seeded)
}

/// The path of a UserService method.
macro_rules! method {
    ($name:literal) => {
        concat!("/users.v1.UserService/", $name)
    };
}

async fn run_scenario(
    s: Scenario,
    addr: &str,
    args: &Args,
    seeded: &Arc<Seeded>,
    run: &str,
) -> Result<Stats, BoxError> {
    match s {
        // One-shot scenarios, run by `run` itself.
        Scenario::Import
        | Scenario::Stream
        | Scenario::Groups
        | Scenario::Watch
        | Scenario::Find => Ok(Stats::default()),
        Scenario::Get | Scenario::Ceiling => {
            let seeded = seeded.clone();
            let path = method!("GetUser");
            load(addr, args, move |_| {
                let name = if seeded.names.is_empty() {
                    format!("{PROJECT}/users/ceiling")
                } else {
                    seeded.names[fastrand::usize(..seeded.names.len())].clone()
                };
                Call::new(path, &pb::GetUserRequest { name })
            })
            .await
        }
        Scenario::Lookup => {
            let seeded = seeded.clone();
            let path = method!("LookupUser");
            load(addr, args, move |_| {
                let email = seeded.emails[fastrand::usize(..seeded.emails.len())].clone();
                Call::new(
                    path,
                    &pb::LookupUserRequest {
                        parent: PROJECT.into(),
                        identifier: Some(pb::lookup_user_request::Identifier::Email(email)),
                    },
                )
            })
            .await
        }
        Scenario::Create => {
            let run = run.to_owned();
            let path = method!("CreateUser");
            load(addr, args, move |n| {
                let user = pb::User {
                    email: format!("new{n}.{run}@bench.example.com"),
                    ..seed_user(&run, n)
                };
                Call::new(
                    path,
                    &pb::CreateUserRequest {
                        parent: PROJECT.into(),
                        user: Some(user),
                        ..Default::default()
                    },
                )
            })
            .await
        }
        Scenario::List => {
            let path = method!("ListUsers");
            load(addr, args, move |_| {
                Call::new(
                    path,
                    &pb::ListUsersRequest {
                        parent: PROJECT.into(),
                        page_size: 50,
                        filter: format!("tags:\"cohort-{}\"", fastrand::u8(..10)),
                        ..Default::default()
                    },
                )
            })
            .await
        }
        Scenario::Search => {
            let n = seeded.names.len().max(1);
            let path = method!("SearchUsers");
            load(addr, args, move |_| {
                let digits = fastrand::usize(..n).to_string();
                let query = format!("user{}", &digits[..fastrand::usize(1..=digits.len())]);
                Call::new(
                    path,
                    &pb::SearchUsersRequest {
                        parent: PROJECT.into(),
                        query,
                        page_size: 50,
                        ..Default::default()
                    },
                )
            })
            .await
        }
        Scenario::Count => {
            let path = method!("CountUsers");
            load(addr, args, move |_| {
                Call::new(
                    path,
                    &pb::CountUsersRequest {
                        parent: PROJECT.into(),
                        filter: format!(
                            "state = ACTIVE AND tags:\"cohort-{}\"",
                            fastrand::u8(..10)
                        ),
                        ..Default::default()
                    },
                )
            })
            .await
        }
        Scenario::Update => {
            let seeded = seeded.clone();
            let path = method!("UpdateUser");
            load(addr, args, move |n| {
                let name = seeded.names[fastrand::usize(..seeded.names.len())].clone();
                Call::new(
                    path,
                    &pb::UpdateUserRequest {
                        user: Some(pb::User {
                            name,
                            display_name: format!("Renamed {n}"),
                            metadata: [("seen".to_string(), n.to_string())].into(),
                            ..Default::default()
                        }),
                        update_mask: Some(prost_types::FieldMask {
                            paths: vec!["display_name".into(), "metadata.seen".into()],
                        }),
                    },
                )
            })
            .await
        }
    }
}

async fn channels_to(addr: &str, n: usize) -> Result<Vec<Channel>, BoxError> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(connect(addr).await?);
    }
    Ok(v)
}

async fn run(args: Args) -> Result<bool, BoxError> {
    let run_id = format!("{:x}", fastrand::u64(..));
    let dir = tempfile::tempdir()?;
    let db_url = args
        .database_url
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}/bench.db?mode=rwc", dir.path().display()));
    let engine = if db_url.starts_with("postgres") {
        "postgres"
    } else {
        "sqlite"
    };
    let bin = match &args.server_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?
            .parent()
            .ok_or("no parent dir")?
            .join("user-service"),
    };

    let mut server: Option<ServerProcess> = None;
    let target = match &args.target {
        Some(t) => t.trim_start_matches("http://").to_owned(),
        None => {
            let started = Instant::now();
            let s = spawn_server(&bin, dir.path(), &db_url)?;
            let ready = wait_serving(&s.addr, started).await?;
            println!(
                "server: {engine}, first start to SERVING {:.0} ms, idle RSS {}",
                ready.as_secs_f64() * 1000.0,
                mib(proc_kib(s.pid(), "VmRSS:"))
            );
            let addr = s.addr.clone();
            server = Some(s);
            addr
        }
    };
    println!(
        "load: {} connections x {} in flight, {:?} measured after {:?} warm-up per scenario",
        args.connections, args.in_flight, args.duration, args.warmup
    );

    let needs_seed = args.scenarios.iter().any(|s| {
        !matches!(
            s,
            Scenario::Ceiling
                | Scenario::Import
                | Scenario::Stream
                | Scenario::Groups
                | Scenario::Find
        )
    });
    let mut seeded = Seeded {
        names: Vec::new(),
        emails: Vec::new(),
    };
    if needs_seed && args.users > 0 {
        // Seeding is not measured: at least 4 connections whatever the load.
        let channels = channels_to(&target, args.connections.max(4)).await?;
        let t0 = Instant::now();
        seeded = seed(&channels, &args, &run_id).await?;
        let secs = t0.elapsed().as_secs_f64();
        println!(
            "seeded {} users in {:.1} s ({:.0} creates/s)",
            seeded.names.len(),
            secs,
            seeded.names.len() as f64 / secs
        );
        // Restart on the now populated database: start-up time and idle
        // memory on an existing file.
        if let Some(s) = server.as_mut() {
            s.stop();
            let started = Instant::now();
            let s2 = spawn_server(&bin, dir.path(), &db_url)?;
            let ready = wait_serving(&s2.addr, started).await?;
            tokio::time::sleep(Duration::from_millis(200)).await;
            println!(
                "restart on the seeded database: start to SERVING {:.0} ms, idle RSS {}",
                ready.as_secs_f64() * 1000.0,
                mib(proc_kib(s2.pid(), "VmRSS:"))
            );
            server = Some(s2);
        }
    }
    let seeded = Arc::new(seeded);
    let mut target = server.as_ref().map(|s| s.addr.clone()).unwrap_or(target);

    let mut results: Vec<(Scenario, Stats, Option<u64>)> = Vec::new();
    let mut h2load_rates: Vec<(Scenario, f64)> = Vec::new();
    let mut all_ok = true;
    for &s in &args.scenarios {
        if s == Scenario::Groups {
            let channel = connect(&target).await?;
            run_groups(channel, &args, &run_id).await?;
            continue;
        }
        if s == Scenario::Find {
            println!(
                "find: first page of 50, 1 call in flight, {} timed calls per shape",
                args.find_rounds
            );
            if !run_find(connect(&target).await?, args.find_rounds).await? {
                all_ok = false;
            }
            continue;
        }
        if s == Scenario::Watch {
            let moved = run_watch(connect(&target).await?).await?;
            println!(
                "watch    {:>9} events in {:.2} s: {:>9.0} events/s",
                moved.users,
                moved.elapsed.as_secs_f64(),
                moved.per_sec(),
            );
            continue;
        }
        // A self-hosted export runs twice: in the process that ran the
        // scenarios before it (an import's memory must have been given
        // back), then in a fresh one.
        let passes = if s == Scenario::Stream && server.is_some() {
            2
        } else {
            1
        };
        for pass in 0..passes {
            if !matches!(s, Scenario::Import | Scenario::Stream) {
                break;
            }
            if pass == 1
                && let Some(old) = server.as_mut()
            {
                old.stop();
                let s2 = spawn_server(&bin, dir.path(), &db_url)?;
                wait_serving(&s2.addr, Instant::now()).await?;
                target = s2.addr.clone();
                server = Some(s2);
                println!("(stream again, in a fresh server process)");
            }
            let pid = server.as_ref().map(|s| s.pid());
            if let Some(pid) = pid {
                reset_peak(pid);
            }
            let channel = connect(&target).await?;
            let moved = if s == Scenario::Import {
                let messages = import_messages(&run_id, args.import_users);
                run_import(channel, messages).await?
            } else {
                run_stream(channel).await?
            };
            let peak = pid.and_then(|p| proc_kib(p, "VmHWM:"));
            let anon = pid.and_then(|p| proc_kib(p, "RssAnon:"));
            if moved.failed > 0 {
                all_ok = false;
            }
            println!(
                "{:<8} {:>9} users in {:.2} s: {:>9.0} users/s  failed {}  server peak RSS {} (anon now {})",
                format!("{s:?}").to_lowercase(),
                moved.users,
                moved.elapsed.as_secs_f64(),
                moved.per_sec(),
                moved.failed,
                mib(peak),
                mib(anon),
            );
            if let Some((first, last)) = moved.ends {
                println!(
                    "  first 100,000 users acknowledged after {:.2} s, the last 100,000 took {:.2} s: {:.2}x",
                    first.as_secs_f64(),
                    last.as_secs_f64(),
                    last.as_secs_f64() / first.as_secs_f64()
                );
            }
            if args.target.is_none() {
                // The raw ceilings with the same rows, in this run.
                if s == Scenario::Import {
                    use user_service::storage::ceiling::{Rows, prepare, raw_insert};
                    for rows in [Rows::Identifiers, Rows::Full] {
                        let raw = ceiling_database(&db_url, dir.path(), rows).await?;
                        prepare(&raw, rows).await?;
                        let n = args.import_users;
                        let run = run_id.clone();
                        let chunk = user_service::grpc::IMPORT_CHUNK;
                        let encode = user_service::grpc::events::encode_event;
                        let (stored, spent) =
                            raw_insert(&raw, rows, encode, n.div_ceil(chunk), |k| {
                                import_chunk_users(&run, n, k, chunk)
                            })
                            .await?;
                        let raw_rate = stored as f64 / spent.as_secs_f64();
                        println!(
                            "  raw insert ceiling, {}: {stored} users in {:.2} s: {raw_rate:.0} users/s; import / ceiling = {:.2}x",
                            match rows {
                                Rows::Identifiers => "users only, primary key and 4 unique indexes",
                                Rows::Full => "full schema (users, terms, events)",
                            },
                            spent.as_secs_f64(),
                            moved.per_sec() / raw_rate
                        );
                    }
                } else {
                    let (rows, spent) =
                        user_service::storage::ceiling::raw_scan(&db_url, "bench", 500).await?;
                    let raw_rate = rows as f64 / spent.as_secs_f64();
                    println!(
                        "  raw keyset read ceiling, same rows: {rows} users in {:.2} s: {raw_rate:.0} users/s; stream / ceiling = {:.2}x",
                        spent.as_secs_f64(),
                        moved.per_sec() / raw_rate
                    );
                }
            }
        }
        if matches!(s, Scenario::Import | Scenario::Stream) {
            continue;
        }
        let (addr, pid, _ceiling) = if s == Scenario::Ceiling {
            let c = spawn_ceiling()?;
            wait_serving(&c.addr, Instant::now()).await?;
            (c.addr.clone(), Some(c.pid()), Some(c))
        } else {
            (target.clone(), server.as_ref().map(|s| s.pid()), None)
        };
        if let Some(pid) = pid {
            reset_peak(pid);
        }
        let stats = run_scenario(s, &addr, &args, &seeded, &run_id).await?;
        let peak = pid.and_then(|p| proc_kib(p, "VmHWM:"));
        // Mapped database pages count in RSS but are the kernel's page cache;
        // the anonymous part is the server's own memory.
        let anon = pid.and_then(|p| proc_kib(p, "RssAnon:"));
        let errors = if stats.errors.is_empty() {
            "none".to_string()
        } else {
            all_ok = false;
            format!("{:?}", stats.errors)
        };
        println!(
            "{:<8} {:>9.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms  p99.9 {:>6.2} ms  server peak RSS {:>9} (anon {:>9})  errors: {}",
            format!("{s:?}").to_lowercase(),
            stats.rps(),
            stats.quantile_ms(0.50),
            stats.quantile_ms(0.99),
            stats.quantile_ms(0.999),
            mib(peak),
            mib(anon),
            errors
        );
        // The same load from h2load, one fixed request (it cannot vary them).
        let fixed = match s {
            Scenario::Ceiling => Some(Call::new(
                method!("GetUser"),
                &pb::GetUserRequest {
                    name: format!("{PROJECT}/users/ceiling"),
                },
            )),
            Scenario::Get => seeded.names.first().map(|name| {
                Call::new(
                    method!("GetUser"),
                    &pb::GetUserRequest { name: name.clone() },
                )
            }),
            Scenario::Lookup => seeded.emails.first().map(|email| {
                Call::new(
                    method!("LookupUser"),
                    &pb::LookupUserRequest {
                        parent: PROJECT.into(),
                        identifier: Some(pb::lookup_user_request::Identifier::Email(email.clone())),
                    },
                )
            }),
            _ => None,
        };
        if let Some(call) = fixed.filter(|_| !args.no_h2load) {
            // h2load takes any HTTP 200 for a success: the request must be
            // answered OK before its rate means anything.
            let send = h2_connect(&addr).await?;
            let authority: http::uri::Authority = addr.parse()?;
            let probe = Call {
                path: call.path,
                body: call.body.clone(),
            };
            h2_call(&send, &authority, probe)
                .await
                .map_err(|e| format!("the request h2load would send fails: {e}"))?;
            let rps = h2load(&addr, &args, &call, dir.path())?;
            println!(
                "{:<8} {rps:>9.0} req/s  (h2load, one fixed request: one hot key)",
                format!("{s:?}").to_lowercase(),
            );
            h2load_rates.push((s, rps));
        }
        results.push((s, stats, peak));
    }

    if let Some((_, ceiling, _)) = results.iter().find(|(s, _, _)| *s == Scenario::Ceiling) {
        let c = ceiling.rps();
        println!("\nratios to the ceiling of this run ({c:.0} req/s), {engine}:");
        for (s, st, _) in &results {
            if *s != Scenario::Ceiling {
                println!(
                    "  {:<8} {:.2}x",
                    format!("{s:?}").to_lowercase(),
                    st.rps() / c
                );
            }
        }
    }
    if let Some((_, c)) = h2load_rates.iter().find(|(s, _)| *s == Scenario::Ceiling) {
        println!("\nratios to h2load's ceiling of this run ({c:.0} req/s), {engine}:");
        for (s, rps) in &h2load_rates {
            if *s != Scenario::Ceiling {
                println!("  {:<8} {:.2}x", format!("{s:?}").to_lowercase(), rps / c);
            }
        }
        if let Some((_, mine, _)) = results.iter().find(|(s, _, _)| *s == Scenario::Ceiling) {
            println!(
                "  user-bench's own ceiling / h2load's: {:.2}x (the generator is not the \
                 bottleneck while this stays near 1)",
                mine.rps() / c
            );
        }
    }
    Ok(all_ok)
}

/// Runs h2load (Debian's nghttp2-client) with this run's connections,
/// streams, warm-up and duration, sending `call` every time; its requests/s.
fn h2load(addr: &str, args: &Args, call: &Call, dir: &std::path::Path) -> Result<f64, BoxError> {
    let body = dir.join("h2load-request.bin");
    std::fs::write(&body, &call.body)?;
    let out = Command::new("h2load")
        .args(["-t", "1"])
        .args(["-c", &args.connections.to_string()])
        .args(["-m", &args.in_flight.to_string()])
        .args(["-D", &args.duration.as_secs().max(1).to_string()])
        .args(["--warm-up-time", &args.warmup.as_secs().to_string()])
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .arg("-d")
        .arg(&body)
        .arg(format!("http://{addr}{}", call.path))
        .output()
        .map_err(|e| format!("h2load (apt-get install nghttp2-client, or --no-h2load): {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "finished in 10.00s, 117603.75 req/s, 27.70MB/s"
    let rps = text
        .lines()
        .find(|l| l.starts_with("finished in"))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|r| r.trim_end_matches(" req/s").parse::<f64>().ok())
        .ok_or_else(|| format!("h2load printed no rate: {text}"))?;
    let failed = text
        .lines()
        .any(|l| l.starts_with("requests:") && !l.contains(" 0 failed"));
    if failed || !out.status.success() {
        return Err(format!("h2load reported failures: {text}").into());
    }
    Ok(rps)
}

/// The trivial UserService of the ceiling scenario.
struct Ceiling {
    user: pb::User,
}

#[tonic::async_trait]
impl UserService for Ceiling {
    async fn create_user(
        &self,
        _: Request<pb::CreateUserRequest>,
    ) -> Result<Response<pb::User>, Status> {
        Err(Status::unimplemented("ceiling"))
    }
    async fn get_user(&self, _: Request<pb::GetUserRequest>) -> Result<Response<pb::User>, Status> {
        Ok(Response::new(self.user.clone()))
    }
    async fn lookup_user(
        &self,
        _: Request<pb::LookupUserRequest>,
    ) -> Result<Response<pb::User>, Status> {
        Ok(Response::new(self.user.clone()))
    }
    async fn update_user(
        &self,
        _: Request<pb::UpdateUserRequest>,
    ) -> Result<Response<pb::User>, Status> {
        Err(Status::unimplemented("ceiling"))
    }
    async fn delete_user(
        &self,
        _: Request<pb::DeleteUserRequest>,
    ) -> Result<Response<pb::User>, Status> {
        Err(Status::unimplemented("ceiling"))
    }
    async fn undelete_user(
        &self,
        _: Request<pb::UndeleteUserRequest>,
    ) -> Result<Response<pb::User>, Status> {
        Err(Status::unimplemented("ceiling"))
    }
    async fn activate_user(
        &self,
        _: Request<pb::ActivateUserRequest>,
    ) -> Result<Response<pb::User>, Status> {
        Err(Status::unimplemented("ceiling"))
    }
    async fn disable_user(
        &self,
        _: Request<pb::DisableUserRequest>,
    ) -> Result<Response<pb::User>, Status> {
        Err(Status::unimplemented("ceiling"))
    }
    async fn list_users(
        &self,
        _: Request<pb::ListUsersRequest>,
    ) -> Result<Response<pb::ListUsersResponse>, Status> {
        Err(Status::unimplemented("ceiling"))
    }
    async fn search_users(
        &self,
        _: Request<pb::SearchUsersRequest>,
    ) -> Result<Response<pb::SearchUsersResponse>, Status> {
        Err(Status::unimplemented("ceiling"))
    }
    async fn count_users(
        &self,
        _: Request<pb::CountUsersRequest>,
    ) -> Result<Response<pb::CountUsersResponse>, Status> {
        Err(Status::unimplemented("ceiling"))
    }
    async fn batch_get_users(
        &self,
        _: Request<pb::BatchGetUsersRequest>,
    ) -> Result<Response<pb::BatchGetUsersResponse>, Status> {
        Err(Status::unimplemented("ceiling"))
    }
    type StreamUsersStream = tokio_stream::Empty<Result<pb::StreamUsersResponse, Status>>;
    async fn stream_users(
        &self,
        _: Request<pb::StreamUsersRequest>,
    ) -> Result<Response<Self::StreamUsersStream>, Status> {
        Err(Status::unimplemented("ceiling"))
    }
    async fn batch_create_users(
        &self,
        _: Request<pb::BatchCreateUsersRequest>,
    ) -> Result<Response<pb::BatchCreateUsersResponse>, Status> {
        Err(Status::unimplemented("ceiling"))
    }
    type ImportUsersStream = tokio_stream::Empty<Result<pb::ImportUsersResponse, Status>>;
    async fn import_users(
        &self,
        _: Request<tonic::Streaming<pb::ImportUsersRequest>>,
    ) -> Result<Response<Self::ImportUsersStream>, Status> {
        Err(Status::unimplemented("ceiling"))
    }
}

async fn serve_ceiling(addr: SocketAddr) -> Result<(), BoxError> {
    let now = prost_types::Timestamp {
        seconds: 1_790_000_000,
        nanos: 0,
    };
    // The same shape as a seeded user, as the real server returns it.
    let user = pb::User {
        name: format!("{PROJECT}/users/01a2035c-f346-738c-b769-93a19fd1d5e6"),
        state: pb::user::State::Active as i32,
        create_time: Some(now),
        update_time: Some(now),
        etag: "W/\"1-18ea5fd10f106e34\"".into(),
        ..seed_user("ceiling", 12345)
    };
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    tonic::transport::Server::builder()
        .add_service(health)
        .add_service(UserServiceServer::new(Ceiling { user }))
        .serve(addr)
        .await?;
    Ok(())
}

/// Mean and 99th percentile of timed calls, in ms.
fn summary(times: &[Duration]) -> (f64, f64) {
    let mut ms: Vec<f64> = times.iter().map(|t| t.as_secs_f64() * 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    let mean = ms.iter().sum::<f64>() / ms.len().max(1) as f64;
    let p99 = ms
        .get(((ms.len() as f64 * 0.99).ceil() as usize).saturating_sub(1))
        .copied()
        .unwrap_or(0.0);
    (mean, p99)
}

/// The groups scenario (see `Scenario::Groups`).
async fn run_groups(channel: Channel, args: &Args, run: &str) -> Result<(), BoxError> {
    use user_service::proto::users::v1::group_service_client::GroupServiceClient;
    let n = args.group_members;
    let rounds = args.group_rounds.max(1);
    let mut users = UserServiceClient::new(channel.clone()).max_decoding_message_size(64 << 20);
    let mut groups = GroupServiceClient::new(channel.clone());

    // n members, imported.
    let t0 = Instant::now();
    let run = format!("{run}g");
    let moved = run_import(channel.clone(), import_messages(&run, n)).await?;
    println!(
        "groups: imported {} users in {:.1} s",
        moved.users,
        t0.elapsed().as_secs_f64()
    );
    let mut names = Vec::with_capacity(n);
    let mut s = users
        .stream_users(pb::StreamUsersRequest {
            parent: PROJECT.into(),
            filter: format!("email = \"*.{run}@legacy.example.com\""),
            ..Default::default()
        })
        .await?
        .into_inner();
    while let Some(m) = s.message().await? {
        names.extend(m.users.into_iter().map(|u| u.name));
    }
    if names.len() != n {
        return Err(format!("exported {} users, imported {n}", names.len()).into());
    }
    // 1000 members spread over the whole id range (not the newest ids, which
    // would all land at the right edge of the index).
    let extra: Vec<String> = names
        .iter()
        .step_by((n / 1000).max(1))
        .take(1000)
        .cloned()
        .collect();

    let group = |id: &str| pb::CreateGroupRequest {
        parent: PROJECT.into(),
        group_id: format!("{id}-{run}"),
        group: Some(pb::Group {
            display_name: id.into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let big = groups.create_group(group("big")).await?.into_inner().name;
    let empty = groups.create_group(group("empty")).await?.into_inner().name;
    let outer = groups.create_group(group("outer")).await?.into_inner().name;

    // Fill the large group, 4 calls in flight.
    let t0 = Instant::now();
    let mut fills = tokio::task::JoinSet::new();
    let chunks: Vec<Vec<String>> = names.chunks(1000).map(<[String]>::to_vec).collect();
    let chunks = Arc::new(std::sync::Mutex::new(chunks));
    for _ in 0..4 {
        let mut g = groups.clone();
        let chunks = chunks.clone();
        let big = big.clone();
        fills.spawn(async move {
            loop {
                let next = chunks.lock().map_err(|_| "poisoned")?.pop();
                let Some(members) = next else {
                    return Ok::<(), BoxError>(());
                };
                g.add_group_members(pb::AddGroupMembersRequest {
                    group: big.clone(),
                    members,
                })
                .await?;
            }
        });
    }
    while let Some(r) = fills.join_next().await {
        r??;
    }
    let fill = t0.elapsed().as_secs_f64();
    println!(
        "groups: added {n} members in {fill:.1} s ({:.0} members/s, 1000 a call, 4 in flight)",
        n as f64 / fill
    );
    groups
        .add_group_members(pb::AddGroupMembersRequest {
            group: outer.clone(),
            members: vec![big.clone()],
        })
        .await?;

    // Page through once for the token of the last full page.
    let page = |group: &str, transitive: bool, token: String| pb::ListGroupMembersRequest {
        group: group.to_owned(),
        transitive,
        page_size: 1000,
        page_token: token,
    };
    let mut lasts = Vec::new();
    for (group, transitive) in [(&big, false), (&outer, true)] {
        let t0 = Instant::now();
        let (mut token, mut last, mut listed) = (String::new(), String::new(), 0usize);
        loop {
            let r = groups
                .list_group_members(page(group, transitive, token.clone()))
                .await?
                .into_inner();
            listed += r.members.len();
            if r.members.len() == 1000 {
                last.clone_from(&token);
            }
            if r.next_page_token.is_empty() {
                break;
            }
            token = r.next_page_token;
        }
        println!(
            "groups: paged through {listed} members of {group} (transitive {transitive}, \
             pages of 1000) in {:.1} s",
            t0.elapsed().as_secs_f64()
        );
        lasts.push(last);
    }
    let (last, last_transitive) = (lasts[0].clone(), lasts[1].clone());

    let timed = |times: &mut Vec<Duration>, t: Instant| times.push(t.elapsed());
    for (what, group, transitive, last) in [
        ("direct", &big, false, &last),
        ("transitive", &outer, true, &last_transitive),
    ] {
        let (mut first_t, mut last_t) = (Vec::new(), Vec::new());
        for _ in 0..rounds {
            let t = Instant::now();
            groups
                .list_group_members(page(group, transitive, String::new()))
                .await?;
            timed(&mut first_t, t);
            let t = Instant::now();
            groups
                .list_group_members(page(group, transitive, last.clone()))
                .await?;
            timed(&mut last_t, t);
        }
        let (f, fp) = summary(&first_t);
        let (l, lp) = summary(&last_t);
        println!(
            "ListGroupMembers {what}, {n} members, pages of 1000: first page mean {f:.2} ms (p99 {fp:.2}), \
             last page mean {l:.2} ms (p99 {lp:.2}); last / first = {:.2}x",
            l / f
        );
    }

    // 1000 members into the large group (taken out of it first) and into an
    // empty one, alternating; removed again between rounds (not timed).
    groups
        .remove_group_members(pb::RemoveGroupMembersRequest {
            group: big.clone(),
            members: extra.clone(),
        })
        .await?;
    let (mut into_big, mut into_empty) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        for (group, times) in [(&big, &mut into_big), (&empty, &mut into_empty)] {
            let t = Instant::now();
            groups
                .add_group_members(pb::AddGroupMembersRequest {
                    group: group.clone(),
                    members: extra.clone(),
                })
                .await?;
            timed(times, t);
            groups
                .remove_group_members(pb::RemoveGroupMembersRequest {
                    group: group.clone(),
                    members: extra.clone(),
                })
                .await?;
        }
    }
    let (b, bp) = summary(&into_big);
    let (e, ep) = summary(&into_empty);
    println!(
        "AddGroupMembers of 1000 users: into the {n}-member group mean {b:.2} ms (p99 {bp:.2}), \
         into an empty group mean {e:.2} ms (p99 {ep:.2}); large / empty = {:.2}x",
        b / e
    );
    Ok(())
}
