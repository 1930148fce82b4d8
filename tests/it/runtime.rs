//! The runtime never blocks: while slow counts keep every list/count reader
//! busy, point reads and health checks still answer at once, and a count
//! whose caller gives up stops.

use std::time::{Duration, Instant};

use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;
use user_service::proto::users::v1 as pb;

use crate::both_engines;
use crate::harness::*;

const USERS: usize = 20_000;
/// A filter every user must be read for (a substring of a free-text field).
const SLOW: &str = "display_name = \"*7*\"";

async fn seed(c: &mut Client) -> String {
    let users: Vec<User> = (0..USERS)
        .map(|i| User {
            email: format!("u{i}@example.com"),
            display_name: format!("User {i}"),
            ..Default::default()
        })
        .collect();
    crate::bulk::import(c, users, 2000).await.expect("import");
    create(c, user("probe@example.com")).await.name
}

async fn count(c: &mut Client) -> i64 {
    c.count_users(pb::CountUsersRequest {
        parent: PROJECT.into(),
        filter: SLOW.into(),
        ..Default::default()
    })
    .await
    .expect("count")
    .into_inner()
    .total_size
}

async fn point_reads_and_health_answer_while_counts_saturate(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    let probe = seed(&mut c).await;

    let t = Instant::now();
    let want = count(&mut c).await;
    let one_count = t.elapsed();
    assert!(want > 0);

    // 24 callers counting in a loop: far more than there are readers.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut counters = Vec::new();
    for _ in 0..24 {
        let mut c = s.client();
        let stop = stop.clone();
        counters.push(tokio::spawn(async move {
            let mut slowest = Duration::ZERO;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let t = Instant::now();
                assert_eq!(count(&mut c).await, want);
                slowest = slowest.max(t.elapsed());
            }
            slowest
        }));
    }
    tokio::time::sleep(one_count * 2).await;
    let mut worst_get = Duration::ZERO;
    let mut worst_health = Duration::ZERO;
    let mut health = HealthClient::new(s.channel.clone());
    let until = Instant::now() + (one_count * 12).max(Duration::from_secs(2));
    while Instant::now() < until {
        let t = Instant::now();
        get(&mut c, &probe).await.expect("get");
        worst_get = worst_get.max(t.elapsed());
        let t = Instant::now();
        let h = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("health");
        assert_eq!(h.into_inner().status, 1);
        worst_health = worst_health.max(t.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut slowest_count = Duration::ZERO;
    for t in counters {
        slowest_count = slowest_count.max(t.await.unwrap());
    }
    eprintln!(
        "one count {one_count:?}; under load: slowest count {slowest_count:?}, \
         worst GetUser {worst_get:?}, worst health {worst_health:?}"
    );
    // The counts queued behind each other (the readers were saturated) ...
    assert!(slowest_count > one_count * 4, "the counts never queued");
    // ... yet a point read and a health check never waited for them.
    assert!(
        worst_get < slowest_count / 2,
        "GetUser waited behind the counts"
    );
    assert!(
        worst_health < slowest_count / 2,
        "health waited behind the counts"
    );
}

/// SQLite interrupts the statement of a call that was dropped. (PostgreSQL
/// bounds a statement by the server-side `statement_timeout` instead: the
/// request timeout plus 5 s.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_count_whose_caller_gives_up_stops() {
    let s = TestServer::start(Engine::Sqlite).await;
    let mut c = s.client();
    let probe = seed(&mut c).await;
    let t = Instant::now();
    count(&mut c).await;
    let one_count = t.elapsed();
    // Deadlines far shorter than a count: each call fails with
    // DEADLINE_EXCEEDED (or CANCELLED) and its query is interrupted, so the
    // readers are free again right away.
    for _ in 0..32 {
        let mut req = tonic::Request::new(pb::CountUsersRequest {
            parent: PROJECT.into(),
            filter: SLOW.into(),
            ..Default::default()
        });
        req.set_timeout(Duration::from_millis(1));
        let st = c.count_users(req).await.unwrap_err();
        assert!(
            matches!(
                st.code(),
                tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
            ),
            "{st:?}"
        );
    }
    // Had the 32 counts run on, the next one would queue behind them.
    let t = Instant::now();
    count(&mut c).await;
    let after = t.elapsed();
    eprintln!("one count {one_count:?}; after 32 abandoned ones {after:?}");
    assert!(
        after < one_count * 4,
        "abandoned counts kept running: {after:?} vs {one_count:?}"
    );
    get(&mut c, &probe).await.expect("get");
}

both_engines!(point_reads_and_health_answer_while_counts_saturate);
