//! Metrics end to end: the real binary, real gRPC calls of all four kinds,
//! then what `GET /metrics` on its own listener says about them; and OTLP
//! metrics reaching a receiver this test runs.

use std::{collections::BTreeSet, time::Duration};

use futures::{StreamExt, stream};
use opentelemetry_proto::tonic::{
    common::v1::{KeyValue, any_value::Value},
    metrics::v1::{metric::Data, number_data_point},
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request};
use user_manager::proto::{UserRequest, UserTypeRequest, user_manager_client::UserManagerClient};

use crate::common::{
    self, Binary, ServerProcess, grpc_frame, health_status,
    metrics::{Scrape, http_get},
    otlp::Collector,
    raw_grpc_call, user,
};
use crate::security::{Ca, TlsFiles, tls_channel};

const NORMAL: i32 = 1;
const GUEST: i32 = 3;

const DURATION: &str = "rpc_server_call_duration_seconds";
const ACTIVE: &str = "user_manager_rpc_server_active_calls";

fn ids(ids: impl IntoIterator<Item = u32>) -> Vec<UserRequest> {
    ids.into_iter().map(|id| UserRequest { id }).collect()
}

/// The labels of one method and status code.
fn call<'a>(method: &'a str, code: &'a str) -> [(&'a str, &'a str); 3] {
    [
        ("rpc_system_name", "grpc"),
        ("rpc_method", method),
        ("rpc_response_status_code", code),
    ]
}

async fn start(dir: &std::path::Path, env: &[(&str, &str)]) -> ServerProcess {
    Binary::new(dir).metrics_listener().envs(env).start().await
}

#[tokio::test]
async fn every_call_is_measured_once_with_its_method_and_status() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[]).await;
    let mut client = server.client().await;

    // Unary: three found, one not (answered OK, with `error` set).
    for _ in 0..3 {
        client.get_user(UserRequest { id: 1 }).await.unwrap();
    }
    let missing = client.get_user(UserRequest { id: 999 }).await.unwrap();
    assert!(missing.into_inner().error);
    client.add_user(user(7001, "metrics", GUEST)).await.unwrap();

    // Client stream: three messages in, one out.
    client
        .count_already_users(stream::iter(ids([1, 2, 99])))
        .await
        .unwrap();

    // Server stream, read to its end.
    let normal = client
        .get_users_by_type(UserTypeRequest { user_type: NORMAL })
        .await
        .unwrap()
        .into_inner()
        .collect::<Vec<_>>()
        .await;
    assert_eq!(normal.len(), 3);

    // Bidi, held open by its client: the call lasts until the requests end,
    // and so must its measurement.
    let (requests, rx) = mpsc::channel(4);
    let started = std::time::Instant::now();
    let mut answers = client
        .get_users_by_ids(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    requests.send(UserRequest { id: 1 }).await.unwrap();
    answers.next().await.unwrap().unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    requests.send(UserRequest { id: 3 }).await.unwrap();
    drop(requests);
    let rest: Vec<_> = answers.collect().await;
    assert_eq!(rest.len(), 1);
    let held = started.elapsed().as_secs_f64();

    // Cancelled: a bidi stream whose client goes away mid-call.
    let (cancelled_requests, rx) = mpsc::channel(4);
    let mut cancelled = client
        .get_users_by_ids(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    cancelled_requests
        .send(UserRequest { id: 1 })
        .await
        .unwrap();
    cancelled.next().await.unwrap().unwrap();
    drop(cancelled);
    drop(cancelled_requests);

    // A deadline: the client's grpc-timeout ends a stream it keeps open.
    let (late_requests, rx) = mpsc::channel(4);
    let mut request = Request::new(ReceiverStream::new(rx));
    request.set_timeout(Duration::from_millis(300));
    let outcome = match client.get_users_by_ids(request).await {
        Ok(response) => response
            .into_inner()
            .collect::<Vec<_>>()
            .await
            .into_iter()
            .find_map(Result::err),
        Err(status) => Some(status),
    };
    assert_eq!(outcome.map(|s| s.code()), Some(Code::DeadlineExceeded));
    drop(late_requests);

    // A method we don't have.
    let unknown = raw_grpc_call(
        server.addr,
        "/UserManager/Nope",
        &[],
        grpc_frame(&UserRequest { id: 1 }),
        false,
    )
    .await;
    assert_eq!(unknown.grpc_status, Some(Code::Unimplemented as i32));

    // Health is not an RPC of ours.
    for _ in 0..5 {
        health_status(&server.url(), "").await;
    }

    let metrics = eventually_scrape(&server, "the cancelled call is counted", |m| {
        m.sum(
            &format!("{DURATION}_count"),
            &call("UserManager/GetUsersByIds", "CANCELLED"),
        ) == 1.0
    })
    .await;
    let count =
        |method: &str, code: &str| metrics.sum(&format!("{DURATION}_count"), &call(method, code));
    assert_eq!(count("UserManager/GetUser", "OK"), 4.0);
    assert_eq!(count("UserManager/AddUser", "OK"), 1.0);
    assert_eq!(count("UserManager/CountAlreadyUsers", "OK"), 1.0);
    assert_eq!(count("UserManager/GetUsersByType", "OK"), 1.0);
    assert_eq!(count("UserManager/GetUsersByIds", "OK"), 1.0);
    assert_eq!(count("UserManager/GetUsersByIds", "CANCELLED"), 1.0);
    assert_eq!(count("UserManager/GetUsersByIds", "DEADLINE_EXCEEDED"), 1.0);
    assert_eq!(count("_OTHER", "UNIMPLEMENTED"), 1.0);
    // Every call made, and nothing else (health checks left out).
    assert_eq!(
        metrics.sum(&format!("{DURATION}_count"), &[]),
        11.0,
        "{}",
        metrics.text
    );
    let methods: BTreeSet<&str> = metrics
        .matching(&format!("{DURATION}_count"), &[])
        .iter()
        .map(|(s, _)| s.labels["rpc_method"].as_str())
        .collect();
    assert_eq!(
        methods,
        BTreeSet::from([
            "UserManager/GetUser",
            "UserManager/AddUser",
            "UserManager/CountAlreadyUsers",
            "UserManager/GetUsersByType",
            "UserManager/GetUsersByIds",
            "_OTHER",
        ])
    );

    // Lines as a scrape of this very sequence of calls showed them, checked
    // by hand: the names, label names and label values the dashboards use.
    for line in [
        "# TYPE rpc_server_call_duration_seconds histogram\n",
        "rpc_server_call_duration_seconds_count{rpc_method=\"UserManager/GetUser\",rpc_response_status_code=\"OK\",rpc_system_name=\"grpc\"} 4\n",
        "rpc_server_call_duration_seconds_count{error_type=\"DEADLINE_EXCEEDED\",rpc_method=\"UserManager/GetUsersByIds\",rpc_response_status_code=\"DEADLINE_EXCEEDED\",rpc_system_name=\"grpc\"} 1\n",
        "rpc_server_call_duration_seconds_bucket{error_type=\"UNIMPLEMENTED\",rpc_method=\"_OTHER\",rpc_response_status_code=\"UNIMPLEMENTED\",rpc_system_name=\"grpc\",le=\"0.5\"} 1\n",
        "# TYPE user_manager_rpc_server_active_calls gauge\n",
        "user_manager_rpc_server_active_calls{rpc_method=\"UserManager/GetUser\"} 0\n",
        "# TYPE user_manager_rpc_server_messages_received histogram\n",
        "# TYPE db_client_operation_duration_seconds histogram\n",
        "# TYPE db_client_connection_wait_time_seconds histogram\n",
        "# TYPE user_manager_db_group_commit_size histogram\n",
        "# TYPE user_manager_db_sqlite_wal_size_bytes gauge\n",
        "# TYPE user_manager_ready gauge\nuser_manager_ready 1\n",
    ] {
        assert!(
            metrics.text.contains(line),
            "{line} not in\n{}",
            metrics.text
        );
    }

    // error.type on the server's faults only.
    for (series, _) in metrics.matching(&format!("{DURATION}_count"), &[]) {
        let code = series.labels["rpc_response_status_code"].as_str();
        let fault = matches!(code, "DEADLINE_EXCEEDED" | "UNIMPLEMENTED");
        assert_eq!(
            series.labels.get("error_type").map(String::as_str),
            fault.then_some(code),
            "{series:?}"
        );
    }

    // The held stream is measured whole, not to its first answer.
    let held_sum = metrics.value(
        &format!("{DURATION}_sum"),
        &call("UserManager/GetUsersByIds", "OK"),
    );
    assert!(
        held_sum >= 0.4 && held_sum <= held + 0.1,
        "{held_sum} vs {held}"
    );
    let deadline_sum = metrics.value(
        &format!("{DURATION}_sum"),
        &call("UserManager/GetUsersByIds", "DEADLINE_EXCEEDED"),
    );
    assert!(deadline_sum >= 0.29, "{deadline_sum}");
    // Unary calls land in the sub-second buckets, and every bucket series is
    // cumulative up to its count.
    let get_user = call("UserManager/GetUser", "OK");
    let mut le_one = get_user.to_vec();
    le_one.push(("le", "1"));
    assert_eq!(metrics.value(&format!("{DURATION}_bucket"), &le_one), 4.0);
    let mut le_inf = get_user.to_vec();
    le_inf.push(("le", "+Inf"));
    assert_eq!(metrics.value(&format!("{DURATION}_bucket"), &le_inf), 4.0);
    assert_eq!(metrics.types[DURATION], "histogram");

    // Messages per streaming call.
    let received = "user_manager_rpc_server_messages_received_sum";
    let sent = "user_manager_rpc_server_messages_sent_sum";
    let method = |m: &'static str| [("rpc_method", m)];
    assert_eq!(
        metrics.value(received, &method("UserManager/CountAlreadyUsers")),
        3.0
    );
    assert_eq!(
        metrics.value(sent, &method("UserManager/CountAlreadyUsers")),
        1.0
    );
    assert_eq!(
        metrics.value(sent, &method("UserManager/GetUsersByType")),
        3.0
    );
    // Bidi: 2 + 1 + 0 received, 2 + 1 + 0 sent over three calls.
    assert_eq!(
        metrics.value(received, &method("UserManager/GetUsersByIds")),
        3.0
    );
    assert_eq!(
        metrics.value(sent, &method("UserManager/GetUsersByIds")),
        3.0
    );
    assert_eq!(
        metrics.value(
            "user_manager_rpc_server_messages_sent_count",
            &method("UserManager/GetUsersByIds")
        ),
        3.0
    );
    assert!(
        metrics
            .matching(received, &method("UserManager/GetUser"))
            .is_empty(),
        "unary calls have no message counts"
    );

    // Nothing left in flight.
    for (series, value) in metrics.matching(ACTIVE, &[]) {
        assert_eq!(value, 0.0, "{series:?}");
    }
    assert_eq!(metrics.value(ACTIVE, &method("UserManager/GetUser")), 0.0);

    // The database under it, and readiness.
    assert!(
        metrics.sum(
            "db_client_operation_duration_seconds_count",
            &[("db_system_name", "sqlite"), ("db_operation_name", "get")]
        ) >= 4.0
    );
    assert!(
        metrics.sum(
            "db_client_connection_wait_time_seconds_count",
            &[
                ("db_system_name", "sqlite"),
                ("db_client_connection_pool_name", "sqlite_readers")
            ]
        ) >= 1.0,
        "GetUsersByType's page waits for a reader (lone GetUsers find one free and record nothing)"
    );
    assert_eq!(
        metrics.value("user_manager_db_group_commit_size_sum", &[]),
        1.0
    );
    assert!(metrics.value("user_manager_db_sqlite_wal_size_bytes", &[]) > 0.0);
    assert_eq!(metrics.value("user_manager_ready", &[]), 1.0);
}

/// Scrapes until `ready` holds (measurements land when calls really end,
/// which may be just after the client saw the end).
async fn eventually_scrape(
    server: &ServerProcess,
    what: &str,
    ready: impl Fn(&Scrape) -> bool,
) -> Scrape {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let scrape = server.scrape().await;
        if ready(&scrape) {
            return scrape;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within 10 s in\n{}",
            scrape.text
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn the_listener_serves_only_metrics_and_closes_with_the_server() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = start(dir.path(), &[]).await;
    let addr = server.metrics.expect("the metrics address is logged");
    let (status, body) = http_get(addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(body.contains("# TYPE user_manager_ready gauge"), "{body}");
    for path in ["/", "/metric", "/metrics/x", "/debug"] {
        assert_eq!(http_get(addr, path).await.0, 404, "{path}");
    }
    let status = server.sigterm_and_wait(Duration::from_secs(30)).await;
    assert!(status.success(), "{status}");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the metrics listener outlived the server"
    );
}

#[tokio::test]
async fn the_in_process_listener_closes_when_the_server_stops() {
    let dir = tempfile::tempdir().unwrap();
    let app = common::spawn_app_in(dir, |s| {
        s.telemetry.metrics_listen = Some("127.0.0.1:0".parse().unwrap());
    })
    .await;
    let addr = app.metrics.expect("a metrics listener");
    assert_eq!(http_get(addr, "/metrics").await.0, 200);
    // A scrape connection left open must not hold the server up either.
    let idle = tokio::net::TcpStream::connect(addr).await.unwrap();
    app.stop().await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "the metrics listener outlived the server"
    );
    drop(idle);
}

#[tokio::test]
async fn readiness_is_a_gauge_that_follows_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(
        dir.path(),
        &[("USER_MANAGER__HEALTH__CHECK_INTERVAL_MS", "100")],
    )
    .await;
    let ready = |m: &Scrape| m.value("user_manager_ready", &[]);
    assert_eq!(ready(&server.scrape().await), 1.0);
    std::fs::rename(
        common::db_path(dir.path()),
        dir.path().join("moved-away.db"),
    )
    .unwrap();
    eventually_scrape(&server, "user_manager_ready 0", |m| ready(m) == 0.0).await;
}

#[tokio::test]
async fn refusals_are_counted_by_the_limit_that_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server = start(
        dir.path(),
        &[
            ("USER_MANAGER__LIMITS__MAX_OPEN_STREAMS", "1"),
            ("USER_MANAGER__LIMITS__MAX_MESSAGE_BYTES", "1024"),
        ],
    )
    .await;
    let mut client = server.client().await;
    let (open, rx) = mpsc::channel(1);
    let _held = client
        .get_users_by_ids(ReceiverStream::new(rx))
        .await
        .unwrap();
    let refused = client
        .get_users_by_type(UserTypeRequest { user_type: NORMAL })
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted);

    // A request message over limits.max_message_bytes.
    let oversized = client
        .add_user(user(7002, &"x".repeat(2_000), GUEST))
        .await
        .unwrap_err();
    assert_eq!(oversized.code(), Code::ResourceExhausted, "{oversized:?}");

    let metrics = server.scrape().await;
    let refusals = "user_manager_limit_refusals_total";
    assert_eq!(
        metrics.value(refusals, &[("limit", "max_open_streams")]),
        1.0
    );
    assert_eq!(
        metrics.value(refusals, &[("limit", "max_message_bytes")]),
        1.0
    );
    assert_eq!(
        metrics.sum(refusals, &[]),
        2.0,
        "no other limit refused anything"
    );
    // The refused call is measured too, with its status.
    assert_eq!(
        metrics.value(
            &format!("{DURATION}_count"),
            &call("UserManager/GetUsersByType", "RESOURCE_EXHAUSTED")
        ),
        1.0
    );
    assert_eq!(
        metrics.value(ACTIVE, &[("rpc_method", "UserManager/GetUsersByIds")]),
        1.0,
        "the held stream is in flight"
    );
    drop(open);
}

// ---------------------------------------------------------------- OTLP

fn attr<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a str> {
    attributes.iter().find(|kv| kv.key == key).and_then(|kv| {
        match kv.value.as_ref()?.value.as_ref()? {
            Value::StringValue(s) => Some(s.as_str()),
            _ => None,
        }
    })
}

/// The server, exporting every 100 ms to `collector`, with `env` on top.
async fn exporting_to(
    dir: &std::path::Path,
    collector: &Collector,
    env: &[(&str, &str)],
) -> ServerProcess {
    Binary::new(dir)
        .metrics_listener()
        .env(
            "USER_MANAGER__TELEMETRY__OTLP_ENDPOINT",
            collector.endpoint(),
        )
        .env("OTEL_METRIC_EXPORT_INTERVAL", "100")
        .env("OTEL_TRACES_EXPORTER", "none")
        .envs(env)
        .start()
        .await
}

#[tokio::test]
async fn otlp_metrics_reach_the_collector_with_names_units_and_attributes() {
    let collector = Collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = exporting_to(dir.path(), &collector, &[]).await;
    let mut client = server.client().await;
    for _ in 0..2 {
        client.get_user(UserRequest { id: 1 }).await.unwrap();
    }

    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let (resource, duration) = loop {
        if let Some((resource, metric)) = collector.latest_metric("rpc.server.call.duration")
            && let Some(Data::Histogram(h)) = &metric.data
            && h.data_points.iter().any(|p| {
                attr(&p.attributes, "rpc.method") == Some("UserManager/GetUser") && p.count == 2
            })
        {
            break (resource, metric);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no export with both GetUser calls within 10 s ({} exports)",
            collector.metric_exports()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(attr(&resource, "service.name"), Some("user-manager"));
    assert_eq!(duration.unit, "s");
    let Some(Data::Histogram(histogram)) = &duration.data else {
        unreachable!()
    };
    let point = histogram
        .data_points
        .iter()
        .find(|p| attr(&p.attributes, "rpc.method") == Some("UserManager/GetUser"))
        .unwrap();
    assert_eq!(attr(&point.attributes, "rpc.system.name"), Some("grpc"));
    assert_eq!(
        attr(&point.attributes, "rpc.response.status_code"),
        Some("OK")
    );
    assert_eq!(attr(&point.attributes, "error.type"), None);
    assert_eq!(point.explicit_bounds.first(), Some(&0.0001));
    assert!(point.sum.unwrap() > 0.0);

    let (_, ready) = collector
        .latest_metric("user_manager.ready")
        .expect("readiness");
    let Some(Data::Gauge(gauge)) = &ready.data else {
        panic!("{ready:?}")
    };
    assert_eq!(
        gauge.data_points[0].value,
        Some(number_data_point::Value::AsInt(1))
    );
    let (_, db) = collector
        .latest_metric("db.client.operation.duration")
        .expect("database durations");
    assert_eq!(db.unit, "s");
    let (_, active) = collector
        .latest_metric("user_manager.rpc.server.active_calls")
        .expect("active calls");
    assert_eq!(active.unit, "{call}");
}

#[tokio::test]
async fn the_standard_switches_turn_metrics_off() {
    for (var, value) in [
        ("OTEL_METRICS_EXPORTER", "none"),
        ("OTEL_SDK_DISABLED", "true"),
    ] {
        let collector = Collector::start().await;
        let dir = tempfile::tempdir().unwrap();
        let mut server = exporting_to(dir.path(), &collector, &[(var, value)]).await;
        let mut client = server.client().await;
        client.get_user(UserRequest { id: 1 }).await.unwrap();
        let scrape = server.scrape().await;
        // Ten export intervals, then the flush at shutdown.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let status = server.sigterm_and_wait(Duration::from_secs(30)).await;
        assert!(status.success(), "{status}");
        assert_eq!(
            collector.metric_exports(),
            0,
            "{var}={value}: metrics were sent"
        );
        let rpc_series = scrape.sum(&format!("{DURATION}_count"), &[]);
        match value {
            // The Prometheus listener is not an exporter OTEL_METRICS_EXPORTER names.
            "none" => assert_eq!(rpc_series, 1.0, "{}", scrape.text),
            // No SDK, no readers: the listener answers, with nothing.
            _ => assert!(scrape.samples.is_empty(), "{}", scrape.text),
        }
    }
}

// ---------------------------------------------------------------- TLS

#[tokio::test]
async fn failed_handshakes_are_counted_by_reason_and_a_rejected_certificate_warns() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let files = TlsFiles::write(dir.path(), &server_ca.server(), &client_ca);
    let server = Binary::new(dir.path())
        .health_listener()
        .metrics_listener()
        .envs(&files.env(true))
        .start()
        .await;

    let good = client_ca.client("reporting", vec![]);
    let channel = tls_channel(server.addr, &server_ca, Some(&good))
        .await
        .unwrap();
    UserManagerClient::new(channel)
        .get_user(UserRequest { id: 1 })
        .await
        .unwrap();
    // TLS 1.3 clients finish their side before the server has checked their
    // certificate: the refusal may come at connect or at the first call.
    let forged = Ca::new("client CA").client("reporting", vec![]);
    for identity in [None, Some(&forged)] {
        if let Ok(channel) = tls_channel(server.addr, &server_ca, identity).await {
            let refused = UserManagerClient::new(channel)
                .get_user(UserRequest { id: 1 })
                .await;
            assert!(refused.is_err(), "{refused:?}");
        }
    }

    // A client's channel may try again (so count at least one of each).
    let failures = "user_manager_tls_handshake_failures_total";
    let counted = |m: &Scrape, reason| m.sum(failures, &[("reason", reason)]);
    let metrics = eventually_scrape(&server, "both failures counted", |m| {
        counted(m, "client_certificate_rejected") >= 1.0
            && counted(m, "no_client_certificate") >= 1.0
    })
    .await;
    let reasons: BTreeSet<&str> = metrics
        .matching(failures, &[])
        .iter()
        .map(|(s, _)| s.labels["reason"].as_str())
        .collect();
    assert_eq!(
        reasons,
        BTreeSet::from(["client_certificate_rejected", "no_client_certificate"]),
        "the good client's handshake is no failure"
    );
    // Logged at warn, once: the rest within 10 s stay at debug.
    let warned: Vec<String> = server
        .stdout_lines()
        .into_iter()
        .filter(|line| line.contains("\"WARN\"") && line.contains("client certificate rejected"))
        .collect();
    assert_eq!(warned.len(), 1, "{}", server.log());
}

#[tokio::test]
async fn a_stream_whose_client_stopped_reading_is_counted_as_a_stall() {
    let dir = tempfile::tempdir().unwrap();
    let seed = common::big_seed(dir.path(), 20_000);
    let seed = seed.display().to_string();
    let server = start(
        dir.path(),
        &[
            ("USER_MANAGER__SEED__PATH", seed.as_str()),
            ("USER_MANAGER__LIMITS__STREAM_STALL_TIMEOUT_MS", "300"),
        ],
    )
    .await;
    // HTTP/2's default windows (hyper's client would take megabytes).
    let channel = tonic::transport::Endpoint::from_shared(server.url())
        .unwrap()
        .initial_stream_window_size(65_535)
        .initial_connection_window_size(65_535)
        .connect()
        .await
        .unwrap();
    let mut guests = UserManagerClient::new(channel)
        .get_users_by_type(UserTypeRequest { user_type: GUEST })
        .await
        .unwrap()
        .into_inner();
    guests.next().await.unwrap().unwrap();
    // Read nothing more: once the flow-control window is full the server
    // can send nothing, and the stall timeout ends the call.
    let refusals = "user_manager_limit_refusals_total";
    let metrics = eventually_scrape(&server, "the stall is counted", |m| {
        m.sum(refusals, &[("limit", "stream_stall_timeout_ms")]) == 1.0
    })
    .await;
    assert_eq!(metrics.sum(refusals, &[]), 1.0, "{}", metrics.text);
    drop(guests);
}

// ---------------------------------------------------------------- the end

#[tokio::test]
async fn a_stream_ended_by_the_drain_is_unavailable_and_flushed_at_exit() {
    let collector = Collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut server = exporting_to(
        dir.path(),
        &collector,
        &[
            // Only the flush at shutdown exports.
            ("OTEL_METRIC_EXPORT_INTERVAL", "3600000"),
            ("USER_MANAGER__SERVER__DRAIN_TIMEOUT_MS", "300"),
        ],
    )
    .await;
    let mut client = server.client().await;
    let (open, rx) = mpsc::channel(1);
    let mut held = client
        .get_users_by_ids(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    open.send(UserRequest { id: 1 }).await.unwrap();
    held.next().await.unwrap().unwrap();

    server.signal("TERM");
    let ended = held.next().await.expect("an end").unwrap_err();
    assert_eq!(ended.code(), Code::Unavailable);
    let status = server
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("exits");
    assert!(status.success(), "{status}");
    drop(open);

    let (_, duration) = collector
        .latest_metric("rpc.server.call.duration")
        .expect("the flush at exit exported the calls");
    let Some(Data::Histogram(histogram)) = &duration.data else {
        panic!("{duration:?}")
    };
    let drained = histogram
        .data_points
        .iter()
        .find(|p| attr(&p.attributes, "rpc.method") == Some("UserManager/GetUsersByIds"))
        .expect("the drained stream");
    assert_eq!(
        attr(&drained.attributes, "rpc.response.status_code"),
        Some("UNAVAILABLE")
    );
    assert_eq!(attr(&drained.attributes, "error.type"), Some("UNAVAILABLE"));
    assert_eq!(drained.count, 1);
    assert!(drained.sum.unwrap() >= 0.3, "{drained:?}");
}

// ---------------------------------------------------------------- PostgreSQL

#[tokio::test]
async fn the_postgres_pool_and_its_operations_are_observed() {
    let url = common::postgres::fresh_database().await;
    let dir = tempfile::tempdir().unwrap();
    let server = start(dir.path(), &[("USER_MANAGER__DATABASE__URL", &url)]).await;
    let mut client = server.client().await;
    client.get_user(UserRequest { id: 1 }).await.unwrap();

    let metrics = server.scrape().await;
    let pool = [
        ("db_system_name", "postgresql"),
        ("db_client_connection_pool_name", "postgres"),
    ];
    assert_eq!(metrics.value("db_client_connection_max", &pool), 10.0);
    let count = |state| {
        let mut labels = pool.to_vec();
        labels.push(("db_client_connection_state", state));
        metrics.value("db_client_connection_count", &labels)
    };
    assert!(count("idle") + count("used") >= 1.0, "{}", metrics.text);
    assert_eq!(
        metrics.value(
            "db_client_operation_duration_seconds_count",
            &[
                ("db_system_name", "postgresql"),
                ("db_operation_name", "get")
            ]
        ),
        1.0
    );
    assert!(
        metrics
            .matching("user_manager_db_sqlite_wal_size_bytes", &[])
            .is_empty(),
        "no SQLite file, no WAL size"
    );
}
