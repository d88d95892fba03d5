//! External commands: the tools the tests drive (grpcurl, python, kubectl,
//! kubernetes-validate, docker-compose, hadolint, cargo), run to completion.

use std::process::{Command, Output, Stdio};

/// The repository root, where tools run.
pub const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// Runs `program` from the repository root, stdin closed, and returns its
/// output whatever its exit status. A program that can't be started fails
/// the test, saying where it `comes_from`.
pub fn run_tool(program: &str, args: &[&str], comes_from: &str) -> Output {
    let mut command = Command::new(program);
    command.args(args).current_dir(REPO);
    output(command, comes_from)
}

/// Like [`run_tool`], for a tool that must succeed: its stdout.
pub fn run_tool_ok(program: &str, args: &[&str], comes_from: &str) -> String {
    success(
        &format!("{program} {args:?}"),
        run_tool(program, args, comes_from),
    )
}

/// Runs `command` to completion, stdin closed.
pub fn output(mut command: Command, comes_from: &str) -> Output {
    let shown = format!("{command:?}");
    match command.stdin(Stdio::null()).output() {
        Ok(output) => output,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("{shown}: not installed: {comes_from}")
        }
        Err(e) => panic!("running {shown}: {e}"),
    }
}

/// [`output`] off the async runtime, whose threads keep serving an
/// in-process test server meanwhile.
pub async fn output_async(command: Command, comes_from: &'static str) -> Output {
    tokio::task::spawn_blocking(move || output(command, comes_from))
        .await
        .unwrap()
}

/// The stdout of `what`, which must have succeeded; else its output fails the test.
pub fn success(what: &str, output: Output) -> String {
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}{}",
        output.status,
        text(&output.stdout),
        text(&output.stderr)
    );
    text(&output.stdout)
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
