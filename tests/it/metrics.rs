//! The Prometheus endpoint of the binary: request counts and latency by
//! method and the code the client received (trailers-only failures and a
//! stream that fails after its first messages included), in-flight calls,
//! pool use, group-commit batches, import and export rows; unknown methods
//! do not grow the label set.

use tokio_stream::StreamExt;
use tonic::Code;
use user_service::proto::users::v1 as pb;

use crate::both_engines;
use crate::harness::*;
use crate::server::{Process, metric_value};

const HANDLED: &str = "grpc_server_handled_total";

fn rpc(method: &str, code: &str) -> [String; 3] {
    [
        "grpc_service=\"users.v1.UserService\"".to_owned(),
        format!("grpc_method=\"{method}\""),
        format!("grpc_code=\"{code}\""),
    ]
}

fn handled(text: &str, method: &str, code: &str) -> f64 {
    let labels = rpc(method, code);
    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
    metric_value(text, HANDLED, &labels)
}

both_engines!(metrics_count_what_clients_received);

async fn metrics_count_what_clients_received(engine: Engine) {
    let db = TestDb::new(engine).await;
    let server = Process::start("metrics", &db.url, &[]).await;
    let mut c = server.client().await;

    // Three creates (one group commit each at least), one failing get
    // (trailers-only NOT_FOUND), one success.
    let mut names = Vec::new();
    for i in 0..3 {
        names.push(
            create(&mut c, user(&format!("m{i}@example.com")))
                .await
                .name,
        );
    }
    let missing = get(&mut c, "projects/acme/users/nobody").await.unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    get(&mut c, &names[0]).await.expect("get");

    // An import whose first message is acknowledged and whose second names
    // another project: the stream fails after a message was sent.
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(pb::ImportUsersRequest {
        parent: PROJECT.into(),
        users: vec![user("i1@example.com"), user("not-an-email")],
    })
    .await
    .unwrap();
    let mut acks = c
        .import_users(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("import starts")
        .into_inner();
    let first = acks.next().await.expect("an ack").expect("first chunk");
    assert_eq!(first.created_count, 1);
    tx.send(pb::ImportUsersRequest {
        parent: "projects/other".into(),
        users: vec![user("i2@example.com")],
    })
    .await
    .unwrap();
    let failed = loop {
        match acks.next().await {
            Some(Ok(_)) => continue,
            Some(Err(s)) => break s,
            None => panic!("the import ended without the error"),
        }
    };
    assert_eq!(failed.code(), Code::InvalidArgument);
    drop(tx);

    // An export of the four users.
    let exported: usize = c
        .stream_users(pb::StreamUsersRequest {
            parent: PROJECT.into(),
            ..Default::default()
        })
        .await
        .expect("export")
        .into_inner()
        .map(|m| m.expect("message").users.len())
        .fold(0, |a, n| a + n)
        .await;
    assert_eq!(exported, 4);

    // A method this server does not have: counted as unknown, UNIMPLEMENTED.
    let mut raw = tonic::client::Grpc::new(crate::server::connect_to(&server.addr).await);
    raw.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/users.v1.UserService/NoSuchMethod");
    let r: Result<tonic::Response<()>, _> = raw
        .unary(
            tonic::Request::new(()),
            path,
            tonic_prost::ProstCodec::<(), ()>::default(),
        )
        .await;
    assert_eq!(r.unwrap_err().code(), Code::Unimplemented);

    // The handler finishes its bookkeeping as the trailers go out: wait for
    // the counts to settle.
    let mut text = String::new();
    for _ in 0..50 {
        text = server.scrape().await;
        if handled(&text, "ImportUsers", "INVALID_ARGUMENT") >= 1.0
            && handled(&text, "StreamUsers", "OK") >= 1.0
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(handled(&text, "CreateUser", "OK"), 3.0, "{text}");
    assert_eq!(handled(&text, "GetUser", "NOT_FOUND"), 1.0, "{text}");
    assert_eq!(handled(&text, "GetUser", "OK"), 1.0, "{text}");
    assert_eq!(
        handled(&text, "ImportUsers", "INVALID_ARGUMENT"),
        1.0,
        "a stream that failed after a message counts its final code: {text}"
    );
    assert_eq!(handled(&text, "ImportUsers", "OK"), 0.0, "{text}");
    assert_eq!(handled(&text, "StreamUsers", "OK"), 1.0, "{text}");
    assert_eq!(
        metric_value(
            &text,
            HANDLED,
            &[
                "grpc_service=\"unknown\"",
                "grpc_method=\"unknown\"",
                "grpc_code=\"UNIMPLEMENTED\""
            ]
        ),
        1.0,
        "{text}"
    );
    assert!(!text.contains("NoSuchMethod"), "{text}");
    // Latency histogram by method and code.
    let get_ok = rpc("GetUser", "OK");
    let get_ok: Vec<&str> = get_ok.iter().map(String::as_str).collect();
    assert_eq!(
        metric_value(&text, "grpc_server_handling_seconds_count", &get_ok),
        1.0,
        "{text}"
    );
    assert!(
        metric_value(&text, "grpc_server_handling_seconds_bucket", &get_ok) > 0.0,
        "{text}"
    );
    // Nothing is in flight any more.
    assert_eq!(
        metric_value(
            &text,
            "grpc_server_in_flight",
            &["grpc_method=\"CreateUser\""]
        ),
        0.0,
        "{text}"
    );
    // Rows moved by bulk calls, and group-commit batch sizes.
    assert_eq!(
        metric_value(
            &text,
            "user_service_imported_users_total",
            &["outcome=\"created\""]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric_value(
            &text,
            "user_service_imported_users_total",
            &["outcome=\"failed\""]
        ),
        1.0,
        "{text}"
    );
    assert_eq!(
        metric_value(&text, "user_service_exported_users_total", &[]),
        4.0,
        "{text}"
    );
    assert_eq!(
        metric_value(&text, "user_service_create_batch_size_sum", &[]),
        3.0,
        "{text}"
    );
    // The pool is reported once the health prober has run (every second).
    let mut pool = 0.0;
    for _ in 0..40 {
        text = server.scrape().await;
        pool = metric_value(&text, "user_service_db_pool_max_connections", &[]);
        if pool > 0.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert_eq!(pool, 16.0, "{text}");
    assert_eq!(
        metric_value(&text, "user_service_database_up", &[]),
        1.0,
        "{text}"
    );
}
