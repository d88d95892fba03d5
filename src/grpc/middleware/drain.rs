//! The drain deadline: once it passes, every UserManager call still open
//! ends with UNAVAILABLE ("retry on another instance") instead of keeping
//! the process alive, whatever the handler is doing, in one place:
//!
//! - a call whose response hasn't started (a unary call stuck on the
//!   database, CountAlreadyUsers waiting for its client's stream) is
//!   answered UNAVAILABLE, and its handler dropped;
//! - a streaming response (per the method table) ends with UNAVAILABLE
//!   trailers at its next poll. Frames already handed to HTTP/2 still reach
//!   the client first; a client whose flow-control window is full hears it
//!   when it reads again, or loses the connection when the server exits.
//!
//! Health and reflection are not ours to end: they are dropped with their
//! connections when the server exits, as before.

use std::{
    pin::Pin,
    task::{Context, Poll},
};

use futures::future::{BoxFuture, Either};
use tokio::sync::watch;
use tonic::{Status, body::Body};
use tower::{Layer, Service};

use crate::grpc::{
    body::{Hooks, Wrapped},
    methods::Method,
};

/// Fires once; cheap to clone into every call.
#[derive(Clone)]
pub(crate) struct Drain(watch::Receiver<bool>);

/// The side that fires the drain.
pub(crate) struct DrainTrigger(watch::Sender<bool>);

pub(crate) fn drain_pair() -> (DrainTrigger, Drain) {
    let (tx, rx) = watch::channel(false);
    (DrainTrigger(tx), Drain(rx))
}

impl DrainTrigger {
    pub(crate) fn fire(&self) {
        self.0.send_replace(true);
    }
}

impl Drain {
    /// Resolves when the drain fires (or its trigger is gone).
    pub(crate) async fn fired(mut self) {
        let _ = self.0.wait_for(|fired| *fired).await;
    }

    pub(crate) fn status() -> Status {
        Status::unavailable("the server is shutting down; retry on another instance")
    }
}

/// Ends the calls of the routes it wraps at the drain deadline. Install it
/// inside the trace and limits layers, so they see the UNAVAILABLE.
#[derive(Clone)]
pub(crate) struct DrainLayer {
    drain: Drain,
}

impl DrainLayer {
    pub(crate) fn new(drain: Drain) -> Self {
        Self { drain }
    }
}

impl<S> Layer<S> for DrainLayer {
    type Service = Drained<S>;

    fn layer(&self, inner: S) -> Drained<S> {
        Drained {
            inner,
            drain: self.drain.clone(),
        }
    }
}

#[derive(Clone)]
pub(crate) struct Drained<S> {
    inner: S,
    drain: Drain,
}

impl<S, B> Service<http::Request<B>> for Drained<S>
where
    S: Service<http::Request<B>, Response = http::Response<Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = S::Error;
    type Future = Either<S::Future, BoxFuture<'static, Result<http::Response<Body>, S::Error>>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let Some(method) = Method::from_path(request.uri().path()) else {
            return Either::Left(self.inner.call(request));
        };
        let response = self.inner.call(request);
        let drain = self.drain.clone();
        Either::Right(Box::pin(async move {
            tokio::select! {
                biased;
                () = drain.clone().fired() => Ok(Drain::status().into_http()),
                response = response => {
                    let response = response?;
                    Ok(if method.kind().streams_responses() {
                        response.map(|body| Wrapped::body(body, UntilDrained::new(drain)))
                    } else {
                        // One message and the trailers, ready together.
                        response
                    })
                }
            }
        }))
    }
}

/// Ends a response stream with UNAVAILABLE once the drain fires.
struct UntilDrained(Pin<Box<dyn Future<Output = ()> + Send>>);

impl UntilDrained {
    fn new(drain: Drain) -> Self {
        Self(Box::pin(drain.fired()))
    }
}

impl Hooks for UntilDrained {
    fn before(&mut self, cx: &mut Context<'_>) -> Poll<Status> {
        self.0.as_mut().poll(cx).map(|()| Drain::status())
    }
}
