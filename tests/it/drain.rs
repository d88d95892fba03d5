//! The drain deadline, per streaming RPC: a call still open when it passes
//! ends with UNAVAILABLE (retry elsewhere), within a few seconds, whatever
//! its handler is doing. One shared mechanism (src/grpc/middleware/drain.rs)
//! does it for every method of the table, so each kind of call is checked.

use std::time::{Duration, Instant};

use crate::common::{TestApp, big_seed, grpc_frame, raw_grpc::RawStream, spawn_app_in};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Status};
use user_manager::proto::{UserRequest, UserTypeRequest};

const DRAIN_MS: u64 = 300;
/// Drain deadline, the server's final flush, and slack for a busy machine.
const ENDS_WITHIN: Duration = Duration::from_secs(5);
const GUEST: i32 = 3;

/// A server that stops accepting at once and drains for `DRAIN_MS`, over
/// the seed plus `extra_guests` guests.
async fn draining_app(extra_guests: u32) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let seed_path = big_seed(dir.path(), extra_guests);
    spawn_app_in(dir, |s| {
        s.seed.path = seed_path;
        s.server.lame_duck_ms = 0;
        s.server.drain_timeout_ms = DRAIN_MS;
    })
    .await
}

/// Stops `app` gracefully while the call is open, and expects the call's
/// end (`ended`) to be the drain's UNAVAILABLE: after the deadline, within
/// `ENDS_WITHIN`, and from the drain itself (its message), not from
/// something closing under the call later.
async fn stop_and_expect_drained(app: TestApp, ended: impl Future<Output = Status>) {
    let stopping = Instant::now();
    let stopped = tokio::spawn(async move {
        app.stop().await;
    });
    let status = tokio::time::timeout(ENDS_WITHIN, ended)
        .await
        .expect("the call ends");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("shutting down"), "{status:?}");
    assert!(stopping.elapsed() >= Duration::from_millis(DRAIN_MS));
    stopped.await.unwrap();
}

#[tokio::test]
async fn a_bidi_call_left_open_ends_with_unavailable_at_the_drain_deadline() {
    let app = draining_app(0).await;
    let mut client = app.client().await;
    let (ids, requests) = mpsc::channel(1);
    let mut answers = client
        .get_users_by_ids(ReceiverStream::new(requests))
        .await
        .unwrap()
        .into_inner();
    ids.send(UserRequest { id: 1 }).await.unwrap();
    answers.next().await.unwrap().unwrap();

    stop_and_expect_drained(app, async {
        answers
            .next()
            .await
            .expect("a status, not a bare end")
            .unwrap_err()
    })
    .await;
    drop(ids);
}

#[tokio::test]
async fn a_client_stream_never_closed_ends_with_unavailable_at_the_drain_deadline() {
    let app = draining_app(0).await;
    let mut client = app.client().await;
    let (ids, requests) = mpsc::channel(1);
    ids.send(UserRequest { id: 1 }).await.unwrap();
    let counting = tokio::spawn(async move {
        client
            .count_already_users(ReceiverStream::new(requests))
            .await
    });
    // The handler is waiting for the rest of the stream.
    tokio::time::sleep(Duration::from_millis(200)).await;

    stop_and_expect_drained(app, async { counting.await.unwrap().unwrap_err() }).await;
    drop(ids);
}

/// GetUsersByType to a client that reads slowly through a small HTTP/2
/// window (raw h2: a generated client would read as fast as it can), so
/// the stream is still sending when the deadline passes.
#[tokio::test]
async fn a_server_stream_still_sending_ends_with_unavailable_at_the_drain_deadline() {
    const GUESTS: u32 = 5000;
    const WINDOW: u32 = 1024;
    let app = draining_app(GUESTS).await;
    let mut stream = RawStream::open_with_window(
        app.addr,
        "/UserManager/GetUsersByType",
        grpc_frame(&UserTypeRequest { user_type: GUEST }),
        WINDOW,
    )
    .await;

    let mut received = Vec::new();
    stop_and_expect_drained(app, async {
        // A slow reader: about 50 KB/s.
        let trailers = stream
            .read_to_end(0, &mut received, || {
                tokio::time::sleep(Duration::from_millis(20))
            })
            .await
            .expect("trailers");
        Status::from_header_map(&trailers).expect("a grpc-status in the trailers")
    })
    .await;
    // It was cut short: 5000 users are well over 100 KB.
    assert!(
        !received.is_empty() && received.len() < 100_000,
        "{} bytes",
        received.len()
    );
}
