//! Hostile input is bounded at the edge: huge masks and lists, oversized
//! messages, errors with thousands of violations, and responses that would
//! not fit what a default gRPC client accepts (4 MiB).

use std::time::{Duration, Instant};

use prost::Message;
use tonic::Code;
use tonic_types::StatusExt;
use user_service::proto::users::v1 as pb;

use crate::both_engines;
use crate::harness::*;

/// What a status costs on the wire (message and details).
fn status_bytes(s: &tonic::Status) -> usize {
    s.message().len() + s.details().len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_update_masks_and_lists_are_refused_quickly_and_briefly() {
    let s = TestServer::start(Engine::Sqlite).await;
    let mut c = s.client();
    let u = create(&mut c, user("mask@example.com")).await;

    // 1,300,000 "*" paths: a 3.9 MB request that would take 70 MB decoded,
    // refused unread.
    let st = c
        .update_user(pb::UpdateUserRequest {
            user: Some(pb::User {
                name: u.name.clone(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask {
                paths: vec!["*".to_owned(); 1_300_000],
            }),
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::ResourceExhausted, "{st:?}");
    assert_eq!(reason(&st), "REQUEST_TOO_LARGE");
    // 400,000 of them fit the decoding budget: counted before validated.
    let paths = vec!["*".to_owned(); 400_000];
    let started = Instant::now();
    let st = c
        .update_user(pb::UpdateUserRequest {
            user: Some(pb::User {
                name: u.name.clone(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask { paths }),
        })
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(st.code(), Code::InvalidArgument);
    assert_eq!(bad_fields(&st), vec!["update_mask.paths"]);
    assert!(status_bytes(&st) < 2048, "{} bytes", status_bytes(&st));

    // Long garbage paths are not echoed back whole.
    let paths: Vec<String> = (0..100)
        .map(|i| format!("{i}{}", "x".repeat(30_000)))
        .collect();
    let st = c
        .update_user(pb::UpdateUserRequest {
            user: Some(pb::User {
                name: u.name.clone(),
                ..Default::default()
            }),
            update_mask: Some(prost_types::FieldMask { paths }),
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);
    assert!(status_bytes(&st) < 64 * 1024, "{} bytes", status_bytes(&st));

    // 200,000 tags and 100,000 secondary emails: counted before validated.
    let started = Instant::now();
    let st = c
        .create_user(pb::CreateUserRequest {
            parent: PROJECT.into(),
            user: Some(pb::User {
                email: "tags@example.com".into(),
                tags: (0..200_000).map(|i| format!("bad tag {i}")).collect(),
                secondary_emails: vec!["nope".into(); 100_000],
                metadata: (0..10_000).map(|i| (format!("k{i}"), "v".into())).collect(),
                ..Default::default()
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        bad_fields(&st),
        vec!["user.metadata", "user.secondary_emails", "user.tags"]
    );
    assert!(status_bytes(&st) < 2048, "{} bytes", status_bytes(&st));
    assert_eq!(count_all(&mut c, "").await, 1, "nothing was stored");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_most_100_violations_are_listed() {
    let s = TestServer::start(Engine::Sqlite).await;
    let mut c = s.client();
    let requests: Vec<pb::CreateUserRequest> = (0..1000)
        .map(|i| pb::CreateUserRequest {
            user: Some(pb::User {
                email: format!("bad-{i}"),
                ..Default::default()
            }),
            ..Default::default()
        })
        .collect();
    let st = c
        .batch_create_users(pb::BatchCreateUsersRequest {
            parent: PROJECT.into(),
            requests,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::InvalidArgument);
    let d = st.get_error_details();
    let listed = d.bad_request().unwrap().field_violations.len();
    assert!((10..=100).contains(&listed), "{listed} listed");
    assert_eq!(d.error_info().unwrap().metadata["violations"], "1000");
    // The whole trailer stays under the 8 KiB other clients accept.
    assert!(
        st.details().len() < 4096,
        "{} bytes of details",
        st.details().len()
    );
    assert!(
        st.message().contains("(and 999 more violations)"),
        "{}",
        st.message()
    );
    assert_eq!(
        d.bad_request().unwrap().field_violations[0].field,
        "requests[0].user.email"
    );
}

/// An empty message: two bytes on the wire per item, nothing in memory here.
#[derive(Clone, PartialEq, prost::Message)]
struct Empty {}

/// BatchCreateUsersRequest's wire shape with `requests` as empty items.
#[derive(Clone, PartialEq, prost::Message)]
struct RawBatch {
    #[prost(string, tag = "1")]
    parent: String,
    #[prost(message, repeated, tag = "2")]
    requests: Vec<Empty>,
}

/// CreateUserRequest with a user of `email` and many empty addresses.
#[derive(Clone, PartialEq, prost::Message)]
struct RawCreate {
    #[prost(string, tag = "1")]
    parent: String,
    #[prost(message, optional, tag = "2")]
    user: Option<RawUser>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct RawUser {
    #[prost(string, tag = "2")]
    email: String,
    #[prost(message, repeated, tag = "18")]
    addresses: Vec<Empty>,
}

async fn raw_unary<M: prost::Message + Send + Sync + 'static>(
    s: &TestServer,
    path: &'static str,
    m: M,
) -> tonic::Status {
    let mut grpc = tonic::client::Grpc::new(s.channel.clone());
    grpc.ready().await.unwrap();
    let mut req = tonic::Request::new(m);
    req.metadata_mut().insert(
        "authorization",
        "Bearer unused-without-auth".parse().unwrap(),
    );
    let r: Result<tonic::Response<pb::User>, tonic::Status> = grpc
        .unary(
            req,
            http::uri::PathAndQuery::from_static(path),
            tonic_prost::ProstCodec::default(),
        )
        .await;
    r.expect_err("refused")
}

/// Two million empty items are 4 MB on the wire and would be gigabytes
/// decoded: refused before decoding.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_that_would_decode_to_gigabytes_are_refused_unread() {
    let s = TestServer::start(Engine::Sqlite).await;
    let mut c = s.client();
    let started = Instant::now();
    let batch = RawBatch {
        parent: PROJECT.into(),
        requests: vec![Empty {}; 1_900_000],
    };
    let st = raw_unary(&s, "/users.v1.UserService/BatchCreateUsers", batch).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(st.code(), Code::ResourceExhausted, "{st:?}");
    assert_eq!(reason(&st), "REQUEST_TOO_LARGE");
    let create = RawCreate {
        parent: PROJECT.into(),
        user: Some(RawUser {
            email: "a@example.com".into(),
            addresses: vec![Empty {}; 1_900_000],
        }),
    };
    let st = raw_unary(&s, "/users.v1.UserService/CreateUser", create).await;
    assert_eq!(st.code(), Code::ResourceExhausted, "{st:?}");
    // A batch of ordinary users over the count is decoded and refused for
    // its count, naming the field.
    let st = c
        .batch_create_users(pb::BatchCreateUsersRequest {
            parent: PROJECT.into(),
            requests: vec![
                pb::CreateUserRequest {
                    user: Some(user("x@example.com")),
                    ..Default::default()
                };
                1001
            ],
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad_fields(&st), vec!["requests"]);
    assert_eq!(count_all(&mut c, "").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_messages_are_resource_exhausted() {
    let s = TestServer::start_with(Engine::Sqlite, |s| s.max_request_bytes = 64 * 1024).await;
    let mut c = s.client();
    let big = |email: &str| pb::User {
        email: email.into(),
        bio: "b".repeat(100_000),
        ..Default::default()
    };
    let st = c
        .create_user(pb::CreateUserRequest {
            parent: PROJECT.into(),
            user: Some(big("big@example.com")),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::ResourceExhausted, "{st:?}");
    assert_eq!(reason(&st), "REQUEST_TOO_LARGE");

    // In an import, the messages before the oversized one are committed and
    // acknowledged; then the call fails with the same status.
    let msgs = vec![
        pb::ImportUsersRequest {
            parent: PROJECT.into(),
            users: vec![user("first@example.com")],
        },
        pb::ImportUsersRequest {
            parent: String::new(),
            users: vec![big("second@example.com")],
        },
    ];
    let mut acks = c
        .import_users(tokio_stream::iter(msgs))
        .await
        .unwrap()
        .into_inner();
    let mut created = 0;
    let err = loop {
        match acks.message().await {
            Ok(Some(a)) => created += a.created_count,
            Ok(None) => panic!("the import ended without an error"),
            Err(e) => break e,
        }
    };
    assert_eq!(created, 1);
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert_eq!(reason(&err), "REQUEST_TOO_LARGE");
    assert_eq!(count_all(&mut c, "").await, 1);
}

/// A user with about 15 KB of custom data.
fn heavy(i: usize) -> pb::User {
    let mut fields = std::collections::BTreeMap::new();
    fields.insert(
        "blob".to_owned(),
        prost_types::Value {
            kind: Some(prost_types::value::Kind::StringValue(format!(
                "{i:05}{}",
                "z".repeat(15_000)
            ))),
        },
    );
    pb::User {
        email: format!("heavy{i}@example.com"),
        tags: vec!["heavy".into()],
        custom_data: Some(prost_types::Struct { fields }),
        ..Default::default()
    }
}

async fn pages_and_stream_messages_fit_a_default_client(e: Engine) {
    let s = TestServer::start(e).await;
    let mut c = s.client();
    // 600 x 15 KB = 9 MB: more than a page holds and more than one read
    // of the server holds in memory (8 MiB).
    const N: usize = 600;
    for chunk in (0..N).collect::<Vec<_>>().chunks(200) {
        c.batch_create_users(pb::BatchCreateUsersRequest {
            parent: PROJECT.into(),
            requests: chunk
                .iter()
                .map(|i| pb::CreateUserRequest {
                    user: Some(heavy(*i)),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        })
        .await
        .expect("batch create");
    }

    // One page of 1000 cannot hold them. The default
    // client (4 MiB receive limit) reads every page.
    let mut seen = std::collections::HashSet::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let page = c
            .list_users(pb::ListUsersRequest {
                parent: PROJECT.into(),
                page_size: 1000,
                page_token: token.clone(),
                filter: "tags:\"heavy\"".into(),
                ..Default::default()
            })
            .await
            .expect("a page a default client accepts")
            .into_inner();
        assert!(page.encoded_len() <= 4 * 1024 * 1024);
        pages += 1;
        for u in page.users {
            assert!(seen.insert(u.name), "a user came twice");
        }
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    assert_eq!(seen.len(), N);
    assert!(pages >= 2, "{pages} pages");

    let mut stream = c
        .stream_users(pb::StreamUsersRequest {
            parent: PROJECT.into(),
            batch_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut exported = std::collections::HashSet::new();
    let mut messages = 0;
    let mut second_token = String::new();
    let mut first = std::collections::HashSet::new();
    while let Some(m) = stream
        .message()
        .await
        .expect("a message a default client accepts")
    {
        assert!(m.encoded_len() <= 4 * 1024 * 1024);
        messages += 1;
        if messages == 1 {
            second_token = m.resume_token.clone();
            first = m.users.iter().map(|u| u.name.clone()).collect();
        }
        for u in m.users {
            assert!(exported.insert(u.name), "exported twice");
        }
    }
    assert_eq!(exported.len(), N);
    assert!(messages >= 2);
    // Resuming from the first message's token yields exactly the rest.
    let mut rest = c
        .stream_users(pb::StreamUsersRequest {
            parent: PROJECT.into(),
            batch_size: 1000,
            resume_token: second_token,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut after = std::collections::HashSet::new();
    while let Some(m) = rest.message().await.unwrap() {
        for u in m.users {
            assert!(after.insert(u.name), "resumed twice");
        }
    }
    assert!(!first.is_empty() && first.len() < N);
    assert!(
        after.is_disjoint(&first),
        "the resumed export repeats the first message"
    );
    assert_eq!(after.len() + first.len(), N, "a gap after the resume token");

    // Asking for all of them at once cannot be answered in one message.
    let names: Vec<String> = seen.into_iter().collect();
    let st = c
        .batch_get_users(pb::BatchGetUsersRequest {
            parent: PROJECT.into(),
            names,
        })
        .await
        .unwrap_err();
    assert_eq!(st.code(), Code::ResourceExhausted);
    assert_eq!(reason(&st), "TOO_LARGE");
}

both_engines!(pages_and_stream_messages_fit_a_default_client);

/// Peak resident memory of a process, in KiB (VmHWM).
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM")
}

/// The binary as deployed, fed every kind of hostile request: each gets a
/// client error within 2 s, and the server's peak memory barely moves.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_leave_server_memory_flat() {
    use crate::server::{BIN, connect_to, free_port, wait_healthy};
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let mut child = std::process::Command::new(BIN)
        .current_dir(dir.path())
        .env("USER_SERVICE_LISTEN", &addr)
        .env_remove("DATABASE_URL")
        .env("RUST_LOG", "error")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_healthy(&addr);
    let channel = connect_to(&addr).await;
    let mut c = pb::user_service_client::UserServiceClient::new(channel.clone());
    let u = c
        .create_user(pb::CreateUserRequest {
            parent: PROJECT.into(),
            user: Some(user("flat@example.com")),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let before = peak_rss_kib(child.id());

    let timed = |what: &'static str, started: Instant, st: tonic::Status| {
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{what}: {:?}",
            started.elapsed()
        );
        assert!(
            matches!(
                st.code(),
                Code::InvalidArgument | Code::ResourceExhausted | Code::OutOfRange
            ),
            "{what}: {st:?}"
        );
    };
    let mut grpc = tonic::client::Grpc::new(channel.clone());
    for _ in 0..3 {
        let t = Instant::now();
        grpc.ready().await.unwrap();
        let r: Result<tonic::Response<pb::User>, tonic::Status> = grpc
            .unary(
                tonic::Request::new(RawBatch {
                    parent: PROJECT.into(),
                    requests: vec![Empty {}; 1_900_000],
                }),
                http::uri::PathAndQuery::from_static("/users.v1.UserService/BatchCreateUsers"),
                tonic_prost::ProstCodec::default(),
            )
            .await;
        timed("empty batch items", t, r.unwrap_err());

        let t = Instant::now();
        let r = c
            .update_user(pb::UpdateUserRequest {
                user: Some(pb::User {
                    name: u.name.clone(),
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["*".to_owned(); 1_300_000],
                }),
            })
            .await;
        timed("1.3M mask paths", t, r.unwrap_err());

        let t = Instant::now();
        let r = c
            .create_user(pb::CreateUserRequest {
                parent: PROJECT.into(),
                user: Some(pb::User {
                    email: "t@example.com".into(),
                    tags: vec!["!".to_owned(); 1_000_000],
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await;
        timed("1M tags", t, r.unwrap_err());

        let t = Instant::now();
        let r = c
            .create_user(pb::CreateUserRequest {
                parent: PROJECT.into(),
                user: Some(pb::User {
                    email: "big@example.com".into(),
                    bio: "b".repeat(5 * 1024 * 1024),
                    ..Default::default()
                }),
                ..Default::default()
            })
            .await;
        timed("5 MiB message", t, r.unwrap_err());

        let t = Instant::now();
        let r = c
            .list_users(pb::ListUsersRequest {
                parent: PROJECT.into(),
                filter: "(".repeat(1_000_000),
                ..Default::default()
            })
            .await;
        timed("1M-character filter", t, r.unwrap_err());
    }
    let after = peak_rss_kib(child.id());
    let _ = child.kill();
    let _ = child.wait();
    let grown_mib = after.saturating_sub(before) / 1024;
    eprintln!(
        "server peak RSS {} MiB -> {} MiB",
        before / 1024,
        after / 1024
    );
    assert!(grown_mib < 64, "peak RSS grew by {grown_mib} MiB");
}
