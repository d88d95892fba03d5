//! The gRPC message frame (a compressed flag, a 4-byte big-endian length,
//! the message), for tests that write request bodies and read response
//! bodies themselves.

use bytes::Bytes;

/// One frame with the given compressed flag around `payload` (which may be
/// anything: tests send deliberately broken messages too).
pub fn encode(flag: u8, payload: &[u8]) -> Bytes {
    let mut frame = Vec::with_capacity(payload.len() + 5);
    frame.push(flag);
    frame.extend_from_slice(&u32::try_from(payload.len()).unwrap().to_be_bytes());
    frame.extend_from_slice(payload);
    frame.into()
}

/// One length-prefixed gRPC message frame, uncompressed.
pub fn grpc_frame(message: &impl prost::Message) -> Bytes {
    encode(0, &message.encode_to_vec())
}

/// The complete frames at the start of `body`, as (flag, payload); a
/// trailing partial frame is left out.
pub fn decode(mut body: &[u8]) -> Vec<(u8, &[u8])> {
    let mut frames = Vec::new();
    while body.len() >= 5 {
        let len = u32::from_be_bytes(body[1..5].try_into().unwrap()) as usize;
        if body.len() < 5 + len {
            break;
        }
        frames.push((body[0], &body[5..5 + len]));
        body = &body[5 + len..];
    }
    frames
}

/// The complete messages in `body`, decoded as `M`.
pub fn decode_messages<M: prost::Message + Default>(body: &[u8]) -> Vec<M> {
    decode(body)
        .into_iter()
        .map(|(flag, payload)| {
            assert_eq!(flag, 0, "an uncompressed message");
            M::decode(payload).expect("a well-formed message")
        })
        .collect()
}
