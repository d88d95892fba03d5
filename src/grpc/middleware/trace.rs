//! One server span per UserManager RPC, as the OpenTelemetry RPC conventions
//! describe it: named `UserManager/<Method>`, with `rpc.system`,
//! `rpc.service`, `rpc.method` and `rpc.grpc.status_code`, a child of the
//! caller's span when the request carries a W3C `traceparent`.
//!
//! The span lasts the whole call, until the response body ends, so streams
//! are covered, and it records how many gRPC messages went each way
//! (`rpc.request.message_count`, `rpc.response.message_count`). The status
//! comes from `grpc-status`, in the headers (trailers-only responses) or the
//! trailers (including errors returned mid-stream); a call whose response is
//! dropped before its trailers was cancelled.
//!
//! Health, reflection and anything else outside `/UserManager/` pass through
//! untouched, and so does everything when no exporter is installed.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use futures::future::{BoxFuture, Either};
use opentelemetry::propagation::Extractor;
use tonic::{Code, body::Body};
use tower::{Layer, Service};
use tracing::{Instrument, Span, field::Empty};
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::grpc::{
    body::{Polled, Wrapped},
    call_end::{self, CallEnd, MessageCount, RequestCounter, is_server_fault},
    methods::Method,
};

/// What the conventions call a method the instrumentation doesn't know
/// (`rpc.method`, span name), for a path under our service naming none.
const OTHER_METHOD: (&str, &str) = ("_OTHER", Method::OTHER_SPAN_NAME);

/// Wraps the server's routes; install outside any layer that answers with a
/// status of its own (deadlines), so the span sees that status too.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RpcTraceLayer {
    enabled: bool,
}

impl RpcTraceLayer {
    /// Traces when [`crate::telemetry::init`] installed an exporter; otherwise
    /// the service only forwards.
    pub(crate) fn new() -> Self {
        Self {
            enabled: crate::telemetry::exporting(),
        }
    }
}

impl Default for RpcTraceLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> Layer<S> for RpcTraceLayer {
    type Service = RpcTrace<S>;

    fn layer(&self, inner: S) -> RpcTrace<S> {
        RpcTrace {
            inner,
            enabled: self.enabled,
        }
    }
}

#[derive(Debug, Clone)]
pub(crate) struct RpcTrace<S> {
    inner: S,
    enabled: bool,
}

impl<S> Service<http::Request<Body>> for RpcTrace<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Either<S::Future, BoxFuture<'static, Result<http::Response<Body>, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if !self.enabled {
            return Either::Left(self.inner.call(request));
        }
        let path = request.uri().path();
        let (method, name) = match Method::from_path(path) {
            Some(method) => (method.name(), method.span_name()),
            None if path.starts_with(Method::PATH_PREFIX) => OTHER_METHOD,
            None => return Either::Left(self.inner.call(request)),
        };
        let span = tracing::info_span!(
            "grpc.server",
            otel.name = name,
            otel.kind = "server",
            otel.status_code = Empty,
            rpc.system = "grpc",
            rpc.service = Method::SERVICE,
            rpc.method = method,
            rpc.grpc.status_code = Empty,
            rpc.request.message_count = Empty,
            rpc.response.message_count = Empty,
        );
        // Without a traceparent this is an empty context: the span is a root,
        // whatever span happens to be current.
        let parent = opentelemetry::global::get_text_map_propagator(|propagator| {
            propagator.extract(&HeaderExtractor(request.headers()))
        });
        let _ = span.set_parent(parent);

        let requests = Arc::new(AtomicU64::new(0));
        let request =
            request.map(|inner| Wrapped::body(inner, RequestCounter::new(requests.clone())));
        let response = self.inner.call(request).instrument(span.clone());
        Either::Right(Box::pin(call_end::follow(
            Call {
                span,
                requests,
                responses: MessageCount::default(),
            },
            response,
        )))
    }
}

/// An RPC in flight: its span and what it has counted so far.
struct Call {
    span: Span,
    requests: Arc<AtomicU64>,
    responses: MessageCount,
}

impl CallEnd for Call {
    fn sent(&mut self, data: &[u8]) {
        self.responses.feed(data);
    }

    /// Streaming handlers do their work (database reads included) here.
    fn around(&mut self, poll: impl FnOnce() -> Polled) -> Polled {
        self.span.in_scope(poll)
    }

    fn end(self, code: Code) {
        let span = &self.span;
        span.record("rpc.grpc.status_code", code as i64);
        if is_server_fault(code) {
            span.record("otel.status_code", "error");
        }
        // As i64: OpenTelemetry has no unsigned integers (u64 would become text).
        let count = |n: u64| i64::try_from(n).unwrap_or(i64::MAX);
        span.record(
            "rpc.request.message_count",
            count(self.requests.load(Ordering::Relaxed)),
        );
        span.record("rpc.response.message_count", count(self.responses.messages));
        // Dropping the last handle ends the span.
    }
}

struct HeaderExtractor<'a>(&'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}
