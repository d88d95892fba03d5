//! The maximum connection age, enforced: tonic sends GOAWAY at the age, and
//! this closes whatever is still open at the age plus its grace.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use futures::{Stream, StreamExt};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::Sleep,
};
use tonic::transport::server::Connected;

use super::millis;
use crate::config::LimitsSettings;

/// Each accepted connection closed at `max_connection_age_ms` +
/// `max_connection_age_grace_ms`, whatever is still open on it; tonic sent
/// it GOAWAY at the age, so well-behaved clients have moved on by then.
pub(crate) fn with_max_age<S, IO, E>(
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
pub(crate) struct Aged<IO> {
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
