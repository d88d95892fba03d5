//! Limits and bad input: broken or hostile clients against the real server,
//! each case with the status or protocol answer it gets. Malformed requests
//! go over raw HTTP/2 (the h2 crate, or hand-written frames where even h2
//! would refuse to misbehave), so no client library fixes them on the way.

use crate::common;

use std::{
    net::SocketAddr,
    time::{Duration, Instant},
};

use crate::common::{
    Binary, ServerProcess, grpc_frame, raw_grpc::RawStream, raw_grpc_call, spawn_app_in, user,
};
use bytes::Bytes;
use futures::{StreamExt, stream};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::mpsc,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, transport::Channel};
use tonic_health::pb::health_check_response::ServingStatus;
use user_manager::{
    config::Settings,
    proto::{UserRequest, UserTypeRequest, user_manager_client::UserManagerClient},
};

const GUEST: i32 = 3;
const DISABLED: i32 = 4;
/// How long a test waits for something that must happen before calling it
/// missing: a bound on hanging, not a measurement.
const PATIENCE: Duration = Duration::from_secs(30);

async fn app(adjust: impl FnOnce(&mut Settings)) -> common::TestApp {
    spawn_app_in(tempfile::tempdir().unwrap(), adjust).await
}

async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

async fn client(addr: SocketAddr) -> UserManagerClient<Channel> {
    UserManagerClient::new(channel(addr).await)
}

/// Sends `body` as the request of `path` over raw HTTP/2 (the request
/// stream left open with `keep_open`), asserts the call ends with
/// `expected`, and returns its grpc-message, percent-decoded.
async fn status_of(
    addr: SocketAddr,
    path: &str,
    body: Bytes,
    keep_open: bool,
    expected: Code,
) -> String {
    let reply = raw_grpc_call(addr, path, &[], body, keep_open).await;
    let message = percent_decoded(reply.grpc_message.as_deref().unwrap_or_default());
    assert_eq!(
        reply.grpc_status.map(Code::from_i32),
        Some(expected),
        "{path}: {message}"
    );
    message
}

/// grpc-message as sent: percent-encoded, as the gRPC spec asks.
fn percent_decoded(raw: &str) -> String {
    let raw = raw.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < raw.len() {
        let hex = raw
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok());
        match (raw[i], hex.and_then(|h| u8::from_str_radix(h, 16).ok())) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(out).unwrap()
}

/// A memory figure of the server process from /proc/PID/status, in KiB:
/// "VmRSS" (resident now) or "VmHWM" (the peak of resident so far).
fn memory_kib(server: &ServerProcess, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", server.pid())).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("{field} in /proc/PID/status"))
}

/// A protobuf `User` with raw bytes as its nickname (field 2), so it can be
/// invalid UTF-8.
fn user_with_raw_nickname(nickname: &[u8]) -> Bytes {
    let mut payload = vec![0x08, 0x2a]; // id = 42
    payload.push(0x12);
    payload.push(u8::try_from(nickname.len()).unwrap());
    payload.extend_from_slice(nickname);
    payload.extend_from_slice(b"\x1a\x0fraw@example.com\x20\x03"); // mail, GUEST
    grpc_frame::encode(0, &payload)
}

// ---------------------------------------------------------------------------
// Raw HTTP/2 frames: what the h2 crate won't send (rapid resets in one write,
// window overflows) and what it hides (SETTINGS, PING, GOAWAY).

mod frame {
    pub const HEADERS: u8 = 0x1;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const PING: u8 = 0x6;
    pub const GOAWAY: u8 = 0x7;
    pub const WINDOW_UPDATE: u8 = 0x8;

    pub const END_STREAM: u8 = 0x1;
    pub const ACK: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;

    pub const SETTINGS_MAX_CONCURRENT_STREAMS: u16 = 0x3;

    pub const NO_ERROR: u32 = 0x0;
    pub const CANCEL: u32 = 0x8;
    pub const REFUSED_STREAM: u32 = 0x7;
    pub const ENHANCE_YOUR_CALM: u32 = 0xb;
}

#[derive(Debug)]
struct Frame {
    kind: u8,
    flags: u8,
    stream: u32,
    payload: Vec<u8>,
}

impl Frame {
    /// The error code of a GOAWAY or RST_STREAM.
    fn error_code(&self) -> u32 {
        let at = if self.kind == frame::GOAWAY { 4 } else { 0 };
        u32::from_be_bytes(self.payload[at..at + 4].try_into().unwrap())
    }

    fn settings(&self) -> Vec<(u16, u32)> {
        self.payload
            .chunks_exact(6)
            .map(|s| {
                (
                    u16::from_be_bytes([s[0], s[1]]),
                    u32::from_be_bytes([s[2], s[3], s[4], s[5]]),
                )
            })
            .collect()
    }
}

fn encode_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let mut out = u32::try_from(payload.len()).unwrap().to_be_bytes()[1..].to_vec();
    out.extend([kind, flags]);
    out.extend(stream.to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A request's HEADERS frame, its fields as HPACK literals without indexing.
fn request_headers(stream: u32, path: &str, end_stream: bool) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "localhost"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ] {
        block.push(0x00);
        block.push(u8::try_from(name.len()).unwrap());
        block.extend_from_slice(name.as_bytes());
        block.push(u8::try_from(value.len()).unwrap());
        block.extend_from_slice(value.as_bytes());
    }
    let flags = frame::END_HEADERS | if end_stream { frame::END_STREAM } else { 0 };
    encode_frame(frame::HEADERS, flags, stream, &block)
}

fn rst_stream(stream: u32, code: u32) -> Vec<u8> {
    encode_frame(frame::RST_STREAM, 0, stream, &code.to_be_bytes())
}

fn ping(opaque: [u8; 8]) -> Vec<u8> {
    encode_frame(frame::PING, 0, 0, &opaque)
}

/// A hand-driven HTTP/2 client connection.
struct RawH2 {
    tcp: TcpStream,
    read: Vec<u8>,
}

impl RawH2 {
    /// Connects and sends the preface and empty SETTINGS.
    async fn connect(addr: SocketAddr) -> Self {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.set_nodelay(true).unwrap();
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        hello.extend(encode_frame(frame::SETTINGS, 0, 0, &[]));
        tcp.write_all(&hello).await.unwrap();
        RawH2 {
            tcp,
            read: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        // The server may have closed the connection already; the frames
        // read afterwards say why.
        let _ = self.tcp.write_all(bytes).await;
    }

    /// The next frame, SETTINGS acknowledged on the way; None once the
    /// connection is closed. Panics if nothing comes within PATIENCE.
    async fn next(&mut self) -> Option<Frame> {
        let frame = tokio::time::timeout(PATIENCE, self.read_frame())
            .await
            .expect("the server neither sent a frame nor closed the connection")?;
        if frame.kind == frame::SETTINGS && frame.flags & frame::ACK == 0 {
            self.send(&encode_frame(frame::SETTINGS, frame::ACK, 0, &[]))
                .await;
        }
        Some(frame)
    }

    async fn read_frame(&mut self) -> Option<Frame> {
        loop {
            if self.read.len() >= 9 {
                let len = usize::from(self.read[0]) << 16
                    | usize::from(self.read[1]) << 8
                    | usize::from(self.read[2]);
                if self.read.len() >= 9 + len {
                    let bytes: Vec<u8> = self.read.drain(..9 + len).collect();
                    return Some(Frame {
                        kind: bytes[3],
                        flags: bytes[4],
                        stream: u32::from_be_bytes(bytes[5..9].try_into().unwrap()) & 0x7fff_ffff,
                        payload: bytes[9..].to_vec(),
                    });
                }
            }
            let mut chunk = [0; 16 * 1024];
            match self.tcp.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => self.read.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Every frame until the server closes the connection.
    async fn until_closed(&mut self) -> Vec<Frame> {
        let mut frames = Vec::new();
        while let Some(frame) = self.next().await {
            frames.push(frame);
        }
        frames
    }

    /// Frames until the server acknowledges PING `opaque` (it has handled
    /// everything sent before it) or closes the connection; the GOAWAY
    /// among them, if any.
    async fn goaway_before_pong(&mut self, opaque: [u8; 8]) -> Option<Frame> {
        self.send(&ping(opaque)).await;
        let mut goaway = None;
        while let Some(frame) = self.next().await {
            match frame.kind {
                frame::GOAWAY => goaway = Some(frame),
                frame::PING if frame.flags & frame::ACK != 0 && frame.payload == opaque => break,
                _ => {}
            }
        }
        goaway
    }
}

/// A second client keeps being answered, and health says SERVING.
async fn still_serving(addr: SocketAddr) {
    let mut client = client(addr).await;
    let r = client.get_user(UserRequest { id: 1 }).await.unwrap();
    assert_eq!(r.into_inner().user.unwrap().nickname, "admin");
    assert_eq!(
        common::health_status(&format!("http://{addr}"), "").await,
        Some(ServingStatus::Serving)
    );
}

// ---------------------------------------------------------------------------
// Limits

#[tokio::test]
async fn messages_over_the_size_limit_are_resource_exhausted_before_buffering() {
    let app = app(|s| s.limits.max_message_bytes = 2048).await;
    const ADD: &str = "/UserManager/AddUser";

    // Just under the limit: through to validation, which refuses the nickname.
    let long = user_manager::proto::User {
        nickname: "x".repeat(2000),
        ..user(50, "Long", GUEST)
    };
    status_of(
        app.addr,
        ADD,
        grpc_frame(&long),
        false,
        Code::InvalidArgument,
    )
    .await;

    // Over it: refused by size, whatever the content.
    let huge = user(51, &"x".repeat(4000), GUEST);
    let message = status_of(
        app.addr,
        ADD,
        grpc_frame(&huge),
        false,
        Code::ResourceExhausted,
    )
    .await;
    assert!(message.contains("2048"), "{message}");

    // A prefix announcing 1 GiB is refused on its five bytes: the server
    // doesn't wait for (or reserve room for) a body that never comes.
    let mut liar = vec![0];
    liar.extend((1u32 << 30).to_be_bytes());
    let path = "/UserManager/GetUser";
    status_of(app.addr, path, liar.into(), true, Code::ResourceExhausted).await;

    // In a client stream, after valid messages.
    let mut body = Vec::new();
    for id in 1..=3 {
        body.extend_from_slice(&grpc_frame(&UserRequest { id }));
    }
    body.extend_from_slice(&grpc_frame::encode(0, &[0; 3000]));
    let path = "/UserManager/CountAlreadyUsers";
    status_of(app.addr, path, body.into(), false, Code::ResourceExhausted).await;
    still_serving(app.addr).await;
}

/// Opens a GetUsersByIds call and waits for its first answer: a call in
/// flight until `tx` is dropped.
async fn open_bidi(
    client: &mut UserManagerClient<Channel>,
) -> (
    mpsc::Sender<UserRequest>,
    tonic::Streaming<user_manager::proto::UserResponse>,
) {
    let (tx, rx) = mpsc::channel(1);
    tx.send(UserRequest { id: 1 }).await.unwrap();
    let mut answers = client
        .get_users_by_ids(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    answers.next().await.unwrap().unwrap();
    (tx, answers)
}

async fn finish_bidi(
    (tx, mut answers): (
        mpsc::Sender<UserRequest>,
        tonic::Streaming<user_manager::proto::UserResponse>,
    ),
) {
    drop(tx);
    assert!(answers.next().await.is_none());
}

#[tokio::test]
async fn calls_over_the_per_connection_limit_are_shed_at_once() {
    let app = app(|s| s.limits.max_calls_per_connection = 2).await;
    let mut busy = client(app.addr).await;
    let first = open_bidi(&mut busy).await;
    let second = open_bidi(&mut busy).await;

    // Both streams are still open: a third call on that connection is shed,
    // not queued, unary or not.
    let status = busy.get_user(UserRequest { id: 1 }).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("this connection"), "{status:?}");
    let status = busy
        .get_users_by_type(UserTypeRequest { user_type: GUEST })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");

    // Other connections are not affected.
    still_serving(app.addr).await;

    // A finished stream gives its place back.
    finish_bidi(first).await;
    busy.get_user(UserRequest { id: 1 }).await.unwrap();
    finish_bidi(second).await;
}

#[tokio::test]
async fn open_streams_are_bounded_across_connections() {
    let app = app(|s| s.limits.max_open_streams = 2).await;
    let mut a = client(app.addr).await;
    let mut b = client(app.addr).await;
    let mut c = client(app.addr).await;
    let first = open_bidi(&mut a).await;
    let second = open_bidi(&mut b).await;

    let status = c
        .get_users_by_type(UserTypeRequest { user_type: GUEST })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(status.message().contains("open streams"), "{status:?}");
    let status = c
        .count_already_users(stream::iter([UserRequest { id: 1 }]))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    // Unary calls don't count against it.
    c.get_user(UserRequest { id: 2 }).await.unwrap();

    finish_bidi(first).await;
    let r = c
        .count_already_users(stream::iter([UserRequest { id: 1 }]))
        .await
        .unwrap();
    assert_eq!(r.into_inner().user_cnt, 1);
    finish_bidi(second).await;
}

#[tokio::test]
async fn the_server_announces_and_enforces_max_concurrent_streams() {
    // The binary, which reports the health-only listener's address.
    let dir = tempfile::tempdir().unwrap();
    let app = Binary::new(dir.path())
        .env("USER_MANAGER__LIMITS__MAX_CONCURRENT_STREAMS", 3)
        .env("USER_MANAGER__LIMITS__MAX_CALLS_PER_CONNECTION", 3)
        .health_listener()
        .start()
        .await;
    let health_port = app.health.unwrap();
    // The health-only listener has the same limits.
    let mut health = RawH2::connect(health_port).await;
    let settings = health.next().await.unwrap();
    assert!(
        settings
            .settings()
            .contains(&(frame::SETTINGS_MAX_CONCURRENT_STREAMS, 3)),
        "health port: {:?}",
        settings.settings()
    );

    let mut h2 = RawH2::connect(app.addr).await;
    let settings = h2.next().await.unwrap();
    assert_eq!(settings.kind, frame::SETTINGS);
    assert!(
        settings
            .settings()
            .contains(&(frame::SETTINGS_MAX_CONCURRENT_STREAMS, 3)),
        "{:?}",
        settings.settings()
    );
    // Four bidi calls left open: the fourth is refused by the protocol.
    let mut burst = Vec::new();
    for stream in [1, 3, 5, 7] {
        burst.extend(request_headers(stream, "/UserManager/GetUsersByIds", false));
    }
    h2.send(&burst).await;
    loop {
        let frame = h2.next().await.expect("connection stays open");
        if frame.kind == frame::RST_STREAM {
            assert_eq!(frame.stream, 7);
            assert_eq!(frame.error_code(), frame::REFUSED_STREAM);
            break;
        }
    }
}

/// A GetUsersByType(GUEST) call over its own connection whose client has
/// read one flow-control window (the h2 default, 65 535 bytes) and released
/// none of it: the server can send nothing more.
struct Stalled {
    call: RawStream,
    received: Vec<u8>,
}

async fn stalled_guest_stream(addr: SocketAddr) -> Stalled {
    let request = grpc_frame(&UserTypeRequest { user_type: GUEST });
    let mut call = RawStream::open(addr, "/UserManager/GetUsersByType", request).await;
    let mut received = Vec::new();
    call.read_unreleased(&mut received, 65_535).await;
    Stalled { call, received }
}

/// A server with 20 000 GUESTs that allows one open stream at a time, with
/// the given stream stall timeout.
async fn one_stream_at_a_time(stall_timeout_ms: u64) -> common::TestApp {
    let dir = tempfile::tempdir().unwrap();
    let seed = common::big_seed(dir.path(), 20_000);
    spawn_app_in(dir, |s| {
        s.seed.path = seed;
        s.limits.max_open_streams = 1;
        s.limits.stream_stall_timeout_ms = stall_timeout_ms;
    })
    .await
}

#[tokio::test]
async fn a_stream_whose_client_stops_reading_ends_at_the_stall_timeout() {
    let app = one_stream_at_a_time(500).await;

    let Stalled {
        mut call,
        mut received,
    } = stalled_guest_stream(app.addr).await;

    // The server gives the stalled stream's place back...
    let mut other = client(app.addr).await;
    common::eventually(PATIENCE, "another stream is accepted", || {
        let mut other = other.clone();
        async move {
            match other
                .get_users_by_type(UserTypeRequest {
                    user_type: DISABLED,
                })
                .await
            {
                Ok(users) => {
                    let users: Vec<_> = users.into_inner().collect().await;
                    users.len() == 1 && users[0].is_ok()
                }
                Err(status) => {
                    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                    false
                }
            }
        }
    })
    .await;
    other.get_user(UserRequest { id: 2 }).await.unwrap();

    // ...and when the client reads again, what was sent is followed by the
    // status that ended the call, far short of the 20 000 guests.
    let read = received.len();
    let trailers = call
        .read_to_end(read, &mut received, || async {})
        .await
        .expect("trailers");
    assert_eq!(
        trailers.get("grpc-status").unwrap(),
        &(Code::ResourceExhausted as i32).to_string()
    );
    let message = percent_decoded(trailers.get("grpc-message").unwrap().to_str().unwrap());
    assert!(message.contains("read nothing"), "{message}");
    let messages = grpc_frame::decode(&received).len();
    assert!(messages < 20_000, "{messages} messages");
}

#[tokio::test]
async fn clients_that_never_read_cost_bounded_memory() {
    const STREAMS: usize = 50;
    let dir = tempfile::tempdir().unwrap();
    let seed = common::big_seed(dir.path(), 20_000);
    let server = ServerProcess::start(
        dir.path(),
        &[
            ("USER_MANAGER__SEED__PATH", seed.to_str().unwrap()),
            // No stall timeout: what the streams hold while they wait.
            ("USER_MANAGER__LIMITS__STREAM_STALL_TIMEOUT_MS", "0"),
        ],
    )
    .await;
    // Warm up: one full read, so caches and pools are counted in the baseline.
    let mut reader = server.client().await;
    let all: Vec<_> = reader
        .get_users_by_type(UserTypeRequest { user_type: GUEST })
        .await
        .unwrap()
        .into_inner()
        .collect()
        .await;
    assert_eq!(all.len(), 20_001);
    let before = memory_kib(&server, "VmRSS");

    let mut stalled = Vec::new();
    for _ in 0..STREAMS {
        stalled.push(stalled_guest_stream(server.addr).await);
    }
    // Every stream now waits on its client's window, at about 170 KiB each
    // (8 MiB in all). Had the server read each result whole, as one page, it
    // would hold 20 000 users per stream: over 120 MiB.
    let grown = memory_kib(&server, "VmRSS").saturating_sub(before);
    assert!(grown < 32 * 1024, "resident memory grew {grown} KiB");
    drop(stalled);
    let r = reader.get_user(UserRequest { id: 1 }).await.unwrap();
    assert_eq!(r.into_inner().user.unwrap().id, 1);
}

#[tokio::test]
async fn a_cancelled_stream_releases_everything_it_held() {
    // No stall timeout: the only way a stream that nobody reads can give its
    // place back is the client's cancel stopping its work.
    let app = one_stream_at_a_time(0).await;
    let mut client = client(app.addr).await;
    for round in 0..20 {
        let deadline = Instant::now() + PATIENCE;
        let mut users = loop {
            match client
                .get_users_by_type(UserTypeRequest { user_type: GUEST })
                .await
            {
                Ok(users) => break users.into_inner(),
                Err(status) => {
                    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                    assert!(
                        Instant::now() < deadline,
                        "round {round}: the slot never came back"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        };
        for _ in 0..10 {
            users.next().await.unwrap().unwrap();
        }
        // Dropping the stream sends RST_STREAM(CANCEL) mid-stream.
        drop(users);
        if round == 0 {
            still_serving(app.addr).await;
        }
    }
    still_serving(app.addr).await;
}

#[tokio::test]
async fn connections_get_goaway_at_max_age_and_are_closed_after_the_grace() {
    let app = app(|s| {
        s.limits.max_connection_age_ms = 300;
        s.limits.max_connection_age_grace_ms = 700;
    })
    .await;
    let mut h2 = RawH2::connect(app.addr).await;
    // A bidi call left open for ever.
    h2.send(&request_headers(1, "/UserManager/GetUsersByIds", false))
        .await;
    let frames = h2.until_closed().await;
    let goaway = frames
        .iter()
        .find(|frame| frame.kind == frame::GOAWAY)
        .expect("GOAWAY before the close");
    assert_eq!(goaway.error_code(), frame::NO_ERROR);
    still_serving(app.addr).await;
}

#[tokio::test]
async fn silent_peers_are_pinged_and_dropped() {
    let app = app(|s| {
        s.limits.keepalive_interval_ms = 200;
        s.limits.keepalive_timeout_ms = 200;
    })
    .await;
    // This client never answers PINGs: the server closes the connection.
    let frames = RawH2::connect(app.addr).await.until_closed().await;
    assert!(
        frames
            .iter()
            .any(|frame| frame.kind == frame::PING && frame.flags & frame::ACK == 0),
        "closed without a keepalive PING"
    );
}

/// Opens `streams` streams on one connection, each followed at once by
/// `abuse(stream)`, all in one write: the connection must get
/// GOAWAY(ENHANCE_YOUR_CALM) and other clients must still be served.
async fn calmed_after_burst(
    addr: SocketAddr,
    path: &str,
    streams: u32,
    abuse: impl Fn(u32) -> Vec<u8>,
    what: &str,
) {
    let mut attacker = RawH2::connect(addr).await;
    let mut burst = Vec::new();
    for stream in (1..).step_by(2).take(streams as usize) {
        burst.extend(request_headers(stream, path, false));
        burst.extend(abuse(stream));
    }
    attacker.send(&burst).await;
    let goaway = attacker
        .goaway_before_pong(*b"calmdown")
        .await
        .unwrap_or_else(|| panic!("no GOAWAY for {what}"));
    assert_eq!(goaway.error_code(), frame::ENHANCE_YOUR_CALM, "{what}");
    still_serving(addr).await;
}

#[tokio::test]
async fn rapid_reset_gets_goaway_and_others_keep_being_served() {
    let app = app(|_| {}).await;
    // Streams reset as soon as opened: the server never gets to accept them.
    calmed_after_burst(
        app.addr,
        "/UserManager/GetUser",
        1000,
        |stream| rst_stream(stream, frame::CANCEL),
        "rapid resets",
    )
    .await;
}

#[tokio::test]
async fn streams_the_server_must_reset_are_capped_per_connection() {
    // "MadeYouReset": each stream is made to break flow control, so the
    // server itself resets it; past the cap the connection is closed.
    let app = app(|s| s.limits.max_local_error_reset_streams = 50).await;
    calmed_after_burst(
        app.addr,
        "/UserManager/GetUsersByIds",
        200,
        // Overflows the stream's send window past 2^31 - 1.
        |stream| {
            encode_frame(
                frame::WINDOW_UPDATE,
                0,
                stream,
                &0x7fff_ffffu32.to_be_bytes(),
            )
        },
        "server-side resets",
    )
    .await;
}

// ---------------------------------------------------------------------------
// Bad input

#[tokio::test]
async fn invalid_utf8_in_a_string_field_is_invalid_argument() {
    let app = app(|_| {}).await;
    let bad = user_with_raw_nickname(b"\xff\xfe");
    let message = status_of(
        app.addr,
        "/UserManager/AddUser",
        bad,
        false,
        Code::InvalidArgument,
    )
    .await;
    assert!(message.contains("UTF-8"), "{message}");
    // The same bytes as valid UTF-8 are stored: the framing was right.
    let good = user_with_raw_nickname("Zoë".as_bytes());
    status_of(app.addr, "/UserManager/AddUser", good, false, Code::Ok).await;
}

#[tokio::test]
async fn an_enum_number_outside_the_enum_is_invalid_argument() {
    let app = app(|_| {}).await;
    let mut client = client(app.addr).await;
    let status = client.add_user(user(60, "Enum", 99)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("user_type"), "{status:?}");
    let status = client
        .get_users_by_type(UserTypeRequest { user_type: -1 })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
}

#[tokio::test]
async fn empty_and_garbage_bodies_get_clear_statuses() {
    let app = app(|_| {}).await;
    let get_user = |body: Bytes, expected: Code| {
        status_of(app.addr, "/UserManager/GetUser", body, false, expected)
    };

    // No message at all: tonic's answer for a unary call without its request.
    let message = get_user(Bytes::new(), Code::Internal).await;
    assert!(message.contains("Missing request message"), "{message}");

    // An empty message is a valid request with every field unset: id 0,
    // which names no user.
    get_user(grpc_frame::encode(0, &[]), Code::Ok).await;

    // A well-framed message whose bytes aren't a UserRequest: the caller's fault.
    get_user(grpc_frame::encode(0, &[0xff; 12]), Code::InvalidArgument).await;

    // Bytes that aren't gRPC framing at all: a protocol error (the first byte
    // is no valid compressed flag).
    let message = get_user(Bytes::from_static(b"hello, world"), Code::Internal).await;
    assert!(message.contains("compression flag"), "{message}");
    still_serving(app.addr).await;
}

#[tokio::test]
async fn a_truncated_frame_is_a_protocol_error() {
    let app = app(|_| {}).await;
    let whole = grpc_frame(&user(70, "Truncated", GUEST));
    let cut = whole.slice(..whole.len() - 4);
    let message = status_of(app.addr, "/UserManager/AddUser", cut, false, Code::Internal).await;
    assert!(message.contains("EOF"), "{message}");
    // Nothing was stored.
    let r = client(app.addr)
        .await
        .get_user(UserRequest { id: 70 })
        .await
        .unwrap();
    assert!(r.into_inner().user.is_none());
}

#[tokio::test]
async fn the_compressed_flag_without_an_encoding_is_internal() {
    let app = app(|_| {}).await;
    let payload = prost::Message::encode_to_vec(&UserRequest { id: 1 });
    // INTERNAL, as the gRPC compression spec requires.
    let flagged = grpc_frame::encode(1, &payload);
    let message = status_of(
        app.addr,
        "/UserManager/GetUser",
        flagged,
        false,
        Code::Internal,
    )
    .await;
    assert!(message.contains("grpc-encoding"), "{message}");
}

#[tokio::test]
async fn unknown_methods_are_unimplemented() {
    let app = app(|_| {}).await;
    for path in ["/UserManager/DeleteUser", "/NoSuchService/GetUser"] {
        let request = grpc_frame(&UserRequest { id: 1 });
        status_of(app.addr, path, request, false, Code::Unimplemented).await;
    }
}

#[tokio::test]
async fn a_plain_http1_request_is_closed_and_the_server_carries_on() {
    let app = app(|_| {}).await;
    let mut tcp = TcpStream::connect(app.addr).await.unwrap();
    tcp.write_all(b"GET / HTTP/1.1\r\nHost: localhost\r\nConnection: keep-alive\r\n\r\n")
        .await
        .unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(PATIENCE, tcp.read_to_end(&mut answer))
        .await
        .expect("the connection is closed, not left hanging")
        .ok();
    assert!(!answer.starts_with(b"HTTP/1.1 2"), "{answer:?}");
    still_serving(app.addr).await;
}

#[tokio::test]
async fn a_client_stream_of_a_million_messages_works_in_bounded_memory() {
    const MESSAGES: u32 = 1_000_000;
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]).await;
    let mut client = server.client().await;
    // Warm up, so the baseline includes what any call allocates.
    client
        .count_already_users(stream::iter((1..=10_000).map(|id| UserRequest { id })))
        .await
        .unwrap();
    let before = memory_kib(&server, "VmRSS");
    let r = client
        .count_already_users(stream::iter((1..=MESSAGES).map(|id| UserRequest { id })))
        .await
        .unwrap();
    // The seeded users are the ones that exist.
    let seeded: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(common::SEED).unwrap()).unwrap();
    assert_eq!(r.into_inner().user_cnt as usize, seeded.len());
    // The peak, against the resident size before: batches of ids take about
    // 2 MiB; the million requests collected first would take 17.
    let grown = memory_kib(&server, "VmHWM").saturating_sub(before);
    assert!(
        grown < 8 * 1024,
        "resident memory peaked {grown} KiB higher"
    );
}
