//! Following a call to its real end, for the layers that measure calls
//! (`middleware::trace`, `middleware::metrics`): the status in the response
//! headers (trailers-only), in the trailers after the last message, an error
//! from the body, or the response dropped before any of them (CANCELLED:
//! the client went away or the connection closed). Messages are counted on
//! the way, however the bytes are split into frames.

use std::{
    ops::ControlFlow,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::Poll,
};

use http_body::Body as _;
use tonic::{Code, Status, body::Body};

use crate::grpc::body::{FrameScanner, Hooks, Polled, Wrapped};

/// What a layer does with a call it follows.
pub(crate) trait CallEnd: Send + Unpin + 'static {
    /// Sees the bytes of each DATA frame of the response.
    fn sent(&mut self, _data: &[u8]) {}

    /// Runs one poll of the response body (inside a span, say).
    fn around(&mut self, poll: impl FnOnce() -> Polled) -> Polled {
        poll()
    }

    /// The call ended with `code`; called exactly once.
    fn end(self, code: Code);
}

/// Follows `call`, whose response `response` gives, to its end. The call
/// is followed from now: if the future returned is dropped before the
/// response comes, the call ends CANCELLED.
pub(crate) fn follow<C, F, E>(
    call: C,
    response: F,
) -> impl Future<Output = Result<http::Response<Body>, E>> + Send
where
    C: CallEnd,
    F: Future<Output = Result<http::Response<Body>, E>> + Send,
{
    let mut watcher = EndWatcher(Some(call));
    async move {
        match response.await {
            Ok(response) => Ok(watcher.follow(response)),
            Err(e) => {
                // Tonic answers a failed service with UNKNOWN.
                watcher.end(Code::Unknown);
                Err(e)
            }
        }
    }
}

/// Ends its call once: at the status, or as CANCELLED when dropped before.
struct EndWatcher<C: CallEnd>(Option<C>);

impl<C: CallEnd> EndWatcher<C> {
    /// Ends now if the response is trailers-only, else when its body ends.
    fn follow(mut self, response: http::Response<Body>) -> http::Response<Body> {
        if let Some(code) = grpc_status(response.headers()) {
            self.end(code);
            return response;
        }
        if response.body().is_end_stream() {
            // A gRPC response without grpc-status anywhere: clients read UNKNOWN.
            self.end(Code::Unknown);
            return response;
        }
        response.map(|inner| Wrapped::body(inner, self))
    }

    /// Ends the call with `code` unless it has ended already.
    fn end(&mut self, code: Code) {
        if let Some(call) = self.0.take() {
            call.end(code);
        }
    }
}

impl<C: CallEnd> Hooks for EndWatcher<C> {
    fn around(&mut self, poll: impl FnOnce() -> Polled) -> Polled {
        match &mut self.0 {
            Some(call) => call.around(poll),
            None => poll(),
        }
    }

    fn after(&mut self, polled: &Polled) -> Option<Status> {
        let call = self.0.as_mut()?;
        let ended = match polled {
            Poll::Pending => None,
            Poll::Ready(Some(Ok(frame))) => match frame.data_ref() {
                Some(data) => {
                    call.sent(data);
                    None
                }
                None => Some(frame.trailers_ref().and_then(grpc_status)),
            },
            Poll::Ready(Some(Err(status))) => Some(Some(status.code())),
            Poll::Ready(None) => Some(None),
        };
        if let Some(code) = ended {
            self.end(code.unwrap_or(Code::Unknown));
        }
        None
    }
}

impl<C: CallEnd> Drop for EndWatcher<C> {
    fn drop(&mut self) {
        // The call went away before its status: the client cancelled or the
        // connection was closed under it.
        self.end(Code::Cancelled);
    }
}

/// The codes the RPC conventions count as the server's fault.
pub(crate) fn is_server_fault(code: Code) -> bool {
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

/// Counts gRPC messages in a body's bytes, however they are split into frames.
#[derive(Debug, Default)]
pub(crate) struct MessageCount {
    pub(crate) messages: u64,
    scanner: FrameScanner,
}

impl MessageCount {
    /// Returns how many messages started in `data`.
    pub(crate) fn feed(&mut self, data: &[u8]) -> u64 {
        let mut started = 0;
        let _ = self.scanner.feed::<()>(data, |_| {
            started += 1;
            ControlFlow::Continue(())
        });
        self.messages += started;
        started
    }
}

/// Counts a request's messages into `total` as the handler reads them.
pub(crate) struct RequestCounter {
    count: MessageCount,
    total: Arc<AtomicU64>,
}

impl RequestCounter {
    pub(crate) fn new(total: Arc<AtomicU64>) -> Self {
        Self {
            count: MessageCount::default(),
            total,
        }
    }
}

impl Hooks for RequestCounter {
    fn after(&mut self, polled: &Polled) -> Option<Status> {
        if let Poll::Ready(Some(Ok(frame))) = polled
            && let Some(data) = frame.data_ref()
        {
            let started = self.count.feed(data);
            self.total.fetch_add(started, Ordering::Relaxed);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
