//! SIGKILL in the middle of an import: every acknowledged user is stored,
//! the stored users are a prefix of the import (no hole, no half-written
//! chunk), and sending the unacknowledged users again finishes the import
//! with no user stored twice.

use std::collections::BTreeSet;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use user_service::proto::users::v1 as pb;
use user_service::proto::users::v1::user_service_client::UserServiceClient;

use crate::both_engines;
use crate::harness::*;

const BIN: &str = env!("CARGO_BIN_EXE_user-service");
const TOTAL: usize = 20_000;
const PER_MESSAGE: usize = 250;

struct Server {
    child: Child,
    addr: String,
}

impl Server {
    async fn start(db: &TestDb) -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let child = Command::new(BIN)
            .env("RUST_LOG", "warn")
            .args(["serve", "--listen", &addr, "--database-url", &db.url])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the server binary");
        let start = Instant::now();
        loop {
            if let Ok(ch) = tonic::transport::Channel::from_shared(format!("http://{addr}"))
                .expect("uri")
                .connect()
                .await
                && let Ok(r) = tonic_health::pb::health_client::HealthClient::new(ch)
                    .check(tonic_health::pb::HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                && r.into_inner().status == 1
            {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(30), "never served");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Server { child, addr }
    }

    async fn client(&self) -> Client {
        let channel = tonic::transport::Channel::from_shared(format!("http://{}", self.addr))
            .expect("uri")
            .connect()
            .await
            .expect("connect");
        UserServiceClient::with_interceptor(channel, Bearer::default())
    }

    fn kill(&mut self) {
        let _ = self.child.kill(); // SIGKILL
        let _ = self.child.wait();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

fn imported(i: usize) -> User {
    User {
        email: format!("crash{i}@example.com"),
        display_name: format!("Crash Test {i}"),
        tags: vec![format!("t{}", i % 4)],
        metadata: [("source".to_string(), "legacy".to_string())].into(),
        ..Default::default()
    }
}

fn messages(from: usize) -> Vec<pb::ImportUsersRequest> {
    (from..TOTAL)
        .step_by(PER_MESSAGE)
        .enumerate()
        .map(|(k, start)| pb::ImportUsersRequest {
            parent: if k == 0 {
                PROJECT.into()
            } else {
                String::new()
            },
            users: (start..(start + PER_MESSAGE).min(TOTAL))
                .map(imported)
                .collect(),
        })
        .collect()
}

/// The import index of every stored user, from an export.
async fn stored(c: &mut Client) -> Vec<usize> {
    let mut s = c
        .stream_users(pb::StreamUsersRequest {
            parent: PROJECT.into(),
            batch_size: 1000,
            ..Default::default()
        })
        .await
        .expect("export")
        .into_inner();
    let mut out = Vec::new();
    while let Some(m) = s.message().await.expect("export message") {
        for u in m.users {
            // Not half-written: every field and index entry is there.
            let i: usize = u
                .email
                .trim_start_matches("crash")
                .trim_end_matches("@example.com")
                .parse()
                .expect("an imported email");
            assert_eq!(
                u,
                User {
                    name: u.name.clone(),
                    state: u.state,
                    create_time: u.create_time,
                    update_time: u.update_time,
                    etag: u.etag.clone(),
                    ..imported(i)
                }
            );
            out.push(i);
        }
    }
    out.sort_unstable();
    out
}

async fn sigkill_mid_import_loses_nothing_acknowledged(engine: Engine) {
    let db = TestDb::new(engine).await;
    let mut server = Server::start(&db).await;
    let mut c = server.client().await;

    // The client streams as fast as the server takes users and reads acks
    // as they come; after a few it kills the server.
    let (tx, rx) = mpsc::channel(2);
    let sender = tokio::spawn(async move {
        for m in messages(0) {
            if tx.send(m).await.is_err() {
                return;
            }
        }
        // Keep the stream open: the kill must come before the end.
        tokio::time::sleep(Duration::from_secs(3600)).await;
    });
    let mut acks = c
        .import_users(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let mut acked: i64 = -1;
    let mut n_acks = 0;
    while n_acks < 4 {
        let a = acks.message().await.unwrap().expect("ack");
        assert!(a.failures.is_empty(), "{:?}", a.failures);
        acked = a.committed_through;
        n_acks += 1;
    }
    server.kill();
    sender.abort();
    assert!(
        (acked as usize) < TOTAL - 1,
        "the import finished before the kill"
    );

    let server = Server::start(&db).await;
    let mut c = server.client().await;
    let present = stored(&mut c).await;
    // A prefix of the import: nothing is missing before the last stored user,
    // so no chunk after an acknowledged one was lost or half-stored.
    let m = present.len();
    assert!(
        m > acked as usize,
        "acknowledged users lost: {m} stored, acked through {acked}"
    );
    assert_eq!(
        present,
        (0..m).collect::<Vec<_>>(),
        "stored users are not a prefix"
    );
    // At most what was in flight beyond the ack: the chunk being committed
    // and the acks queued behind it.
    assert!(
        m - (acked as usize + 1) <= 6 * 1000,
        "{m} stored, acked through {acked}"
    );
    // The index terms were written with the users.
    assert_eq!(
        count_all(&mut c, "tags:\"t1\"").await,
        (0..m).filter(|i| i % 4 == 1).count() as i64
    );
    assert_eq!(
        count_all(&mut c, "metadata.source = \"legacy\"").await,
        m as i64
    );

    // Finish: send everything after the last acknowledged user again.
    let resume = acked as usize + 1;
    let mut s = c
        .import_users(tokio_stream::iter(messages(resume)))
        .await
        .unwrap()
        .into_inner();
    let mut duplicates = BTreeSet::new();
    let mut created = 0;
    let mut last = -1;
    while let Some(a) = s.message().await.unwrap() {
        created += a.created_count;
        last = a.committed_through;
        for f in a.failures {
            let st = f.status.expect("status");
            assert_eq!(Code::from(st.code), Code::AlreadyExists, "{st:?}");
            duplicates.insert(f.index as usize + resume);
        }
    }
    assert_eq!(last as usize, TOTAL - resume - 1);
    assert_eq!(duplicates, (resume..m).collect::<BTreeSet<_>>());
    assert_eq!(created as usize, TOTAL - m);
    assert_eq!(stored(&mut c).await, (0..TOTAL).collect::<Vec<_>>());
    assert_eq!(count_all(&mut c, "").await, TOTAL as i64);
}

both_engines!(sigkill_mid_import_loses_nothing_acknowledged);
