//! Everything gRPC: the generated code and its codec, the handlers, the
//! middleware every call goes through, and TLS on the listener.

pub mod codec;
pub mod middleware;
pub mod proto;
pub mod service;
pub mod tls;
