//! The generated code's codec (`build.rs` points `codec_path` here): prost,
//! except that a request that doesn't parse (invalid UTF-8 in a string, a
//! truncated field, a wrong wire type) is the caller's INVALID_ARGUMENT, not
//! the INTERNAL that `tonic_prost` answers for every decode error, which
//! would count a client's mistake as the server's fault.

use std::marker::PhantomData;

use tonic::{
    Code, Status,
    codec::{BufferSettings, DecodeBuf, Decoder},
};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

use crate::grpc::proto;

/// How a message of this type that fails to parse is answered: requests
/// are the client's fault; responses (decoded by the generated client) stay
/// INTERNAL, as the gRPC status code table says.
pub(crate) trait Decoded: prost::Message + Default + Send + 'static {
    const UNPARSABLE: Code;
}

impl Decoded for proto::User {
    const UNPARSABLE: Code = Code::InvalidArgument;
}

impl Decoded for proto::UserRequest {
    const UNPARSABLE: Code = Code::InvalidArgument;
}

impl Decoded for proto::UserTypeRequest {
    const UNPARSABLE: Code = Code::InvalidArgument;
}

impl Decoded for proto::UserResponse {
    const UNPARSABLE: Code = Code::Internal;
}

impl Decoded for proto::UserCntResponse {
    const UNPARSABLE: Code = Code::Internal;
}

#[derive(Debug, Clone)]
pub(crate) struct Codec<T, U>(PhantomData<(T, U)>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: prost::Message + Send + 'static,
    U: Decoded,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = MessageDecoder<U>;

    fn encoder(&mut self) -> ProstEncoder<T> {
        ProstCodec::<T, U>::default().encoder()
    }

    fn decoder(&mut self) -> MessageDecoder<U> {
        MessageDecoder(ProstCodec::<T, U>::default().decoder())
    }
}

pub(crate) struct MessageDecoder<U>(ProstDecoder<U>);

impl<U: Decoded> Decoder for MessageDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|status| {
            Status::new(
                U::UNPARSABLE,
                format!("the message does not parse: {}", status.message()),
            )
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
