//! OTLP trace export: the binary started with --otlp-endpoint sends the
//! span of an RPC to the collector (OTLP/HTTP protobuf), continuing the W3C
//! trace context the caller sent in `traceparent`.

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::harness::*;
use crate::server::Process;

/// A collector that answers every POST with 200 and hands over its path
/// and body.
async fn collector() -> (String, mpsc::UnboundedReceiver<(String, Vec<u8>)>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_string();
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse().ok())?
                        })
                        .unwrap_or(0);
                    while buf.len() < end + 4 + len {
                        match conn.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
                    let body = buf[end + 4..end + 4 + len].to_vec();
                    buf.drain(..end + 4 + len);
                    let _ = tx.send((path, body));
                    let ok = b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n";
                    if conn.write_all(ok).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (format!("http://{addr}"), rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_spans_go_to_the_collector_in_the_callers_trace() {
    let (endpoint, mut exports) = collector().await;
    let db = TestDb::new(Engine::Sqlite).await;
    let server = Process::start("otlp", &db.url, &["--otlp-endpoint", &endpoint]).await;
    let mut c = server.client().await;

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut req = tonic::Request::new(user_service::proto::users::v1::GetUserRequest {
        name: format!("{PROJECT}/users/nobody"),
    });
    req.metadata_mut().insert(
        "traceparent",
        format!("00-{trace_id}-00f067aa0ba902b7-01")
            .parse()
            .unwrap(),
    );
    let e = c.get_user(req).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);

    let want: Vec<u8> = (0..16)
        .map(|i| u8::from_str_radix(&trace_id[2 * i..2 * i + 2], 16).unwrap())
        .collect();
    let start = Instant::now();
    loop {
        let left = Duration::from_secs(15).saturating_sub(start.elapsed());
        let (path, body) = tokio::time::timeout(left, exports.recv())
            .await
            .expect("no span of the call reached the collector within 15 s")
            .expect("collector");
        assert_eq!(path, "/v1/traces");
        // The protobuf carries the trace id as 16 raw bytes, and the span
        // its method.
        if body.windows(16).any(|w| w == want.as_slice())
            && body
                .windows(b"/users.v1.UserService/GetUser".len())
                .any(|w| w == b"/users.v1.UserService/GetUser")
        {
            break;
        }
    }
}
