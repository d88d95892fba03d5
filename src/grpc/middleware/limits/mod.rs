//! Resource limits, so that no client, broken or hostile, can take more than
//! its share: HTTP/2 settings on the server, a layer that sheds calls over
//! the per-connection and server-wide bounds with RESOURCE_EXHAUSTED (at
//! once, never queued), checks each request message's size before it is
//! buffered, and ends server streams whose client stopped reading; and a
//! connection wrapper that closes connections at their maximum age plus grace.
//! The defaults and their reasons are in `config/default.toml`.

mod age;
mod http2;
mod shedding;
mod size;
mod stall;

use std::{
    sync::Arc,
    task::{Context, Poll},
    time::Duration,
};

use futures::future::BoxFuture;
use tonic::body::Body;
use tower::{Layer, Service};

pub(crate) use age::with_max_age;
pub(crate) use http2::apply;

use crate::{
    config::LimitsSettings,
    grpc::{body::Wrapped, methods::is_unary_path},
};
use shedding::Shedder;
use size::SizeCheck;

fn millis(ms: u64) -> Option<Duration> {
    (ms != 0).then(|| Duration::from_millis(ms))
}

/// Sheds calls over the per-connection and server-wide bounds, limits
/// request message sizes, and ends stalled server streams. Install it inside
/// the trace layer, so shed and ended calls are traced with their status.
#[derive(Clone)]
pub(crate) struct LimitsLayer {
    shared: Arc<Shared>,
}

struct Shared {
    max_message_bytes: usize,
    stall_timeout: Option<Duration>,
    shedder: Shedder,
}

impl LimitsLayer {
    pub(crate) fn new(limits: &LimitsSettings) -> Self {
        Self {
            shared: Arc::new(Shared {
                max_message_bytes: limits.max_message_bytes,
                stall_timeout: millis(limits.stream_stall_timeout_ms),
                shedder: Shedder::new(limits),
            }),
        }
    }
}

impl<S> Layer<S> for LimitsLayer {
    type Service = Limits<S>;

    fn layer(&self, inner: S) -> Limits<S> {
        Limits {
            inner,
            shared: self.shared.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct Limits<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S> Service<http::Request<Body>> for Limits<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<http::Response<Body>, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        let shared = &self.shared;
        let streaming = !is_unary_path(request.uri().path());
        let permits = match shared.shedder.admit(request.extensions(), streaming) {
            Ok(permits) => permits,
            // At once, never queued.
            Err(status) => return Box::pin(std::future::ready(Ok(status.into_http()))),
        };
        let request =
            request.map(|body| Wrapped::body(body, SizeCheck::new(shared.max_message_bytes)));
        let stall = shared.stall_timeout.filter(|_| streaming);
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| stall::hold(body, permits, stall)))
        })
    }
}
