//! The protobuf codec of UserService. Like tonic-prost's, except that a
//! request that is not a valid protobuf message (bad wire format, invalid
//! UTF-8 in a string, nesting deeper than 100) is the client's mistake:
//! INVALID_ARGUMENT with reason MALFORMED_REQUEST, not INTERNAL; and that a
//! request whose decoding would take more memory than the budget is refused
//! before it is decoded (RESOURCE_EXHAUSTED, REQUEST_TOO_LARGE).

use std::marker::PhantomData;

use prost::{Message, Name};
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::{Code, Status};
use tonic_prost::ProstEncoder;
use tonic_types::{ErrorDetails, StatusExt};

use super::status::DOMAIN;
use super::wire_budget::Refused;

#[derive(Debug, Clone, Copy)]
pub struct StrictProstCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for StrictProstCodec<T, U> {
    fn default() -> Self {
        Self { _pd: PhantomData }
    }
}

impl<T, U> Codec for StrictProstCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Name + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = StrictProstDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        StrictProstDecoder { _pd: PhantomData }
    }
}

fn malformed(why: &str) -> Status {
    Status::with_error_details(
        Code::InvalidArgument,
        why,
        ErrorDetails::with_error_info(
            "MALFORMED_REQUEST",
            DOMAIN,
            std::collections::HashMap::new(),
        ),
    )
}

#[derive(Debug, Clone, Copy)]
pub struct StrictProstDecoder<U> {
    _pd: PhantomData<U>,
}

impl<U: Message + Name + Default> Decoder for StrictProstDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        let bytes = prost::bytes::Buf::chunk(buf);
        if bytes.len() == prost::bytes::Buf::remaining(buf) {
            let name = format!("{}.{}", U::PACKAGE, U::NAME);
            match super::wire_budget::check(&name, bytes, super::wire_budget::DECODE_BUDGET) {
                Ok(()) => {}
                Err(Refused::OverBudget { budget }) => {
                    let mut d = ErrorDetails::with_error_info(
                        "REQUEST_TOO_LARGE",
                        DOMAIN,
                        std::collections::HashMap::new(),
                    );
                    let why = format!(
                        "decoding this message would take more than {} MiB; send fewer items per message",
                        budget / (1024 * 1024)
                    );
                    d.add_quota_failure_violation("request", why.clone());
                    return Err(Status::with_error_details(Code::ResourceExhausted, why, d));
                }
                Err(Refused::Malformed) => {
                    return Err(malformed(
                        "the message is not valid protobuf for its type (bad wire format or a group)",
                    ));
                }
            }
        }
        U::decode(buf).map(Some).map_err(|e| {
            malformed(&format!(
                "the message is not valid protobuf for its type: {e}"
            ))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        BufferSettings::default()
    }
}
