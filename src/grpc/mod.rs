//! Everything gRPC: the generated code and its codec, the handlers, the
//! middleware every call goes through, and TLS on the listener.

pub(crate) mod body;
pub(crate) mod call_end;
pub(crate) mod codec;
pub(crate) mod methods;
pub(crate) mod middleware;
pub mod proto;
mod response;
pub(crate) mod service;
pub(crate) mod tls;
