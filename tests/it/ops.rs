//! Operability: truthful health, bounded graceful shutdown, deadlines, and
//! the operator subcommands, against the real server and binary.

use crate::common;

use std::{
    io::{BufRead, BufReader},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use crate::common::{BINARY, ServerProcess, eventually, health_status, spawn_app_in, user};
use futures::{StreamExt, stream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use user_manager::proto::{UserRequest, UserTypeRequest};

const GUEST: i32 = 3;

fn sigterm(pid: u32) {
    let status = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Waits for the child to exit, at most `within`; returns its exit status.
fn wait_exit(server: &mut ServerProcess, within: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test]
async fn readiness_follows_the_database_and_watch_sees_each_transition() {
    let app = spawn_app_in(tempfile::tempdir().unwrap(), |s| {
        s.health.check_interval_ms = 100;
    })
    .await;
    let url = app.url();
    let mut watch = HealthClient::new(app.channel().await)
        .watch(HealthCheckRequest {
            service: "readiness".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        watch.next().await.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );

    let db = common::db_path(app.dir.path());
    let moved = app.dir.path().join("moved-away.db");
    std::fs::rename(&db, &moved).unwrap();
    eventually(Duration::from_secs(10), "readiness NOT_SERVING", || async {
        health_status(&url, "").await == Some(ServingStatus::NotServing)
    })
    .await;
    assert_eq!(
        watch.next().await.unwrap().unwrap().status,
        ServingStatus::NotServing as i32
    );
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
    assert_eq!(
        watch.next().await.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );
    let r = client
        .get_user(UserRequest { id: 1 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.user.unwrap().nickname, "admin");
}

#[tokio::test]
async fn sigterm_drains_in_flight_streams_and_exits_zero() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(
        dir.path(),
        &[
            ("USER_MANAGER__SERVER__DRAIN_TIMEOUT_MS", "20000"),
            ("USER_MANAGER__SERVER__LAME_DUCK_MS", "300"),
        ],
    )
    .await;
    let mut client = server.client().await;
    for id in 1000..3000 {
        client
            .add_user(user(id, &format!("g{id}"), GUEST))
            .await
            .unwrap();
    }
    let mut watch = HealthClient::new(
        tonic::transport::Channel::from_shared(server.url())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    )
    .watch(HealthCheckRequest {
        service: String::new(),
    })
    .await
    .unwrap()
    .into_inner();
    assert_eq!(
        watch.next().await.unwrap().unwrap().status,
        ServingStatus::Serving as i32
    );

    let mut users = client
        .get_users_by_type(UserTypeRequest { user_type: GUEST })
        .await
        .unwrap()
        .into_inner();
    let first = users.next().await.unwrap().unwrap();
    sigterm(server.child.id());

    // Health says so at once, and the stream in flight still completes.
    assert_eq!(
        watch.next().await.unwrap().unwrap().status,
        ServingStatus::NotServing as i32
    );
    let mut ids = vec![first.user.unwrap().id];
    while let Some(item) = users.next().await {
        ids.push(item.unwrap().user.unwrap().id);
        tokio::time::sleep(Duration::from_micros(200)).await; // a slowish reader
    }
    let expected: Vec<u32> = std::iter::once(2).chain(1000..3000).collect();
    assert_eq!(ids, expected);

    let status = wait_exit(&mut server, Duration::from_secs(30)).expect("exits after draining");
    assert!(status.success(), "{status}");
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
    let mut watch = HealthClient::new(channel.clone())
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
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
    let _silent = std::net::TcpStream::connect(server.addr).unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let signalled = Instant::now();
    sigterm(server.child.id());
    let status = wait_exit(&mut server, Duration::from_millis(DRAIN_MS + 2000))
        .expect("exits within the drain deadline + 2 s");
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
    sigterm(server.child.id());
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
    let status = wait_exit(&mut server, Duration::from_secs(30)).expect("exits");
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

fn run_binary(args: &[&str], env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = Command::new(BINARY);
    cmd.args(args).env_clear().stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().unwrap()
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

    let port = common::free_port();
    let bad = run_binary(
        &["serve"],
        &[
            ("USER_MANAGER__SERVER__LISTEN", &format!("127.0.0.1:{port}")),
            ("USER_MANAGER__DATABASE__MAX_CONNECTIONS", "many"),
        ],
    );
    assert_eq!(bad.status.code(), Some(2), "{bad:?}");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("database.max_connections"));
}
