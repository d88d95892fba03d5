//! deploy/monitoring: the Grafana dashboard, the Prometheus alert rules and
//! their wiring into compose and Kubernetes, checked by the tools that read
//! them, and then run: a real Prometheus (Debian's `prometheus`, which
//! scripts/test asks for) scrapes the real server under load, and every
//! PromQL expression of the dashboard and of the rules must return data
//! through its HTTP API. So a metric renamed on the server, a label the
//! dashboard misspells or a rule that doesn't parse fails here, not on an
//! operator's screen.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use futures::stream;
use rcgen::{CertificateParams, KeyPair};
use serde_json::Value as Json;
use serde_norway::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use user_manager::{
    config::{Settings, Sources},
    proto::{UserRequest, UserTypeRequest},
};

use crate::{
    common::{
        Binary, ServerProcess, free_port, grpc_frame, postgres, raw_grpc_call,
        tools::{REPO, run_tool, success},
        user,
    },
    k8s::{Manifests, kustomize},
};

const MONITORING: &str = "deploy/monitoring";
const ALERTS: &str = "deploy/monitoring/prometheus/alerts.yml";
const ALERTS_TEST: &str = "deploy/monitoring/prometheus/alerts.test.yml";
const DASHBOARD: &str = "deploy/monitoring/grafana/dashboards/user-manager.json";
const DATASOURCES: &str = "deploy/monitoring/grafana/provisioning/datasources/prometheus.yaml";
const DASHBOARD_PROVIDERS: &str =
    "deploy/monitoring/grafana/provisioning/dashboards/user-manager.yaml";
const RUNBOOK: &str = "deploy/monitoring/RUNBOOK.md";
const COMPOSE_MONITORING: &str = "deploy/compose.monitoring.yaml";
const OVERLAY: &str = "deploy/k8s/overlays/monitoring";
const PROMETHEUS_COMES_FROM: &str =
    "Debian's package: apt-get install prometheus (scripts/test names it, .ci/run installs it)";
const COMPOSE_COMES_FROM: &str =
    "scripts/test installs it into target/compose-venv (tests/requirements-compose.txt)";
/// The job label the rules and the dashboard select.
const JOB: &str = "user-manager";

/// The series the server exports (README, Metrics), by name as Prometheus
/// sees them; histograms add `_bucket`, `_sum` and `_count`.
const SERIES: [&str; 7] = [
    "user_manager_rpc_server_active_calls",
    "user_manager_limit_refusals_total",
    "user_manager_tls_handshake_failures_total",
    "user_manager_ready",
    "db_client_connection_count",
    "db_client_connection_max",
    "user_manager_db_sqlite_wal_size_bytes",
];
const HISTOGRAMS: [&str; 4] = [
    "rpc_server_call_duration_seconds",
    "db_client_operation_duration_seconds",
    "db_client_connection_wait_time_seconds",
    "user_manager_db_group_commit_size",
];
/// What Prometheus adds itself.
const PROMETHEUS_SERIES: [&str; 1] = ["up"];

fn read(path: &str) -> String {
    std::fs::read_to_string(Path::new(REPO).join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn yaml(path: &str) -> Value {
    serde_norway::from_str(&read(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn known_series() -> BTreeSet<String> {
    let mut known: BTreeSet<String> = SERIES
        .iter()
        .chain(&PROMETHEUS_SERIES)
        .map(|s| s.to_string())
        .collect();
    for histogram in HISTOGRAMS {
        for suffix in ["_bucket", "_sum", "_count"] {
            known.insert(format!("{histogram}{suffix}"));
        }
    }
    known
}

// ---------------------------------------------------------------- PromQL, as far as these tests read it

/// `expr` without string literals, label matchers (`{...}`), ranges
/// (`[...]`) and grouping label lists (`by (...)`, `on (...)`, ...): what is
/// left names metrics, functions, operators and numbers.
fn strip_promql(expr: &str) -> String {
    let mut out = String::new();
    let mut chars = expr.chars().peekable();
    let mut depth_braces = 0;
    let mut depth_brackets = 0;
    while let Some(c) = chars.next() {
        match c {
            '"' | '\'' => {
                while let Some(d) = chars.next() {
                    if d == '\\' {
                        chars.next();
                    } else if d == c {
                        break;
                    }
                }
                out.push(' ');
            }
            '{' => depth_braces += 1,
            '}' => {
                depth_braces -= 1;
                out.push(' ');
            }
            '[' => depth_brackets += 1,
            ']' => {
                depth_brackets -= 1;
                out.push(' ');
            }
            _ if depth_braces > 0 || depth_brackets > 0 => {}
            _ => out.push(c),
        }
    }
    let mut result = String::new();
    let mut rest = out.as_str();
    // Grouping clauses and their label lists go entirely, so an aggregation
    // (`sum by (x) (...)`) reads as the call it is.
    while let Some((word, at)) = next_identifier(rest) {
        result.push_str(&rest[..at]);
        rest = &rest[at + word.len()..];
        let grouping = [
            "by",
            "without",
            "on",
            "ignoring",
            "group_left",
            "group_right",
        ]
        .contains(&word);
        if !grouping {
            result.push_str(word);
        } else {
            let trimmed = rest.trim_start();
            if let Some(list) = trimmed.strip_prefix('(') {
                let end = list.find(')').expect("a closed label list");
                rest = &list[end + 1..];
                result.push(' ');
            }
        }
    }
    result.push_str(rest);
    result
}

/// The first identifier in `text` and its byte offset.
fn next_identifier(text: &str) -> Option<(&str, usize)> {
    let is_start = |c: char| c.is_ascii_alphabetic() || c == '_' || c == ':';
    let is_part = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut previous = ' ';
    for (i, c) in text.char_indices() {
        // Not the exponent or the digits of a number (1e3, 0x1f).
        if is_start(c) && !is_part(previous) && previous != '.' {
            let end = text[i..]
                .find(|c: char| !is_part(c))
                .map_or(text.len(), |e| i + e);
            return Some((&text[i..end], i));
        }
        previous = c;
    }
    None
}

/// The metric names `expr` selects.
fn metric_names(expr: &str) -> BTreeSet<String> {
    const KEYWORDS: [&str; 14] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "and",
        "or",
        "unless",
        "offset",
        "bool",
        "inf",
        "nan",
        "atan2",
    ];
    let stripped = strip_promql(expr);
    let mut names = BTreeSet::new();
    let mut rest = stripped.as_str();
    while let Some((word, at)) = next_identifier(rest) {
        rest = &rest[at + word.len()..];
        let is_call = rest.trim_start().starts_with('(');
        if !is_call && !KEYWORDS.contains(&word.to_lowercase().as_str()) {
            names.insert(word.to_owned());
        }
    }
    names
}

/// The labels `expr` aggregates by (`by (...)`), which its result keeps;
/// `le` is histogram_quantile's to consume.
fn grouping_labels(expr: &str) -> BTreeSet<String> {
    let mut labels = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("by") {
        let before = rest[..at].chars().next_back().unwrap_or(' ');
        rest = &rest[at + 2..];
        if before.is_alphanumeric() || before == '_' {
            continue;
        }
        if let Some(list) = rest.trim_start().strip_prefix('(') {
            let end = list.find(')').expect("a closed label list");
            labels.extend(
                list[..end]
                    .split(',')
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && *l != "le")
                    .map(str::to_owned),
            );
        }
    }
    labels
}

/// What to ask Prometheus for to learn whether a rule's expression has
/// data: an alert is a comparison that returns nothing until it fires, so
/// its left-hand side (`<query> <op> <number>`), or the selector of
/// `absent(<selector>)`, which returns nothing while the series exists.
fn evaluable(alert: &str, expr: &str) -> String {
    let expr = expr.trim();
    if let Some(inner) = expr
        .strip_prefix("absent(")
        .and_then(|e| e.strip_suffix(')'))
    {
        return inner.trim().to_owned();
    }
    let bytes = expr.as_bytes();
    let (mut depth, mut quote, mut last) = (0i32, None, None);
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        match quote {
            Some(_) if c == b'\\' => i += 1,
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None => match c {
                b'"' | b'\'' => quote = Some(c),
                b'(' | b'{' | b'[' => depth += 1,
                b')' | b'}' | b']' => depth -= 1,
                b'>' | b'<' | b'=' | b'!' if depth == 0 => {
                    let len = if bytes.get(i + 1) == Some(&b'=') {
                        2
                    } else {
                        1
                    };
                    if c != b'=' || len == 2 {
                        last = Some((i, len));
                    }
                    i += len - 1;
                }
                _ => {}
            },
        }
        i += 1;
    }
    let (at, len) = last.unwrap_or_else(|| {
        panic!("{alert}: expr is neither `<query> <op> <number>` nor `absent(<selector>)`")
    });
    let threshold = expr[at + len..].trim();
    assert!(
        threshold.parse::<f64>().is_ok(),
        "{alert}: `{threshold}` after the last comparison is not a number"
    );
    expr[..at].trim().to_owned()
}

// ---------------------------------------------------------------- the rules

struct Rule {
    alert: String,
    expr: String,
    annotations: BTreeMap<String, String>,
}

fn rules() -> Vec<Rule> {
    let file = yaml(ALERTS);
    let mut rules = Vec::new();
    for group in file["groups"].as_sequence().expect("groups") {
        for rule in group["rules"].as_sequence().expect("rules") {
            let alert = rule["alert"]
                .as_str()
                .expect("alerting rules only: a recording rule would be evaluated here too")
                .to_owned();
            rules.push(Rule {
                expr: rule["expr"].as_str().expect("expr").to_owned(),
                annotations: serde_norway::from_value(rule["annotations"].clone())
                    .unwrap_or_else(|e| panic!("{alert}: annotations: {e}")),
                alert,
            });
        }
    }
    assert!(!rules.is_empty());
    rules
}

#[test]
fn promtool_checks_the_rules_and_their_unit_tests_pass() {
    for args in [["check", "rules", ALERTS], ["test", "rules", ALERTS_TEST]] {
        success(
            &format!("promtool {}", args.join(" ")),
            run_tool("promtool", &args, PROMETHEUS_COMES_FROM),
        );
    }
}

/// Each alert says what happened and where its runbook section is, and has a
/// unit test where it fires and one where it stays quiet.
#[test]
fn every_alert_has_annotations_a_runbook_section_and_tests_both_ways() {
    let runbook = read(RUNBOOK);
    let anchors: BTreeSet<String> = runbook
        .lines()
        .filter_map(|l| l.strip_prefix("## "))
        .map(|heading| {
            heading
                .to_lowercase()
                .chars()
                .filter(|c| c.is_alphanumeric() || *c == '-' || *c == ' ')
                .map(|c| if c == ' ' { '-' } else { c })
                .collect()
        })
        .collect();
    let tests = yaml(ALERTS_TEST);
    let (mut fires, mut quiet) = (BTreeSet::new(), BTreeSet::new());
    for test in tests["tests"].as_sequence().expect("tests") {
        for case in test["alert_rule_test"].as_sequence().into_iter().flatten() {
            let name = case["alertname"].as_str().unwrap().to_owned();
            match case["exp_alerts"].as_sequence().map(Vec::len) {
                Some(0) | None => quiet.insert(name),
                Some(_) => fires.insert(name),
            };
        }
    }
    let known = known_series();
    for rule in rules() {
        let alert = &rule.alert;
        for key in ["summary", "description", "runbook"] {
            assert!(
                rule.annotations
                    .get(key)
                    .is_some_and(|v| !v.trim().is_empty()),
                "{alert}: annotation {key}"
            );
        }
        let runbook_link = &rule.annotations["runbook"];
        let (file, anchor) = runbook_link
            .split_once('#')
            .unwrap_or_else(|| panic!("{alert}: runbook {runbook_link} has no #section"));
        assert_eq!(file, RUNBOOK, "{alert}");
        assert!(
            anchors.contains(anchor),
            "{alert}: {RUNBOOK} has no section #{anchor} (it has {anchors:?})"
        );
        assert!(fires.contains(alert), "{alert}: no test where it fires");
        assert!(
            quiet.contains(alert),
            "{alert}: no test where it stays quiet"
        );
        for name in metric_names(&rule.expr) {
            assert!(
                known.contains(&name),
                "{alert}: {name} is not a series the server exports"
            );
        }
        // Fails unless the expression has a shape it can be evaluated by.
        evaluable(alert, &rule.expr);
    }
}

// ---------------------------------------------------------------- the dashboard

struct Panel {
    title: String,
    exprs: Vec<String>,
}

/// The dashboard's panels with their queries, after checking its structure:
/// every panel described, on the provisioned data source, with a query.
fn dashboard() -> (Json, Vec<Panel>) {
    let dashboard: Json = serde_json::from_str(&read(DASHBOARD)).expect("valid JSON");
    let datasources = yaml(DATASOURCES);
    let [source] = &datasources["datasources"]
        .as_sequence()
        .expect("datasources")[..]
    else {
        panic!("{DATASOURCES}: one data source");
    };
    let (kind, uid) = (source["type"].as_str(), source["uid"].as_str());
    assert_eq!(kind, Some("prometheus"));
    let expected = serde_json::json!({"type": kind, "uid": uid});
    assert!(
        dashboard["uid"].as_str().is_some_and(|u| !u.is_empty()),
        "a fixed uid"
    );
    assert!(dashboard["title"].is_string());

    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("templating");
    for name in ["job", "instance"] {
        let variable = variables
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("a ${name} variable"));
        assert_eq!(variable["datasource"], expected, "${name}");
        assert_eq!(variable["type"], "query", "${name}");
    }

    let mut panels = Vec::new();
    let mut rows = vec![dashboard["panels"].as_array().expect("panels")];
    let mut cells: Vec<(u64, u64, u64, u64, String)> = Vec::new();
    let mut ids = BTreeSet::new();
    while let Some(list) = rows.pop() {
        for panel in list {
            let title = panel["title"].as_str().unwrap_or_default().to_owned();
            let id = panel["id"]
                .as_u64()
                .unwrap_or_else(|| panic!("{title}: an id"));
            assert!(ids.insert(id), "{title}: id {id} is taken");
            if panel["type"] == "row" {
                rows.push(panel["panels"].as_array().unwrap());
                continue;
            }
            assert!(!title.is_empty(), "a panel without a title");
            assert!(
                panel["description"].as_str().is_some_and(|d| d.len() > 20),
                "{title}: a description of what it shows"
            );
            assert_eq!(
                panel["datasource"], expected,
                "{title}: the provisioned data source"
            );
            let grid = &panel["gridPos"];
            let cell = |k: &str| {
                grid[k]
                    .as_u64()
                    .unwrap_or_else(|| panic!("{title}: gridPos.{k}"))
            };
            assert!(
                cell("x") + cell("w") <= 24,
                "{title}: inside the 24 columns"
            );
            cells.push((cell("x"), cell("y"), cell("w"), cell("h"), title.clone()));
            let targets = panel["targets"].as_array().expect("targets");
            assert!(!targets.is_empty(), "{title}: no query");
            let mut exprs = Vec::new();
            for target in targets {
                let expr = target["expr"].as_str().unwrap_or_default();
                assert!(!expr.trim().is_empty(), "{title}: an empty query");
                if !target["datasource"].is_null() {
                    assert_eq!(target["datasource"], expected, "{title}");
                }
                exprs.push(expr.to_owned());
            }
            panels.push(Panel { title, exprs });
        }
    }
    for (i, a) in cells.iter().enumerate() {
        for b in &cells[i + 1..] {
            let apart =
                a.0 + a.2 <= b.0 || b.0 + b.2 <= a.0 || a.1 + a.3 <= b.1 || b.1 + b.3 <= a.1;
            assert!(apart, "panels {} and {} overlap", a.4, b.4);
        }
    }
    (dashboard, panels)
}

#[test]
fn the_dashboard_queries_the_servers_series_on_the_provisioned_data_source() {
    let (_, panels) = dashboard();
    let known = known_series();
    let mut used = BTreeSet::new();
    for panel in &panels {
        for expr in &panel.exprs {
            let names = metric_names(expr);
            assert!(
                !names.is_empty(),
                "{}: {expr} selects no metric",
                panel.title
            );
            for name in names {
                assert!(
                    known.contains(&name),
                    "{}: {name} is not a series the server exports",
                    panel.title
                );
                used.insert(name);
            }
            for variable in ["$job", "$instance"] {
                assert!(
                    expr.contains(variable),
                    "{}: {expr} ignores {variable}",
                    panel.title
                );
            }
        }
    }
    // Every series the server exports is on the dashboard somewhere.
    for series in SERIES {
        assert!(used.contains(series), "no panel shows {series}");
    }
    for histogram in HISTOGRAMS {
        assert!(
            used.iter().any(|u| u.starts_with(histogram)),
            "no panel shows {histogram}"
        );
    }
}

#[test]
fn the_promql_reader_finds_metric_names_and_thresholds() {
    assert_eq!(
        metric_names(
            r#"sum by (rpc_method, le) (rate(a_bucket{job=~"$job", x="y{z}"}[$__rate_interval])) / ignoring (code) group_left sum(b) or c * 0 > 1e3"#
        ),
        ["a_bucket", "b", "c"].map(String::from).into()
    );
    assert_eq!(
        evaluable("a", "rate(x{a!=\"1\"}[5m]) >= 0.5"),
        "rate(x{a!=\"1\"}[5m])"
    );
    assert_eq!(evaluable("a", "x == 0"), "x");
    assert_eq!(
        grouping_labels("histogram_quantile(0.9, sum by (job, le) (x)) / sum by(a)(y) / nearby(z)"),
        ["a", "job"].map(String::from).into()
    );
    assert_eq!(evaluable("a", "absent(up{job=\"j\"})"), "up{job=\"j\"}");
    assert!(std::panic::catch_unwind(|| evaluable("a", "x > y")).is_err());
}

// ---------------------------------------------------------------- compose

#[test]
fn the_compose_monitoring_stack_scrapes_the_service_and_provisions_grafana() {
    for files in [
        vec!["deploy/compose.yaml", COMPOSE_MONITORING],
        vec![
            "deploy/compose.yaml",
            "deploy/compose.tls.yaml",
            COMPOSE_MONITORING,
        ],
    ] {
        let mut args: Vec<&str> = files.iter().flat_map(|f| ["-f", *f]).collect();
        args.push("config");
        let resolved = success(
            &format!("docker-compose {args:?}"),
            run_tool("docker-compose", &args, COMPOSE_COMES_FROM),
        );
        let compose: Value = serde_norway::from_str(&resolved).unwrap();
        check_compose(&compose);
    }
}

/// `SOURCE:TARGET[:MODE]` bind mounts of a resolved compose service, sources
/// relative to the repository, by target.
fn binds(service: &Value) -> BTreeMap<String, PathBuf> {
    let deploy = Path::new(REPO).join("deploy").canonicalize().unwrap();
    let mut binds = BTreeMap::new();
    for volume in service["volumes"].as_sequence().into_iter().flatten() {
        let text = volume.as_str().expect("short syntax");
        let mut parts = text.split(':');
        let (source, target) = (parts.next().unwrap(), parts.next().unwrap());
        if source.starts_with('/') {
            let source = Path::new(source);
            let relative = source
                .strip_prefix(&deploy)
                .unwrap_or_else(|_| panic!("{text}: from outside deploy/"));
            binds.insert(target.to_owned(), Path::new("deploy").join(relative));
        }
    }
    binds
}

fn check_compose(compose: &Value) {
    let services = &compose["services"];
    let service = &services["user-manager"];
    let metrics_port = metrics_port();
    let published: Vec<u64> = service["ports"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(|p| p["target"].as_u64())
        .collect();
    assert!(
        published.contains(&u64::from(metrics_port)),
        "the metrics port is published"
    );

    // Prometheus: its config and the rules are deploy/monitoring's files.
    let prometheus = &services["prometheus"];
    assert!(
        prometheus["image"]
            .as_str()
            .unwrap()
            .starts_with("prom/prometheus:v")
    );
    let mounts = binds(prometheus);
    let config_path = prometheus["command"]
        .as_sequence()
        .unwrap()
        .iter()
        .find_map(|a| a.as_str()?.strip_prefix("--config.file="))
        .expect("--config.file");
    let config_file = &mounts[config_path];
    assert!(config_file.starts_with(MONITORING), "{config_file:?}");
    let config: Value = serde_norway::from_str(
        &std::fs::read_to_string(Path::new(REPO).join(config_file)).unwrap(),
    )
    .unwrap();
    let mut on_this_machine = config.clone();
    for (i, rule_file) in config["rule_files"]
        .as_sequence()
        .expect("rule_files")
        .iter()
        .enumerate()
    {
        let mounted = &mounts[rule_file.as_str().unwrap()];
        assert_eq!(mounted, Path::new(ALERTS), "Prometheus loads the rules");
        on_this_machine["rule_files"][i] =
            Value::from(Path::new(REPO).join(mounted).to_str().unwrap());
    }
    // promtool reads the config (and the rules it names) as Prometheus
    // would, with the container's paths mapped to the repository's files.
    let checked = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        checked.path(),
        serde_norway::to_string(&on_this_machine).unwrap(),
    )
    .unwrap();
    success(
        &format!("promtool check config {config_file:?}"),
        run_tool(
            "promtool",
            &["check", "config", checked.path().to_str().unwrap()],
            PROMETHEUS_COMES_FROM,
        ),
    );
    let jobs = config["scrape_configs"].as_sequence().unwrap();
    let job = jobs
        .iter()
        .find(|j| j["job_name"] == JOB)
        .unwrap_or_else(|| panic!("a scrape job named {JOB}, which the rules select"));
    assert_eq!(
        job["metrics_path"].as_str().unwrap_or("/metrics"),
        "/metrics"
    );
    let targets: Vec<&str> = job["static_configs"][0]["targets"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(targets, [format!("user-manager:{metrics_port}")]);

    // Grafana: the data source on that Prometheus, the dashboard where the
    // provider looks.
    let grafana = &services["grafana"];
    assert!(
        grafana["image"]
            .as_str()
            .unwrap()
            .starts_with("grafana/grafana:")
    );
    let mounts = binds(grafana);
    assert_eq!(
        mounts["/etc/grafana/provisioning/datasources"],
        Path::new(DATASOURCES).parent().unwrap()
    );
    assert_eq!(
        mounts["/etc/grafana/provisioning/dashboards"],
        Path::new(DASHBOARD_PROVIDERS).parent().unwrap()
    );
    let providers = yaml(DASHBOARD_PROVIDERS);
    let path = providers["providers"][0]["options"]["path"]
        .as_str()
        .unwrap();
    assert_eq!(mounts[path], Path::new(DASHBOARD).parent().unwrap());
    let url = yaml(DATASOURCES)["datasources"][0]["url"]
        .as_str()
        .unwrap()
        .to_owned();
    let prometheus_port = prometheus["ports"][0]["target"].as_u64().unwrap();
    assert_eq!(url, format!("http://prometheus:{prometheus_port}"));
    assert_eq!(
        grafana["environment"]["GF_AUTH_ANONYMOUS_ENABLED"].as_str(),
        Some("true")
    );
    assert_eq!(
        grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"].as_str(),
        Some("Viewer")
    );
    assert_eq!(grafana["ports"][0]["published"].as_u64(), Some(3000));
}

/// The port of `telemetry.metrics_listen` in the deployments' config file,
/// as the binary reads it: what compose, the pod's port and annotations and
/// the ServiceMonitor use.
fn metrics_port() -> u16 {
    let settings = Settings::load_from(Sources {
        app_env: None,
        file: Some(Path::new(REPO).join("deploy/k8s/base/config.toml")),
        env: Some(Default::default()),
    })
    .unwrap();
    settings
        .telemetry
        .metrics_listen
        .expect("deploy/k8s/base/config.toml sets telemetry.metrics_listen")
        .port()
}

/// One copy of each file: nothing under deploy/ repeats the dashboard or
/// the rules.
#[test]
fn the_dashboard_and_the_rules_exist_once() {
    let originals = [read(DASHBOARD), read(ALERTS)];
    let mut dirs = vec![Path::new(REPO).join("deploy")];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if let Ok(text) = std::fs::read_to_string(&path) {
                let relative = path.strip_prefix(REPO).unwrap();
                if relative != Path::new(DASHBOARD) && relative != Path::new(ALERTS) {
                    assert!(!originals.contains(&text), "{relative:?} is a copy");
                }
            }
        }
    }
}

// ---------------------------------------------------------------- Kubernetes

/// The overlay (rendered and schema-checked with the others by
/// tests/it/deploy.rs) wires the component to the base's pod: the
/// ServiceMonitor finds the metrics Service, which finds the pods' metrics
/// port, which the annotations and the config name; the dashboard and the
/// rules are the files, labelled for the sidecar.
#[test]
fn the_monitoring_overlay_scrapes_the_pods_and_ships_the_dashboard_and_rules() {
    let m = Manifests::render(OVERLAY);
    let port = metrics_port();
    let pod = &m.workload.spec.template;
    let server = m.server();
    let container_port = server
        .ports
        .iter()
        .find(|p| p.name == "metrics")
        .expect("a container port named metrics");
    assert_eq!(
        container_port.container_port, port,
        "containerPort vs metrics_listen"
    );
    let annotations = &pod.metadata.annotations;
    assert_eq!(
        annotations.get("prometheus.io/scrape").map(String::as_str),
        Some("true")
    );
    assert_eq!(
        annotations.get("prometheus.io/port"),
        Some(&port.to_string())
    );
    assert_eq!(
        annotations.get("prometheus.io/path").map(String::as_str),
        Some("/metrics")
    );
    // The base has them too, without the component.
    let base = Manifests::render("deploy/k8s/base");
    assert_eq!(
        &base.workload.spec.template.metadata.annotations,
        annotations
    );
    assert_eq!(base.server().ports, server.ports);
    // The component leaves the base's resources as they were (a Component's
    // transformers would relabel them all).
    for (resource, labels) in &base.labels {
        let ours = m.labels.iter().find(|(r, _)| r == resource);
        assert_eq!(
            ours.map(|(_, l)| l),
            Some(labels),
            "{OVERLAY}: {resource}'s labels"
        );
    }

    let [monitor] = &m.service_monitors[..] else {
        panic!("{OVERLAY}: one ServiceMonitor");
    };
    assert_eq!(
        monitor["apiVersion"].as_str(),
        Some("monitoring.coreos.com/v1")
    );
    let spec = &monitor["spec"];
    let selector: BTreeMap<String, String> =
        serde_norway::from_value(spec["selector"]["matchLabels"].clone()).unwrap();
    let selected: Vec<_> = m
        .services
        .iter()
        .filter(|s| {
            selector
                .iter()
                .all(|(k, v)| s.metadata.labels.get(k) == Some(v))
        })
        .collect();
    let [service] = &selected[..] else {
        panic!(
            "the ServiceMonitor selects one Service, not {}",
            selected.len()
        );
    };
    let endpoint = &spec["endpoints"][0];
    let port_name = endpoint["port"].as_str().expect("endpoints[0].port");
    let service_port = service
        .spec
        .ports
        .iter()
        .find(|p| p.name == port_name)
        .unwrap_or_else(|| panic!("{} has no port {port_name}", service.metadata.name));
    assert_eq!(service_port.target_port.as_str(), Some("metrics"));
    assert_eq!(endpoint["path"].as_str(), Some("/metrics"));
    let job_label = spec["jobLabel"].as_str().expect("jobLabel");
    assert_eq!(
        service.metadata.labels.get(job_label).map(String::as_str),
        Some(JOB),
        "the job label the rules select"
    );

    // The metrics Service selects the pods, ready or not.
    let rendered: Vec<Value> = serde_norway::Deserializer::from_str(&kustomize(OVERLAY))
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let metrics_service = rendered
        .iter()
        .find(|r| r["kind"] == "Service" && r["metadata"]["name"] == service.metadata.name.as_str())
        .unwrap();
    assert_eq!(
        metrics_service["spec"]["publishNotReadyAddresses"].as_bool(),
        Some(true)
    );
    let service_selector: BTreeMap<String, String> =
        serde_norway::from_value(metrics_service["spec"]["selector"].clone()).unwrap();
    assert!(!service_selector.is_empty());
    for (key, value) in &service_selector {
        assert_eq!(pod.metadata.labels.get(key), Some(value), "selector {key}");
    }

    // The dashboard for Grafana's sidecar and the rules: the files themselves.
    for (file, sidecar) in [(DASHBOARD, true), (ALERTS, false)] {
        let key = Path::new(file).file_name().unwrap().to_str().unwrap();
        let config_map = m
            .config_maps
            .iter()
            .find(|c| c.data.contains_key(key))
            .unwrap_or_else(|| panic!("a ConfigMap of {file}"));
        assert_eq!(config_map.data[key], read(file), "{file}");
        if sidecar {
            assert_eq!(
                config_map
                    .metadata
                    .labels
                    .get("grafana_dashboard")
                    .map(String::as_str),
                Some("1")
            );
        }
    }
}

// ---------------------------------------------------------------- a real Prometheus

/// A Prometheus server of its own, in a temporary directory: killed when
/// dropped, even when the test panics; its log is printed then.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Prometheus {
    /// Scrapes `targets` (job `user-manager`) every second and evaluates the
    /// alert rules as often.
    fn start(targets: &[SocketAddr]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let targets: Vec<String> = targets.iter().map(|t| format!("\"{t}\"")).collect();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: {JOB}\n    static_configs:\n      - targets: [{}]\n",
            Path::new(REPO).join(ALERTS).display(),
            targets.join(", ")
        );
        let config_file = dir.path().join("prometheus.yml");
        std::fs::write(&config_file, config).unwrap();
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| match e.kind() {
                std::io::ErrorKind::NotFound => {
                    panic!("prometheus: not installed: {PROMETHEUS_COMES_FROM}")
                }
                _ => panic!("starting prometheus: {e}"),
            });
        Prometheus { child, addr, dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }

    /// GET `path` from the HTTP API: the status code and the body.
    async fn get(&self, path: &str) -> std::io::Result<(u16, String)> {
        let mut stream = tokio::net::TcpStream::connect(self.addr).await?;
        // HTTP/1.0: the body ends with the connection, never chunked.
        let request = format!("GET {path} HTTP/1.0\r\nHost: {}\r\n\r\n", self.addr);
        stream.write_all(request.as_bytes()).await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
        let code = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0);
        Ok((code, body.to_owned()))
    }

    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok((200, _)) = self.get("/-/ready").await {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("prometheus exited ({status}):\n{}", self.log());
            }
            assert!(Instant::now() < deadline, "prometheus not ready in 60 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// An instant query's result vector (or scalar) through /api/v1/query.
    async fn query(&self, expr: &str) -> Vec<Json> {
        let (code, body) = self
            .get(&format!("/api/v1/query?query={}", percent_encode(expr)))
            .await
            .unwrap();
        let response: Json = serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{expr}: HTTP {code}, not JSON ({e}): {body}"));
        assert_eq!(response["status"], "success", "{expr}: {response}");
        match &response["data"]["result"] {
            Json::Array(result) => result.clone(),
            scalar => vec![scalar.clone()],
        }
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- prometheus log ----\n{}---- end of prometheus log ----",
                self.log()
            );
        }
    }
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// The dashboard's template variables as Grafana fills them in: this job,
/// every instance (the "All" value), a rate window of several 1 s scrapes.
fn substitute(expr: &str) -> String {
    let expr = expr
        .replace("$__rate_interval", "10s")
        .replace("$job", JOB)
        .replace("$instance", ".*");
    assert!(
        !expr.contains('$'),
        "{expr}: a variable this test doesn't know"
    );
    expr
}

/// Calls of every method and outcome the dashboard and the rules look at:
/// OK; a client error (INVALID_ARGUMENT: GetUser's not-found is an OK answer
/// with `error` set, not a status); a server fault (UNIMPLEMENTED, an
/// unknown method, `_OTHER`), so the error ratio's numerator has a series;
/// the three streaming methods; writes (group commits, the WAL); and a
/// message over the size limit (a limit refusal).
async fn drive_load(server: &ServerProcess, round: u32) {
    let mut client = server.client().await;
    for id in 1..=5 {
        client.get_user(UserRequest { id }).await.unwrap();
    }
    let missing = client.get_user(UserRequest { id: 999_999 }).await.unwrap();
    assert!(missing.into_inner().error, "not found, in band");
    let invalid = client.add_user(user(0, "", 1)).await.unwrap_err();
    assert_eq!(invalid.code(), tonic::Code::InvalidArgument, "{invalid:?}");
    let unknown = raw_grpc_call(
        server.addr,
        "/UserManager/NoSuchMethod",
        &[],
        grpc_frame(&UserRequest { id: 1 }),
        false,
    )
    .await;
    assert_eq!(unknown.grpc_status, Some(tonic::Code::Unimplemented as i32));
    let id = 10_000 + round;
    client
        .add_user(user(id, &format!("load{id}"), 1))
        .await
        .unwrap();
    let mut by_type = client
        .get_users_by_type(UserTypeRequest { user_type: 1 })
        .await
        .unwrap()
        .into_inner();
    while by_type.message().await.unwrap().is_some() {}
    let requests = || stream::iter((1..=20).map(|id| UserRequest { id }));
    client.count_already_users(requests()).await.unwrap();
    let mut by_ids = client
        .get_users_by_ids(requests())
        .await
        .unwrap()
        .into_inner();
    while by_ids.message().await.unwrap().is_some() {}
    // Over limits.max_message_bytes (16 KiB by default).
    let huge = client
        .add_user(user(id + 1_000_000, &"x".repeat(64 * 1024), 1))
        .await
        .unwrap_err();
    assert_eq!(huge.code(), tonic::Code::ResourceExhausted, "{huge:?}");
}

/// A self-signed certificate and key for `localhost`, as files in `dir`.
fn self_signed(dir: &Path) -> (PathBuf, PathBuf) {
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["localhost".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let (cert_path, key_path) = (dir.join("server.crt"), dir.join("server.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (cert_path, key_path)
}

/// The key test: three instances of the real binary (plaintext under load on
/// SQLite and on PostgreSQL, and one TLS that fails a handshake), a real
/// Prometheus scraping them every second and evaluating the rules, and
/// every query of the dashboard and of
/// the rules must return data through Prometheus' HTTP API. An alert's
/// expression is a comparison that is empty until it fires, so what is
/// queried is its left-hand side, or the selector of an `absent(...)`
/// (`evaluable`); the dashboard's are queried as they are, variables filled
/// in as Grafana would (`substitute`).
#[tokio::test(flavor = "multi_thread")]
async fn prometheus_scrapes_the_server_and_every_dashboard_and_alert_query_returns_data() {
    let dir = tempfile::tempdir().unwrap();
    let [plain_dir, tls_dir, postgres_dir] =
        ["plain", "tls", "postgres"].map(|name| dir.path().join(name));
    for dir in [&plain_dir, &tls_dir, &postgres_dir] {
        std::fs::create_dir_all(dir).unwrap();
    }
    let plain = Binary::new(&plain_dir).metrics_listener();
    let (cert, key) = self_signed(&tls_dir);
    let tls = Binary::new(&tls_dir)
        .health_listener()
        .metrics_listener()
        .env("USER_MANAGER__SERVER__TLS__CERT_PATH", cert.display())
        .env("USER_MANAGER__SERVER__TLS__KEY_PATH", key.display());
    // PostgreSQL's pool gauges exist on that backend only.
    let postgres = Binary::new(&postgres_dir).metrics_listener().env(
        "USER_MANAGER__DATABASE__URL",
        postgres::fresh_database().await,
    );
    let (plain, tls, postgres) = tokio::join!(plain.start(), tls.start(), postgres.start());
    let targets: Vec<SocketAddr> = [&plain, &tls, &postgres]
        .iter()
        .map(|server| server.metrics.expect("the metrics listener's address"))
        .collect();

    let mut prometheus = Prometheus::start(&targets);
    prometheus.wait_ready().await;

    // A plaintext client on the TLS port: a failed handshake.
    let mut stream = tokio::net::TcpStream::connect(tls.addr).await.unwrap();
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    let _ = stream.read(&mut [0; 64]).await;
    drop(stream);

    // Everything the dashboard and the rules ask, by where it comes from.
    let (_, panels) = dashboard();
    let mut queries: Vec<(String, String)> = panels
        .iter()
        .flat_map(|p| {
            p.exprs
                .iter()
                .map(|e| (format!("panel {:?}", p.title), substitute(e)))
        })
        .collect();
    for rule in rules() {
        queries.push((
            format!("alert {}", rule.alert),
            evaluable(&rule.alert, &rule.expr),
        ));
    }

    // Load until every query has data (rates need two scrapes after the
    // first calls), or give up after a minute and name the ones without.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut round = 0;
    let mut missing: Vec<&(String, String)>;
    loop {
        drive_load(&plain, round).await;
        drive_load(&postgres, round).await;
        round += 1;
        missing = Vec::new();
        for query in &queries {
            let result = prometheus.query(&query.1).await;
            // Data, and the labels it groups by on some series: a label the
            // server doesn't set would leave the legend blank.
            let labelled = |label: &String| {
                result
                    .iter()
                    .any(|s| s["metric"][label].as_str().is_some_and(|v| !v.is_empty()))
            };
            if result.is_empty() || !grouping_labels(&query.1).iter().all(labelled) {
                missing.push(query);
            }
        }
        if missing.is_empty() || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let scraped = prometheus
        .query("count by (__name__) ({job=\"user-manager\"})")
        .await;
    let names: Vec<&str> = scraped
        .iter()
        .filter_map(|s| s["metric"]["__name__"].as_str())
        .collect();
    assert!(
        missing.is_empty(),
        "no data (or none with the labels grouped by) after {round} rounds of load for:\n{}\nseries scraped: {names:?}",
        missing
            .iter()
            .map(|(from, expr)| format!("  {from}: {expr}"))
            .collect::<Vec<_>>()
            .join("\n")
    );

    // Prometheus loaded every rule and evaluates it without an error.
    let (_, body) = prometheus.get("/api/v1/rules").await.unwrap();
    let rules_api: Json = serde_json::from_str(&body).unwrap();
    let loaded: Vec<&Json> = rules_api["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect();
    assert_eq!(loaded.len(), rules().len(), "every rule loaded");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = prometheus.get("/api/v1/rules").await.unwrap();
        let rules_api: Json = serde_json::from_str(&body).unwrap();
        let unhealthy: Vec<String> = rules_api["data"]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap())
            .filter(|r| r["health"] != "ok")
            .map(|r| format!("{}: {} {}", r["name"], r["health"], r["lastError"]))
            .collect();
        if unhealthy.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "rules not evaluated cleanly: {unhealthy:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
