//! The HTTP/2 settings of every connection.

use tonic::transport::Server;

use super::millis;
use crate::config::LimitsSettings;

/// The HTTP/2 limits of every connection. tonic leaves most of these off:
/// no cap on concurrent streams, none on streams it resets for protocol
/// errors, no keepalive, no maximum age.
pub(crate) fn apply<L>(server: Server<L>, limits: &LimitsSettings) -> Server<L> {
    let server = server
        .max_concurrent_streams(limits.max_concurrent_streams)
        .http2_max_pending_accept_reset_streams(Some(limits.max_pending_accept_reset_streams))
        .http2_max_local_error_reset_streams(Some(limits.max_local_error_reset_streams))
        .http2_max_header_list_size(limits.max_header_list_bytes)
        .http2_keepalive_interval(millis(limits.keepalive_interval_ms))
        .http2_keepalive_timeout(millis(limits.keepalive_timeout_ms));
    // Only the age: tonic 0.14 given a grace too sends no GOAWAY at the age,
    // it just drops the connection at age + grace. `with_max_age` does that part.
    match millis(limits.max_connection_age_ms) {
        Some(age) => server.max_connection_age(age),
        None => server,
    }
}
