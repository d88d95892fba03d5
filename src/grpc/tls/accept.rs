//! The accept loop: TCP connections accepted, handshaken concurrently, and
//! handed to tonic as a stream.

use std::{
    convert::Infallible,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use futures::Stream;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{Semaphore, mpsc},
    task::JoinHandle,
};
use tokio_rustls::server::TlsStream;

use super::ReloadingTls;
use crate::instruments::{self, Limit, TlsFailure};

/// A client that hasn't finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// After a failed accept (out of file descriptors, say), before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// Handshaken connections waiting for tonic to take them.
const ACCEPTED_QUEUE: usize = 64;

/// Handshaken TLS connections from `listener`, for tonic's
/// `serve_with_incoming_shutdown`. Handshakes run concurrently, each on its
/// own task, so a slow client delays no one, up to `max_handshakes` at once.
/// Accepting starts at the first poll (when the server runs, not when it is
/// built); dropping this (tonic does when it stops accepting) closes the
/// listener.
pub(crate) struct TlsIncoming {
    accepted: mpsc::Receiver<TlsStream<TcpStream>>,
    /// The loop, until the first poll starts it.
    idle: Option<AcceptLoop>,
    accepting: Option<JoinHandle<()>>,
}

pub(crate) fn incoming(
    listener: TcpListener,
    tls: Arc<ReloadingTls>,
    max_handshakes: usize,
) -> TlsIncoming {
    let (handshaken, accepted) = mpsc::channel(ACCEPTED_QUEUE);
    TlsIncoming {
        accepted,
        idle: Some(AcceptLoop {
            listener,
            tls,
            handshaken,
            handshakes: Arc::new(Semaphore::new(max_handshakes)),
        }),
        accepting: None,
    }
}

struct AcceptLoop {
    listener: TcpListener,
    tls: Arc<ReloadingTls>,
    handshaken: mpsc::Sender<TlsStream<TcpStream>>,
    /// One permit per handshake in progress.
    handshakes: Arc<Semaphore>,
}

impl AcceptLoop {
    async fn run(self) {
        loop {
            // At the cap, stop accepting rather than accept and drop: new
            // connections wait in the kernel's backlog (and past it, their
            // SYNs are retried) until a handshake ends or times out, and
            // the flood costs no task or buffer beyond the cap.
            let permit = match self.handshakes.clone().try_acquire_owned() {
                Ok(permit) => permit,
                Err(_) => {
                    instruments::get().limit_refused(Limit::MaxConcurrentTlsHandshakes);
                    let Ok(permit) = self.handshakes.clone().acquire_owned().await else {
                        return;
                    };
                    permit
                }
            };
            let (tcp, peer) = match self.listener.accept().await {
                Ok(connection) => connection,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            // As tonic's own TcpIncoming is set up in crate::app.
            let _ = tcp.set_nodelay(true);
            let acceptor = self.tls.acceptor();
            let handshaken = self.handshaken.clone();
            tokio::spawn(async move {
                let outcome = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await;
                // The handshake is over, whatever tonic does with it next.
                drop(permit);
                match outcome {
                    Ok(Ok(stream)) => {
                        let _ = handshaken.send(stream).await;
                    }
                    Ok(Err(e)) => {
                        let reason = failure_reason(&e);
                        instruments::get().tls_failed(reason);
                        if reason == TlsFailure::ClientCertificateRejected && warn_now() {
                            tracing::warn!(
                                %peer,
                                error = %e,
                                "TLS handshake failed: client certificate rejected \
                                 (at most one such line every 10 s)"
                            );
                        } else {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        }
                    }
                    Err(_) => {
                        instruments::get().tls_failed(TlsFailure::Timeout);
                        tracing::debug!(%peer, "TLS handshake timed out");
                    }
                }
            });
        }
    }
}

impl Stream for TlsIncoming {
    type Item = Result<TlsStream<TcpStream>, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(idle) = self.idle.take() {
            self.accepting = Some(tokio::spawn(idle.run()));
        }
        self.accepted.poll_recv(cx).map(|stream| stream.map(Ok))
    }
}

impl Drop for TlsIncoming {
    fn drop(&mut self) {
        if let Some(accepting) = &self.accepting {
            accepting.abort();
        }
    }
}

/// What a failed handshake's error says went wrong: rustls reports its own
/// error inside the I/O error it returns.
fn failure_reason(e: &std::io::Error) -> TlsFailure {
    use tokio_rustls::rustls::Error as Tls;
    match e.get_ref().and_then(|inner| inner.downcast_ref::<Tls>()) {
        Some(Tls::InvalidCertificate(_)) => TlsFailure::ClientCertificateRejected,
        Some(Tls::NoCertificatesPresented) => TlsFailure::NoClientCertificate,
        Some(_) => TlsFailure::Protocol,
        None if e.kind() == std::io::ErrorKind::InvalidData => TlsFailure::Protocol,
        None => TlsFailure::Io,
    }
}

/// Rejected client certificates log at warn, at most once per
/// [`WARN_EVERY`]: a misconfigured client shows, a flood does not fill the log.
const WARN_EVERY: Duration = Duration::from_secs(10);

fn warn_now() -> bool {
    static START: std::sync::LazyLock<std::time::Instant> =
        std::sync::LazyLock::new(std::time::Instant::now);
    static NEXT_MS: AtomicU64 = AtomicU64::new(0);
    let now = u64::try_from(START.elapsed().as_millis()).unwrap_or(u64::MAX);
    let next = NEXT_MS.load(Ordering::Relaxed);
    now >= next
        && NEXT_MS
            .compare_exchange(
                next,
                now + WARN_EVERY.as_millis() as u64,
                Ordering::Relaxed,
                Ordering::Relaxed,
            )
            .is_ok()
}
