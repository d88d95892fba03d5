//! RED metrics per RPC, as the OpenTelemetry RPC conventions (v1.44) name
//! them: `rpc.server.call.duration` (seconds) with `rpc.system.name`,
//! `rpc.method`, `rpc.response.status_code` and, for the codes that are the
//! server's fault, `error.type`; the calls in flight
//! (`user_manager.rpc.server.active_calls`); and for streaming methods the
//! messages received and sent per call (the conventions removed
//! `rpc.server.requests_per_rpc` without a replacement, so these are ours).
//!
//! A call is measured whole: from the request to its real end, the trailers
//! of the last message (a deadline, a drain or a limit ending it included),
//! or the response dropped before them (CANCELLED). Installed outermost, so
//! calls refused by auth and the limits are counted too.
//!
//! Health and reflection are left out (their signal is `user_manager.ready`);
//! a path that names no method of ours counts as `_OTHER`.
//!
//! Every attribute set is built once, per method × status code, so a call
//! allocates nothing for its measurements. Without a meter provider (no
//! reader configured) the layer only forwards.

use std::{
    sync::{
        Arc,
        atomic::{AtomicI64, AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Instant,
};

use futures::future::{BoxFuture, Either};
use opentelemetry::{KeyValue, metrics::Histogram};
use tonic::{Code, body::Body};
use tower::{Layer, Service};

use crate::{
    grpc::{
        body::Wrapped,
        call_end::{self, CallEnd, MessageCount, RequestCounter, is_server_fault},
        methods::{CallKind, Method},
    },
    instruments::{self, DURATION_BUCKETS},
};

/// `rpc.method` for a path that names none of ours.
const OTHER: &str = "_OTHER";
/// gRPC status codes 0..=16.
const CODES: usize = 17;
/// One slot per method, then `_OTHER`.
const OTHER_SLOT: usize = Method::ALL.len();

/// The code names the gRPC conventions use for `rpc.response.status_code`.
const CODE_NAMES: [&str; CODES] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// Paths left out of the RPC series.
const EXCLUDED_PREFIXES: [&str; 2] = ["/grpc.health.", "/grpc.reflection."];

#[derive(Clone)]
pub(crate) struct RpcMetricsLayer {
    /// `None` when no meter provider is installed: the service only forwards.
    shared: Option<Arc<Shared>>,
}

struct Shared {
    duration: Histogram<f64>,
    /// Calls in flight per method slot, read when metrics are collected: an
    /// atomic add per call instead of two measurements through the SDK.
    active: Arc<[AtomicI64]>,
    received: Histogram<u64>,
    sent: Histogram<u64>,
    /// Per slot × code: system, method, status code (and error type).
    by_status: Vec<Vec<KeyValue>>,
    /// Per slot: the method alone.
    by_method: Vec<[KeyValue; 1]>,
}

impl RpcMetricsLayer {
    /// Measures when [`crate::telemetry::init`] installed a meter provider;
    /// otherwise the service only forwards.
    pub(crate) fn new() -> Self {
        if !crate::telemetry::metering() {
            return Self { shared: None };
        }
        let meter = instruments::meter();
        let methods = Method::ALL
            .iter()
            .map(|m| m.span_name())
            .chain([OTHER])
            .collect::<Vec<_>>();
        let by_status = methods
            .iter()
            .flat_map(|method| {
                (0..CODES).map(move |code| {
                    let name = CODE_NAMES[code];
                    let mut attrs = vec![
                        KeyValue::new("rpc.system.name", "grpc"),
                        KeyValue::new("rpc.method", *method),
                        KeyValue::new("rpc.response.status_code", name),
                    ];
                    if is_server_fault(Code::from_i32(code as i32)) {
                        attrs.push(KeyValue::new("error.type", name));
                    }
                    attrs
                })
            })
            .collect();
        let by_method = methods
            .iter()
            .map(|method| [KeyValue::new("rpc.method", *method)])
            .collect();
        let messages = |name: &'static str, description: &'static str| {
            meter
                .u64_histogram(name)
                .with_unit("{message}")
                .with_description(description)
                .with_boundaries(vec![
                    0.0,
                    1.0,
                    2.0,
                    5.0,
                    10.0,
                    100.0,
                    1_000.0,
                    10_000.0,
                    100_000.0,
                    1_000_000.0,
                ])
                .build()
        };
        let active: Arc<[AtomicI64]> = methods.iter().map(|_| AtomicI64::new(0)).collect();
        let observed = active.clone();
        let attrs: Vec<[KeyValue; 1]> = methods
            .iter()
            .map(|method| [KeyValue::new("rpc.method", *method)])
            .collect();
        let _active = meter
            .i64_observable_up_down_counter("user_manager.rpc.server.active_calls")
            .with_unit("{call}")
            .with_description("RPCs in flight")
            .with_callback(move |observer| {
                for (count, attrs) in observed.iter().zip(&attrs) {
                    observer.observe(count.load(Ordering::Relaxed), attrs);
                }
            })
            .build();
        Self {
            shared: Some(Arc::new(Shared {
                duration: meter
                    .f64_histogram("rpc.server.call.duration")
                    .with_unit("s")
                    .with_description(
                        "Duration of RPCs, from the request to the end of the response",
                    )
                    .with_boundaries(DURATION_BUCKETS.to_vec())
                    .build(),
                active,
                received: messages(
                    "user_manager.rpc.server.messages_received",
                    "Messages received per streaming RPC",
                ),
                sent: messages(
                    "user_manager.rpc.server.messages_sent",
                    "Messages sent per streaming RPC",
                ),
                by_status,
                by_method,
            })),
        }
    }
}

impl Default for RpcMetricsLayer {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> Layer<S> for RpcMetricsLayer {
    type Service = RpcMetrics<S>;

    fn layer(&self, inner: S) -> RpcMetrics<S> {
        RpcMetrics {
            inner,
            shared: self.shared.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct RpcMetrics<S> {
    inner: S,
    shared: Option<Arc<Shared>>,
}

/// The slot of `path`, and whether its call streams; `None`: not measured.
fn classify(path: &str) -> Option<(usize, bool)> {
    if let Some(index) = Method::ALL.iter().position(|m| m.path() == path) {
        return Some((index, Method::ALL[index].kind() != CallKind::Unary));
    }
    if EXCLUDED_PREFIXES.iter().any(|p| path.starts_with(p)) {
        return None;
    }
    Some((OTHER_SLOT, false))
}

impl<S> Service<http::Request<Body>> for RpcMetrics<S>
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
        let (Some(shared), Some((slot, streaming))) =
            (&self.shared, classify(request.uri().path()))
        else {
            return Either::Left(self.inner.call(request));
        };
        let shared = shared.clone();
        shared.active[slot].fetch_add(1, Ordering::Relaxed);
        let started = Instant::now();
        let (request, received) = if streaming {
            let total = Arc::new(AtomicU64::new(0));
            let request =
                request.map(|inner| Wrapped::body(inner, RequestCounter::new(total.clone())));
            (request, Some(total))
        } else {
            (request, None)
        };
        let response = self.inner.call(request);
        Either::Right(Box::pin(call_end::follow(
            Call {
                shared,
                slot,
                started,
                received,
                sent: MessageCount::default(),
            },
            response,
        )))
    }
}

/// A call in flight.
struct Call {
    shared: Arc<Shared>,
    slot: usize,
    started: Instant,
    /// Streaming calls only: messages received so far.
    received: Option<Arc<AtomicU64>>,
    sent: MessageCount,
}

impl CallEnd for Call {
    fn sent(&mut self, data: &[u8]) {
        if self.received.is_some() {
            self.sent.feed(data);
        }
    }

    fn end(self, code: Code) {
        let shared = &self.shared;
        let code = (code as usize).min(CODES - 1);
        shared.duration.record(
            self.started.elapsed().as_secs_f64(),
            &shared.by_status[self.slot * CODES + code],
        );
        let method = &shared.by_method[self.slot];
        shared.active[self.slot].fetch_sub(1, Ordering::Relaxed);
        if let Some(received) = &self.received {
            shared
                .received
                .record(received.load(Ordering::Relaxed), method);
            shared.sent.record(self.sent.messages, method);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_names_follow_the_codes() {
        for (i, name) in CODE_NAMES.iter().enumerate() {
            let code = Code::from_i32(i as i32);
            let debug = format!("{code:?}");
            // Debug is CamelCase: NotFound → NOT_FOUND.
            let mut snake = String::new();
            for (j, c) in debug.chars().enumerate() {
                if c.is_uppercase() && j > 0 {
                    snake.push('_');
                }
                snake.push(c.to_ascii_uppercase());
            }
            assert_eq!(*name, snake, "{code:?}");
        }
    }

    #[test]
    fn health_and_reflection_are_not_measured() {
        assert_eq!(classify("/UserManager/GetUser"), Some((0, false)));
        assert_eq!(
            classify("/UserManager/GetUsersByIds").map(|(_, s)| s),
            Some(true)
        );
        assert_eq!(classify("/UserManager/Nope"), Some((OTHER_SLOT, false)));
        assert_eq!(classify("/other.Service/Call"), Some((OTHER_SLOT, false)));
        assert_eq!(classify("/grpc.health.v1.Health/Check"), None);
        assert_eq!(
            classify("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            None
        );
    }
}
