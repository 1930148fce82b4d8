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

    // The time of one count alone: the fastest of a few, so that the
    // baseline is not what the seeding left behind (on PostgreSQL the
    // import's VACUUM writes every new page once; other tests run beside).
    let mut one_count = Duration::MAX;
    let mut want = 0;
    for _ in 0..3 {
        let t = Instant::now();
        want = count(&mut c).await;
        one_count = one_count.min(t.elapsed());
    }
    assert!(want > 0);

    // 32 callers counting in a loop: far more than there are readers.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut counters = Vec::new();
    for _ in 0..32 {
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
    let mut gets = Vec::new();
    let mut healths = Vec::new();
    let mut health = HealthClient::new(s.channel.clone());
    let until = Instant::now() + (one_count * 12).max(Duration::from_secs(2));
    while Instant::now() < until {
        let t = Instant::now();
        get(&mut c, &probe).await.expect("get");
        gets.push(t.elapsed());
        let t = Instant::now();
        let h = health
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .expect("health");
        assert_eq!(h.into_inner().status, 1);
        healths.push(t.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut slowest_count = Duration::ZERO;
    for t in counters {
        slowest_count = slowest_count.max(t.await.unwrap());
    }
    gets.sort();
    healths.sort();
    let (median_get, worst_get) = (gets[gets.len() / 2], gets[gets.len() - 1]);
    let (median_health, worst_health) = (healths[healths.len() / 2], healths[healths.len() - 1]);
    eprintln!(
        "one count {one_count:?}; under load: slowest count {slowest_count:?}, \
         GetUser median {median_get:?} worst {worst_get:?}, \
         health median {median_health:?} worst {worst_health:?}"
    );
    // The counts queued behind each other (the readers were saturated) ...
    assert!(slowest_count > one_count * 4, "the counts never queued");
    // ... yet point reads and health checks did not wait for them: they
    // share only the CPU (two cores, tests running beside this one), never
    // the queue, so none waits as long as a queued count.
    assert!(
        median_get * 4 < slowest_count,
        "GetUser waited behind the counts"
    );
    assert!(
        worst_get * 4 < slowest_count * 3,
        "GetUser waited behind the counts"
    );
    assert!(
        median_health * 4 < slowest_count,
        "health waited behind the counts"
    );
    assert!(
        worst_health * 4 < slowest_count * 3,
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
    // Forty substring tests per user: a count that takes a while.
    let heavy: String = (0..40)
        .map(|d| format!("display_name = \"*{}*\"", 1000 + d * 7))
        .collect::<Vec<_>>()
        .join(" OR ");
    let heavy_count = |deadline: Option<Duration>| {
        let mut req = tonic::Request::new(pb::CountUsersRequest {
            parent: PROJECT.into(),
            filter: heavy.clone(),
            ..Default::default()
        });
        if let Some(d) = deadline {
            req.set_timeout(d);
        }
        req
    };
    let t = Instant::now();
    c.count_users(heavy_count(None)).await.expect("count");
    let one = t.elapsed();
    // As many abandoned counts as there are readers, each given up a fifth
    // of the way in: interrupted, they free their readers at once.
    let mut calls = Vec::new();
    for _ in 0..4 {
        let mut c = s.client();
        let req = heavy_count(Some(one / 5));
        calls.push(tokio::spawn(async move { c.count_users(req).await }));
    }
    for call in calls {
        let st = call.await.unwrap().unwrap_err();
        assert!(
            matches!(
                st.code(),
                tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
            ),
            "{st:?}"
        );
    }
    // Had they run on, this count would first wait most of `one` for a
    // reader.
    let t = Instant::now();
    c.count_users(heavy_count(None)).await.expect("count");
    let after = t.elapsed();
    eprintln!("one heavy count {one:?}; right after 4 abandoned ones {after:?}");
    assert!(
        after < one + one / 2,
        "abandoned counts kept running: {after:?} vs {one:?}"
    );
    get(&mut c, &probe).await.expect("get");
}

both_engines!(point_reads_and_health_answer_while_counts_saturate);
