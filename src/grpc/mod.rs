//! Everything gRPC: the generated code and its codec, the handlers, the
//! middleware every call goes through, and TLS on the listener.

pub mod body;
pub mod codec;
pub mod methods;
pub mod middleware;
pub mod proto;
pub mod service;
pub mod tls;
