use tonic::Code;
use user_service::proto::users::v1 as pb;

use crate::both_engines;
use crate::harness::*;

/// GetUserRequest's wire shape with `name` as raw bytes, to send what no
/// well-behaved client would.
#[derive(Clone, PartialEq, prost::Message)]
struct RawGetUserRequest {
    #[prost(bytes = "vec", tag = "1")]
    name: Vec<u8>,
}

async fn malformed_protobuf_is_invalid_argument(e: Engine) {
    let s = TestServer::start(e).await;
    let mut grpc = tonic::client::Grpc::new(s.channel.clone());
    for bad in [vec![0xff, 0xfe, 0xfd], b"projects/a/users/\xc3".to_vec()] {
        grpc.ready().await.unwrap();
        let r: Result<tonic::Response<pb::User>, tonic::Status> = grpc
            .unary(
                tonic::Request::new(RawGetUserRequest { name: bad }),
                http::uri::PathAndQuery::from_static("/users.v1.UserService/GetUser"),
                tonic_prost::ProstCodec::default(),
            )
            .await;
        assert_error(r, Code::InvalidArgument, "MALFORMED_REQUEST");
    }
}

/// Sends one raw gRPC request body and returns the status the server
/// answered with (from the headers of a trailers-only answer, or the
/// trailers).
async fn raw_call(s: &TestServer, body: &'static [u8]) -> tonic::Status {
    use http_body_util::BodyExt;
    use tower::{Service, ServiceExt};
    let mut ch = s.channel.clone();
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("http://{}/users.v1.UserService/GetUser", s.addr))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(tonic::body::Body::new(http_body_util::Full::new(
            bytes::Bytes::from_static(body),
        )))
        .unwrap();
    let resp = ch.ready().await.unwrap().call(req).await.unwrap();
    if let Some(st) = tonic::Status::from_header_map(resp.headers()) {
        return st;
    }
    let collected = resp.into_body().collect().await.unwrap();
    let trailers = collected.trailers().cloned().unwrap_or_default();
    tonic::Status::from_header_map(&trailers).expect("a grpc-status")
}

/// Broken frames: a bad compression flag, and a length prefix of 1 GiB with
/// nothing behind it (refused from the prefix alone, nothing allocated).
async fn garbage_frames_are_client_errors(e: Engine) {
    let s = TestServer::start(e).await;
    let st = raw_call(&s, &[7, 0, 0, 0, 1, 0x0a]).await;
    assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
    assert_eq!(reason(&st), "MALFORMED_REQUEST");
    let st = raw_call(&s, &[0, 0x40, 0, 0, 0]).await;
    assert_eq!(st.code(), Code::ResourceExhausted, "{st:?}");
    assert_eq!(reason(&st), "REQUEST_TOO_LARGE");
    // Compressed without saying how; a message cut short; a group (which
    // would hide what follows from the decoding budget).
    for body in [
        &[1u8, 0, 0, 0, 3, 1, 2, 3][..],
        &[0, 0, 0, 0, 9, 0x0a, 1],
        &[0, 0, 0, 0, 2, 0x7b, 0x7c],
    ] {
        let st = raw_call(&s, body).await;
        assert_eq!(st.code(), Code::InvalidArgument, "{st:?}");
        assert_eq!(reason(&st), "MALFORMED_REQUEST");
    }
}

both_engines!(
    malformed_protobuf_is_invalid_argument,
    garbage_frames_are_client_errors
);
