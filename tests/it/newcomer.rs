//! The first five minutes, as a newcomer meets them: the real binary run
//! from an empty directory with its output redirected, its errors read the
//! way a person reads them (each cause once, the setting named with where its
//! value came from), `--help`, `user-manager config`, and the scripts the
//! README's quick start and test section use.

use std::{
    path::Path,
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::common::{
    BINARY, health_status,
    process::{READY, connectable, logged_listen},
    refusing_addr,
    tools::text,
};
use tonic_health::pb::health_check_response::ServingStatus;
use user_manager::proto::{UserRequest, user_manager_client::UserManagerClient};

const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// The binary as a newcomer runs it: from `dir` (no config/, no seed/), with
/// only PATH and `env` in its environment, stdout and stderr captured.
fn binary_in(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = Command::new(BINARY);
    command
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .envs(env.iter().copied())
        .current_dir(dir)
        .stdin(Stdio::null());
    command
}

fn run_in(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    binary_in(dir, args, env)
        .output()
        .expect("runs user-manager")
}

/// How often `needle` occurs in `haystack`.
fn count(haystack: &str, needle: &str) -> usize {
    haystack.matches(needle).count()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_binary_serves_the_embedded_seed_from_an_empty_directory() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("stdout.log");
    // The defaults alone, but the port (0: the binary reports the one it
    // bound in its log): the database lands in ./data, the seed is the one
    // compiled in, and the log is "pretty" into a file.
    let mut child = binary_in(
        dir.path(),
        &[],
        &[("USER_MANAGER__SERVER__LISTEN", "127.0.0.1:0")],
    )
    .stdout(std::fs::File::create(&log_path).unwrap())
    .stderr(Stdio::piped())
    .spawn()
    .expect("starts user-manager");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut url = None;
    while url.is_none()
        || health_status(url.as_deref().unwrap(), "").await != Some(ServingStatus::Serving)
    {
        url = url.or_else(|| {
            std::fs::read_to_string(&log_path)
                .unwrap_or_default()
                .lines()
                .find_map(|line| logged_listen(line, READY))
                .map(|addr| format!("http://{}", connectable(addr)))
        });
        if let Some(status) = child.try_wait().unwrap() {
            let out = child.wait_with_output().unwrap();
            panic!(
                "user-manager exited ({status}) from an empty directory: {}{}",
                std::fs::read_to_string(&log_path).unwrap_or_default(),
                text(&out.stderr)
            );
        }
        assert!(Instant::now() < deadline, "not SERVING within 20 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut client = UserManagerClient::connect(url.unwrap()).await.unwrap();
    let user = client
        .get_user(UserRequest { id: 1 })
        .await
        .unwrap()
        .into_inner()
        .user
        .expect("user 1 was seeded");
    assert_eq!(
        (user.nickname.as_str(), user.mail_address.as_str()),
        ("admin", "admin@example.com")
    );
    assert!(dir.path().join("data/users.db").is_file());

    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let log = std::fs::read_to_string(&log_path).unwrap();
    // Where the seed came from, in the import's own line.
    assert!(
        log.lines()
            .any(|l| l.contains("imported the seed") && l.contains("embedded")),
        "{log}"
    );
    // Redirected to a file: no colour codes.
    assert!(!log.contains("\x1b["), "ANSI escapes in a file:\n{log:?}");
    // The database was never unreadable, so it is not readable "again".
    assert!(!log.contains("readable again"), "{log}");
}

#[test]
fn a_fatal_startup_error_is_reported_once() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_in(
        dir.path(),
        &["migrate"],
        &[("USER_MANAGER__SEED__PATH", "missing/users.json")],
    );
    assert_eq!(out.status.code(), Some(1));
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert_eq!(count(&all, "missing/users.json"), 1, "{all}");
    assert_eq!(count(&all, "No such file or directory"), 1, "{all}");
    assert!(
        text(&out.stderr).starts_with("user-manager: seed file missing/users.json"),
        "{all}"
    );
}

#[test]
fn a_failed_healthcheck_names_each_cause_once_and_what_to_check() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens there: the port is bound by a socket that never listens.
    let (_held, addr) = refusing_addr();
    let addr = addr.to_string();
    let out = run_in(dir.path(), &["healthcheck", "--addr", &addr], &[]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&format!("is the server running on {addr}?")),
        "{stderr}"
    );
    let causes: Vec<&str> = stderr.trim_end().split(": ").collect();
    for (i, cause) in causes.iter().enumerate() {
        assert!(
            !causes[i + 1..].iter().any(|later| later.contains(cause)),
            "{cause:?} repeated in {stderr}"
        );
    }
    assert_eq!(count(&stderr, "onnection refused"), 1, "{stderr}");
}

#[test]
fn configuration_errors_name_key_source_value_and_choices_once() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    std::fs::write(&file, "[database.sqlite]\nsynchronous = \"off\"\n").unwrap();
    let file_arg = file.to_str().unwrap();
    for (args, env, expected) in [
        (
            &[][..],
            &[("USER_MANAGER__LOG__FORMAT", "xml")][..],
            "log.format = \"xml\" (env USER_MANAGER__LOG__FORMAT): expected one of \"pretty\", \"json\""
                .to_owned(),
        ),
        (
            &["--config", file_arg][..],
            &[],
            format!(
                "database.sqlite.synchronous = \"off\" (file {file_arg}): expected one of \"normal\", \"full\""
            ),
        ),
        (
            &[],
            &[("USER_MANAGER__SERVER__LISTEN", "nonsense")],
            "server.listen = \"nonsense\" (env USER_MANAGER__SERVER__LISTEN): expected an IP \
             address and port, e.g. \"127.0.0.1:1234\" or \"[::]:1234\""
                .to_owned(),
        ),
        (
            &[],
            &[("USER_MANAGER__LIMITS__MAX_MESSAGE_BYTES", "-1")],
            "limits.max_message_bytes = -1 (env USER_MANAGER__LIMITS__MAX_MESSAGE_BYTES): \
             expected a whole number from 0 to"
                .to_owned(),
        ),
        (
            &[],
            &[("USER_MANAGER__SERVER__LISTN", "127.0.0.1:1")],
            "(env USER_MANAGER__SERVER__LISTN): no such key; did you mean \
             USER_MANAGER__SERVER__LISTEN (server.listen)?"
                .to_owned(),
        ),
    ] {
        for command in [&["serve"][..], &["config"]] {
            let all_args: Vec<&str> = command.iter().chain(args).copied().collect();
            let out = run_in(dir.path(), &all_args, env);
            let stderr = text(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{all_args:?} {env:?}: {stderr}");
            assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
            assert_eq!(stderr.lines().count(), 1, "once: {stderr}");
            assert!(
                stderr.starts_with("user-manager: invalid configuration: ")
                    && stderr.contains(&expected),
                "{all_args:?} {env:?}:\n  got      {stderr}  expected {expected}"
            );
        }
    }
}

#[test]
fn help_explains_where_settings_come_from() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_in(dir.path(), &["--help"], &[]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    for needle in [
        "USER_MANAGER__SECTION__KEY",
        "USER_MANAGER__SERVER__LISTEN=",
        "APP_ENV",
        "config/$APP_ENV.toml",
        "--config FILE",
        "user-manager config",
    ] {
        assert!(help.contains(needle), "{needle} not in --help:\n{help}");
    }
    // In the order they apply.
    let at = |needle: &str| help.find(needle).unwrap();
    assert!(
        at("compiled into") < at("config/$APP_ENV.toml")
            && at("config/$APP_ENV.toml") < at("given with --config FILE")
            && at("given with --config FILE") < at("USER_MANAGER__SECTION__KEY"),
        "{help}"
    );
}

#[test]
fn config_redacts_values_not_emptiness_or_paths() {
    let dir = tempfile::tempdir().unwrap();
    let out = run_in(
        dir.path(),
        &["config"],
        &[
            ("USER_MANAGER__AUTH__TOKENS_FILE", "/run/secrets/tokens"),
            ("USER_MANAGER__AUTH__WRITE_TOKENS", "token-one-0123456789"),
        ],
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    for line in [
        "auth.tokens_file = \"/run/secrets/tokens\"  # env USER_MANAGER__AUTH__TOKENS_FILE",
        "auth.read_tokens = []  # default",
        "auth.write_tokens = [\"<redacted>\"]  # env USER_MANAGER__AUTH__WRITE_TOKENS",
        "seed.path = \"embedded\"  # default",
    ] {
        assert!(
            stdout.lines().any(|l| l == line),
            "{line} not in:\n{stdout}"
        );
    }
    assert!(!stdout.contains("token-one"), "{stdout}");
}

#[test]
fn the_supply_chain_check_is_a_ci_step_not_a_test() {
    let ci = std::fs::read_to_string(Path::new(REPO).join(".ci/run")).unwrap();
    assert!(
        ci.contains("cargo deny --offline --locked check licenses bans sources"),
        ".ci/run has no cargo deny step"
    );
    // No test needs cargo-deny: scripts/test runs on a machine without it.
    let call = ["\"deny\"", ","].concat();
    for entry in std::fs::read_dir(Path::new(REPO).join("tests")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "rs") {
            let source = std::fs::read_to_string(&path).unwrap();
            assert!(
                !source.contains(&call),
                "{} runs cargo deny",
                path.display()
            );
        }
    }
}

#[test]
fn scripts_test_names_what_it_cannot_install_before_building() {
    // A PATH with the shell and nothing else: no kubectl, and no cargo (so
    // reaching the build would fail differently).
    let stderr = scripts_test_stops_before_building(&[("bash", "bash"), ("dirname", "dirname")]);
    assert!(
        stderr.contains("missing kubectl") && stderr.contains("install-kubectl"),
        "{stderr}"
    );
}

/// Runs scripts/test with nothing on PATH but `tools` (each a name and the
/// system tool it links to); asserts it exits 2 at once, without building,
/// and returns what it printed on stderr.
fn scripts_test_stops_before_building(tools: &[(&str, &str)]) -> String {
    let bin = tempfile::tempdir().unwrap();
    for (name, tool) in tools {
        let found = ["/usr/bin", "/bin"]
            .iter()
            .map(|dir| Path::new(dir).join(tool))
            .find(|p| p.is_file())
            .unwrap_or_else(|| panic!("{tool} is not in /usr/bin or /bin"));
        std::os::unix::fs::symlink(found, bin.path().join(name)).unwrap();
    }
    let started = Instant::now();
    let out = Command::new("/usr/bin/env")
        .arg("bash")
        .arg(Path::new(REPO).join("scripts/test"))
        .env_clear()
        .env("PATH", bin.path())
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "it built first"
    );
    stderr
}

/// Past kubectl, Prometheus (tests/it/monitoring.rs) is named the same way,
/// with the exact command that installs it.
#[test]
fn scripts_test_names_a_missing_prometheus_before_building() {
    // The shell, and a kubectl that passes `command -v`; no prometheus,
    // promtool or cargo.
    let stderr = scripts_test_stops_before_building(&[
        ("bash", "bash"),
        ("dirname", "dirname"),
        ("kubectl", "true"),
    ]);
    assert!(
        stderr.contains("missing prometheus") && stderr.contains("apt-get install prometheus"),
        "{stderr}"
    );
}

#[test]
fn scripts_grpcurl_runs_the_pinned_grpcurl() {
    // Installs it into target/test-venv first if scripts/test has not.
    let out = Command::new(Path::new(REPO).join("scripts/grpcurl"))
        .arg("-version")
        .stdin(Stdio::null())
        .output()
        .expect("runs scripts/grpcurl");
    let all = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "{all}");
    assert!(all.contains("grpcurl v1.8.6"), "{all}");
}
