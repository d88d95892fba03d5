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
use http_body::{Frame, SizeHint};
use tokio::time::{Instant, Sleep};
use tonic::{Status, body::Body, codegen::Bytes};
use tower::{Layer, Service};

/// Unary methods: the server default applies to these only, as streams are
/// bounded by their own limits.
pub(crate) const UNARY: [&str; 3] = [
    "/UserManager/GetUser",
    "/UserManager/AddUser",
    "/grpc.health.v1.Health/Check",
];

/// tonic arms an identical timer for the client's `grpc-timeout` just before
/// this layer runs, and polls this layer first; firing a millisecond earlier
/// makes sure the client hears DEADLINE_EXCEEDED, not tonic's CANCELLED.
const AHEAD_OF_TONIC: Duration = Duration::from_millis(1);

#[derive(Debug, Clone, Copy)]
pub struct DeadlineLayer {
    unary_default: Option<Duration>,
}

impl DeadlineLayer {
    /// `unary_default` of zero means no server default.
    pub fn new(unary_default: Duration) -> Self {
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
pub struct Deadline<S> {
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
        let server = self
            .unary_default
            .filter(|_| UNARY.contains(&request.uri().path()));
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
            match tokio::time::timeout_at(deadline, call).await {
                Ok(Ok(response)) => Ok(response.map(|body| {
                    Body::new(DeadlineBody {
                        inner: body,
                        expiry: Box::pin(tokio::time::sleep_until(deadline)),
                        done: false,
                    })
                })),
                Ok(Err(e)) => Err(e),
                Err(_) => Ok(exceeded().into_http()),
            }
        })
    }
}

fn exceeded() -> Status {
    Status::deadline_exceeded("deadline exceeded before the call completed")
}

/// A response body that ends with DEADLINE_EXCEEDED trailers at the deadline.
struct DeadlineBody {
    inner: Body,
    expiry: Pin<Box<Sleep>>,
    done: bool,
}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.done {
            return Poll::Ready(None);
        }
        match Pin::new(&mut self.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                self.done = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(frame)) => Poll::Ready(Some(frame)),
            Poll::Pending => match self.expiry.as_mut().poll(cx) {
                Poll::Ready(()) => {
                    self.done = true;
                    let mut trailers = http::HeaderMap::new();
                    // Encoding our own fixed status can't fail.
                    let _ = exceeded().add_header(&mut trailers);
                    Poll::Ready(Some(Ok(Frame::trailers(trailers))))
                }
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
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
