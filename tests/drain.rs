//! The drain deadline, per streaming RPC: a call still open when it passes
//! ends with UNAVAILABLE (retry elsewhere), within a few seconds, whatever
//! its handler is doing. One shared mechanism (src/grpc/middleware/drain.rs)
//! does it for every method of the table, so each kind of call is checked.

mod common;

use std::time::{Duration, Instant};

use common::{TestApp, grpc_frame, spawn_app_in};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use user_manager::proto::{UserRequest, UserTypeRequest};

const DRAIN_MS: u64 = 300;
/// Drain deadline, the server's final flush, and slack for a busy machine.
const ENDS_WITHIN: Duration = Duration::from_secs(5);
const GUEST: i32 = 3;

/// A server that stops accepting at once and drains for `DRAIN_MS`, over
/// the seed plus `extra_guests` guests.
async fn draining_app(extra_guests: u32) -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let mut seed: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(common::SEED).unwrap()).unwrap();
    for id in 1000..1000 + extra_guests {
        seed.insert(
            id.to_string(),
            serde_json::json!({
                "nickname": format!("g{id}"),
                "mail_address": format!("g{id}@example.com"),
                "user_type": "GUEST",
            }),
        );
    }
    let seed_path = dir.path().join("seed.json");
    std::fs::write(&seed_path, serde_json::to_vec(&seed).unwrap()).unwrap();
    spawn_app_in(dir, |s| {
        s.seed.path = seed_path;
        s.server.lame_duck_ms = 0;
        s.server.drain_timeout_ms = DRAIN_MS;
    })
    .await
}

/// Starts a graceful stop in the background; the server only finishes it
/// once every call has ended.
fn begin_shutdown(app: TestApp) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        app.stop().await;
    })
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

    let stopping = Instant::now();
    let stopped = begin_shutdown(app);
    let end = tokio::time::timeout(ENDS_WITHIN, answers.next())
        .await
        .expect("the call ends")
        .expect("with a status, not a bare end")
        .unwrap_err();
    assert_eq!(end.code(), Code::Unavailable, "{end:?}");
    assert!(stopping.elapsed() >= Duration::from_millis(DRAIN_MS));
    stopped.await.unwrap();
    drop(ids);
}

#[tokio::test]
async fn a_client_stream_never_closed_ends_with_unavailable_at_the_drain_deadline() {
    let app = draining_app(0).await;
    let mut client = app.client().await;
    let (ids, requests) = mpsc::channel(1);
    ids.send(UserRequest { id: 1 }).await.unwrap();
    let counting =
        tokio::spawn(async move { client.count_already_users(ReceiverStream::new(requests)).await });
    // The handler is waiting for the rest of the stream.
    tokio::time::sleep(Duration::from_millis(200)).await;

    let stopping = Instant::now();
    let stopped = begin_shutdown(app);
    let end = tokio::time::timeout(ENDS_WITHIN, counting)
        .await
        .expect("the call ends")
        .unwrap()
        .unwrap_err();
    assert_eq!(end.code(), Code::Unavailable, "{end:?}");
    assert!(stopping.elapsed() >= Duration::from_millis(DRAIN_MS));
    stopped.await.unwrap();
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
    let addr = app.addr;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut h2, connection) = h2::client::Builder::new()
        .initial_window_size(WINDOW)
        .initial_connection_window_size(WINDOW)
        .handshake::<_, bytes::Bytes>(tcp)
        .await
        .unwrap();
    tokio::spawn(connection);
    let request = http::Request::post(format!("http://{addr}/UserManager/GetUsersByType"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, mut send) = h2.send_request(request, false).unwrap();
    send.send_data(grpc_frame(&UserTypeRequest { user_type: GUEST }), true)
        .unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();

    let stopping = Instant::now();
    let stopped = begin_shutdown(app);
    let mut received = 0;
    let reading = async {
        while let Some(chunk) = body.data().await {
            let chunk = chunk.unwrap();
            received += chunk.len();
            let _ = body.flow_control().release_capacity(chunk.len());
            // A slow reader: about 50 KB/s.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        body.trailers().await.unwrap()
    };
    let trailers = tokio::time::timeout(ENDS_WITHIN, reading)
        .await
        .expect("the stream ends")
        .expect("with trailers");
    let status = trailers.get("grpc-status").map(|v| v.to_str().unwrap());
    assert_eq!(status, Some("14"), "{trailers:?}");
    assert!(stopping.elapsed() >= Duration::from_millis(DRAIN_MS));
    // It was cut short: 5000 users are well over 100 KB.
    assert!(received > 0 && received < 100_000, "{received} bytes");
    stopped.await.unwrap();
}
