//! Test harness: starts the real server the way `main` does (the same
//! `Application::build` path) on an ephemeral port with a temporary database,
//! or the real binary as a child process when a test needs to kill it.

#![allow(dead_code)] // each test binary uses its own part of the harness

use std::{
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use tempfile::TempDir;
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use user_manager::{
    config::Settings,
    proto::{User, user_manager_client::UserManagerClient},
    server::Application,
};

pub const SEED: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/seed/users.json");
pub const BINARY: &str = env!("CARGO_BIN_EXE_user-manager");

/// Settings for a test server: loopback, port 0, a database in `dir`.
pub fn test_settings(dir: &Path) -> Settings {
    let mut settings = Settings::embedded_default();
    settings.server.listen = "127.0.0.1:0".parse().unwrap();
    settings.database.url = format!("sqlite://{}", dir.join("users.db").display());
    settings.seed.path = SEED.into();
    settings
}

pub struct TestApp {
    pub addr: SocketAddr,
    pub dir: TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

/// A server with a fresh, seeded database.
pub async fn spawn_app() -> TestApp {
    spawn_app_in(tempfile::tempdir().unwrap(), |_| {}).await
}

/// A server over the database in `dir`, with settings adjusted by `adjust`.
pub async fn spawn_app_in(dir: TempDir, adjust: impl FnOnce(&mut Settings)) -> TestApp {
    let mut settings = test_settings(dir.path());
    adjust(&mut settings);
    let app = Application::build(settings).await.expect("server builds");
    let addr = app.local_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(app.run_until(async {
        let _ = stopped.await;
    }));
    TestApp {
        addr,
        dir,
        stop: Some(stop),
        task,
    }
}

impl TestApp {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.url())
            .unwrap()
            .connect()
            .await
            .expect("connects to the test server")
    }

    pub async fn client(&self) -> UserManagerClient<Channel> {
        UserManagerClient::new(self.channel().await)
    }

    /// Stops the server gracefully and hands back its database directory.
    pub async fn stop(mut self) -> TempDir {
        let _ = self.stop.take().unwrap().send(());
        self.task
            .await
            .expect("server task did not panic")
            .expect("server stopped cleanly");
        self.dir
    }
}

pub fn user(id: u32, nickname: &str, user_type: i32) -> User {
    User {
        id,
        nickname: nickname.into(),
        mail_address: format!("{}@example.com", nickname.to_lowercase()),
        user_type,
    }
}

/// A free loopback port for a child process (the binary can't report port 0).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The real binary as a child process, configured through the environment.
pub struct ServerProcess {
    pub child: Child,
    pub addr: SocketAddr,
}

impl ServerProcess {
    /// Starts `user-manager serve` over the database in `dir` and waits for SERVING.
    pub async fn start(dir: &Path, extra_env: &[(&str, &str)]) -> Self {
        Self::start_via(&[], dir, extra_env).await
    }

    /// Like `start`, with the binary run by `wrapper` (a command line that
    /// execs its last argument, e.g. `nsenter` into a test's mount namespace).
    pub async fn start_via(wrapper: &[&str], dir: &Path, extra_env: &[(&str, &str)]) -> Self {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let mut cmd = match wrapper.split_first() {
            Some((program, args)) => {
                let mut cmd = Command::new(program);
                cmd.args(args).arg(BINARY);
                cmd
            }
            None => Command::new(BINARY),
        };
        cmd.arg("serve")
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("USER_MANAGER__SERVER__LISTEN", addr.to_string())
            .env(
                "USER_MANAGER__DATABASE__URL",
                format!("sqlite://{}", dir.join("users.db").display()),
            )
            .env("USER_MANAGER__SEED__PATH", SEED)
            .env("USER_MANAGER__LOG__LEVEL", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("starts the user-manager binary");
        let mut process = ServerProcess { child, addr };
        process.wait_serving(Duration::from_secs(20)).await;
        process
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn client(&self) -> UserManagerClient<Channel> {
        UserManagerClient::new(
            Channel::from_shared(self.url())
                .unwrap()
                .connect()
                .await
                .unwrap(),
        )
    }

    async fn wait_serving(&mut self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("user-manager exited before serving: {status}");
            }
            if health_status(&self.url(), "").await == Some(ServingStatus::Serving) {
                return;
            }
            assert!(Instant::now() < deadline, "not SERVING within {within:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill_9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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

pub fn db_path(dir: &Path) -> PathBuf {
    dir.join("users.db")
}

/// A gRPC call over a raw HTTP/2 stream: no client library in between that
/// could enforce deadlines or fix up frames. `body` is sent as is (already
/// framed, or deliberately malformed); with `keep_open` the request stream is
/// left open after it. Returns the response's grpc-status and grpc-message
/// (from headers or trailers) and the raw response body.
pub struct RawReply {
    pub http_status: u16,
    pub grpc_status: Option<i32>,
    pub grpc_message: Option<String>,
    pub body: Vec<u8>,
}

pub async fn raw_grpc_call(
    addr: SocketAddr,
    path: &str,
    extra_headers: &[(&str, &str)],
    body: bytes::Bytes,
    keep_open: bool,
) -> RawReply {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut h2, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut request = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in extra_headers {
        request = request.header(*k, *v);
    }
    let (response, mut send) = h2.send_request(request.body(()).unwrap(), false).unwrap();
    send.send_data(body, !keep_open).unwrap();
    let response = response.await.unwrap();
    let http_status = response.status().as_u16();
    let header = |map: &http::HeaderMap, name: &str| {
        map.get(name)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
    };
    let mut grpc_status = header(response.headers(), "grpc-status");
    let mut grpc_message = header(response.headers(), "grpc-message");
    let mut recv = response.into_body();
    let mut body = Vec::new();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk.unwrap();
        let _ = recv.flow_control().release_capacity(chunk.len());
        body.extend_from_slice(&chunk);
    }
    if let Some(trailers) = recv.trailers().await.unwrap() {
        grpc_status = grpc_status.or_else(|| header(&trailers, "grpc-status"));
        grpc_message = grpc_message.or_else(|| header(&trailers, "grpc-message"));
    }
    drop(send);
    RawReply {
        http_status,
        grpc_status: grpc_status.and_then(|s| s.parse().ok()),
        grpc_message,
        body,
    }
}

/// One length-prefixed gRPC message frame, uncompressed.
pub fn grpc_frame(message: &impl prost::Message) -> bytes::Bytes {
    let payload = message.encode_to_vec();
    let mut frame = Vec::with_capacity(payload.len() + 5);
    frame.push(0);
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(&payload);
    frame.into()
}

/// Polls `check` until it holds; panics after `within` (generous: this waits
/// for a state, it does not time anything).
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
