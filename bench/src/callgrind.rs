//! User-space instructions per call, counted by valgrind's callgrind: a
//! figure other work on the machine hardly moves, unlike throughput. It
//! does not see the kernel (system calls, context switches): the context
//! switch counts of the workloads stand beside it for that.
//!
//! Each server runs under `valgrind --tool=callgrind --instr-atstart=no`
//! (at nearly native speed until instrumentation is switched on, so loading
//! the reference's million users stays quick). Then: instrumentation on, a
//! fixed warm-up, counters zeroed (`callgrind_control --zero`), a fixed
//! number of calls, a dump (`callgrind_control --dump`), whose `totals:` line
//! (instructions executed by every thread, `Ir`) divided by the calls is the
//! figure.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};

use crate::{
    load::{self, Outcome},
    process::{Database, ServerProcess, cpu_time},
};

/// Callers sending the counted calls (a fixed number: the count must not
/// depend on how fast the machine is).
const CALLERS: usize = 8;
/// Ids per GetUsersByIds call.
pub const IDS_PER_CALL: u32 = 100;

/// How many calls are counted.
#[derive(Clone, Copy)]
pub struct Sizes {
    pub warmup: u64,
    pub get_user: u64,
    pub by_ids: u64,
}

/// One server's figures, in instructions per call.
#[derive(Default, Clone, Copy)]
pub struct Counts {
    pub get_user: Option<f64>,
    pub by_ids: Option<f64>,
}

/// Why the phase did not run, if it cannot.
pub fn unavailable() -> Option<String> {
    let ok = |program: &str| {
        Command::new(program)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !ok("valgrind") {
        return Some("skipped: valgrind not installed (apt-get install valgrind)".into());
    }
    if !ok("callgrind_control") {
        return Some("skipped: callgrind_control not found (it comes with valgrind)".into());
    }
    None
}

/// What to start under callgrind.
pub enum Target<'a> {
    Reference,
    UserManager {
        binary: &'a Path,
        db: &'a Database,
        log: &'a Path,
    },
}

/// Starts `target` under callgrind with its dumps in `dir`, counts
/// instructions over the calls of `sizes`, and stops it. Failed calls fail
/// the phase: a count over wrong answers means nothing.
pub async fn count(
    target: Target<'_>,
    users: u32,
    sizes: Sizes,
    dir: &Path,
    name: &str,
) -> anyhow::Result<Counts> {
    let out = dir.join(format!("{name}.callgrind"));
    let prefix: Vec<OsString> = vec![
        "valgrind".into(),
        "--tool=callgrind".into(),
        "--instr-atstart=no".into(),
        "-q".into(),
        format!("--callgrind-out-file={}", out.display()).into(),
    ];
    let started = Instant::now();
    let mut server = match target {
        Target::Reference => {
            let mut server = ServerProcess::reference_via(&prefix, users)?;
            server.wait_answering().await?;
            server
        }
        Target::UserManager { binary, db, log } => {
            let mut server = ServerProcess::user_manager_via(&prefix, binary, db, log)?;
            server.wait_serving(started).await?;
            server
        }
    };
    let pid = server.pid();
    let channels = server.connect(1).await?;
    settle(pid).await;
    control(pid, "--instr=on")?;
    let get_user = || load::get_user_call(users);
    let by_ids = || load::by_ids_call(users, IDS_PER_CALL);
    checked(load::fixed_calls(&channels, CALLERS, sizes.warmup, get_user()).await)?;
    checked(load::fixed_calls(&channels, CALLERS, sizes.warmup / 10 + 1, by_ids()).await)?;

    control(pid, "--zero")?;
    let calls = checked(load::fixed_calls(&channels, CALLERS, sizes.get_user, get_user()).await)?;
    let get_user = dump(pid, &out)? / calls as f64;

    control(pid, "--zero")?;
    let calls = checked(load::fixed_calls(&channels, CALLERS, sizes.by_ids, by_ids()).await)?;
    let by_ids = dump(pid, &out)? / calls as f64;

    drop(channels);
    server.ensure_running()?;
    drop(server); // killed: its exit would only write one more dump
    Ok(Counts {
        get_user: Some(get_user),
        by_ids: Some(by_ids),
    })
}

/// Waits until `pid` has stopped using the CPU (at most a minute): what a
/// server does once after start, in the background (user-manager's SQLite
/// store reads every id into memory), is not a call's work.
async fn settle(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut used = cpu_time(pid);
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = cpu_time(pid);
        if now.saturating_sub(used) < Duration::from_millis(10) {
            return;
        }
        used = now;
    }
}

fn checked(outcome: Outcome) -> anyhow::Result<u64> {
    if let Some(first) = outcome.first_failure {
        bail!(
            "{} failed calls under callgrind, first: {first}",
            outcome.failures
        );
    }
    Ok(outcome.ops)
}

fn control(pid: u32, what: &str) -> anyhow::Result<()> {
    let output = Command::new("callgrind_control")
        .arg(what)
        .arg(pid.to_string())
        .output()
        .context("running callgrind_control")?;
    if !output.status.success() {
        bail!(
            "callgrind_control {what} {pid} failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// Dumps the counters and returns the total instructions since the last zero.
fn dump(pid: u32, out: &Path) -> anyhow::Result<f64> {
    let before = dumps(out);
    control(pid, "--dump")?;
    // The dump is written by the server, asynchronously to the command.
    for _ in 0..500 {
        if let Some(file) = dumps(out).into_iter().find(|d| !before.contains(d))
            && let Ok(text) = std::fs::read_to_string(&file)
            && let Some(total) = total_instructions(&text)
        {
            return Ok(total);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!("no callgrind dump appeared next to {}", out.display())
}

/// The dump files callgrind wrote for `out` (`out.1`, `out.2`, …).
fn dumps(out: &Path) -> Vec<PathBuf> {
    let Some(dir) = out.parent() else {
        return Vec::new();
    };
    let prefix = format!("{}.", out.file_name().unwrap_or_default().to_string_lossy());
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The `totals:` (or `summary:`) line of a callgrind dump: its first event,
/// instructions executed (`Ir`).
pub fn total_instructions(dump: &str) -> Option<f64> {
    dump.lines()
        .find_map(|l| {
            l.strip_prefix("totals:")
                .or_else(|| l.strip_prefix("summary:"))
        })?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {
    use super::total_instructions;

    #[test]
    fn the_total_is_read_from_the_dump() {
        let dump = "version: 1\ncreator: callgrind-3.22.0\nevents: Ir\nfl=(1) a.c\n\
                    fn=(1) main\n3 1230\nsummary: 1230\n\n\ntotals: 1230\n";
        assert_eq!(total_instructions(dump), Some(1230.0));
        assert_eq!(total_instructions("events: Ir\n"), None);
    }
}
