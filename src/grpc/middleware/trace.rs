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
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
};

use futures::future::{BoxFuture, Either};
use http_body::{Body as _, Frame, SizeHint};
use opentelemetry::propagation::Extractor;
use tonic::{Code, Status, body::Body, codegen::Bytes};
use tower::{Layer, Service};
use tracing::{Instrument, Span, field::Empty};
use tracing_opentelemetry::OpenTelemetrySpanExt;

const SERVICE: &str = "UserManager";
const PATH_PREFIX: &str = "/UserManager/";
/// `rpc.method` and span name of each method, so no request allocates them.
const METHODS: [(&str, &str); 5] = [
    ("GetUser", "UserManager/GetUser"),
    ("AddUser", "UserManager/AddUser"),
    ("GetUsersByType", "UserManager/GetUsersByType"),
    ("CountAlreadyUsers", "UserManager/CountAlreadyUsers"),
    ("GetUsersByIds", "UserManager/GetUsersByIds"),
];
/// What the conventions call a method the instrumentation doesn't know.
const OTHER_METHOD: (&str, &str) = ("_OTHER", "UserManager/_OTHER");

/// Wraps the server's routes; install outside any layer that answers with a
/// status of its own (deadlines), so the span sees that status too.
#[derive(Debug, Clone, Copy)]
pub struct RpcTraceLayer {
    enabled: bool,
}

impl RpcTraceLayer {
    /// Traces when [`crate::telemetry::init`] installed an exporter; otherwise
    /// the service only forwards.
    pub fn new() -> Self {
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
pub struct RpcTrace<S> {
    inner: S,
    enabled: bool,
}

impl<S> Service<http::Request<Body>> for RpcTrace<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
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
        let Some(method) = request.uri().path().strip_prefix(PATH_PREFIX) else {
            return Either::Left(self.inner.call(request));
        };
        let (method, name) = METHODS
            .into_iter()
            .find(|(known, _)| *known == method)
            .unwrap_or(OTHER_METHOD);
        let span = tracing::info_span!(
            "grpc.server",
            otel.name = name,
            otel.kind = "server",
            otel.status_code = Empty,
            rpc.system = "grpc",
            rpc.service = SERVICE,
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
        let request = request.map(|inner| {
            Body::new(Watched {
                inner,
                watcher: RequestWatcher {
                    counter: MessageCounter::default(),
                    total: requests.clone(),
                },
            })
        });
        let response = self.inner.call(request).instrument(span.clone());
        Either::Right(Box::pin(async move {
            // Finishes the call as cancelled if this future is dropped first.
            let mut watcher = ResponseWatcher(Some(Call {
                span,
                requests,
                responses: MessageCounter::default(),
            }));
            match response.await {
                Ok(response) => Ok(watcher.follow(response)),
                Err(e) => {
                    // Tonic answers a failed service with UNKNOWN.
                    watcher.finish(Code::Unknown);
                    Err(e)
                }
            }
        }))
    }
}

/// An RPC in flight: its span and what it has counted so far.
struct Call {
    span: Span,
    requests: Arc<AtomicU64>,
    responses: MessageCounter,
}

impl Call {
    fn finish(self, code: Code) {
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

/// The codes the RPC conventions count as the server's fault.
fn is_server_fault(code: Code) -> bool {
    matches!(
        code,
        Code::Unknown
            | Code::DeadlineExceeded
            | Code::Unimplemented
            | Code::Internal
            | Code::Unavailable
            | Code::DataLoss
    )
}

fn grpc_status(headers: &http::HeaderMap) -> Option<Code> {
    headers
        .get(Status::GRPC_STATUS)
        .map(|value| Code::from_bytes(value.as_bytes()))
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

/// Counts gRPC messages in a body's bytes, however they are split into
/// frames: each message is a 1-byte flag, a 4-byte big-endian length, then
/// that many bytes.
#[derive(Debug, Default)]
struct MessageCounter {
    messages: u64,
    prefix: [u8; 5],
    prefix_len: usize,
    payload_left: u64,
}

impl MessageCounter {
    /// Returns how many messages started in `data`.
    fn feed(&mut self, mut data: &[u8]) -> u64 {
        let before = self.messages;
        while !data.is_empty() {
            if self.payload_left > 0 {
                let skip = data
                    .len()
                    .min(usize::try_from(self.payload_left).unwrap_or(usize::MAX));
                data = &data[skip..];
                self.payload_left -= skip as u64;
                continue;
            }
            let take = data.len().min(self.prefix.len() - self.prefix_len);
            self.prefix[self.prefix_len..self.prefix_len + take].copy_from_slice(&data[..take]);
            self.prefix_len += take;
            data = &data[take..];
            if self.prefix_len == self.prefix.len() {
                let [_, len @ ..] = self.prefix;
                self.payload_left = u64::from(u32::from_be_bytes(len));
                self.prefix_len = 0;
                self.messages += 1;
            }
        }
        self.messages - before
    }
}

type Polled = Poll<Option<Result<Frame<Bytes>, Status>>>;

/// A body passed through unchanged, each poll shown to its watcher.
struct Watched<W> {
    inner: Body,
    watcher: W,
}

trait Watcher {
    /// Runs the inner body's poll, inside a span if the watcher has one.
    fn around(&self, poll: impl FnOnce() -> Polled) -> Polled {
        poll()
    }

    fn saw(&mut self, polled: &Polled);
}

impl<W: Watcher + Unpin> http_body::Body for Watched<W> {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Polled {
        let this = &mut *self;
        let polled = this
            .watcher
            .around(|| Pin::new(&mut this.inner).poll_frame(cx));
        this.watcher.saw(&polled);
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Counts the request's messages as the handler reads them.
struct RequestWatcher {
    counter: MessageCounter,
    total: Arc<AtomicU64>,
}

impl Watcher for RequestWatcher {
    fn saw(&mut self, polled: &Polled) {
        if let Poll::Ready(Some(Ok(frame))) = polled
            && let Some(data) = frame.data_ref()
        {
            let started = self.counter.feed(data);
            self.total.fetch_add(started, Ordering::Relaxed);
        }
    }
}

/// Runs the response stream inside the span, counts its messages and
/// finishes the call at the trailers, or as cancelled when dropped before.
/// `None` once finished.
struct ResponseWatcher(Option<Call>);

impl ResponseWatcher {
    /// Finishes now if the response is trailers-only, else when its body ends.
    fn follow(mut self, response: http::Response<Body>) -> http::Response<Body> {
        if let Some(code) = grpc_status(response.headers()) {
            self.finish(code);
            return response;
        }
        if response.body().is_end_stream() {
            // A gRPC response without grpc-status anywhere: clients read UNKNOWN.
            self.finish(Code::Unknown);
            return response;
        }
        response.map(|inner| {
            Body::new(Watched {
                inner,
                watcher: self,
            })
        })
    }

    fn finish(&mut self, code: Code) {
        if let Some(call) = self.0.take() {
            call.finish(code);
        }
    }
}

impl Watcher for ResponseWatcher {
    fn around(&self, poll: impl FnOnce() -> Polled) -> Polled {
        match &self.0 {
            // Streaming handlers do their work (database reads included) here.
            Some(call) => call.span.in_scope(poll),
            None => poll(),
        }
    }

    fn saw(&mut self, polled: &Polled) {
        let Some(call) = self.0.as_mut() else {
            return;
        };
        let finished = match polled {
            Poll::Pending => None,
            Poll::Ready(Some(Ok(frame))) => match frame.data_ref() {
                Some(data) => {
                    call.responses.feed(data);
                    None
                }
                None => Some(frame.trailers_ref().and_then(grpc_status)),
            },
            Poll::Ready(Some(Err(status))) => Some(Some(status.code())),
            Poll::Ready(None) => Some(None),
        };
        if let Some(code) = finished {
            self.finish(code.unwrap_or(Code::Unknown));
        }
    }
}

impl Drop for ResponseWatcher {
    fn drop(&mut self) {
        // The call went away before its status: the client cancelled or the
        // connection was closed under it.
        self.finish(Code::Cancelled);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(payload_len: u32) -> Vec<u8> {
        let mut bytes = vec![0];
        bytes.extend(payload_len.to_be_bytes());
        bytes.extend(std::iter::repeat_n(7, payload_len as usize));
        bytes
    }

    #[test]
    fn counts_messages_however_the_bytes_are_split() {
        let stream: Vec<u8> = [3, 0, 300, 1].into_iter().flat_map(message).collect();
        for chunk in [1, 2, 4, 5, 6, 64, stream.len()] {
            let mut counter = MessageCounter::default();
            let started: u64 = stream.chunks(chunk).map(|c| counter.feed(c)).sum();
            assert_eq!(started, 4, "chunks of {chunk}");
            assert_eq!(counter.messages, 4, "chunks of {chunk}");
            assert_eq!((counter.prefix_len, counter.payload_left), (0, 0));
        }
    }

    #[test]
    fn only_server_faults_are_errors() {
        let faults: Vec<Code> = (0..=16)
            .map(Code::from_i32)
            .filter(|c| is_server_fault(*c))
            .collect();
        assert_eq!(
            faults,
            [
                Code::Unknown,
                Code::DeadlineExceeded,
                Code::Unimplemented,
                Code::Internal,
                Code::Unavailable,
                Code::DataLoss
            ]
        );
    }
}
