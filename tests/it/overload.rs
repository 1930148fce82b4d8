//! Load shedding: beyond --max-in-flight running calls and
//! --max-queued-calls waiting ones, calls are refused at once with
//! RESOURCE_EXHAUSTED (OVERLOADED, with RetryInfo) instead of queueing
//! without bound; health still answers while the server sheds.

use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tonic::Code;
use tonic_types::StatusExt;
use user_service::proto::users::v1 as pb;

use crate::both_engines;
use crate::harness::*;

/// A slow call: 1000 users in one transaction.
fn big_batch(tag: usize) -> pb::BatchCreateUsersRequest {
    pb::BatchCreateUsersRequest {
        parent: PROJECT.into(),
        requests: (0..1000)
            .map(|i| pb::CreateUserRequest {
                user: Some(user(&format!("b{tag}-{i}@example.com"))),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }
}

both_engines!(excess_calls_are_shed_and_health_still_answers);

async fn excess_calls_are_shed_and_health_still_answers(engine: Engine) {
    let s = TestServer::start_with(engine, |s| {
        s.max_in_flight = 1;
        s.max_queued_calls = 1;
        s.max_queue_wait = Duration::from_secs(30);
    })
    .await;

    let mut calls = JoinSet::new();
    for tag in 0..12 {
        let mut c = s.client();
        calls.spawn(async move {
            let t = Instant::now();
            (c.batch_create_users(big_batch(tag)).await, t.elapsed())
        });
    }
    // While the slot and the queue are taken, health answers at once.
    let mut health = tonic_health::pb::health_client::HealthClient::new(s.channel.clone());
    let t = Instant::now();
    let h = health
        .check(tonic_health::pb::HealthCheckRequest::default())
        .await
        .expect("health")
        .into_inner();
    assert_eq!(h.status, 1, "SERVING while shedding");
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());

    let (mut ok, mut shed) = (0, 0);
    while let Some(r) = calls.join_next().await {
        match r.expect("task") {
            (Ok(_), _) => ok += 1,
            (Err(e), took) => {
                assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
                assert_eq!(reason(&e), "OVERLOADED");
                assert!(
                    e.get_details_retry_info().is_some(),
                    "a shed call says when to retry"
                );
                assert!(
                    took < Duration::from_secs(2),
                    "shed at once, not after waiting: {took:?}"
                );
                shed += 1;
            }
        }
    }
    assert!(ok >= 2, "the running and the queued call finish: {ok} ok");
    assert!(
        shed >= 1,
        "calls beyond one running and one queued are shed"
    );
    assert_eq!(ok + shed, 12);
    assert_eq!(
        count_all(&mut s.client(), "").await,
        ok * 1000,
        "a shed call stored nothing"
    );
}
