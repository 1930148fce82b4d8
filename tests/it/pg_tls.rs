//! PostgreSQL over TLS, as production runs it: the test server speaks TLS
//! (sqlx's default `sslmode=prefer`), and statements larger than one TLS
//! record do not wait for delayed ACKs (sqlx 0.9.0 left Nagle's algorithm
//! on: about 40 ms per such statement).

use std::time::{Duration, Instant};

use sea_orm::{ConnectionTrait, Database, Statement};
use user_service::proto::users::v1 as pb;

use crate::harness::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_writes_over_tls_do_not_wait_for_delayed_acks() {
    let Some(base) = postgres_url() else { return };
    // The URL the suite uses really negotiates TLS.
    let db = Database::connect(&base).await.expect("connect");
    let row = db
        .query_one_raw(Statement::from_string(
            db.get_database_backend(),
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        ))
        .await
        .expect("pg_stat_ssl")
        .expect("a row");
    let ssl: bool = row.try_get("", "ssl").expect("ssl");
    assert!(ssl, "the PostgreSQL tests must run over TLS: {base}");

    let s = TestServer::start(Engine::Postgres).await;
    let mut c = s.client();
    // Each create is one INSERT of more than 16 KB: two TLS records.
    let mut times = Vec::new();
    for i in 0..15 {
        let t = Instant::now();
        c.create_user(pb::CreateUserRequest {
            parent: PROJECT.into(),
            user: Some(pb::User {
                email: format!("big{i}@example.com"),
                bio: "b".repeat(4000),
                note: "n".repeat(4000),
                metadata: (0..40)
                    .map(|k| (format!("k{k}"), "v".repeat(300)))
                    .collect(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .expect("create");
        times.push(t.elapsed());
    }
    times.sort();
    let median = times[times.len() / 2];
    eprintln!("large creates over TLS: median {median:?}");
    assert!(
        median < Duration::from_millis(35),
        "a large write over TLS took {median:?}: Nagle's algorithm is back"
    );
}
