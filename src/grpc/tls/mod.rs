//! TLS on server.listen: rustls (ring) through tokio-rustls, with certificate
//! files that are re-read while serving. tonic's own `tls_config` is fixed
//! for the server's life, so connections are accepted and handshaken here and
//! handed to tonic as a stream; tonic's `Connected` impl for the TLS stream
//! puts the client's certificates in each request's extensions.
//!
//! A reload builds a whole new `ServerConfig` (certificate, key and client
//! verifier together) and swaps it in for new connections; open connections
//! keep theirs. A fresh config also means a fresh session cache, so a session
//! resumed after the CA bundle changed can't skip the new verification.

mod accept;
mod reload;
mod server_config;

pub(crate) use accept::incoming;
pub(crate) use reload::ReloadingTls;
