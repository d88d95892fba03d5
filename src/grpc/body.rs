//! What the middleware shares about gRPC bodies: the message framing
//! scanner, the trailers that end a response with a status, and the one
//! body wrapper that the layers hook into.

use std::{
    ops::ControlFlow,
    pin::Pin,
    task::{Context, Poll},
};

use http_body::{Frame, SizeHint};
use tonic::{Status, body::Body, codegen::Bytes};

/// What polling a body gives.
pub(crate) type Polled = Poll<Option<Result<Frame<Bytes>, Status>>>;

/// Each gRPC message is a 1-byte compressed flag, a 4-byte big-endian
/// length, then that many bytes of payload.
const PREFIX_LEN: usize = 5;

/// A message's length prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Prefix {
    /// 0 or 1 in gRPC framing; anything else means the bytes aren't gRPC.
    pub compressed: u8,
    pub length: u32,
}

/// Follows the message framing of a body's bytes, however they are split
/// into frames, and reports each message's prefix as it completes.
#[derive(Debug, Default, Clone)]
pub(crate) struct FrameScanner {
    prefix: [u8; PREFIX_LEN],
    prefix_len: usize,
    payload_left: u64,
}

impl FrameScanner {
    /// Feeds `data` through, calling `each` with every prefix completed in
    /// it; stops at the first `Break` and returns it.
    pub(crate) fn feed<B>(
        &mut self,
        mut data: &[u8],
        mut each: impl FnMut(Prefix) -> ControlFlow<B>,
    ) -> ControlFlow<B> {
        while !data.is_empty() {
            if self.payload_left > 0 {
                let skip = data
                    .len()
                    .min(usize::try_from(self.payload_left).unwrap_or(usize::MAX));
                data = &data[skip..];
                self.payload_left -= skip as u64;
                continue;
            }
            let take = data.len().min(PREFIX_LEN - self.prefix_len);
            self.prefix[self.prefix_len..self.prefix_len + take].copy_from_slice(&data[..take]);
            self.prefix_len += take;
            data = &data[take..];
            if self.prefix_len == PREFIX_LEN {
                let [compressed, length @ ..] = self.prefix;
                let length = u32::from_be_bytes(length);
                self.payload_left = u64::from(length);
                self.prefix_len = 0;
                each(Prefix { compressed, length })?;
            }
        }
        ControlFlow::Continue(())
    }

    /// Whether the bytes fed so far end on a message boundary.
    #[cfg(test)]
    pub(crate) fn at_boundary(&self) -> bool {
        self.prefix_len == 0 && self.payload_left == 0
    }
}

/// The trailers frame that ends a response with `status`.
pub(crate) fn status_trailers(status: &Status) -> Frame<Bytes> {
    let mut trailers = http::HeaderMap::new();
    // Encoding a status of our own can't fail.
    let _ = status.add_header(&mut trailers);
    Frame::trailers(trailers)
}

/// How a body ended early by its hooks tells the reader why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EndAs {
    /// A response: the status in trailers, which the client reads.
    Trailers,
    /// A request: the status as the body's error, which the handler reads.
    Error,
}

/// What a middleware does around each poll of a body it wraps. Every hook
/// is optional; a body ended by one is not polled again.
pub(crate) trait Hooks: Send + Unpin + 'static {
    const END_AS: EndAs = EndAs::Trailers;

    /// Before the inner body is polled: `Ready(status)` ends the body with
    /// `status` instead. Checked first, so a body that always has a frame
    /// ready still ends.
    fn before(&mut self, _cx: &mut Context<'_>) -> Poll<Status> {
        Poll::Pending
    }

    /// Runs the inner body's poll (inside a span, say).
    fn around(&mut self, poll: impl FnOnce() -> Polled) -> Polled {
        poll()
    }

    /// Sees what the inner body gave: `Some(status)` ends the body with
    /// `status` instead of it.
    fn after(&mut self, _polled: &Polled) -> Option<Status> {
        None
    }
}

/// A body passed through with its hooks, ended for good once it has given
/// its trailers, an error or its end, or a hook ended it.
pub(crate) struct Wrapped<H, B = Body> {
    inner: B,
    hooks: H,
    done: bool,
}

impl<H, B> Wrapped<H, B>
where
    H: Hooks,
    B: http_body::Body<Data = Bytes, Error = Status> + Send + Unpin + 'static,
{
    /// `inner` with `hooks`, as a tonic body.
    pub(crate) fn body(inner: B, hooks: H) -> Body {
        Body::new(Wrapped {
            inner,
            hooks,
            done: false,
        })
    }
}

fn end<H: Hooks>(status: Status) -> Polled {
    Poll::Ready(Some(match H::END_AS {
        EndAs::Trailers => Ok(status_trailers(&status)),
        EndAs::Error => Err(status),
    }))
}

impl<H, B> http_body::Body for Wrapped<H, B>
where
    H: Hooks,
    B: http_body::Body<Data = Bytes, Error = Status> + Unpin,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Polled {
        let this = &mut *self;
        if this.done {
            return Poll::Ready(None);
        }
        if let Poll::Ready(status) = this.hooks.before(cx) {
            this.done = true;
            return end::<H>(status);
        }
        let inner = &mut this.inner;
        let polled = this.hooks.around(|| Pin::new(inner).poll_frame(cx));
        if let Some(status) = this.hooks.after(&polled) {
            this.done = true;
            return end::<H>(status);
        }
        this.done = match &polled {
            Poll::Pending => false,
            Poll::Ready(Some(Ok(frame))) => !frame.is_data(),
            Poll::Ready(_) => true,
        };
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.done || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
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
    fn finds_every_prefix_however_the_bytes_are_split() {
        let stream: Vec<u8> = [3, 0, 300, 1].into_iter().flat_map(message).collect();
        for chunk in [1, 2, 4, 5, 6, 64, stream.len()] {
            let mut scanner = FrameScanner::default();
            let mut lengths = Vec::new();
            for c in stream.chunks(chunk) {
                let _ = scanner.feed::<()>(c, |prefix| {
                    lengths.push(prefix.length);
                    ControlFlow::Continue(())
                });
            }
            assert_eq!(lengths, [3, 0, 300, 1], "chunks of {chunk}");
            assert!(scanner.at_boundary(), "chunks of {chunk}");
        }
    }

    #[test]
    fn stops_where_asked() {
        let stream: Vec<u8> = [1, 2, 3].into_iter().flat_map(message).collect();
        let mut scanner = FrameScanner::default();
        let found = scanner.feed(&stream, |prefix| match prefix.length {
            2 => ControlFlow::Break(prefix),
            _ => ControlFlow::Continue(()),
        });
        assert_eq!(
            found,
            ControlFlow::Break(Prefix {
                compressed: 0,
                length: 2
            })
        );
    }
}
