//! The two servers run as child processes, so both are measured the same way:
//! over loopback, with their memory and CPU time read from /proc.

use std::{
    ffi::OsString,
    fs,
    net::{SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};
use user_manager::proto::{UserRequest, user_manager_client::UserManagerClient};

/// How long a server may take to answer before the benchmark gives up.
const START_TIMEOUT: Duration = Duration::from_secs(60);

pub struct ServerProcess {
    pub name: &'static str,
    pub addr: SocketAddr,
    child: Child,
    log: Option<PathBuf>,
}

/// A loopback port nobody listens on right now.
pub fn free_addr() -> anyhow::Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

impl ServerProcess {
    /// `user-manager serve` over `db`, configured through the environment.
    /// Settings the caller exported as `USER_MANAGER__*` pass through, so a
    /// setting can be benchmarked without editing anything; the address, the
    /// database and the seed are the benchmark's.
    pub fn user_manager(binary: &Path, db: &Database, log: &Path) -> anyhow::Result<Self> {
        Self::user_manager_via(&[], binary, db, log)
    }

    /// [`Self::user_manager`] with `env` set on top (settings as
    /// `USER_MANAGER__*` variables).
    pub fn user_manager_with(
        binary: &Path,
        db: &Database,
        log: &Path,
        env: &[(&str, String)],
    ) -> anyhow::Result<Self> {
        Self::spawn_user_manager(&[], binary, db, log, env)
    }

    /// [`Self::user_manager`] run by `prefix` (e.g. `valgrind --tool=callgrind`).
    pub fn user_manager_via(
        prefix: &[OsString],
        binary: &Path,
        db: &Database,
        log: &Path,
    ) -> anyhow::Result<Self> {
        Self::spawn_user_manager(prefix, binary, db, log, &[])
    }

    fn spawn_user_manager(
        prefix: &[OsString],
        binary: &Path,
        db: &Database,
        log: &Path,
        env: &[(&str, String)],
    ) -> anyhow::Result<Self> {
        let addr = free_addr()?;
        let mut cmd = user_manager_command_via(prefix, binary, db);
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        cmd.arg("serve")
            .env("USER_MANAGER__SERVER__LISTEN", addr.to_string())
            .stdin(Stdio::null());
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .with_context(|| format!("opening {}", log.display()))?;
        cmd.stdout(out.try_clone()?).stderr(out);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        Ok(Self {
            name: "user-manager",
            addr,
            child,
            log: Some(log.to_owned()),
        })
    }

    /// This very program, as the reference server.
    pub fn reference(users: u32) -> anyhow::Result<Self> {
        Self::reference_via(&[], users)
    }

    /// [`Self::reference`] run by `prefix` (e.g. `valgrind --tool=callgrind`).
    pub fn reference_via(prefix: &[OsString], users: u32) -> anyhow::Result<Self> {
        let addr = free_addr()?;
        let child = command_via(prefix, &std::env::current_exe()?)
            .args(["--reference-server", &addr.to_string(), "--users"])
            .arg(users.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the reference server")?;
        Ok(Self {
            name: "reference",
            addr,
            child,
            log: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Fails with the server's log if it has exited.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("{} exited ({status}){}", self.name, self.log_tail());
        }
        Ok(())
    }

    fn log_tail(&self) -> String {
        let Some(text) = self.log.as_ref().and_then(|p| fs::read_to_string(p).ok()) else {
            return String::new();
        };
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "; last lines of its log:\n{}",
            lines[lines.len().saturating_sub(20)..].join("\n")
        )
    }

    /// Waits until health reports SERVING ("" service); returns the time
    /// since the process was started.
    pub async fn wait_serving(&mut self, started: Instant) -> anyhow::Result<Duration> {
        loop {
            self.ensure_running()?;
            if health(&self.url()).await == Some(ServingStatus::Serving) {
                return Ok(started.elapsed());
            }
            if started.elapsed() > START_TIMEOUT {
                bail!("{} not SERVING within {START_TIMEOUT:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// Waits until the reference answers a GetUser (it has no health service).
    pub async fn wait_answering(&mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            self.ensure_running()?;
            if let Ok(channel) = Endpoint::from_shared(self.url())?.connect().await
                && UserManagerClient::new(channel)
                    .get_user(UserRequest { id: 1 })
                    .await
                    .is_ok()
            {
                return Ok(());
            }
            if started.elapsed() > START_TIMEOUT {
                bail!("{} not answering within {START_TIMEOUT:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `count` HTTP/2 connections to the server.
    pub async fn connect(&self, count: usize) -> anyhow::Result<Vec<Channel>> {
        let mut channels = Vec::with_capacity(count);
        for _ in 0..count {
            channels.push(
                Endpoint::from_shared(self.url())?
                    .tcp_nodelay(true)
                    .connect()
                    .await
                    .with_context(|| format!("connecting to {}", self.name))?,
            );
        }
        Ok(channels)
    }

    /// Resident memory now, in KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        status_field(self.pid(), "VmRSS:")
    }

    /// Peak resident memory since the last [`Self::reset_peak`], in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        status_field(self.pid(), "VmHWM:")
    }

    /// Restarts the VmHWM high-water mark (Linux `clear_refs` value 5).
    pub fn reset_peak(&self) {
        let _ = fs::write(format!("/proc/{}/clear_refs", self.pid()), "5");
    }

    /// User plus system CPU time the process has used.
    pub fn cpu_time(&self) -> Duration {
        cpu_time(self.pid())
    }

    /// Voluntary plus involuntary context switches, summed over the
    /// process's threads that are alive now.
    pub fn context_switches(&self) -> Option<u64> {
        let tasks = fs::read_dir(format!("/proc/{}/task", self.pid())).ok()?;
        let mut sum = 0;
        for task in tasks.flatten() {
            let Ok(status) = fs::read_to_string(task.path().join("status")) else {
                continue; // the thread exited meanwhile
            };
            sum += status
                .lines()
                .filter_map(|l| {
                    l.strip_prefix("voluntary_ctxt_switches:")
                        .or_else(|| l.strip_prefix("nonvoluntary_ctxt_switches:"))
                })
                .filter_map(|v| v.trim().parse::<u64>().ok())
                .sum::<u64>();
        }
        Some(sum)
    }

    /// SIGTERM, then waits for a graceful exit (SIGKILL after 30 s).
    pub fn terminate(mut self) -> anyhow::Result<ExitStatus> {
        let sent = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()?;
        if !sent.success() {
            bail!("kill -TERM {} failed", self.pid());
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                self.child.kill()?;
                bail!("{} ignored SIGTERM for 30 s", self.name);
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The database the user-manager servers run on.
#[derive(Clone)]
pub enum Database {
    /// A SQLite file the benchmark made; each server gets its own.
    File(PathBuf),
    /// A PostgreSQL database the caller named (`--database-url`), shared by
    /// every replica.
    Url(String),
}

impl Database {
    pub fn url(&self) -> String {
        match self {
            Database::File(path) => format!("sqlite://{}", path.display()),
            Database::Url(url) => url.clone(),
        }
    }
}

/// `scheme://user:password@host/db?query` as `scheme://host/db`.
pub fn redact(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let rest = rest.rsplit_once('@').map_or(rest, |(_, place)| place);
    let rest = rest.split_once('?').map_or(rest, |(place, _)| place);
    format!("{scheme}://{rest}")
}

/// `user-manager` with a clean environment: the benchmark's database, no
/// seed, and only the caller's own `USER_MANAGER__*` settings besides (and
/// libpq's `PG*` variables, e.g. PGPASSWORD, which sqlx reads too).
pub fn user_manager_command(binary: &Path, db: &Database) -> Command {
    user_manager_command_via(&[], binary, db)
}

/// `program`, or `prefix` running it (its first word the program).
fn command_via(prefix: &[OsString], program: &Path) -> Command {
    match prefix.split_first() {
        None => Command::new(program),
        Some((first, rest)) => {
            let mut cmd = Command::new(first);
            cmd.args(rest).arg(program);
            cmd
        }
    }
}

fn user_manager_command_via(prefix: &[OsString], binary: &Path, db: &Database) -> Command {
    let mut cmd = command_via(prefix, binary);
    cmd.env_clear()
        .envs(
            std::env::vars().filter(|(k, _)| {
                k == "PATH" || k.starts_with("USER_MANAGER__") || k.starts_with("PG")
            }),
        )
        .env("USER_MANAGER__DATABASE__URL", db.url())
        .env("USER_MANAGER__SEED__PATH", "");
    cmd
}

/// The processes of one server under test: one, or `--replicas` of
/// user-manager on one database. Connections go to them round-robin; CPU
/// time and memory are summed over them.
pub struct Fleet {
    processes: Vec<ServerProcess>,
}

impl Fleet {
    pub fn new(processes: Vec<ServerProcess>) -> Self {
        assert!(!processes.is_empty(), "a fleet of no servers");
        Self { processes }
    }

    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        self.processes
            .iter_mut()
            .try_for_each(ServerProcess::ensure_running)
    }

    /// `count` HTTP/2 connections, connection `i` to process `i % n`; at
    /// least one per process.
    pub async fn connect(&self, count: usize) -> anyhow::Result<Vec<Channel>> {
        let n = self.processes.len();
        let mut channels = Vec::with_capacity(count.max(n));
        for i in 0..count.max(n) {
            channels.extend(self.processes[i % n].connect(1).await?);
        }
        Ok(channels)
    }

    fn sum(&self, each: impl Fn(&ServerProcess) -> Option<u64>) -> Option<u64> {
        self.processes.iter().map(each).sum()
    }

    /// Resident memory now, summed, in KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        self.sum(ServerProcess::rss_kib)
    }

    /// Each process's peak since [`Self::reset_peak`], summed, in KiB.
    pub fn peak_rss_kib(&self) -> Option<u64> {
        self.sum(ServerProcess::peak_rss_kib)
    }

    pub fn reset_peak(&self) {
        self.processes.iter().for_each(ServerProcess::reset_peak);
    }

    /// Context switches of every thread, summed.
    pub fn context_switches(&self) -> Option<u64> {
        self.sum(ServerProcess::context_switches)
    }

    /// CPU time, summed.
    pub fn cpu_time(&self) -> Duration {
        self.processes.iter().map(ServerProcess::cpu_time).sum()
    }

    /// SIGTERM to every process; waits for each to exit.
    pub fn terminate(self) -> anyhow::Result<()> {
        for process in self.processes {
            process.terminate()?;
        }
        Ok(())
    }
}

/// The health of the whole server, or None if it can't be asked yet.
async fn health(url: &str) -> Option<ServingStatus> {
    let channel = Endpoint::from_shared(url.to_owned())
        .ok()?
        .connect_timeout(Duration::from_millis(200))
        .connect()
        .await
        .ok()?;
    let response = HealthClient::new(channel)
        .check(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .ok()?;
    ServingStatus::try_from(response.into_inner().status).ok()
}

fn status_field(pid: u32, field: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// utime + stime of `pid` (fields 14 and 15 of /proc/PID/stat, in clock ticks).
pub fn cpu_time(pid: u32) -> Duration {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // The command name may contain spaces; the fields after it don't.
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let ticks: u64 = after_name
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|f| f.parse::<u64>().ok())
        .sum();
    Duration::from_secs_f64(ticks as f64 / clock_ticks() as f64)
}

fn clock_ticks() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(100)
    })
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn redact_keeps_only_scheme_host_and_database() {
        assert_eq!(
            redact("postgres://bench:s3cret@db.internal:5432/users?sslmode=require"),
            "postgres://db.internal:5432/users"
        );
        assert_eq!(
            redact("postgres://localhost/users"),
            "postgres://localhost/users"
        );
    }
}
