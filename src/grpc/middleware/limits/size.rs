//! Request messages over `limits.max_message_bytes` are refused by their
//! length prefix, before anyone buffers them.

use std::{ops::ControlFlow, task::Poll};

use tonic::Status;

use crate::{
    grpc::body::{EndAs, FrameScanner, Hooks, Polled},
    instruments::{self, Limit},
};

/// Fails a request body with RESOURCE_EXHAUSTED at the first message whose
/// length prefix is over the limit. (tonic's own check answers OUT_OF_RANGE,
/// unlike other gRPC implementations, and only once it has buffered it.)
pub(super) struct SizeCheck {
    limit: usize,
    scanner: FrameScanner,
    /// Not gRPC framing (a flag other than 0 or 1): tonic refuses it with
    /// INTERNAL, as it must, so the check stands aside.
    unframed: bool,
}

impl SizeCheck {
    pub(super) fn new(limit: usize) -> Self {
        Self {
            limit,
            scanner: FrameScanner::default(),
            unframed: false,
        }
    }

    /// The length of the first message in `data` over the limit, if any.
    fn oversized(&mut self, data: &[u8]) -> Option<usize> {
        if self.unframed {
            return None;
        }
        let limit = self.limit;
        let unframed = &mut self.unframed;
        let found = self.scanner.feed(data, |prefix| {
            let length = prefix.length as usize;
            if prefix.compressed > 1 {
                *unframed = true;
                ControlFlow::Break(None)
            } else if length > limit {
                ControlFlow::Break(Some(length))
            } else {
                ControlFlow::Continue(())
            }
        });
        match found {
            ControlFlow::Break(length) => length,
            ControlFlow::Continue(()) => None,
        }
    }
}

impl Hooks for SizeCheck {
    /// The handler reads the refusal from its request stream.
    const END_AS: EndAs = EndAs::Error;

    fn after(&mut self, polled: &Polled) -> Option<Status> {
        if let Poll::Ready(Some(Ok(frame))) = polled
            && let Some(data) = frame.data_ref()
            && let Some(length) = self.oversized(data)
        {
            instruments::get().limit_refused(Limit::MaxMessageBytes);
            return Some(Status::resource_exhausted(format!(
                "a request message of {length} bytes is over this server's limit of {} bytes",
                self.limit
            )));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(length: u32) -> Vec<u8> {
        [&[0][..], &length.to_be_bytes(), &vec![1; length as usize]].concat()
    }

    #[test]
    fn finds_an_oversized_prefix_however_the_bytes_are_split() {
        let bytes: Vec<u8> = [10, 0, 100, 101, 3].into_iter().flat_map(frame).collect();
        for chunk in [1, 2, 3, 5, 7, 64, bytes.len()] {
            let mut check = SizeCheck::new(100);
            let found = bytes.chunks(chunk).find_map(|c| check.oversized(c));
            assert_eq!(found, Some(101), "chunks of {chunk}");
        }
    }

    #[test]
    fn stands_aside_for_what_is_not_grpc_framing() {
        let mut check = SizeCheck::new(100);
        assert_eq!(check.oversized(b"hello, world, and more"), None);
        assert_eq!(check.oversized(&frame(1000)), None);
    }

    #[test]
    fn messages_up_to_the_limit_pass() {
        let bytes: Vec<u8> = [0, 100, 1, 100].into_iter().flat_map(frame).collect();
        let mut check = SizeCheck::new(100);
        assert_eq!(bytes.chunks(3).find_map(|c| check.oversized(c)), None);
    }
}
