//! Two server processes on one PostgreSQL schema, raced against each other
//! round after round: the same create, the same idempotent create and the
//! same conditional update sent to both at once; then both purging the same
//! soft-deleted users, every row purged (and counted) by exactly one of them.

use std::time::{Duration, Instant};

use prost_types::FieldMask;
use tokio::task::JoinSet;
use tonic::{Code, Response, Status};
use user_service::proto::users::v1 as pb;

use crate::harness::*;
use crate::server::Process;

const ROUNDS: usize = 40;
const PURGED: usize = 300;
const PURGE_PROJECT: &str = "projects/replicas-purge";
const PURGED_METRIC: &str = "user_service_purged_users_total";

fn describe(s: &Status) -> String {
    format!("{:?} ({})", s.code(), s.message())
}

fn outcome<T>(r: &Result<T, Status>) -> String {
    r.as_ref().map_or_else(describe, |_| "OK".to_owned())
}

/// The answer of the one call of a race that succeeded and the error of the
/// other; fails naming both outcomes otherwise.
fn one_won<T>(
    what: &str,
    from_a: Result<Response<T>, Status>,
    from_b: Result<Response<T>, Status>,
) -> (T, Status) {
    match (from_a, from_b) {
        (Ok(won), Err(lost)) | (Err(lost), Ok(won)) => (won.into_inner(), lost),
        (from_a, from_b) => panic!(
            "{what}: want exactly one OK, got A: {}, B: {}",
            outcome(&from_a),
            outcome(&from_b)
        ),
    }
}

/// Replicas A and B serve the same PostgreSQL schema; every race sends one
/// call to each at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_race_on_one_postgres() {
    if postgres_url().is_none() {
        return;
    }
    let db = TestDb::new(Engine::Postgres).await;
    let args = ["--delete-retention", "1s", "--purge-interval", "200ms"];
    let ra = Process::start("A", &db.url, &args).await;
    let rb = Process::start("B", &db.url, &args).await;
    let (mut a, mut b) = (ra.client().await, rb.client().await);
    let before = (
        ra.metric(PURGED_METRIC, &[]).await as u64,
        rb.metric(PURGED_METRIC, &[]).await as u64,
    );
    assert_eq!(before, (0, 0), "purged (A, B) before any delete");

    for round in 0..ROUNDS {
        // 1. The same email, no request_id: one creates, the other conflicts.
        let email = format!("race{round}@example.com");
        let req = pb::CreateUserRequest {
            parent: PROJECT.into(),
            user: Some(user(&email)),
            ..Default::default()
        };
        let (from_a, from_b) = tokio::join!(a.create_user(req.clone()), b.create_user(req));
        let what = format!("round {round}: CreateUser of one email");
        let (_, lost) = one_won(&what, from_a, from_b);
        assert_eq!(
            lost.code(),
            Code::AlreadyExists,
            "{what}: {}",
            describe(&lost)
        );
        assert_eq!(reason(&lost), "EMAIL_ALREADY_EXISTS", "{what}");
        let filter = format!("email = \"{email}\"");
        assert_eq!(count_all(&mut b, &filter).await, 1, "{what}");

        // 2. The same request_id and request: both answer the one user.
        let email = format!("idem{round}@example.com");
        let req = pb::CreateUserRequest {
            parent: PROJECT.into(),
            user: Some(user(&email)),
            request_id: format!("replicas-{round}"),
            ..Default::default()
        };
        let (from_a, from_b) = tokio::join!(a.create_user(req.clone()), b.create_user(req));
        let what = format!("round {round}: CreateUser with one request_id");
        let (Ok(from_a), Ok(from_b)) = (&from_a, &from_b) else {
            panic!(
                "{what}: want both OK, got A: {}, B: {}",
                outcome(&from_a),
                outcome(&from_b)
            );
        };
        let name = &from_a.get_ref().name;
        assert_eq!(name, &from_b.get_ref().name, "{what}");
        let found = a
            .lookup_user(pb::LookupUserRequest {
                parent: PROJECT.into(),
                identifier: Some(pb::lookup_user_request::Identifier::Email(email.clone())),
            })
            .await
            .unwrap_or_else(|s| panic!("{what}: LookupUser: {}", describe(&s)))
            .into_inner();
        assert_eq!(&found.name, name, "{what}");
        let filter = format!("email = \"{email}\"");
        assert_eq!(count_all(&mut a, &filter).await, 1, "{what}");

        // 3. The same etag, different display names: one writes, the other
        // is ABORTED, and the stored user is the winner's.
        let made = create(&mut a, user(&format!("upd{round}@example.com"))).await;
        let update = |display_name: String| pb::UpdateUserRequest {
            user: Some(User {
                name: made.name.clone(),
                etag: made.etag.clone(),
                display_name,
                ..Default::default()
            }),
            update_mask: Some(FieldMask {
                paths: vec!["display_name".into()],
            }),
        };
        let (from_a, from_b) = tokio::join!(
            a.update_user(update(format!("A{round}"))),
            b.update_user(update(format!("B{round}")))
        );
        let what = format!("round {round}: UpdateUser with one etag");
        let (won, lost) = one_won(&what, from_a, from_b);
        assert_eq!(lost.code(), Code::Aborted, "{what}: {}", describe(&lost));
        assert_eq!(reason(&lost), "ETAG_MISMATCH", "{what}");
        let stored = get(&mut b, &made.name)
            .await
            .unwrap_or_else(|s| panic!("{what}: GetUser: {}", describe(&s)));
        assert_eq!(stored.display_name, won.display_name, "{what}");
        assert_eq!(stored.etag, won.etag, "{what}");
    }

    // 4. Both purge the same soft-deleted users: each is erased and counted
    // by exactly one replica.
    let created = a
        .batch_create_users(pb::BatchCreateUsersRequest {
            parent: PURGE_PROJECT.into(),
            requests: (0..PURGED)
                .map(|i| pb::CreateUserRequest {
                    user: Some(user(&format!("purge{i}@example.com"))),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
        .await
        .expect("batch_create_users")
        .into_inner()
        .users;
    assert_eq!(created.len(), PURGED);
    // 50 at a time per replica: within what a replica takes at once
    // (--max-in-flight and --max-queued-calls), so none is shed.
    for (k, chunk) in created.chunks(100).enumerate() {
        let mut deletes = JoinSet::new();
        for (i, u) in chunk.iter().enumerate().map(|(i, u)| (i + k * 100, u)) {
            let mut c = if i % 2 == 0 { a.clone() } else { b.clone() };
            let name = u.name.clone();
            deletes.spawn(async move {
                c.delete_user(pb::DeleteUserRequest {
                    name,
                    ..Default::default()
                })
                .await
            });
        }
        while let Some(r) = deletes.join_next().await {
            if let Err(s) = r.expect("delete task") {
                panic!("DeleteUser: {}", describe(&s));
            }
        }
    }

    let start = Instant::now();
    loop {
        let left = a
            .count_users(pb::CountUsersRequest {
                parent: PURGE_PROJECT.into(),
                filter: String::new(),
                show_deleted: true,
            })
            .await
            .expect("count_users")
            .into_inner()
            .total_size;
        let (by_a, by_b) = (
            ra.metric(PURGED_METRIC, &[]).await as u64,
            rb.metric(PURGED_METRIC, &[]).await as u64,
        );
        if left == 0 && by_a + by_b >= PURGED as u64 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "after {:?}: {left} of {PURGED} deleted users still stored; purged by A {by_a}, by B {by_b}",
            start.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A few more purge passes: a row counted twice, late, would show now.
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (by_a, by_b) = (
        ra.metric(PURGED_METRIC, &[]).await as u64,
        rb.metric(PURGED_METRIC, &[]).await as u64,
    );
    eprintln!("purged by A {by_a}, by B {by_b} in {:?}", start.elapsed());
    assert_eq!(
        by_a + by_b,
        PURGED as u64,
        "purged by A {by_a}, by B {by_b}: each row must be counted exactly once"
    );
    for (i, u) in created.iter().enumerate() {
        let c = if i % 2 == 0 { &mut a } else { &mut b };
        match get(c, &u.name).await {
            Err(s) if s.code() == Code::NotFound => {}
            other => panic!("{} after the purge: {}", u.name, outcome(&other)),
        }
    }
    let listed = b
        .list_users(pb::ListUsersRequest {
            parent: PURGE_PROJECT.into(),
            page_size: 1000,
            show_deleted: true,
            ..Default::default()
        })
        .await
        .expect("list_users")
        .into_inner()
        .users;
    assert!(
        listed.is_empty(),
        "{} purged users still listed with show_deleted, e.g. {}",
        listed.len(),
        listed[0].name
    );
}
