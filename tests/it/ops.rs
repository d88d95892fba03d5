//! Operability: truthful health, bounded graceful shutdown, deadlines, and
//! the operator subcommands, against the real server and binary.

use crate::common;

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::common::{
    BINARY, Binary, ServerProcess, eventually, health_status, raw_grpc::RawStream, spawn_app_in,
    tools, user,
};
use futures::{StreamExt, stream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, HealthCheckResponse, health_check_response::ServingStatus,
    health_client::HealthClient,
};
use user_manager::proto::{UserRequest, UserResponse, UserTypeRequest};

const GUEST: i32 = 3;

/// A health Watch of `service` over `channel`.
async fn watch(
    channel: tonic::transport::Channel,
    service: impl Into<String>,
) -> tonic::Streaming<HealthCheckResponse> {
    HealthClient::new(channel)
        .watch(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
}

/// The next status a Watch reports.
async fn next_status(watch: &mut tonic::Streaming<HealthCheckResponse>) -> ServingStatus {
    let status = watch.next().await.unwrap().unwrap().status;
    ServingStatus::try_from(status).unwrap()
}

#[tokio::test]
async fn readiness_follows_the_database_and_watch_sees_each_transition() {
    let app = spawn_app_in(tempfile::tempdir().unwrap(), |s| {
        s.health.check_interval_ms = 100;
    })
    .await;
    let url = app.url();
    let mut watch = watch(app.channel().await, "readiness").await;
    assert_eq!(next_status(&mut watch).await, ServingStatus::Serving);

    let db = common::db_path(app.dir.path());
    let moved = app.dir.path().join("moved-away.db");
    std::fs::rename(&db, &moved).unwrap();
    eventually(Duration::from_secs(10), "readiness NOT_SERVING", || async {
        health_status(&url, "").await == Some(ServingStatus::NotServing)
    })
    .await;
    assert_eq!(next_status(&mut watch).await, ServingStatus::NotServing);
    for name in ["UserManager", "readiness"] {
        assert_eq!(
            health_status(&url, name).await,
            Some(ServingStatus::NotServing)
        );
    }
    assert_eq!(
        health_status(&url, "liveness").await,
        Some(ServingStatus::Serving)
    );
    let mut client = app.client().await;
    let status = client.get_user(UserRequest { id: 1 }).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable);

    std::fs::rename(&moved, &db).unwrap();
    eventually(
        Duration::from_secs(10),
        "readiness SERVING again",
        || async { health_status(&url, "UserManager").await == Some(ServingStatus::Serving) },
    )
    .await;
    assert_eq!(next_status(&mut watch).await, ServingStatus::Serving);
    let r = client
        .get_user(UserRequest { id: 1 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.user.unwrap().nickname, "admin");
}

/// A stream in flight when SIGTERM comes completes during the drain, every
/// message and an OK status, and then the process exits 0 at once: long
/// before the drain deadline, so the drain ended because the work did. With
/// draining broken the stream is cut (messages missing, no OK status), or
/// the exit waits for the deadline, and this fails.
#[tokio::test]
async fn sigterm_drains_in_flight_streams_and_exits_zero() {
    const GUESTS: u32 = 10_000;
    const DRAIN: Duration = Duration::from_secs(20);
    const LAME_DUCK: Duration = Duration::from_millis(300);
    let dir = tempfile::tempdir().unwrap();
    let seed = common::big_seed(dir.path(), GUESTS);
    let mut server = Binary::new(dir.path())
        .env("USER_MANAGER__SEED__PATH", seed.display())
        .env("USER_MANAGER__SERVER__DRAIN_TIMEOUT_MS", DRAIN.as_millis())
        .env("USER_MANAGER__SERVER__LAME_DUCK_MS", LAME_DUCK.as_millis())
        .start()
        .await;
    let mut watch = watch(server.channel().await, String::new()).await;
    assert_eq!(next_status(&mut watch).await, ServingStatus::Serving);

    // Every guest, about 500 kB: more than the server can buffer. The client
    // reads one flow-control window and releases none of it, so the call
    // stays in flight until the client reads on.
    let mut users = RawStream::open(
        server.addr,
        "/UserManager/GetUsersByType",
        common::grpc_frame(&UserTypeRequest { user_type: GUEST }),
    )
    .await;
    let mut received = Vec::new();
    users.read_unreleased(&mut received, 65_535).await;
    let signalled = Instant::now();
    server.signal("TERM");

    // Health says so at once. (The Watch is closed then: an open Watch
    // never ends by itself, and would hold the drain to its deadline.)
    assert_eq!(next_status(&mut watch).await, ServingStatus::NotServing);
    drop(watch);
    // Past the lame duck, the listener closed and the drain begun, the call
    // is still stuck on its client, longer than a server that stopped
    // waiting for it would live on (it gives cancelled calls 500 ms to say
    // so): the server waits for it.
    tokio::time::sleep(LAME_DUCK + Duration::from_millis(1200)).await;
    assert!(server.is_running(), "exited with a call in flight");

    // The client reads on, slowish, and gets the whole stream.
    let window = received.len();
    let trailers = users
        .read_to_end(window, &mut received, || {
            tokio::time::sleep(Duration::from_millis(1))
        })
        .await
        .expect("trailers");
    assert_eq!(
        trailers.get("grpc-status").map(|v| v.to_str().unwrap()),
        Some("0"),
        "{trailers:?}"
    );
    let ids: Vec<u32> = common::grpc_frame::decode_messages::<UserResponse>(&received)
        .into_iter()
        .map(|r| r.user.unwrap().id)
        .collect();
    let expected: Vec<u32> = std::iter::once(2).chain(100..100 + GUESTS).collect();
    assert!(ids == expected, "{} of {} users", ids.len(), expected.len());

    let status = server.wait_exit(DRAIN).await.expect("exits after draining");
    assert!(status.success(), "{status}");
    let took = signalled.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "exited {took:?} after SIGTERM: the drain waited for its {DRAIN:?} deadline, not for the call"
    );
}

#[tokio::test]
async fn sigterm_exits_within_the_drain_deadline_whatever_stays_open() {
    const DRAIN_MS: u64 = 1000;
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(
        dir.path(),
        &[(
            "USER_MANAGER__SERVER__DRAIN_TIMEOUT_MS",
            &DRAIN_MS.to_string(),
        )],
    )
    .await;
    let channel = tonic::transport::Channel::from_shared(server.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    // An open Watch, a half-finished bidi call, a client stream never closed,
    // and a TCP connection that never sends the HTTP/2 preface.
    let mut watch = watch(channel.clone(), String::new()).await;
    watch.next().await.unwrap().unwrap();
    let mut client = user_manager::proto::user_manager_client::UserManagerClient::new(channel);
    let (bidi_tx, bidi_rx) = mpsc::channel(1);
    let mut bidi = client
        .get_users_by_ids(ReceiverStream::new(bidi_rx))
        .await
        .unwrap()
        .into_inner();
    bidi_tx.send(UserRequest { id: 1 }).await.unwrap();
    bidi.next().await.unwrap().unwrap();
    let (count_tx, count_rx) = mpsc::channel(1);
    count_tx.send(UserRequest { id: 1 }).await.unwrap();
    let mut counting = client.clone();
    let count = tokio::spawn(async move {
        counting
            .count_already_users(ReceiverStream::new(count_rx))
            .await
    });
    let _silent = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let signalled = Instant::now();
    let status = server
        .sigterm_and_wait(Duration::from_millis(DRAIN_MS + 2000))
        .await;
    assert!(status.success(), "{status}");
    assert!(signalled.elapsed() >= Duration::from_millis(DRAIN_MS));

    // Cancelled calls hear why.
    let end = bidi.next().await.unwrap().unwrap_err();
    assert_eq!(end.code(), Code::Unavailable, "{end:?}");
    let counted = count.await.unwrap().unwrap_err();
    assert_eq!(counted.code(), Code::Unavailable, "{counted:?}");
    drop((bidi_tx, count_tx));
}

#[tokio::test]
async fn lame_duck_keeps_serving_while_health_says_not_serving() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(
        dir.path(),
        &[("USER_MANAGER__SERVER__LAME_DUCK_MS", "3000")],
    )
    .await;
    server.signal("TERM");
    let url = server.url();
    eventually(
        Duration::from_secs(5),
        "NOT_SERVING after SIGTERM",
        || async { health_status(&url, "readiness").await == Some(ServingStatus::NotServing) },
    )
    .await;
    // A new connection is still accepted and served during the lame duck.
    let mut client = server.client().await;
    let r = client
        .get_user(UserRequest { id: 2 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.user.unwrap().nickname, "guest");
    assert_eq!(
        health_status(&url, "liveness").await,
        Some(ServingStatus::Serving)
    );
    let status = server
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("exits");
    assert!(status.success());
}

/// Holds SQLite's write lock from another process until dropped.
struct WriteLock(std::process::Child);

impl WriteLock {
    fn take(db: &std::path::Path) -> Self {
        let mut child = Command::new("python3")
            .args([
                "-c",
                "import sqlite3,sys,time\n\
                 c=sqlite3.connect(sys.argv[1], isolation_level=None)\n\
                 c.execute('BEGIN IMMEDIATE')\n\
                 print('locked', flush=True)\n\
                 sys.stdin.read()\n",
            ])
            .arg(db)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "locked");
        WriteLock(child)
    }
}

impl Drop for WriteLock {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn expired_deadlines_are_deadline_exceeded() {
    let app = spawn_app_in(tempfile::tempdir().unwrap(), |s| {
        s.server.request_timeout_ms = 300;
    })
    .await;
    let mut client = app.client().await;

    // The server default bounds a unary call stuck behind another process's lock.
    let lock = WriteLock::take(&common::db_path(app.dir.path()));
    let status = client.add_user(user(900, "Late", GUEST)).await.unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    // A client's shorter grpc-timeout wins. Raw HTTP/2 here and below, because
    // client libraries enforce the deadline locally too and would hide what
    // the server answers.
    let reply = common::raw_grpc_call(
        app.addr,
        "/UserManager/AddUser",
        &[("grpc-timeout", "50m")],
        common::grpc_frame(&user(901, "Later", GUEST)),
        false,
    )
    .await;
    assert_eq!(reply.grpc_status, Some(Code::DeadlineExceeded as i32));
    drop(lock);

    // A client stream is bounded by the client's grpc-timeout...
    let reply = common::raw_grpc_call(
        app.addr,
        "/UserManager/CountAlreadyUsers",
        &[("grpc-timeout", "200m")],
        common::grpc_frame(&UserRequest { id: 1 }),
        true,
    )
    .await;
    assert_eq!(reply.grpc_status, Some(Code::DeadlineExceeded as i32));

    // ...not by the unary default: a stream may stay open longer than that.
    let (tx, rx) = mpsc::channel(1);
    let mut answers = client
        .get_users_by_ids(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for id in [1, 2] {
        tokio::time::sleep(Duration::from_millis(400)).await;
        tx.send(UserRequest { id }).await.unwrap();
        assert_eq!(answers.next().await.unwrap().unwrap().user.unwrap().id, id);
    }
    drop(tx);
    assert!(answers.next().await.is_none());
    let r = client
        .count_already_users(stream::iter([UserRequest { id: 1 }]))
        .await
        .unwrap();
    assert_eq!(r.into_inner().user_cnt, 1);
}

/// The binary with nothing but `env`: no database, seed or address of the
/// harness's.
fn run_binary(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(BINARY);
    cmd.args(args).env_clear().envs(env.iter().copied());
    tools::output(cmd, "cargo builds it")
}

#[tokio::test]
async fn healthcheck_subcommand_exits_by_status() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]).await;
    let addr = server.addr.to_string();
    for service in ["", "readiness", "liveness", "UserManager"] {
        let out = run_binary(&["healthcheck", "--addr", &addr, "--service", service], &[]);
        assert!(out.status.success(), "{service:?}: {out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "SERVING");
    }
    // The default address comes from server.listen's port.
    let listen = format!("[::]:{}", server.addr.port());
    let out = run_binary(
        &["healthcheck"],
        &[("USER_MANAGER__SERVER__LISTEN", &listen)],
    );
    assert!(out.status.success(), "{out:?}");

    let unknown = run_binary(&["healthcheck", "--addr", &addr, "--service", "nope"], &[]);
    assert_eq!(unknown.status.code(), Some(1), "{unknown:?}");
    drop(server);
    let down = run_binary(
        &["healthcheck", "--addr", &addr, "--timeout-ms", "500"],
        &[],
    );
    assert_eq!(down.status.code(), Some(1), "{down:?}");
}

#[test]
fn config_subcommand_shows_sources_and_bad_values_fail_before_binding() {
    let out = run_binary(&["config"], &[("USER_MANAGER__LOG__FORMAT", "json")]);
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("log.format = \"json\"  # env USER_MANAGER__LOG__FORMAT"),
        "{text}"
    );
    assert!(
        text.contains("server.listen = \"[::]:1234\"  # default"),
        "{text}"
    );

    // Port 0: the refusal comes before anything is bound.
    let bad = run_binary(
        &["serve"],
        &[
            ("USER_MANAGER__SERVER__LISTEN", "127.0.0.1:0"),
            ("USER_MANAGER__DATABASE__SQLITE__MAX_CONNECTIONS", "many"),
        ],
    );
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("database.sqlite.max_connections"));
}
