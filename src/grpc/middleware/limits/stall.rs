//! The stall watchdog: a server stream whose client stops reading is ended,
//! its work and permits dropped, instead of holding them forever. The same
//! wrapper holds every call's permits until its response ends.

use std::{
    pin::Pin,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use http_body::SizeHint;
use tokio::{
    sync::{Notify, oneshot},
    time::Instant,
};
use tonic::{Status, body::Body, codegen::Bytes};

use super::shedding::Permits;
use crate::{
    grpc::body::{Hooks, Polled, Wrapped},
    instruments::{self, Limit},
};

/// A response body that holds the call's permits until it ends or is
/// dropped (the client cancelled), and, for a stream (`stall` set), ends the
/// call when its client stops reading.
///
/// A stalled reader is seen by what hyper does: it asks for the next frame
/// only once the client's flow-control window has room for the last one.
/// If it hasn't asked for `stall` since this body handed it a frame, the
/// watchdog drops the call's work and permits; whenever hyper asks again the
/// call ends with RESOURCE_EXHAUSTED. Until then HTTP/2 flow control keeps
/// what waits for the client to one window and one frame.
pub(super) fn hold(body: Body, permits: Permits, stall: Option<Duration>) -> Body {
    let Some(limit) = stall else {
        // Nothing can take the body away: no shared state, no lock per poll.
        return Wrapped::body(body, Permitted(Some(permits)));
    };
    let call = Arc::new(Call {
        live: Mutex::new(Some(Live {
            body,
            _permits: permits,
        })),
        handed: AtomicU64::new(0),
        epoch: Instant::now(),
        handed_data: Notify::new(),
    });
    let (stop, stopped) = oneshot::channel();
    tokio::spawn(watch_stall(call.clone(), limit, stopped));
    Wrapped::body(
        LiveBody(call.clone()),
        Holder {
            call,
            _watchdog: stop,
            stall: limit,
        },
    )
}

struct Call {
    /// None once finished or ended by the watchdog.
    live: Mutex<Option<Live>>,
    /// 0 while hyper waits for this body; otherwise 1 + nanoseconds since
    /// `epoch` at which this body last handed hyper a data frame.
    handed: AtomicU64,
    epoch: Instant,
    handed_data: Notify,
}

struct Live {
    body: Body,
    _permits: Permits,
}

impl Call {
    fn lock(&self) -> MutexGuard<'_, Option<Live>> {
        self.live.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

async fn watch_stall(call: Arc<Call>, limit: Duration, mut stopped: oneshot::Receiver<()>) {
    loop {
        let handed = call.handed.load(Ordering::Acquire);
        let wait = async {
            if handed == 0 {
                call.handed_data.notified().await;
            } else {
                let since = call.epoch + Duration::from_nanos(handed - 1);
                tokio::time::sleep_until(since + limit).await;
            }
        };
        tokio::select! {
            _ = &mut stopped => return,
            () = wait => {}
        }
        if handed == 0 {
            continue;
        }
        let mut live = call.lock();
        if call.handed.load(Ordering::Acquire) == handed {
            let ended = live.take();
            drop(live);
            drop(ended);
            instruments::get().limit_refused(Limit::StreamStallTimeout);
            tracing::info!(
                ?limit,
                "a stream's client read nothing for stream_stall_timeout_ms; ended its call"
            );
            return;
        }
    }
}

/// The call's body while it lives; nothing once the watchdog took it (the
/// holder's trailers say why first).
struct LiveBody(Arc<Call>);

impl http_body::Body for LiveBody {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Polled {
        match self.0.lock().as_mut() {
            Some(running) => Pin::new(&mut running.body).poll_frame(cx),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.0
            .lock()
            .as_ref()
            .is_some_and(|running| running.body.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.0
            .lock()
            .as_ref()
            .map_or_else(SizeHint::default, |running| running.body.size_hint())
    }
}

struct Holder {
    call: Arc<Call>,
    /// Dropping it stops the watchdog.
    _watchdog: oneshot::Sender<()>,
    stall: Duration,
}

impl Hooks for Holder {
    fn before(&mut self, _cx: &mut Context<'_>) -> Poll<Status> {
        let live = self.call.lock();
        // Hyper is asking: until a data frame is handed, the watchdog waits.
        // Under the lock, so it can't take the body between here and the poll.
        self.call.handed.store(0, Ordering::Release);
        if live.is_some() {
            return Poll::Pending;
        }
        let stall = self.stall;
        Poll::Ready(Status::resource_exhausted(format!(
            "the client read nothing of this stream for {stall:?}; the server ended it"
        )))
    }

    fn after(&mut self, polled: &Polled) -> Option<Status> {
        match polled {
            Poll::Pending => {}
            Poll::Ready(Some(Ok(frame))) if frame.is_data() => {
                let call = &self.call;
                let now = u64::try_from(call.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
                call.handed.store(now.saturating_add(1), Ordering::Release);
                call.handed_data.notify_one();
            }
            Poll::Ready(_) => {
                // Trailers, an error or the end: the call is over, its
                // permits go back now.
                let done = self.call.lock().take();
                drop(done);
            }
        }
        None
    }
}

/// The permits of a call nothing can stall (a unary call, or any call with
/// the stall timeout off), given back when its response ends or is dropped.
struct Permitted(Option<Permits>);

impl Hooks for Permitted {
    fn after(&mut self, polled: &Polled) -> Option<Status> {
        match polled {
            Poll::Pending => {}
            Poll::Ready(Some(Ok(frame))) if frame.is_data() => {}
            // Trailers, an error or the end: the permits go back now.
            Poll::Ready(_) => self.0 = None,
        }
        None
    }
}
