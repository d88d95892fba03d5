//! Test harness: the real server, started the way `main` starts it.
//!
//! - [`app`]: in-process through `Application::build` (port 0, a temporary
//!   database), for tests that only talk to it.
//! - [`process`]: the real binary as a child process, for tests that signal,
//!   kill or restart it. It binds port 0 and the harness reads the address
//!   from its startup log; its output is kept, printed when the test fails,
//!   and streamed live with `TEST_LOG=1`.
//! - [`tools`]: external commands (grpcurl, python, kubectl, ...).
//! - [`grpc_frame`] and [`raw_grpc`]: gRPC messages over raw HTTP/2, where no
//!   client library may fix up what a test sends.
//!
//! Shared by every test binary that says `mod common;`.

// Each test binary uses its own part of the harness.
#![allow(dead_code, unused_imports)]

pub mod app;
pub mod grpc_frame;
pub mod metrics;
pub mod otlp;
pub mod postgres;
pub mod process;
pub mod raw_grpc;
pub mod tls;
pub mod tools;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use user_manager::proto::User;

pub use app::{
    Backend, TestApp, database_url, spawn_app, spawn_app_in, spawn_app_on, test_settings,
};
pub use grpc_frame::grpc_frame;
pub use process::{Binary, ServerProcess};
pub use raw_grpc::raw_grpc_call;

pub const SEED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/seed/users.json");
pub const BINARY: &str = env!("CARGO_BIN_EXE_user-manager");

pub fn user(id: u32, nickname: &str, user_type: i32) -> User {
    User {
        id,
        nickname: nickname.into(),
        mail_address: format!("{}@example.com", nickname.to_lowercase()),
        user_type,
    }
}

pub fn db_path(dir: &Path) -> PathBuf {
    dir.join("users.db")
}

/// A seed file in `dir` with the usual users and `guests` more GUESTs (ids
/// from 100): enough to fill any flow-control window.
pub fn big_seed(dir: &Path, guests: u32) -> PathBuf {
    let mut users = serde_json::Map::new();
    let seed: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(SEED).unwrap()).unwrap();
    users.extend(seed.as_object().unwrap().clone());
    for id in 100..100 + guests {
        users.insert(
            id.to_string(),
            serde_json::json!({
                "id": id,
                "nickname": format!("guest{id}"),
                "mail_address": format!("guest{id}@example.com"),
                "user_type": "GUEST",
            }),
        );
    }
    let path = dir.join("big-seed.json");
    std::fs::write(&path, serde_json::Value::Object(users).to_string()).unwrap();
    path
}

/// A loopback address where connections are refused: the port is bound by
/// the returned socket, which never listens, so no one else can take it
/// while the test holds it.
pub fn refusing_addr() -> (tokio::net::TcpSocket, SocketAddr) {
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = socket.local_addr().unwrap();
    (socket, addr)
}

/// A channel to a test server at `url`, connected.
pub async fn connect(url: String) -> Channel {
    Channel::from_shared(url)
        .unwrap()
        .connect()
        .await
        .expect("connects to the test server")
}

/// The health status of `service`, or None if the server can't be asked.
pub async fn health_status(url: &str, service: &str) -> Option<ServingStatus> {
    let channel = Channel::from_shared(url.to_owned())
        .ok()?
        .connect_timeout(Duration::from_millis(500))
        .connect()
        .await
        .ok()?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .ok()?;
    ServingStatus::try_from(response.into_inner().status).ok()
}

/// Polls `check` until it holds; panics after `within` (generous: this waits
/// for a state, it does not time anything).
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A free loopback port: bound, then released for a child process to bind.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
