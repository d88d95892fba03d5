//! Deadlines reported as DEADLINE_EXCEEDED. tonic's own timeout answers
//! CANCELLED and only bounds the response headers; this layer bounds the
//! whole call by the client's `grpc-timeout`, and unary calls without one by
//! the server's default, then answers DEADLINE_EXCEEDED. Dropping the call's
//! future or body stops its database work.

use std::{
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use futures::future::BoxFuture;
use tokio::time::{Instant, Sleep};
use tonic::{Status, body::Body};
use tower::{Layer, Service};

use crate::grpc::{
    body::{Hooks, Wrapped},
    methods::is_unary_path,
};

/// tonic arms an identical timer for the client's `grpc-timeout` just before
/// this layer runs, and polls this layer first; firing a millisecond earlier
/// makes sure the client hears DEADLINE_EXCEEDED, not tonic's CANCELLED.
const AHEAD_OF_TONIC: Duration = Duration::from_millis(1);

#[derive(Debug, Clone, Copy)]
pub(crate) struct DeadlineLayer {
    unary_default: Option<Duration>,
}

impl DeadlineLayer {
    /// `unary_default` of zero means no server default.
    pub(crate) fn new(unary_default: Duration) -> Self {
        Self {
            unary_default: (!unary_default.is_zero()).then_some(unary_default),
        }
    }
}

impl<S> Layer<S> for DeadlineLayer {
    type Service = Deadline<S>;

    fn layer(&self, inner: S) -> Self::Service {
        Deadline {
            inner,
            unary_default: self.unary_default,
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Deadline<S> {
    inner: S,
    unary_default: Option<Duration>,
}

impl<S, B> Service<http::Request<B>> for Deadline<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let client = request
            .headers()
            .get("grpc-timeout")
            .and_then(|v| parse_grpc_timeout(v.as_bytes()))
            .map(|d| d.saturating_sub(AHEAD_OF_TONIC));
        // The server default bounds unary calls only: streams are bounded
        // by their own limits.
        let server = self
            .unary_default
            .filter(|_| is_unary_path(request.uri().path()));
        let budget = match (client, server) {
            (Some(c), Some(s)) => Some(c.min(s)),
            (c, s) => c.or(s),
        };
        let call = self.inner.call(request);
        let Some(budget) = budget else {
            return Box::pin(call);
        };
        let deadline = Instant::now() + budget;
        Box::pin(async move {
            // One timer bounds the call, then goes on with its body: arming
            // a second one cost each call a timer registration more.
            let mut expiry = Box::pin(tokio::time::sleep_until(deadline));
            tokio::select! {
                biased;
                response = call => {
                    Ok(response?.map(|body| Wrapped::body(body, Expiry(expiry))))
                }
                () = &mut expiry => Ok(exceeded().into_http()),
            }
        })
    }
}

fn exceeded() -> Status {
    Status::deadline_exceeded("deadline exceeded before the call completed")
}

/// Ends a response body with DEADLINE_EXCEEDED trailers at the deadline.
struct Expiry(Pin<Box<Sleep>>);

impl Hooks for Expiry {
    fn before(&mut self, cx: &mut Context<'_>) -> Poll<Status> {
        self.0.as_mut().poll(cx).map(|()| exceeded())
    }
}

/// Parses `grpc-timeout`: up to 8 ASCII digits and a unit (H, M, S, m, u, n).
fn parse_grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (&unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_grpc_timeout_unit() {
        assert_eq!(parse_grpc_timeout(b"2H"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_grpc_timeout(b"3M"), Some(Duration::from_secs(180)));
        assert_eq!(parse_grpc_timeout(b"4S"), Some(Duration::from_secs(4)));
        assert_eq!(
            parse_grpc_timeout(b"150m"),
            Some(Duration::from_millis(150))
        );
        assert_eq!(
            parse_grpc_timeout(b"99999999u"),
            Some(Duration::from_micros(99_999_999))
        );
        assert_eq!(parse_grpc_timeout(b"5n"), Some(Duration::from_nanos(5)));
    }

    #[test]
    fn rejects_malformed_grpc_timeouts() {
        for bad in [
            &b""[..],
            b"S",
            b"10",
            b"10x",
            b"123456789S",
            b"-1S",
            b"1.5S",
        ] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad:?}");
        }
    }
}
