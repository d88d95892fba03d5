//! The drain signal: once the drain deadline passes, every stream still open
//! ends with UNAVAILABLE instead of keeping the process alive.

use futures::{Stream, StreamExt, stream};
use tokio::sync::watch;
use tonic::Status;

/// Fires once; cheap to clone into every call.
#[derive(Clone)]
pub struct Drain(watch::Receiver<bool>);

/// The side that fires the drain.
pub struct DrainTrigger(watch::Sender<bool>);

pub fn drain_pair() -> (DrainTrigger, Drain) {
    let (tx, rx) = watch::channel(false);
    (DrainTrigger(tx), Drain(rx))
}

impl DrainTrigger {
    pub fn fire(&self) {
        self.0.send_replace(true);
    }
}

impl Drain {
    /// Resolves when the drain fires (or its trigger is gone).
    pub async fn fired(mut self) {
        let _ = self.0.wait_for(|fired| *fired).await;
    }

    pub fn status() -> Status {
        Status::unavailable("the server is shutting down; retry on another instance")
    }

    /// `stream` until the drain fires, then one UNAVAILABLE and the end.
    /// Dropping the inner stream stops its database work.
    pub fn guard<T, S>(&self, stream: S) -> impl Stream<Item = Result<T, Status>> + Send + use<T, S>
    where
        S: Stream<Item = Result<T, Status>> + Send + 'static,
        T: Send + 'static,
    {
        let fired = Box::pin(self.clone().fired());
        stream::unfold(Some((Box::pin(stream), fired)), |state| async move {
            let (mut inner, mut fired) = state?;
            tokio::select! {
                biased;
                () = &mut fired => Some((Err(Drain::status()), None)),
                item = inner.next() => item.map(|item| (item, Some((inner, fired)))),
            }
        })
    }
}
