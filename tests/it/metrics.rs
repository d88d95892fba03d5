//! Metrics end to end: the real binary, real gRPC calls of all four kinds,
//! then what `GET /metrics` on its own listener says about them; and OTLP
//! metrics reaching a receiver this test runs.

use std::{collections::BTreeSet, time::Duration};

use futures::{StreamExt, stream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request};
use user_manager::proto::{UserRequest, UserTypeRequest};

use crate::common::{
    self, Binary, ServerProcess, grpc_frame, health_status,
    metrics::{Scrape, http_get},
    raw_grpc_call, user,
};

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
        ) >= 4.0
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
        &[("USER_MANAGER__LIMITS__MAX_OPEN_STREAMS", "1")],
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

    let metrics = server.scrape().await;
    assert_eq!(
        metrics.value(
            "user_manager_limit_refusals_total",
            &[("limit", "max_open_streams")]
        ),
        1.0
    );
    assert_eq!(
        metrics.sum("user_manager_limit_refusals_total", &[]),
        1.0,
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
