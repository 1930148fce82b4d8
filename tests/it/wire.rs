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

both_engines!(malformed_protobuf_is_invalid_argument);
