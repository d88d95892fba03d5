//! End to end, with clients this project did not write: the real grpcurl
//! binary (1.8.6, which only speaks v1alpha reflection) discovering the API
//! through reflection alone, the README's grpcurl examples, and Python grpcio,
//! the original service's users' client. `scripts/test` installs them into
//! target/test-venv and puts its bin directory on PATH.

use crate::common;

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    process::{Command, Output},
};

use crate::common::{
    Backend, ServerProcess, database_url, spawn_app, spawn_app_on,
    tools::{self, text},
};
use serde_json::{Value, json};

const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");
/// The address the README's examples use; tests swap in their server's.
const README_ADDR: &str = "localhost:1234";

/// The grpcurl on PATH.
fn grpcurl_path() -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("grpcurl"))
        .find(|candidate| candidate.is_file())
        .unwrap_or_else(|| {
            panic!(
                "grpcurl is not on PATH. Run the tests with scripts/test, which installs \
                 grpcurl 1.8.6 into target/test-venv/bin and puts that directory on PATH \
                 (or prepend {MANIFEST_DIR}/target/test-venv/bin to PATH yourself)"
            )
        })
}

/// Runs `command` to completion off the async runtime, whose threads keep
/// serving the in-process test server meanwhile.
async fn output_of(command: Command) -> Output {
    tools::output_async(
        command,
        "scripts/test installs the e2e clients into target/test-venv",
    )
    .await
}

/// grpcurl aimed at one server, in plaintext.
struct Grpcurl {
    bin: PathBuf,
    addr: String,
}

impl Grpcurl {
    fn new(addr: impl ToString) -> Self {
        Self {
            bin: grpcurl_path(),
            addr: addr.to_string(),
        }
    }

    /// `grpcurl -plaintext [-format-error] [-d DATA] ADDR ARGS...`.
    async fn run(&self, data: Option<&str>, args: &[&str]) -> Output {
        let mut command = Command::new(&self.bin);
        command.args(["-plaintext", "-format-error"]);
        if let Some(data) = data {
            command.args(["-d", data]);
        }
        command.arg(&self.addr).args(args);
        output_of(command).await
    }

    /// Text output of a command that must succeed.
    async fn ok_text(&self, args: &[&str]) -> String {
        let out = self.run(None, args).await;
        assert!(
            out.status.success(),
            "grpcurl {args:?} failed ({}): {}",
            out.status,
            text(&out.stderr)
        );
        text(&out.stdout)
    }

    /// The response messages of a call that must succeed.
    async fn call(&self, method: &str, data: &str) -> Vec<Value> {
        let out = self.run(Some(data), &[method]).await;
        assert!(
            out.status.success(),
            "grpcurl {method} -d {data} failed ({}): {}",
            out.status,
            text(&out.stderr)
        );
        json_values(&text(&out.stdout))
    }

    /// The status of a call that must fail: the JSON grpcurl's `-format-error`
    /// prints on stderr (`{"code": N, "message": ...}`); it exits with 64 + code.
    async fn call_err(&self, method: &str, data: &str) -> (i64, String) {
        let out = self.run(Some(data), &[method]).await;
        assert!(
            !out.status.success(),
            "grpcurl {method} -d {data} succeeded: {}",
            text(&out.stdout)
        );
        let error = json_values(&text(&out.stderr));
        let [error] = error.as_slice() else {
            panic!("expected one error object, got {error:?}");
        };
        let code = error["code"].as_i64().expect("a numeric code");
        assert_eq!(out.status.code().map(i64::from), Some(64 + code), "{error}");
        (
            code,
            error["message"].as_str().unwrap_or_default().to_owned(),
        )
    }
}

/// Every JSON value in `s`, one after the other (how grpcurl prints a stream).
fn json_values(s: &str) -> Vec<Value> {
    serde_json::Deserializer::from_str(s)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("not a sequence of JSON values ({e}): {s}"))
}

/// A response carrying `user`, as grpcurl prints it (defaults left out).
fn found(id: u32, nickname: &str, mail_address: &str, user_type: &str) -> Value {
    json!({"user": {
        "id": id,
        "nickname": nickname,
        "mailAddress": mail_address,
        "userType": user_type,
    }})
}

fn ids_of(responses: &[Value]) -> Vec<u64> {
    responses
        .iter()
        .map(|r| {
            r["user"]["id"]
                .as_u64()
                .unwrap_or_else(|| panic!("no user id in {r}"))
        })
        .collect()
}

/// grpc.StatusCode numbers grpcurl reports.
const NOT_FOUND: i64 = 5;
const INVALID_ARGUMENT: i64 = 3;

#[tokio::test(flavor = "multi_thread")]
async fn grpcurl_lists_and_describes_every_service_through_reflection() {
    let app = spawn_app().await;
    let grpcurl = Grpcurl::new(app.addr);

    let listed = grpcurl.ok_text(&["list"]).await;
    let services: BTreeSet<&str> = listed.lines().collect();
    assert_eq!(
        services,
        BTreeSet::from([
            "UserManager",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        ]),
        "grpcurl list"
    );

    let expected_rpcs: [(&str, &[&str]); 3] = [
        (
            "UserManager",
            &[
                "rpc AddUser ( .User ) returns ( .UserResponse );",
                "rpc CountAlreadyUsers ( stream .UserRequest ) returns ( .UserCntResponse );",
                "rpc GetUser ( .UserRequest ) returns ( .UserResponse );",
                "rpc GetUsersByIds ( stream .UserRequest ) returns ( stream .UserResponse );",
                "rpc GetUsersByType ( .UserTypeRequest ) returns ( stream .UserResponse );",
            ],
        ),
        (
            "grpc.health.v1.Health",
            &[
                "rpc Check ( .grpc.health.v1.HealthCheckRequest ) returns ( .grpc.health.v1.HealthCheckResponse );",
                "rpc Watch ( .grpc.health.v1.HealthCheckRequest ) returns ( stream .grpc.health.v1.HealthCheckResponse );",
            ],
        ),
        (
            "grpc.reflection.v1alpha.ServerReflection",
            &[
                "rpc ServerReflectionInfo ( stream .grpc.reflection.v1alpha.ServerReflectionRequest ) returns ( stream .grpc.reflection.v1alpha.ServerReflectionResponse );",
            ],
        ),
    ];
    for (service, rpcs) in expected_rpcs {
        let described = grpcurl.ok_text(&["describe", service]).await;
        assert!(
            described.starts_with(&format!("{service} is a service:")),
            "{described}"
        );
        let described_rpcs: Vec<&str> = described
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("rpc "))
            .collect();
        assert_eq!(described_rpcs, rpcs, "describe {service}");
    }

    // The messages resolve too: the request and response types a client needs.
    let user = grpcurl.ok_text(&["describe", "User"]).await;
    for field in [
        "uint32 id = 1;",
        "string nickname = 2;",
        "string mail_address = 3;",
        ".User.UserType user_type = 4;",
        "DISABLED = 4;",
    ] {
        assert!(user.contains(field), "{field} not in {user}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn grpcurl_get_user_finds_seeded_users_and_reports_missing_ones() {
    let app = spawn_app().await;
    let grpcurl = Grpcurl::new(app.addr);

    assert_eq!(
        grpcurl.call("UserManager/GetUser", r#"{"id": 5}"#).await,
        [found(5, "Zaru", "zaru@example.com", "NORMAL")]
    );
    for missing in ["0", "7", "4294967295"] {
        assert_eq!(
            grpcurl
                .call("UserManager/GetUser", &format!(r#"{{"id": {missing}}}"#))
                .await,
            [json!({"error": true, "message": "not found"})],
            "GetUser {missing}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn grpcurl_add_user_adds_refuses_duplicates_and_names_invalid_fields() {
    let app = spawn_app().await;
    let grpcurl = Grpcurl::new(app.addr);
    let add = "UserManager/AddUser";

    let ann =
        r#"{"id": 10, "nickname": "Ann", "mail_address": "ann@example.com", "user_type": "GUEST"}"#;
    let ann_found = found(10, "Ann", "ann@example.com", "GUEST");
    assert_eq!(
        grpcurl.call(add, ann).await,
        std::slice::from_ref(&ann_found)
    );

    let other = r#"{"id": 10, "nickname": "Bob", "mail_address": "bob@example.com", "user_type": "NORMAL"}"#;
    assert_eq!(
        grpcurl.call(add, other).await,
        [json!({"error": true, "message": "already exist"})]
    );
    assert_eq!(
        grpcurl.call("UserManager/GetUser", r#"{"id": 10}"#).await,
        [ann_found],
        "the duplicate left user 10 unchanged"
    );

    for (field, data) in [
        (
            "id",
            r#"{"nickname": "Cy", "mail_address": "cy@example.com", "user_type": "NORMAL"}"#,
        ),
        (
            "nickname",
            r#"{"id": 11, "nickname": "", "mail_address": "cy@example.com", "user_type": "NORMAL"}"#,
        ),
        (
            "mail_address",
            r#"{"id": 11, "nickname": "Cy", "mail_address": "cy at example.com", "user_type": "NORMAL"}"#,
        ),
        (
            "user_type",
            r#"{"id": 11, "nickname": "Cy", "mail_address": "cy@example.com", "user_type": "NONE"}"#,
        ),
        (
            "user_type",
            r#"{"id": 11, "nickname": "Cy", "mail_address": "cy@example.com", "user_type": 9}"#,
        ),
    ] {
        let (code, message) = grpcurl.call_err(add, data).await;
        assert_eq!(code, INVALID_ARGUMENT, "{data}: {message}");
        assert!(
            message.starts_with(&format!("invalid {field}:")),
            "{data}: {message:?} does not name {field}"
        );
    }
    assert_eq!(
        grpcurl.call("UserManager/GetUser", r#"{"id": 11}"#).await,
        [json!({"error": true, "message": "not found"})],
        "no rejected user was stored"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn grpcurl_get_users_by_type_streams_each_type_in_id_order() {
    let app = spawn_app().await;
    let grpcurl = Grpcurl::new(app.addr);
    let by_type = "UserManager/GetUsersByType";

    assert_eq!(
        grpcurl.call(by_type, r#"{"user_type": "NORMAL"}"#).await,
        [
            found(3, "foo", "foo@example.com", "NORMAL"),
            found(5, "Zaru", "zaru@example.com", "NORMAL"),
            found(6, "Saru", "saru@example.com", "NORMAL"),
        ]
    );
    for (user_type, ids) in [
        ("ADMINISTRATOR", vec![1]),
        ("GUEST", vec![2]),
        ("DISABLED", vec![4]),
        ("NONE", vec![]),
    ] {
        let data = format!(r#"{{"user_type": "{user_type}"}}"#);
        assert_eq!(
            ids_of(&grpcurl.call(by_type, &data).await),
            ids,
            "{user_type}"
        );
    }
    let (code, message) = grpcurl.call_err(by_type, r#"{"user_type": 9}"#).await;
    assert_eq!(code, INVALID_ARGUMENT, "{message}");
    assert!(message.contains("user_type"), "{message}");
}

#[tokio::test(flavor = "multi_thread")]
async fn grpcurl_count_already_users_counts_existing_ids_of_a_stream() {
    let app = spawn_app().await;
    let grpcurl = Grpcurl::new(app.addr);
    let count = "UserManager/CountAlreadyUsers";

    assert_eq!(
        grpcurl
            .call(
                count,
                r#"{"id": 1} {"id": 99} {"id": 3} {"id": 3} {"id": 0} {"id": 6}"#
            )
            .await,
        [json!({"userCnt": 4})]
    );
    // No message at all: a count of 0, which proto JSON leaves out.
    assert_eq!(grpcurl.call(count, "").await, [json!({})]);
}

#[tokio::test(flavor = "multi_thread")]
async fn grpcurl_get_users_by_ids_answers_each_existing_id_in_order() {
    let app = spawn_app().await;
    let grpcurl = Grpcurl::new(app.addr);

    let answers = grpcurl
        .call(
            "UserManager/GetUsersByIds",
            r#"{"id": 4} {"id": 99} {"id": 2} {"id": 4} {"id": 0} {"id": 1}"#,
        )
        .await;
    assert_eq!(
        answers,
        [
            found(4, "troll", "troll@example.com", "DISABLED"),
            found(2, "guest", "guest@example.com", "GUEST"),
            found(4, "troll", "troll@example.com", "DISABLED"),
            found(1, "admin", "admin@example.com", "ADMINISTRATOR"),
        ]
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn grpcurl_health_check_reports_serving() {
    let app = spawn_app().await;
    let grpcurl = Grpcurl::new(app.addr);
    let check = "grpc.health.v1.Health/Check";

    for service in ["", "UserManager", "readiness", "liveness"] {
        let data = format!(r#"{{"service": "{service}"}}"#);
        assert_eq!(
            grpcurl.call(check, &data).await,
            [json!({"status": "SERVING"})],
            "health of {service:?}"
        );
    }
    let (code, message) = grpcurl
        .call_err(check, r#"{"service": "NoSuchService"}"#)
        .await;
    assert_eq!(code, NOT_FOUND, "{message}");
}

/// One README example: a grpcurl command and the output documented after it.
struct Example {
    command: String,
    /// The info string of the output block: "json" or "text".
    kind: String,
    expected: String,
}

/// The fenced blocks of a Markdown document: (info string, body).
fn fenced_blocks(markdown: &str) -> Vec<(String, String)> {
    let mut blocks = Vec::new();
    let mut open: Option<(String, String)> = None;
    for line in markdown.lines() {
        match (&mut open, line.strip_prefix("```")) {
            (None, Some(info)) => open = Some((info.trim().to_owned(), String::new())),
            (Some(_), Some(_)) => blocks.extend(open.take()),
            (Some((_, body)), None) => {
                body.push_str(line);
                body.push('\n');
            }
            (None, None) => {}
        }
    }
    assert!(open.is_none(), "README.md has an unclosed code block");
    blocks
}

/// How the README runs grpcurl: the script that installs it on first use.
const README_GRPCURL: &str = "scripts/grpcurl ";

/// Every `sh` block that runs grpcurl, with the output block that must follow it.
fn readme_examples(markdown: &str) -> Vec<Example> {
    let blocks = fenced_blocks(markdown);
    let mut examples = Vec::new();
    for (i, (info, body)) in blocks.iter().enumerate() {
        if info != "sh" || !body.trim_start().starts_with(README_GRPCURL) {
            continue;
        }
        let Some((kind, expected)) = blocks
            .get(i + 1)
            .filter(|(kind, _)| kind == "json" || kind == "text")
        else {
            panic!("README example\n{body}is not followed by a json or text output block");
        };
        assert!(
            body.contains(README_ADDR),
            "README example\n{body}does not use {README_ADDR}"
        );
        examples.push(Example {
            command: body.clone(),
            kind: kind.clone(),
            expected: expected.clone(),
        });
    }
    examples
}

#[tokio::test(flavor = "multi_thread")]
async fn readme_grpcurl_examples() {
    readme_grpcurl_examples_on(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn readme_grpcurl_examples_on_postgres() {
    readme_grpcurl_examples_on(Backend::Postgres).await;
}

async fn readme_grpcurl_examples_on(backend: Backend) {
    let readme = read_readme();
    let examples = readme_examples(&readme);

    // The README shows every RPC and health; dropping one must not go unnoticed.
    for method in [
        "UserManager/GetUser",
        "UserManager/AddUser",
        "UserManager/GetUsersByType",
        "UserManager/CountAlreadyUsers",
        "UserManager/GetUsersByIds",
        "grpc.health.v1.Health/Check",
    ] {
        assert!(
            examples
                .iter()
                .any(|e| e.command.split_whitespace().any(|word| word == method)),
            "README.md has no grpcurl example of {method}"
        );
    }

    // The real binary, as `cargo run` starts it: the examples are run in
    // order against one freshly seeded server, as the README says.
    let dir = tempfile::tempdir().unwrap();
    let url = database_url(backend).await;
    let env: Vec<(&str, &str)> = url
        .iter()
        .map(|url| ("USER_MANAGER__DATABASE__URL", url.as_str()))
        .collect();
    let server = ServerProcess::start(dir.path(), &env).await;
    grpcurl_path(); // a clear message if grpcurl is missing, not sh's
    for example in &examples {
        let command = example
            .command
            .replace(README_ADDR, &server.addr.to_string());
        // From the repository root, as the README's commands are.
        let mut sh = Command::new("sh");
        sh.args(["-c", &command]).current_dir(MANIFEST_DIR);
        let out = output_of(sh).await;
        let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
        let context = format!(
            "README example\n{}exited with {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
            example.command, out.status
        );
        let expect_error = example.expected.starts_with("ERROR:");
        assert_eq!(out.status.success(), !expect_error, "{context}");
        if example.kind == "json" {
            assert_eq!(
                json_values(&stdout),
                json_values(&example.expected),
                "{context}"
            );
        } else {
            // grpcurl prints errors on stderr, everything else on stdout.
            let actual = if expect_error { &stderr } else { &stdout };
            assert_eq!(actual.trim_end(), example.expected.trim_end(), "{context}");
        }
    }
}

#[test]
fn readme_examples_are_extracted_with_their_outputs() {
    let markdown = "\
```sh
cargo run --release
```

```sh
scripts/grpcurl -plaintext -d '{\"id\": 1}' \\
  localhost:1234 UserManager/GetUser
```

```json
{\"user\": {}}
```

```sh
scripts/grpcurl -plaintext localhost:1234 list
```
```text
UserManager
```
";
    let examples = readme_examples(markdown);
    let summary: Vec<_> = examples
        .iter()
        .map(|e| (e.command.as_str(), e.kind.as_str(), e.expected.as_str()))
        .collect();
    assert_eq!(
        summary,
        [
            (
                "scripts/grpcurl -plaintext -d '{\"id\": 1}' \\\n  localhost:1234 UserManager/GetUser\n",
                "json",
                "{\"user\": {}}\n"
            ),
            (
                "scripts/grpcurl -plaintext localhost:1234 list\n",
                "text",
                "UserManager\n"
            ),
        ]
    );
}

#[test]
#[should_panic(expected = "is not followed by a json or text output block")]
fn a_readme_example_without_its_output_is_an_error() {
    readme_examples("```sh\nscripts/grpcurl -plaintext localhost:1234 list\n```\n");
}

/// The body of the README section under `heading` (up to the next `## `).
fn readme_section<'a>(markdown: &'a str, heading: &str) -> &'a str {
    let start = markdown
        .find(&format!("\n{heading}\n"))
        .unwrap_or_else(|| panic!("README.md has no {heading:?} section"))
        + heading.len()
        + 2;
    let rest = &markdown[start..];
    &rest[..rest.find("\n## ").unwrap_or(rest.len())]
}

/// The first two cells of each body row of the section's tables, backticks
/// removed from the first.
fn table_rows(section: &str) -> Vec<(String, String)> {
    section
        .lines()
        .filter_map(|line| line.trim().strip_prefix('|'))
        .map(|row| row.split(" | ").map(str::trim).collect::<Vec<_>>())
        .filter(|cells| cells.len() >= 2 && !cells[0].starts_with("---"))
        .map(|cells| (cells[0].replace('`', ""), cells[1].to_owned()))
        .collect()
}

fn read_readme() -> String {
    std::fs::read_to_string(Path::new(MANIFEST_DIR).join("README.md"))
        .expect("README.md is readable")
}

/// The binary with nothing but its embedded defaults: no environment, and a
/// working directory without config/.
fn bare_binary(args: &[&str]) -> (Output, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let mut command = Command::new(common::BINARY);
    command.args(args).env_clear().current_dir(dir.path());
    let out = tools::output(command, "cargo builds it");
    assert!(
        out.status.success(),
        "user-manager {args:?} failed ({}): {}",
        out.status,
        text(&out.stderr)
    );
    (out, dir)
}

#[test]
fn readme_lists_every_configuration_key_with_its_default() {
    // `user-manager config` prints `key = value  # source` for every key.
    let (out, _dir) = bare_binary(&["config"]);
    let effective: BTreeMap<String, String> = text(&out.stdout)
        .lines()
        .map(|line| {
            let (setting, _source) = line.rsplit_once("  # ").unwrap_or((line, ""));
            let (key, value) = setting
                .split_once(" = ")
                .unwrap_or_else(|| panic!("not `key = value`: {line}"));
            (key.to_owned(), format!("`{value}`"))
        })
        .collect();
    assert!(effective.contains_key("server.listen"), "{effective:?}");

    let readme = read_readme();
    let documented: BTreeMap<String, String> =
        table_rows(readme_section(&readme, "## Configuration"))
            .into_iter()
            .filter(|(key, _)| key != "Key")
            .collect();
    assert_eq!(
        documented.keys().collect::<Vec<_>>(),
        effective.keys().collect::<Vec<_>>(),
        "README.md's configuration table lists other keys than `user-manager config`"
    );
    // Secrets are printed redacted, so only their presence can be checked.
    for (key, value) in effective.iter().filter(|(_, v)| *v != "`\"<redacted>\"`") {
        assert_eq!(&documented[key], value, "README.md's default of {key}");
    }
}

#[test]
fn readme_lists_every_subcommand() {
    let (out, _dir) = bare_binary(&["--help"]);
    let help = text(&out.stdout);
    let commands: BTreeSet<String> = help
        .split_once("Commands:\n")
        .unwrap_or_else(|| panic!("no Commands: in --help:\n{help}"))
        .1
        .lines()
        .take_while(|line| !line.trim().is_empty())
        .filter_map(|line| line.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_owned)
        .collect();

    let readme = read_readme();
    let documented: BTreeSet<String> = table_rows(readme_section(&readme, "## Command line"))
        .into_iter()
        .filter_map(|(name, _)| name.split_whitespace().next().map(str::to_owned))
        .filter(|name| name != "Command")
        .collect();
    assert_eq!(
        documented, commands,
        "README.md's command table differs from --help"
    );
}

/// The venv's Python (where scripts/test installs grpcio), else python3.
fn python() -> PathBuf {
    let venv = Path::new(MANIFEST_DIR).join("target/test-venv/bin/python");
    if venv.is_file() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn python_grpcio_client_uses_every_rpc_health_and_reflection() {
    python_grpcio_client_on(Backend::Sqlite).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn python_grpcio_client_on_postgres() {
    python_grpcio_client_on(Backend::Postgres).await;
}

async fn python_grpcio_client_on(backend: Backend) {
    let app = spawn_app_on(backend).await;
    let script = Path::new(MANIFEST_DIR).join("tests/e2e/grpcio_client.py");
    let mut command = Command::new(python());
    command.arg(&script).arg(app.addr.to_string());
    let out = output_of(command).await;
    assert!(
        out.status.success(),
        "{} {} failed ({}); run scripts/test to install grpcio into target/test-venv\n\
         stdout:\n{}\nstderr:\n{}",
        python().display(),
        script.display(),
        out.status,
        text(&out.stdout),
        text(&out.stderr)
    );
    let stdout = text(&out.stdout);
    assert!(
        stdout.contains("all grpcio checks passed"),
        "the script did not finish its checks:\n{stdout}"
    );
}
