//! A real PostgreSQL for tests, never a mock.
//!
//! [`fresh_database`] gives each test its own empty database. The server is
//! the one `USER_MANAGER_TEST_PG_URL` names (an admin URL: `scripts/test` and
//! `.ci/run` start one throwaway server for the whole run), or else one this
//! process starts for itself ([`Cluster`]) and stops at exit. Tests that stop
//! the server (`replicas`) start a [`Cluster`] of their own.
//!
//! The binaries are Debian's (`apt-get install postgresql`), found on PATH or
//! in /usr/lib/postgresql/*/bin. initdb refuses to run as root, so as root the
//! cluster runs as the `postgres` user (through runuser).

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::{
        OnceLock,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use sqlx::{Connection, Executor, PgConnection};
use tempfile::TempDir;

/// An admin URL of an already running server, for the whole test run.
pub const ADMIN_URL_VAR: &str = "USER_MANAGER_TEST_PG_URL";

/// A throwaway cluster: initdb into a temporary directory, a unix socket
/// there and a free loopback port, trust authentication, fsync on (the
/// default). Stopped (immediately) when dropped.
pub struct Cluster {
    dir: TempDir,
    port: u16,
    running: bool,
}

impl Cluster {
    pub fn start() -> Self {
        let bin = pg_bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("user-manager-pg")
            .tempdir()
            .unwrap();
        let data = dir.path().join("data");
        as_root_chown(dir.path());
        run(
            pg_command(&bin.join("initdb"))
                .args([
                    "--auth=trust",
                    "--username=postgres",
                    "--no-sync",
                    "-E",
                    "UTF8",
                    "-D",
                ])
                .arg(&data),
            "initdb",
        );
        let mut cluster = Self {
            dir,
            port: 0,
            running: false,
        };
        // PostgreSQL can't report a port 0 back: pick a free one, retry if
        // another process takes it first.
        for _ in 0..5 {
            cluster.port = super::free_port();
            if cluster.try_start() {
                return cluster;
            }
        }
        panic!("PostgreSQL did not start; see {}", cluster.log().display());
    }

    fn log(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    fn try_start(&mut self) -> bool {
        let bin = pg_bin_dir();
        let options = format!(
            "-c listen_addresses=127.0.0.1 -p {} -c unix_socket_directories={} \
             -c max_connections=300 -c fsync=on",
            self.port,
            self.dir.path().display()
        );
        let ok = pg_command(&bin.join("pg_ctl"))
            .args(["start", "-w", "-t", "30", "-D"])
            .arg(self.dir.path().join("data"))
            .arg("-l")
            .arg(self.log())
            .args(["-o", &options])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        self.running = ok;
        ok
    }

    /// Starts the server again, on the same port, after [`Cluster::stop`].
    pub fn restart(&mut self) {
        assert!(
            self.try_start(),
            "PostgreSQL did not restart; see {}",
            self.log().display()
        );
    }

    /// Stops the server at once, as a crash would (`pg_ctl stop -m immediate`).
    pub fn stop(&mut self) {
        let _ = pg_command(&pg_bin_dir().join("pg_ctl"))
            .args(["stop", "-m", "immediate", "-w", "-D"])
            .arg(self.dir.path().join("data"))
            .status();
        self.running = false;
    }

    /// The superuser's URL, on the `postgres` database.
    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.running {
            self.stop();
        }
    }
}

impl Cluster {
    /// Hands the cluster to a watchdog that stops it once this process has
    /// ended, however it ends (returning, a panic, a test runner's kill): a
    /// shell polls for our pid, then stops the postmaster at once (SIGQUIT,
    /// as `pg_ctl stop -m immediate` would; pg_ctl itself refuses to run as
    /// root) and removes the cluster's directory.
    fn stop_when_this_process_exits(self) {
        let dir = self.dir.path().to_owned();
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; \
             pm=$(head -n1 '{data}/postmaster.pid' 2>/dev/null) && kill -QUIT \"$pm\"; \
             sleep 1; rm -rf '{dir}'",
            pid = std::process::id(),
            data = dir.join("data").display(),
            dir = dir.display(),
        );
        #[expect(
            clippy::zombie_processes,
            reason = "the watchdog outlives this process by design"
        )]
        Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starts the cluster's watchdog");
        // The watchdog owns the server and its directory now.
        std::mem::forget(self);
    }
}

/// The admin URL for this process's tests: the shared server's, or a
/// cluster started on first use and stopped when the process exits.
fn admin_url() -> &'static str {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        if let Ok(url) = std::env::var(ADMIN_URL_VAR)
            && !url.is_empty()
        {
            return url;
        }
        let cluster = Cluster::start();
        let url = cluster.admin_url();
        cluster.stop_when_this_process_exits();
        url
    })
}

/// A new, empty database on the test server; its URL.
pub async fn fresh_database() -> String {
    fresh_database_on(admin_url()).await
}

/// A new, empty database on the server `admin_url` names; its URL.
pub async fn fresh_database_on(admin_url: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let name = format!(
        "t_{}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut admin = loop {
        match PgConnection::connect(admin_url).await {
            Ok(conn) => break conn,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("connecting to the test PostgreSQL at {admin_url}: {e}"),
        }
    };
    admin
        .execute(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .await
        .expect("CREATE DATABASE");
    let _ = admin.close().await;
    let (base, _) = admin_url
        .rsplit_once('/')
        .expect("an admin URL with a database");
    format!("{base}/{name}")
}

/// Where Debian's PostgreSQL binaries are: PATH, or the newest
/// /usr/lib/postgresql/*/bin. Panics naming the package when missing.
pub fn pg_bin_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path().join("bin"))
            .filter(|p| p.join("initdb").exists())
            .collect();
        versions.sort();
        if let Some(dir) = versions.pop() {
            return dir;
        }
        if let Some(dir) = std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .find(|d| d.join("initdb").exists() && d.join("pg_ctl").exists())
        }) {
            return dir;
        }
        panic!(
            "PostgreSQL's server binaries (initdb, pg_ctl) are missing: \
             apt-get install postgresql (Debian puts them in /usr/lib/postgresql/*/bin), \
             or set {ADMIN_URL_VAR} to an admin URL of a running server"
        )
    })
    .clone()
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// A PostgreSQL command, run as `postgres` when we are root.
fn pg_command(program: &Path) -> Command {
    if is_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(program);
        cmd
    } else {
        Command::new(program)
    }
}

fn as_root_chown(dir: &Path) {
    if is_root() {
        run(
            Command::new("chown").arg("-R").arg("postgres").arg(dir),
            "chown",
        );
    }
}

fn run(cmd: &mut Command, what: &str) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
