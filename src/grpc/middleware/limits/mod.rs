//! Resource limits, so that no client, broken or hostile, can take more than
//! its share: HTTP/2 settings on the server, a layer that sheds calls over
//! the per-connection and server-wide bounds with RESOURCE_EXHAUSTED (at
//! once, never queued), checks each request message's size before it is
//! buffered, and ends server streams whose client stopped reading; and a
//! connection wrapper that closes connections at their maximum age plus grace.
//! The defaults and their reasons are in `config/default.toml`.

use std::{
    collections::HashMap,
    io,
    net::SocketAddr,
    pin::Pin,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicU64, Ordering},
    },
    task::{Context, Poll},
    time::Duration,
};

use futures::{Stream, StreamExt, future::BoxFuture};
use http_body::{Frame, SizeHint};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::{Notify, OwnedSemaphorePermit, Semaphore, oneshot},
    time::{Instant, Sleep},
};
use tonic::{
    Status,
    body::Body,
    codegen::Bytes,
    transport::{
        Server,
        server::{Connected, TcpConnectInfo, TlsConnectInfo},
    },
};
use tower::{Layer, Service};

use crate::{config::LimitsSettings, grpc::middleware::deadline::UNARY};

impl LimitsSettings {
    /// What serde can't check; the error names the key.
    pub(crate) fn check(&self) -> Result<(), String> {
        // A valid User (64 four-byte characters, a 254-byte address) encodes
        // to about 530 bytes; a smaller limit would refuse valid requests.
        const SMALLEST_MESSAGE_LIMIT: usize = 1024;
        if self.max_message_bytes < SMALLEST_MESSAGE_LIMIT {
            return Err(format!(
                "limits.max_message_bytes: must be at least {SMALLEST_MESSAGE_LIMIT}"
            ));
        }
        for (key, value) in [
            (
                "max_concurrent_streams",
                self.max_concurrent_streams as usize,
            ),
            ("max_calls_per_connection", self.max_calls_per_connection),
            ("max_open_streams", self.max_open_streams),
        ] {
            if value == 0 {
                return Err(format!("limits.{key}: must be at least 1"));
            }
        }
        if self.max_calls_per_connection > self.max_concurrent_streams as usize {
            return Err(format!(
                "limits.max_calls_per_connection: {} is more than limits.max_concurrent_streams \
                 ({}), so it could never shed",
                self.max_calls_per_connection, self.max_concurrent_streams
            ));
        }
        Ok(())
    }
}

fn millis(ms: u64) -> Option<Duration> {
    (ms != 0).then(|| Duration::from_millis(ms))
}

/// The HTTP/2 limits of every connection. tonic leaves most of these off:
/// no cap on concurrent streams, none on streams it resets for protocol
/// errors, no keepalive, no maximum age.
pub fn apply<L>(server: Server<L>, limits: &LimitsSettings) -> Server<L> {
    let server = server
        .max_concurrent_streams(limits.max_concurrent_streams)
        .http2_max_pending_accept_reset_streams(Some(limits.max_pending_accept_reset_streams))
        .http2_max_local_error_reset_streams(Some(limits.max_local_error_reset_streams))
        .http2_max_header_list_size(limits.max_header_list_bytes)
        .http2_keepalive_interval(millis(limits.keepalive_interval_ms))
        .http2_keepalive_timeout(millis(limits.keepalive_timeout_ms));
    // Only the age: tonic 0.14 given a grace too sends no GOAWAY at the age,
    // it just drops the connection at age + grace. `with_max_age` does that part.
    match millis(limits.max_connection_age_ms) {
        Some(age) => server.max_connection_age(age),
        None => server,
    }
}

/// Each accepted connection closed at `max_connection_age_ms` +
/// `max_connection_age_grace_ms`, whatever is still open on it; tonic sent
/// it GOAWAY at the age, so well-behaved clients have moved on by then.
pub fn with_max_age<S, IO, E>(
    incoming: S,
    limits: &LimitsSettings,
) -> impl Stream<Item = Result<Aged<IO>, E>> + use<S, IO, E>
where
    S: Stream<Item = Result<IO, E>>,
{
    let lifetime = millis(limits.max_connection_age_ms)
        .map(|age| age + Duration::from_millis(limits.max_connection_age_grace_ms));
    incoming.map(move |accepted| {
        accepted.map(|io| Aged {
            io,
            closes: lifetime.map(|d| Box::pin(tokio::time::sleep(d))),
        })
    })
}

/// A connection that fails its reads and writes once its lifetime is over,
/// which makes hyper drop it. Otherwise transparent, connection info included.
pub struct Aged<IO> {
    io: IO,
    closes: Option<Pin<Box<Sleep>>>,
}

impl<IO> Aged<IO> {
    /// Registers the connection's task for the close, and says if it is due.
    fn expired(&mut self, cx: &mut Context<'_>) -> io::Result<()> {
        match self.closes.as_mut().map(|close| close.as_mut().poll(cx)) {
            Some(Poll::Ready(())) => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the connection outlived limits.max_connection_age_ms + grace",
            )),
            _ => Ok(()),
        }
    }
}

impl<IO: Connected> Connected for Aged<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Aged<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.expired(cx)?;
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Aged<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.expired(cx)?;
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.expired(cx)?;
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Sheds calls over the per-connection and server-wide bounds, limits
/// request message sizes, and ends stalled server streams. Install it inside
/// the trace layer, so shed and ended calls are traced with their status.
#[derive(Clone)]
pub struct LimitsLayer {
    shared: Arc<Shared>,
}

struct Shared {
    max_message_bytes: usize,
    stall_timeout: Option<Duration>,
    /// Server-wide: one permit per open streaming call.
    open_streams: Arc<Semaphore>,
    max_open_streams: usize,
    per_connection: Arc<PerConnection>,
}

impl LimitsLayer {
    pub fn new(limits: &LimitsSettings) -> Self {
        Self {
            shared: Arc::new(Shared {
                max_message_bytes: limits.max_message_bytes,
                stall_timeout: millis(limits.stream_stall_timeout_ms),
                open_streams: Arc::new(Semaphore::new(limits.max_open_streams)),
                max_open_streams: limits.max_open_streams,
                per_connection: Arc::new(PerConnection {
                    limit: limits.max_calls_per_connection,
                    in_flight: Mutex::default(),
                }),
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
pub struct Limits<S> {
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
        let connection = match connection_key(request.extensions()) {
            Some(key) => match shared.per_connection.enter(key) {
                Some(permit) => Some(permit),
                None => {
                    return shed(format!(
                        "too many calls in flight on this connection (at most {}); \
                         retry later or spread calls over more connections",
                        shared.per_connection.limit
                    ));
                }
            },
            None => None,
        };
        let streaming = !UNARY.contains(&request.uri().path());
        let stream = if streaming {
            match shared.open_streams.clone().try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => {
                    return shed(format!(
                        "too many open streams on this server (at most {}); retry later",
                        shared.max_open_streams
                    ));
                }
            }
        } else {
            None
        };
        let permits = Permits {
            _connection: connection,
            _stream: stream,
        };
        let request = request.map(|body| {
            Body::new(SizeChecked {
                inner: body,
                limit: shared.max_message_bytes,
                scan: Scan::START,
                failed: false,
            })
        });
        let stall = shared.stall_timeout.filter(|_| streaming);
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| Guarded::wrap(body, permits, stall)))
        })
    }
}

fn shed<E: Send + 'static>(message: String) -> BoxFuture<'static, Result<http::Response<Body>, E>> {
    Box::pin(std::future::ready(Ok(
        Status::resource_exhausted(message).into_http()
    )))
}

/// Identifies a connection by its two ends, whether TLS or not.
type ConnectionKey = (Option<SocketAddr>, Option<SocketAddr>);

fn connection_key(extensions: &http::Extensions) -> Option<ConnectionKey> {
    let tcp = extensions.get::<TcpConnectInfo>().or_else(|| {
        extensions
            .get::<TlsConnectInfo<TcpConnectInfo>>()
            .map(TlsConnectInfo::get_ref)
    })?;
    Some((tcp.local_addr, tcp.remote_addr))
}

/// Calls in flight per connection. tonic's own per-connection limit holds
/// its permit only until the response headers, so it never counts a stream.
struct PerConnection {
    limit: usize,
    in_flight: Mutex<HashMap<ConnectionKey, usize>>,
}

impl PerConnection {
    fn lock(&self) -> MutexGuard<'_, HashMap<ConnectionKey, usize>> {
        self.in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn enter(self: &Arc<Self>, key: ConnectionKey) -> Option<ConnectionPermit> {
        let mut in_flight = self.lock();
        let calls = in_flight.entry(key).or_default();
        if *calls >= self.limit {
            return None;
        }
        *calls += 1;
        Some(ConnectionPermit {
            table: self.clone(),
            key,
        })
    }
}

struct ConnectionPermit {
    table: Arc<PerConnection>,
    key: ConnectionKey,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        let mut in_flight = self.table.lock();
        if let Some(calls) = in_flight.get_mut(&self.key) {
            *calls -= 1;
            if *calls == 0 {
                in_flight.remove(&self.key);
            }
        }
    }
}

/// What a call holds until its response ends, is dropped, or stalls.
struct Permits {
    _connection: Option<ConnectionPermit>,
    _stream: Option<OwnedSemaphorePermit>,
}

/// Where the size check is in the request's gRPC framing: each message is a
/// 1-byte compressed flag and a 4-byte big-endian length, then the payload.
#[derive(Clone, Copy)]
enum Scan {
    Prefix {
        seen: u8,
        length: u32,
    },
    Payload {
        left: usize,
    },
    /// Not gRPC framing (a flag other than 0 or 1): tonic refuses it with
    /// INTERNAL, as it must, so the check stands aside.
    Unframed,
}

impl Scan {
    const START: Scan = Scan::Prefix { seen: 0, length: 0 };
}

/// A request body that fails with RESOURCE_EXHAUSTED at the first message
/// whose length prefix is over the limit, before anyone buffers it. (tonic's
/// own check answers OUT_OF_RANGE, unlike other gRPC implementations.)
struct SizeChecked {
    inner: Body,
    limit: usize,
    scan: Scan,
    failed: bool,
}

impl SizeChecked {
    /// The length of the first message in `data` over the limit, if any.
    fn oversized(&mut self, mut data: &[u8]) -> Option<usize> {
        while let Some((&byte, rest)) = data.split_first() {
            match &mut self.scan {
                Scan::Unframed => return None,
                Scan::Prefix { seen: 0, .. } if byte > 1 => self.scan = Scan::Unframed,
                Scan::Payload { left } => {
                    let skipped = (*left).min(data.len());
                    *left -= skipped;
                    data = &data[skipped..];
                    if *left == 0 {
                        self.scan = Scan::START;
                    }
                }
                Scan::Prefix { seen, length } => {
                    // Byte 0 is the flag.
                    if *seen > 0 {
                        *length = (*length << 8) | u32::from(byte);
                    }
                    *seen += 1;
                    data = rest;
                    if *seen == 5 {
                        let length = *length as usize;
                        if length > self.limit {
                            return Some(length);
                        }
                        self.scan = if length == 0 {
                            Scan::START
                        } else {
                            Scan::Payload { left: length }
                        };
                    }
                }
            }
        }
        None
    }
}

impl http_body::Body for SizeChecked {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.failed {
            return Poll::Ready(None);
        }
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
            && let Some(length) = self.oversized(data)
        {
            self.failed = true;
            return Poll::Ready(Some(Err(Status::resource_exhausted(format!(
                "a request message of {length} bytes is over this server's limit of {} bytes",
                self.limit
            )))));
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body that holds the call's permits until it ends or is
/// dropped (the client cancelled), and, for a stream, ends the call when its
/// client stops reading.
///
/// A stalled reader is seen by what hyper does: it asks for the next frame
/// only once the client's flow-control window has room for the last one.
/// If it hasn't asked for `stall` since this body handed it a frame, the
/// watchdog drops the call's work and permits; whenever hyper asks again the
/// call ends with RESOURCE_EXHAUSTED. Until then HTTP/2 flow control keeps
/// what waits for the client to one window and one frame.
struct Guarded {
    call: Arc<Call>,
    /// Dropping it stops the watchdog.
    _watchdog: Option<oneshot::Sender<()>>,
    stall: Option<Duration>,
    finished: bool,
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

impl Guarded {
    fn wrap(body: Body, permits: Permits, stall: Option<Duration>) -> Body {
        let call = Arc::new(Call {
            live: Mutex::new(Some(Live {
                body,
                _permits: permits,
            })),
            handed: AtomicU64::new(0),
            epoch: Instant::now(),
            handed_data: Notify::new(),
        });
        let watchdog = stall.map(|limit| {
            let (stop, stopped) = oneshot::channel();
            tokio::spawn(watch_stall(call.clone(), limit, stopped));
            stop
        });
        Body::new(Guarded {
            call,
            _watchdog: watchdog,
            stall,
            finished: false,
        })
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
            tracing::info!(
                ?limit,
                "a stream's client read nothing for stream_stall_timeout_ms; ended its call"
            );
            return;
        }
    }
}

impl http_body::Body for Guarded {
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        if self.finished {
            return Poll::Ready(None);
        }
        let call = self.call.clone();
        let mut live = call.lock();
        call.handed.store(0, Ordering::Release);
        let Some(running) = live.as_mut() else {
            self.finished = true;
            let stall = self.stall.unwrap_or_default();
            let mut trailers = http::HeaderMap::new();
            // Encoding our own fixed status can't fail.
            let _ = Status::resource_exhausted(format!(
                "the client read nothing of this stream for {stall:?}; the server ended it"
            ))
            .add_header(&mut trailers);
            return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
        };
        let polled = Pin::new(&mut running.body).poll_frame(cx);
        match &polled {
            Poll::Pending => {}
            Poll::Ready(Some(Ok(frame))) if frame.is_data() => {
                if self.stall.is_some() {
                    let now = u64::try_from(call.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX);
                    call.handed.store(now.saturating_add(1), Ordering::Release);
                    call.handed_data.notify_one();
                }
            }
            Poll::Ready(_) => {
                // Trailers, an error or the end: the call is over, its
                // permits go back now.
                self.finished = true;
                let done = live.take();
                drop(live);
                drop(done);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.finished
            || self
                .call
                .lock()
                .as_ref()
                .is_some_and(|running| running.body.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        self.call
            .lock()
            .as_ref()
            .map_or_else(SizeHint::default, |running| running.body.size_hint())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(length: u32) -> Vec<u8> {
        [&[0][..], &length.to_be_bytes(), &vec![1; length as usize]].concat()
    }

    fn checker(limit: usize) -> SizeChecked {
        SizeChecked {
            inner: Body::empty(),
            limit,
            scan: Scan::START,
            failed: false,
        }
    }

    #[test]
    fn finds_an_oversized_prefix_however_the_bytes_are_split() {
        let bytes: Vec<u8> = [10, 0, 100, 101, 3].into_iter().flat_map(frame).collect();
        for chunk in [1, 2, 3, 5, 7, 64, bytes.len()] {
            let mut check = checker(100);
            let found = bytes.chunks(chunk).find_map(|c| check.oversized(c));
            assert_eq!(found, Some(101), "chunks of {chunk}");
        }
    }

    #[test]
    fn stands_aside_for_what_is_not_grpc_framing() {
        let mut check = checker(100);
        assert_eq!(check.oversized(b"hello, world, and more"), None);
    }

    #[test]
    fn messages_up_to_the_limit_pass() {
        let bytes: Vec<u8> = [0, 100, 1, 100].into_iter().flat_map(frame).collect();
        let mut check = checker(100);
        assert_eq!(bytes.chunks(3).find_map(|c| check.oversized(c)), None);
    }
}
