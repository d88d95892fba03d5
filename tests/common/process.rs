//! The real binary as a child process: configured through its environment,
//! on port 0, its address read from its own startup log.
//!
//! Everything it writes (logs on stdout, startup errors on stderr) is kept.
//! When a test fails while the process is in scope, the log is printed with
//! the failure; with `TEST_LOG=1` it is streamed live to stderr as it comes
//! (run with `--no-capture` to see it as it happens).

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::Path,
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{Arc, Mutex},
    thread::JoinHandle,
    time::{Duration, Instant},
};

use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use user_manager::proto::{UserRequest, user_manager_client::UserManagerClient};

use super::{BINARY, SEED, db_path, health_status};

/// How long a server may take to log that it is ready, and to be SERVING:
/// generous, for a machine busy building and testing in parallel.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// The event the binary logs once its listener is bound, with `listen`.
pub const READY: &str = "user-manager ready to serve";
/// The event that names the health-only listener's address, with `listen`.
pub const HEALTH_LISTENER: &str = "health-only plaintext listener";
/// The event that names the metrics listener's address, with `listen`.
pub const METRICS_LISTENER: &str = "metrics listener";

/// `user-manager` with a clean environment: its database in a directory,
/// the repository's seed, port 0 on loopback, JSON logs at `info`.
#[derive(Clone, Debug)]
pub struct Binary {
    wrapper: Vec<String>,
    args: Vec<String>,
    env: Vec<(String, String)>,
}

impl Binary {
    pub fn new(dir: &Path) -> Self {
        Binary {
            wrapper: Vec::new(),
            args: Vec::new(),
            env: Vec::new(),
        }
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("NO_COLOR", "1")
        .env("USER_MANAGER__SERVER__LISTEN", "127.0.0.1:0")
        .env(
            "USER_MANAGER__DATABASE__URL",
            format!("sqlite://{}", db_path(dir).display()),
        )
        .env("USER_MANAGER__SEED__PATH", SEED)
        .env("USER_MANAGER__LOG__FORMAT", "json")
        .env("USER_MANAGER__LOG__LEVEL", "info")
    }

    pub fn arg(mut self, arg: impl ToString) -> Self {
        self.args.push(arg.to_string());
        self
    }

    pub fn args<S: ToString>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.args.extend(args.into_iter().map(|a| a.to_string()));
        self
    }

    /// Sets a variable, replacing an earlier value.
    pub fn env(mut self, key: &str, value: impl ToString) -> Self {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_owned(), value.to_string()));
        self
    }

    pub fn envs<'a, K, V>(self, vars: impl IntoIterator<Item = &'a (K, V)>) -> Self
    where
        K: AsRef<str> + 'a,
        V: AsRef<str> + 'a,
    {
        vars.into_iter()
            .fold(self, |binary, (k, v)| binary.env(k.as_ref(), v.as_ref()))
    }

    pub fn env_remove(mut self, key: &str) -> Self {
        self.env.retain(|(k, _)| k != key);
        self
    }

    /// The binary run by `wrapper`, a command line that execs its last
    /// argument (e.g. `nsenter` into a test's mount namespace).
    pub fn via<S: ToString>(mut self, wrapper: impl IntoIterator<Item = S>) -> Self {
        self.wrapper = wrapper.into_iter().map(|w| w.to_string()).collect();
        self
    }

    /// A health-only plaintext listener on port 0 too.
    pub fn health_listener(self) -> Self {
        self.env("USER_MANAGER__SERVER__HEALTH_LISTEN", "127.0.0.1:0")
    }

    /// The Prometheus metrics listener on port 0 too.
    pub fn metrics_listener(self) -> Self {
        self.env("USER_MANAGER__TELEMETRY__METRICS_LISTEN", "127.0.0.1:0")
    }

    /// The command line, for running a subcommand to completion.
    pub fn command(&self) -> Command {
        let mut command = match self.wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(BINARY);
                command
            }
            None => Command::new(BINARY),
        };
        command
            .args(&self.args)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null());
        command
    }

    /// Runs to completion (`config`, `healthcheck`, a `serve` that must fail).
    pub fn output(&self) -> Output {
        self.command()
            .output()
            .expect("runs the user-manager binary")
    }

    /// `serve` (unless other arguments were given), once it has logged the
    /// address it bound.
    pub async fn spawn(&self) -> ServerProcess {
        let mut binary = self.clone();
        if binary.args.is_empty() {
            binary.args.push("serve".into());
        }
        ServerProcess::spawn(binary.command()).await
    }

    /// [`Binary::spawn`], then waits until health says SERVING (on the
    /// health-only listener if there is one).
    pub async fn start(&self) -> ServerProcess {
        let mut server = self.spawn().await;
        server.wait_serving().await;
        server
    }
}

/// Where a captured line came from.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Source {
    Stdout,
    Stderr,
}

/// A running server process. Killed when dropped; its log printed then if
/// the test is failing.
pub struct ServerProcess {
    /// The address `server.listen` bound (loopback if it bound all addresses).
    pub addr: SocketAddr,
    /// The address `server.health_listen` bound, if set.
    pub health: Option<SocketAddr>,
    /// The address `telemetry.metrics_listen` bound, if set.
    pub metrics: Option<SocketAddr>,
    child: Child,
    name: String,
    lines: Arc<Mutex<Vec<(Source, String)>>>,
    readers: Vec<JoinHandle<()>>,
    streamed: bool,
}

impl ServerProcess {
    /// Starts `user-manager serve` over the database in `dir` and waits for SERVING.
    pub async fn start(dir: &Path, extra_env: &[(&str, &str)]) -> Self {
        Binary::new(dir).envs(extra_env).start().await
    }

    /// Like `start`, with the binary run by `wrapper` (see [`Binary::via`]).
    pub async fn start_via(wrapper: &[&str], dir: &Path, extra_env: &[(&str, &str)]) -> Self {
        Binary::new(dir).via(wrapper).envs(extra_env).start().await
    }

    /// Starts `command` (which runs the server, however configured) with its
    /// output captured, and waits until it logs the address it bound.
    pub async fn spawn(mut command: Command) -> Self {
        let name = format!("{:?}", command.get_program());
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {command:?}: {e}"));
        let streamed = std::env::var_os("TEST_LOG").is_some_and(|v| !v.is_empty() && v != "0");
        let mut server = ServerProcess {
            addr: SocketAddr::from(([0, 0, 0, 0], 0)),
            health: None,
            metrics: None,
            name: format!("{} {}", name.trim_matches('"'), child.id()),
            child,
            lines: Arc::default(),
            readers: Vec::new(),
            streamed,
        };
        let stdout = server.child.stdout.take().unwrap();
        let stderr = server.child.stderr.take().unwrap();
        server.readers = vec![
            server.capture(Source::Stdout, stdout),
            server.capture(Source::Stderr, stderr),
        ];
        server.addr = server.logged_addr(READY).await;
        server.health = server.find_addr(HEALTH_LISTENER);
        server.metrics = server.find_addr(METRICS_LISTENER);
        server
    }

    /// A thread that keeps each line of `output` (and echoes it with TEST_LOG).
    fn capture(&self, source: Source, output: impl Read + Send + 'static) -> JoinHandle<()> {
        let lines = Arc::clone(&self.lines);
        let prefix = format!("[{}]", self.name);
        let streamed = self.streamed;
        std::thread::spawn(move || {
            for line in BufReader::new(output).lines().map_while(Result::ok) {
                if streamed {
                    // Straight to the process's stderr: not held back by the
                    // test runner's capture.
                    let _ = writeln!(std::io::stderr().lock(), "{prefix} {line}");
                }
                lines.lock().unwrap().push((source, line));
            }
        })
    }

    /// Waits for the event `message` in the log; the address in its `listen`.
    async fn logged_addr(&mut self, message: &str) -> SocketAddr {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(addr) = self.find_addr(message) {
                return addr;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                self.wait_readers().await;
                panic!("{} exited ({status}) before logging {message:?}", self.name);
            }
            assert!(
                Instant::now() < deadline,
                "{} did not log {message:?} within {START_TIMEOUT:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    fn find_addr(&self, message: &str) -> Option<SocketAddr> {
        let lines = self.lines.lock().unwrap();
        lines
            .iter()
            .filter(|(source, _)| *source == Source::Stdout)
            .find_map(|(_, line)| logged_listen(line, message))
            .map(connectable)
    }

    /// Waits until health ("" service) says SERVING, on the health-only
    /// listener if there is one, else on server.listen in plaintext.
    pub async fn wait_serving(&mut self) {
        let url = self.health_url().unwrap_or_else(|| self.url());
        let deadline = Instant::now() + START_TIMEOUT;
        while health_status(&url, "").await != Some(ServingStatus::Serving) {
            if let Some(status) = self.child.try_wait().unwrap() {
                self.wait_readers().await;
                panic!("{} exited ({status}) before SERVING", self.name);
            }
            assert!(
                Instant::now() < deadline,
                "{} not SERVING within {START_TIMEOUT:?}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `GET /metrics` on the metrics listener: the Prometheus text.
    pub async fn scrape(&self) -> super::metrics::Scrape {
        let addr = self.metrics.expect("started with a metrics listener");
        let (status, body) = super::metrics::http_get(addr, "/metrics").await;
        assert_eq!(status, 200, "GET /metrics: {body}");
        super::metrics::Scrape::parse(&body)
    }

    pub fn health_url(&self) -> Option<String> {
        self.health.map(|addr| format!("http://{addr}"))
    }

    pub async fn channel(&self) -> Channel {
        super::connect(self.url()).await
    }

    pub async fn client(&self) -> UserManagerClient<Channel> {
        UserManagerClient::new(self.channel().await)
    }

    /// Asserts the seeded users are there (user 1 is `admin`): the seed
    /// reached the database this server reads.
    pub async fn assert_serves_seeded_users(&self) {
        let response = self
            .client()
            .await
            .get_user(UserRequest { id: 1 })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(response.user.map(|u| u.nickname).as_deref(), Some("admin"));
    }

    /// Whether the process has not exited.
    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Everything captured so far, stdout and stderr, in the order read.
    pub fn log(&self) -> String {
        let lines = self.lines.lock().unwrap();
        let mut log = String::new();
        for (_, line) in lines.iter() {
            log.push_str(line);
            log.push('\n');
        }
        log
    }

    /// The lines written to stdout so far (the log; startup errors go to stderr).
    pub fn stdout_lines(&self) -> Vec<String> {
        let lines = self.lines.lock().unwrap();
        lines
            .iter()
            .filter(|(source, _)| *source == Source::Stdout)
            .map(|(_, line)| line.clone())
            .collect()
    }

    /// Waits until the log, past `from` bytes, contains `needle`; returns
    /// the length of the log then.
    pub async fn wait_for_log(&self, from: usize, needle: &str) -> usize {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = self.log();
            if log[from..].contains(needle) {
                return log.len();
            }
            assert!(Instant::now() < deadline, "no {needle:?} in the log");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends `signal` ("TERM", "HUP", ...).
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -{signal} {}", self.pid());
    }

    /// Waits for the process to exit, at most `within`; returns its exit
    /// status, or None if it is still running. Waits without blocking the
    /// runtime, so the test's open connections can answer the server's
    /// goodbye (a GOAWAY and a PING) and its drain can end.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                self.wait_readers().await;
                return Some(status);
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGTERM, then waits for the exit (at most `within`) and the last of
    /// its log.
    pub async fn sigterm_and_wait(&mut self, within: Duration) -> ExitStatus {
        self.signal("TERM");
        match self.wait_exit(within).await {
            Some(status) => status,
            None => panic!("{} still running {within:?} after SIGTERM", self.name),
        }
    }

    /// SIGKILL: no shutdown code runs.
    pub async fn kill_9(&mut self) {
        self.child.kill().unwrap();
        self.wait_exit(START_TIMEOUT)
            .await
            .expect("exits on SIGKILL");
    }

    /// Until the output pipes are closed (the process has exited), so the
    /// log is complete.
    async fn wait_readers(&self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.readers.iter().all(JoinHandle::is_finished) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() && !self.streamed {
            // The last lines may still be in the pipes.
            let deadline = Instant::now() + Duration::from_secs(1);
            while !self.readers.iter().all(JoinHandle::is_finished) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            eprintln!(
                "---- log of {} (TEST_LOG=1 streams it) ----\n{}---- end of log of {} ----",
                self.name,
                self.log(),
                self.name
            );
        }
    }
}

/// The `listen` address of event `message` in a log line, JSON or pretty.
pub fn logged_listen(line: &str, message: &str) -> Option<SocketAddr> {
    if let Ok(event) = serde_json::from_str::<serde_json::Value>(line) {
        return (event["message"] == message)
            .then(|| event["listen"].as_str()?.parse().ok())
            .flatten();
    }
    let plain = strip_ansi(line);
    if !plain.contains(message) {
        return None;
    }
    plain
        .split_whitespace()
        .find_map(|word| word.strip_prefix("listen="))
        .and_then(|addr| addr.parse().ok())
}

/// `line` without ANSI escape sequences (colours in the pretty format).
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ parameters final-byte
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A bound address as a client reaches it: the unspecified address (every
/// interface) as loopback.
pub fn connectable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    }
}
