//! `bench`: user-manager measured against a bare tonic server of the same
//! proto, side by side in one run, every figure a ratio to that reference.
//!
//! `cargo run --release -p user-manager-bench -- --quick|--full|--smoke`
//! builds the release server, loads a fresh temporary database, runs every
//! workload against both servers, prints the report and (except in smoke
//! mode) writes it into BENCHMARKS.md. `--database-url postgres://…` runs
//! user-manager on that (empty) database instead, `--replicas N` as N
//! processes sharing it.

// In a binary nothing is reachable from outside: `pub` here means "used by
// another module of it", which is what the modules say.
#![allow(unreachable_pub)]

mod callgrind;
mod dataset;
mod load;
mod machine;
mod metrics_cost;
mod process;
mod reference;
mod report;

use std::{
    future::Future,
    net::SocketAddr,
    path::{Path, PathBuf},
    pin::Pin,
    process::{Command, ExitCode, Stdio},
    sync::{Arc, atomic::AtomicU32},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::Parser;
use tonic::transport::Channel;

use crate::{
    load::{Outcome, Window},
    machine::{Load, Sample, Sampler},
    process::{Database, Fleet, ServerProcess},
    report::{Measured, Report, Targets, min_ratio},
};

/// Streams in flight for GetUser and AddUser, spread over the connections.
const CALLERS: usize = 64;
/// HTTP/2 connections the load generator opens to each server.
const CONNECTIONS: usize = 4;
/// Ids per call of the short CountAlreadyUsers and GetUsersByIds calls.
const SHORT_IDS: u32 = 100;

/// Load user-manager and a bare tonic reference server side by side.
#[derive(Parser)]
#[command(about)]
struct Cli {
    /// Seconds: tiny sizes, checks that everything works (CI runs this).
    #[arg(long, conflicts_with_all = ["quick", "full"])]
    smoke: bool,
    /// About a minute: 1M users, one pass of every workload (the default).
    #[arg(long, conflicts_with = "full")]
    quick: bool,
    /// A few minutes: 1M users, best of three passes, longer windows.
    #[arg(long)]
    full: bool,
    /// The user-manager binary to measure (default: `cargo build --release` it).
    #[arg(long, value_name = "PATH")]
    server_bin: Option<PathBuf>,
    /// Where to write the results (default: BENCHMARKS.md, except with --smoke).
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Users in the database (default: 1,000,000; 2,000 with --smoke).
    #[arg(long)]
    users: Option<u32>,
    /// Another user-manager build to measure alongside, e.g. the code before
    /// a change (repeatable); shown in extra columns, not judged by the targets.
    #[arg(long, value_name = "PATH")]
    candidate_bin: Vec<PathBuf>,
    /// Directory for the temporary database (default: the system's temp dir).
    #[arg(long, value_name = "DIR")]
    db_dir: Option<PathBuf>,
    /// Run user-manager on this database instead of a temporary SQLite file,
    /// e.g. postgres://user:password@host:5432/db. It must be empty: the
    /// benchmark migrates it, imports its users through a seed file and adds
    /// users to it. (Candidates would share it, so no --candidate-bin.)
    #[arg(long, value_name = "URL", conflicts_with = "candidate_bin")]
    database_url: Option<String>,
    /// user-manager processes on the one database, clients spread over them
    /// round-robin, their CPU time and memory summed. More than one needs a
    /// PostgreSQL --database-url: a SQLite file has one writer.
    #[arg(long, value_name = "N", default_value_t = 1)]
    replicas: usize,
    /// Only count instructions per call under valgrind's callgrind (part of
    /// --quick and --full otherwise); writes nothing unless --out is given.
    #[arg(long, conflicts_with = "skip_instructions")]
    instructions: bool,
    /// Leave out the instruction counts (callgrind).
    #[arg(long)]
    skip_instructions: bool,
    /// Only measure the server's CPU per GetUser with metrics off and on
    /// (the /metrics listener scraped every second), and print both and the
    /// difference; writes nothing. Take the figure on an idle machine.
    #[arg(long, conflicts_with_all = ["instructions", "candidate_bin"])]
    metrics_cost: bool,
    /// Testing: judge as if other processes had kept N tasks runnable.
    #[arg(long, value_name = "N", hide = true)]
    pretend_load: Option<f64>,
    /// Internal: serve as the reference server on ADDR.
    #[arg(long, value_name = "ADDR", hide = true)]
    reference_server: Option<SocketAddr>,
}

/// Sizes and durations of one mode.
struct Plan {
    mode: &'static str,
    users: u32,
    /// Passes per workload; the best pass of each server is kept.
    passes: usize,
    window: Window,
    count_ids: u32,
    ids_per_stream: u32,
    starts: usize,
    instructions: callgrind::Sizes,
}

impl Plan {
    fn of(cli: &Cli) -> Self {
        let secs = Duration::from_secs_f64;
        let mut plan = if cli.smoke {
            Plan {
                mode: "smoke",
                users: 2_000,
                passes: 1,
                window: Window {
                    warmup: secs(0.1),
                    measure: secs(0.3),
                },
                count_ids: 5_000,
                ids_per_stream: 2_000,
                starts: 2,
                instructions: callgrind::Sizes {
                    warmup: 50,
                    get_user: 100,
                    by_ids: 10,
                },
            }
        } else if cli.full {
            Plan {
                mode: "full",
                users: 1_000_000,
                passes: 3,
                window: Window {
                    warmup: secs(1.0),
                    measure: secs(4.0),
                },
                count_ids: 1_000_000,
                ids_per_stream: 250_000,
                starts: 5,
                instructions: callgrind::Sizes {
                    warmup: 500,
                    get_user: 4_000,
                    by_ids: 200,
                },
            }
        } else {
            Plan {
                mode: "quick",
                users: 1_000_000,
                passes: 1,
                window: Window {
                    warmup: secs(0.5),
                    measure: secs(2.0),
                },
                count_ids: 1_000_000,
                ids_per_stream: 100_000,
                starts: 3,
                instructions: callgrind::Sizes {
                    warmup: 500,
                    get_user: 2_000,
                    by_ids: 100,
                },
            }
        };
        if let Some(users) = cli.users {
            plan.users = users;
        }
        plan
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(listen) = cli.reference_server {
        return match reference::serve(listen, cli.users.unwrap_or(0)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("reference server: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(0) => ExitCode::SUCCESS,
        Ok(failures) => {
            eprintln!("bench: {failures} responses were wrong or failed");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// One server under load, with the connections the load generator uses.
struct Side {
    name: String,
    server: Fleet,
    /// How to start it again: binary, database and where its logs go
    /// (user-manager servers only).
    restart: Option<(PathBuf, Database, PathBuf)>,
    channels: Vec<Channel>,
    /// The next id AddUser will add.
    next_id: Arc<AtomicU32>,
    startups: Vec<Duration>,
}

type Work<'a> = Pin<Box<dyn Future<Output = Outcome> + 'a>>;

/// One short-call workload: `CALLERS` callers each making `call` again
/// and again, both servers compared, at least 0.5× the reference's rate.
async fn short_workload(
    sides: &mut [Side],
    passes: usize,
    window: Window,
    report: &mut Report,
    name: &str,
    call: impl Fn(load::Client, &mut dataset::Rng) -> load::Call + Clone + Send + 'static,
) -> anyhow::Result<Vec<Measured>> {
    let measured = compare(sides, passes, |s| {
        Box::pin(load::short_calls(
            &s.channels,
            CALLERS,
            window,
            call.clone(),
        ))
    })
    .await?;
    report.workload(name, "call", &measured, min_ratio(0.5));
    Ok(measured)
}

/// Runs `work` against every server `passes` times, rotating which goes
/// first, and keeps each server's best pass: noise from other processes only
/// ever slows a pass down.
async fn compare(
    sides: &mut [Side],
    passes: usize,
    work: impl for<'a> Fn(&'a Side) -> Work<'a>,
) -> anyhow::Result<Vec<Measured>> {
    let n = sides.len();
    let mut best: Vec<Option<Measured>> = sides.iter().map(|_| None).collect();
    for pass in 0..passes {
        for i in (0..n).map(|k| (k + pass) % n) {
            let m = measure(&mut sides[i], &work).await?;
            let better = best[i].as_ref().is_none_or(|b| {
                (m.outcome.failures, -m.outcome.rate()) < (b.outcome.failures, -b.outcome.rate())
            });
            if better {
                best[i] = Some(m);
            }
        }
    }
    best.into_iter()
        .map(|m| m.context("no pass was run"))
        .collect()
}

/// Runs one workload against one server, with the server's CPU time and
/// peak memory over it.
async fn measure(
    side: &mut Side,
    work: impl for<'a> Fn(&'a Side) -> Work<'a>,
) -> anyhow::Result<Measured> {
    side.server.ensure_running()?;
    side.server.reset_peak();
    let cpu = side.server.cpu_time();
    let switches = side.server.context_switches();
    let outcome = work(side).await;
    let server_cpu = side.server.cpu_time().saturating_sub(cpu);
    let context_switches = match (switches, side.server.context_switches()) {
        (Some(before), Some(after)) => Some(after.saturating_sub(before)),
        _ => None,
    };
    let peak_rss_kib = side.server.peak_rss_kib();
    side.server.ensure_running()?;
    Ok(Measured {
        outcome,
        server_cpu,
        peak_rss_kib,
        context_switches,
    })
}

/// `replicas` user-manager servers over `db`, started at once, timed from
/// then until the last is SERVING. Their logs go to `logs`.
async fn start_user_manager(
    binary: &Path,
    db: &Database,
    logs: &Path,
    replicas: usize,
) -> anyhow::Result<(Fleet, Duration)> {
    let started = Instant::now();
    let mut servers = Vec::with_capacity(replicas);
    for i in 0..replicas {
        let log = match i {
            0 => logs.join("server.log"),
            i => logs.join(format!("server-{i}.log")),
        };
        servers.push(ServerProcess::user_manager(binary, db, &log)?);
    }
    let mut took = Duration::ZERO;
    for server in &mut servers {
        took = took.max(server.wait_serving(started).await?);
    }
    Ok((Fleet::new(servers), took))
}

/// The database the run is about: `--database-url`'s, and whether
/// `--replicas` can share it.
fn check_database(cli: &Cli) -> anyhow::Result<()> {
    if cli.replicas == 0 {
        bail!("--replicas must be at least 1");
    }
    let postgres = cli
        .database_url
        .as_deref()
        .is_some_and(|url| url.starts_with("postgres://") || url.starts_with("postgresql://"));
    if cli.replicas > 1 && !postgres {
        bail!(
            "--replicas {} needs a PostgreSQL database (--database-url postgres://…): \
             replicas share one database, and a SQLite file has one writer",
            cli.replicas
        );
    }
    Ok(())
}

/// Fails unless the database holds exactly the benchmark's users: the seed
/// was imported (a database seeded before keeps its old users) and nothing
/// was added since (AddUser would find its ids taken).
async fn check_dataset(side: &Side, users: u32) -> anyhow::Result<()> {
    use user_manager::proto::{UserRequest, user_manager_client::UserManagerClient};
    let client = UserManagerClient::new(side.channels[0].clone());
    let get = |id| {
        let mut client = client.clone();
        async move {
            client
                .get_user(UserRequest { id })
                .await
                .map(|r| r.into_inner().user)
        }
    };
    let last = get(users).await.context("reading the last user")?;
    if !last.is_some_and(|u| dataset::is_user(&u, users)) {
        bail!(
            "user {users} is not the benchmark's: the database was not empty \
             (its seed was imported before); give --database-url an empty database"
        );
    }
    if get(users + 1).await.is_ok_and(|u| u.is_some()) {
        bail!(
            "user {} exists: the database was used before; give --database-url an empty database",
            users + 1
        );
    }
    Ok(())
}

/// The candidates' column names: their file names, unless ambiguous.
fn candidate_names(paths: &[PathBuf]) -> Vec<String> {
    paths
        .iter()
        .enumerate()
        .map(|(i, p)| match p.file_name().and_then(|n| n.to_str()) {
            Some(name) if name != "user-manager" => name.to_owned(),
            _ => format!("candidate {}", i + 1),
        })
        .collect()
}

async fn run(cli: Cli) -> anyhow::Result<u64> {
    check_database(&cli)?;
    let load_before = Sample::now();
    let plan = Plan::of(&cli);
    if cfg!(debug_assertions) && !cli.smoke {
        eprintln!("bench: warning: the load generator is a debug build; use `cargo run --release`");
    }
    let binary = match &cli.server_bin {
        Some(path) => path.clone(),
        None => build_server()?,
    };
    let tmp = match &cli.db_dir {
        Some(dir) => tempfile::Builder::new()
            .prefix("user-manager-bench.")
            .tempdir_in(dir),
        None => tempfile::Builder::new()
            .prefix("user-manager-bench.")
            .tempdir(),
    }
    .context("creating the temporary database directory")?;

    eprintln!(
        "bench: {} mode, {} users, databases in {}",
        plan.mode,
        plan.users,
        tmp.path().display()
    );
    let prepared = Instant::now();
    let logs = tmp.path().join("user-manager");
    std::fs::create_dir_all(&logs)?;
    let db = match &cli.database_url {
        Some(url) => Database::Url(url.clone()),
        None => Database::File(logs.join("users.db")),
    };
    let mut migrate = process::user_manager_command(&binary, &db);
    migrate.arg("migrate").stdout(Stdio::null());
    if cli.database_url.is_some() {
        // Through the service's own seed import: works on any backend.
        let seed = tmp.path().join("seed.json");
        dataset::write_seed(&seed, plan.users)?;
        migrate.env("USER_MANAGER__SEED__PATH", &seed);
    }
    let migrated = migrate.status().context("running user-manager migrate")?;
    if !migrated.success() {
        bail!("user-manager migrate failed ({migrated})");
    }
    let mut servers = vec![("user-manager".to_owned(), binary.clone(), db.clone(), logs)];
    if let Database::File(file) = &db {
        dataset::populate(file, plan.users).await?;
        // Each user-manager server gets its own database (AddUser writes to
        // it), migrated by its own build: a candidate from before a schema
        // change must not find migrations it doesn't know.
        for (name, path) in candidate_names(&cli.candidate_bin)
            .into_iter()
            .zip(&cli.candidate_bin)
        {
            let dir = tmp.path().join(format!("candidate-{}", servers.len()));
            std::fs::create_dir_all(&dir)?;
            let file = dir.join("users.db");
            let mut migrate = process::user_manager_command(path, &Database::File(file.clone()));
            migrate.arg("migrate").stdout(Stdio::null());
            let migrated = migrate
                .status()
                .context("running the candidate's migrate")?;
            if !migrated.success() {
                bail!("{} migrate failed ({migrated})", path.display());
            }
            dataset::populate(&file, plan.users).await?;
            servers.push((name, path.clone(), Database::File(file), dir));
        }
    }
    eprintln!(
        "bench: database ready in {:.1} s",
        prepared.elapsed().as_secs_f64()
    );
    let sampler = Sampler::start();
    let callgrind_dir = tmp.path().join("callgrind");
    std::fs::create_dir_all(&callgrind_dir)?;

    if cli.metrics_cost {
        eprintln!("bench: server CPU per GetUser, metrics off and on");
        let (cost, failures) = metrics_cost::measure(
            &binary,
            &db,
            &servers[0].3,
            plan.users,
            plan.window,
            plan.passes,
        )
        .await?;
        print!("{}", cost.render(plan.passes));
        return Ok(failures);
    }
    if cli.instructions {
        let mut report = Report::new(servers.iter().map(|s| s.0.clone()).collect());
        report.sides.insert(0, "reference".into());
        count_instructions(&mut report, &plan, &servers, &callgrind_dir).await;
        let load = judged_load(&cli, load_before, sampler.stop());
        let results = conclude(&mut report, &cli, &plan, &binary, tmp.path(), load);
        if let Some(out) = &cli.out {
            report::write_into(out, block_label(&cli).as_deref(), &results)?;
            eprintln!("bench: results written to {}", out.display());
        }
        return Ok(report.failures);
    }
    let instruction_targets = servers.clone();

    let mut reference = ServerProcess::reference(plan.users)?;
    reference.wait_answering().await?;
    let mut sides = vec![Side {
        name: "reference".into(),
        server: Fleet::new(vec![reference]),
        restart: None,
        channels: Vec::new(),
        next_id: Arc::new(AtomicU32::new(plan.users + 1)),
        startups: Vec::new(),
    }];
    for (name, binary, db, logs) in servers {
        let (server, took) = start_user_manager(&binary, &db, &logs, cli.replicas).await?;
        sides.push(Side {
            name,
            server,
            restart: Some((binary, db, logs)),
            channels: Vec::new(),
            next_id: Arc::new(AtomicU32::new(plan.users + 1)),
            startups: vec![took],
        });
    }
    // Idle memory once the processes settled (the health checker has run).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle: Vec<Option<u64>> = sides.iter().map(|s| s.server.rss_kib()).collect();
    for side in &mut sides {
        side.channels = side.server.connect(CONNECTIONS).await?;
    }
    if cli.database_url.is_some() {
        check_dataset(&sides[1], plan.users).await?;
    }

    let (users, window) = (plan.users, plan.window);
    let mut report = Report::new(sides.iter().map(|s| s.name.clone()).collect());
    report.table("Workload", true);

    eprintln!("bench: GetUser");
    let get_user = compare(&mut sides, plan.passes, |s| {
        Box::pin(load::get_user(&s.channels, users, CALLERS, window, None))
    })
    .await?;
    report.workload(
        &format!("GetUser, {CALLERS} callers"),
        "request",
        &get_user,
        Targets {
            min_ratio: Some(0.75),
            max_cpu_ratio: Some(1.5),
            max_switches: Some(0.5),
        },
    );

    // "No slower than today" needs today's build beside it: --candidate-bin.
    eprintln!("bench: GetUser, one caller");
    let lone = compare(&mut sides, plan.passes, |s| {
        Box::pin(load::get_user(&s.channels, users, 1, window, None))
    })
    .await?;
    report.workload("GetUser, 1 caller", "request", &lone, report::NO_TARGET);

    eprintln!("bench: GetUser at half of the peak rate");
    let mut paced = Vec::new();
    for (side, peak) in sides.iter_mut().zip(&get_user) {
        let rate = peak.outcome.rate() / 2.0;
        paced.push(
            measure(side, |s| {
                Box::pin(load::get_user(
                    &s.channels,
                    users,
                    CALLERS,
                    window,
                    Some(rate),
                ))
            })
            .await?,
        );
    }
    report.paced(
        "GetUser at half its peak rate",
        &paced,
        Duration::from_millis(1),
    );

    eprintln!("bench: short calls");
    let rare = dataset::rare_ids(users).count();
    let short_by_type = short_workload(
        &mut sides,
        plan.passes,
        window,
        &mut report,
        &format!("GetUsersByType, {rare} users per call, {CALLERS} callers"),
        load::by_rare_type_call(users),
    )
    .await?;
    let short_count = short_workload(
        &mut sides,
        plan.passes,
        window,
        &mut report,
        &format!("CountAlreadyUsers, {SHORT_IDS} ids per call, {CALLERS} callers"),
        load::count_call(users, SHORT_IDS),
    )
    .await?;
    let short_by_ids = short_workload(
        &mut sides,
        plan.passes,
        window,
        &mut report,
        &format!("GetUsersByIds, {SHORT_IDS} ids per call, {CALLERS} callers"),
        load::by_ids_call(users, SHORT_IDS),
    )
    .await?;

    eprintln!("bench: GetUsersByType");
    let by_type = compare(&mut sides, plan.passes, |s| {
        Box::pin(load::users_by_type(&s.channels[0], users))
    })
    .await?;
    report.workload(
        &format!(
            "GetUsersByType, {} of {} users",
            dataset::streamed_count(users),
            users
        ),
        "message",
        &by_type,
        min_ratio(0.5),
    );

    eprintln!("bench: CountAlreadyUsers");
    let count_ids = plan.count_ids;
    let count = compare(&mut sides, plan.passes, |s| {
        Box::pin(load::count_already_users(&s.channels[0], users, count_ids))
    })
    .await?;
    report.workload(
        &format!("CountAlreadyUsers, {count_ids} ids in one stream"),
        "id",
        &count,
        min_ratio(0.5),
    );

    eprintln!("bench: GetUsersByIds");
    let ping_pong = compare(&mut sides, plan.passes, |s| {
        Box::pin(load::users_by_ids_ping_pong(&s.channels[0], users, window))
    })
    .await?;
    report.workload(
        "GetUsersByIds, ping-pong on one stream",
        "round trip",
        &ping_pong,
        min_ratio(0.75),
    );
    let per_stream = plan.ids_per_stream;
    let by_ids = compare(&mut sides, plan.passes, |s| {
        Box::pin(load::users_by_ids_bulk(&s.channels, users, per_stream))
    })
    .await?;
    report.workload(
        &format!("GetUsersByIds, {CONNECTIONS} streams of {per_stream} ids"),
        "message",
        &by_ids,
        min_ratio(0.5),
    );

    // Last, because it grows the database the other workloads check against.
    eprintln!("bench: AddUser");
    let add_user = compare(&mut sides, plan.passes, |s| {
        Box::pin(load::add_user(
            &s.channels,
            s.next_id.clone(),
            CALLERS,
            window,
        ))
    })
    .await?;
    report.workload(
        &format!("AddUser, {CALLERS} callers"),
        "request",
        &add_user,
        min_ratio(0.5),
    );

    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle_after: Vec<Option<u64>> = sides.iter().map(|s| s.server.rss_kib()).collect();
    let all = [
        &get_user,
        &lone,
        &paced,
        &short_by_type,
        &short_count,
        &short_by_ids,
        &by_type,
        &count,
        &ping_pong,
        &by_ids,
        &add_user,
    ];
    let peaks: Vec<Option<u64>> = (0..sides.len())
        .map(|i| all.iter().filter_map(|w| w[i].peak_rss_kib).max())
        .collect();

    eprintln!("bench: start-up");
    let mut idle_fresh = vec![None];
    let mut startups = Vec::new();
    for side in sides.drain(..) {
        let Some((binary, db, logs)) = side.restart else {
            continue;
        };
        side.server.terminate()?;
        let mut samples = side.startups;
        let mut fresh = None;
        for _ in 0..plan.starts {
            let (server, took) = start_user_manager(&binary, &db, &logs, cli.replicas).await?;
            samples.push(took);
            if fresh.is_none() {
                tokio::time::sleep(Duration::from_millis(500)).await;
                fresh = server.rss_kib();
            }
            server.terminate()?;
        }
        idle_fresh.push(fresh);
        startups.push(samples);
    }

    report.text("");
    report.table("Memory and start-up", false);
    let idle_start: Vec<Option<u64>> = idle
        .iter()
        .zip(&idle_fresh)
        .map(|(a, b)| (*a).max(*b))
        .collect();
    report.memory("resident, idle after start", &idle_start, Some(32.0));
    report.memory(
        "resident, idle after the workloads",
        &idle_after,
        Some(48.0),
    );
    report.memory("peak resident, all workloads", &peaks, None);
    let peak_of = |w: &[Measured]| w.iter().map(|m| m.peak_rss_kib).collect::<Vec<_>>();
    report.memory(
        "peak resident, GetUsersByType stream",
        &peak_of(&by_type),
        Some(64.0),
    );
    report.memory(
        "peak resident, CountAlreadyUsers stream",
        &peak_of(&count),
        Some(64.0),
    );
    report.memory(
        "peak resident, GetUsersByIds streams",
        &peak_of(&by_ids),
        Some(64.0),
    );
    report.startup(
        &format!("start to SERVING, {users} users"),
        &mut startups,
        Duration::from_millis(300),
    );

    if cli.smoke {
        // Valgrind's start-up alone takes seconds: `--smoke --instructions`.
        report
            .text("\nInstructions per call: not counted in smoke mode (`--smoke --instructions`).");
    } else if !cli.skip_instructions {
        count_instructions(&mut report, &plan, &instruction_targets, &callgrind_dir).await;
    }

    let load = judged_load(&cli, load_before, sampler.stop());
    let results = conclude(&mut report, &cli, &plan, &binary, tmp.path(), load);
    let out = match (&cli.out, cli.smoke) {
        (Some(out), _) => Some(out.clone()),
        (None, false) => Some(workspace_root().join("BENCHMARKS.md")),
        (None, true) => None,
    };
    if let Some(out) = out {
        report::write_into(&out, block_label(&cli).as_deref(), &results)?;
        eprintln!("bench: results written to {}", out.display());
    }
    Ok(report.failures)
}

/// The report under its context line (mode, machine, load, database),
/// printed; what is written into BENCHMARKS.md.
fn conclude(
    report: &mut Report,
    cli: &Cli,
    plan: &Plan,
    binary: &Path,
    db_dir: &Path,
    load: Load,
) -> String {
    report.load = Some(load);
    let results = format!(
        "{}\n{}",
        context(plan, cli, binary, db_dir, &load),
        report.render()
    );
    println!("{results}");
    results
}

/// How busy the machine was over the run (or `--pretend-load`'s figure).
fn judged_load(cli: &Cli, before: Option<Sample>, samples: Vec<Sample>) -> Load {
    let cores = machine::cores();
    match cli.pretend_load {
        Some(others) => Load::fixed(cores, others),
        None => Load::of(cores, before, &samples),
    }
}

/// The callgrind phase: instructions per call on every server, one after
/// the other with nothing else of the benchmark running. A phase that
/// cannot run or fails says so in the report; the run goes on.
async fn count_instructions(
    report: &mut Report,
    plan: &Plan,
    servers: &[(String, PathBuf, Database, PathBuf)],
    dir: &Path,
) {
    report.text("");
    if let Some(why) = callgrind::unavailable() {
        report.text(&format!("Instructions per call: {why}."));
        return;
    }
    eprintln!("bench: instructions per call (callgrind)");
    let started = Instant::now();
    let sizes = plan.instructions;
    let mut counts = Vec::new();
    let mut first = Ok(());
    let reference = callgrind::count(
        callgrind::Target::Reference,
        plan.users,
        sizes,
        dir,
        "reference",
    );
    match reference.await {
        Ok(c) => counts.push(c),
        Err(e) => first = Err(e.context("the reference")),
    }
    for (i, (name, binary, db, logs)) in servers.iter().enumerate() {
        if first.is_err() {
            break;
        }
        let log = logs.join("callgrind.log");
        let target = callgrind::Target::UserManager {
            binary,
            db,
            log: &log,
        };
        match callgrind::count(target, plan.users, sizes, dir, &format!("server-{i}")).await {
            Ok(c) => counts.push(c),
            Err(e) => first = Err(e.context(name.clone())),
        }
    }
    if let Err(e) = first {
        report.text(&format!("Instructions per call: **failed**: {e:#}."));
        return;
    }
    report.table("Instructions per call (callgrind, user space)", false);
    report.figures(
        &format!("GetUser, {} calls from 8 callers", sizes.get_user),
        &counts.iter().map(|c| c.get_user).collect::<Vec<_>>(),
        report::kilo,
    );
    report.figures(
        &format!(
            "GetUsersByIds, {} ids per call, {} calls from 8 callers",
            callgrind::IDS_PER_CALL,
            sizes.by_ids
        ),
        &counts.iter().map(|c| c.by_ids).collect::<Vec<_>>(),
        report::kilo,
    );
    report.text(&format!(
        "\nCounted under `valgrind --tool=callgrind` after {} warm-up calls, \
         every thread of the server; the kernel's side (system calls, context \
         switches) is not in them. Phase took {:.0} s.",
        sizes.warmup,
        started.elapsed().as_secs_f64()
    ));
}

/// Which block of BENCHMARKS.md a run writes: SQLite's is the unlabelled
/// one; each database and replica count has its own beside it.
fn block_label(cli: &Cli) -> Option<String> {
    let url = cli.database_url.as_deref()?;
    let backend = url.split_once(':').map_or(url, |(scheme, _)| scheme);
    let backend = if backend == "postgresql" {
        "postgres"
    } else {
        backend
    };
    let replicas = match cli.replicas {
        1 => "1 replica".to_owned(),
        n => format!("{n} replicas"),
    };
    Some(format!("{backend}, {replicas}"))
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Builds the release server with cargo and returns the binary's path.
fn build_server() -> anyhow::Result<PathBuf> {
    eprintln!("bench: cargo build --release --bin user-manager");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let output = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--bin",
            "user-manager",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(workspace_root())
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo build")?;
    if !output.status.success() {
        bail!("cargo build --release --bin user-manager failed");
    }
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|m| m["target"]["name"] == "user-manager")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .context("cargo did not report the user-manager executable")
}

/// What the numbers depend on: mode, machine, load, code version.
fn context(plan: &Plan, cli: &Cli, binary: &Path, db_dir: &Path, load: &Load) -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .current_dir(workspace_root())
            .output()
            .ok()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default()
    };
    let commit = git(&["rev-parse", "--short", "HEAD"]);
    let dirty = if git(&["status", "--porcelain", "--untracked-files=no"]).is_empty() {
        ""
    } else {
        " with uncommitted changes"
    };
    let date = Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M UTC"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let filesystem = Command::new("df")
        .args(["--output=fstype"])
        .arg(db_dir)
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .nth(1)
                .map(str::to_owned)
        })
        .unwrap_or_else(|| "unknown".into());
    let database = match &cli.database_url {
        None => format!(
            "{} users in a fresh {filesystem} temporary directory",
            plan.users
        ),
        Some(url) => format!(
            "{} users in {}, imported through a seed file; {} user-manager process(es) on it, \
             connections spread round-robin, server CPU and memory summed over them",
            plan.users,
            process::redact(url),
            cli.replicas
        ),
    };
    let mut flags = String::new();
    if let Some(url) = &cli.database_url {
        flags.push_str(&format!(" --database-url {}", process::redact(url)));
    }
    if cli.replicas > 1 {
        flags.push_str(&format!(" --replicas {}", cli.replicas));
    }
    format!(
        "Latest run: `bench --{mode}{flags}` on {date}, commit {commit}{dirty}.\n\
         Machine: **{cores} cores** ({cpu}); load generator, reference and user-manager \
         share them over loopback.\n\
         {load}\n\
         Database: {database}; server binary {binary}.\n\
         GetUser and AddUser: {CALLERS} callers over {CONNECTIONS} HTTP/2 connections; \
         {passes} pass(es) per workload, each server's best kept; windows of {measure:.1} s after {warmup:.1} s warm-up.\n",
        mode = plan.mode,
        load = load.describe(),
        binary = binary.display(),
        passes = plan.passes,
        measure = plan.window.measure.as_secs_f64(),
        warmup = plan.window.warmup.as_secs_f64(),
    )
}
