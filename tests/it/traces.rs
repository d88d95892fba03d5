//! Traces end to end: the real binary exports over OTLP/gRPC to a collector
//! this test runs. Batches are held back for an hour (OTEL_BSP_SCHEDULE_DELAY),
//! so whatever the collector holds after SIGTERM was flushed on shutdown.

use crate::common;

use std::{process::ExitStatus, time::Duration};

use crate::common::{
    ServerProcess,
    otlp::{Collector, Exported},
    user,
};
use futures::{StreamExt, stream};
use opentelemetry_proto::tonic::{
    common::v1::{KeyValue, any_value::Value},
    trace::v1::{Span, span::SpanKind, status::StatusCode},
};
use sqlx::{Connection, SqliteConnection};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Code, Request, codegen::http::uri::PathAndQuery, transport::Channel};
use user_manager::proto::{UserRequest, UserTypeRequest, user_manager_client::UserManagerClient};

const NORMAL: i32 = 1;
const GUEST: i32 = 3;
const DISABLED: i32 = 4;

fn attr<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref()?.value.as_ref())
}

fn str_attr<'a>(attributes: &'a [KeyValue], key: &str) -> &'a str {
    match attr(attributes, key) {
        Some(Value::StringValue(s)) => s,
        other => panic!("{key}: {other:?} in {attributes:?}"),
    }
}

fn int_attr(attributes: &[KeyValue], key: &str) -> i64 {
    match attr(attributes, key) {
        Some(Value::IntValue(n)) => *n,
        other => panic!("{key}: {other:?} in {attributes:?}"),
    }
}

fn is_error(span: &Span) -> bool {
    span.status
        .as_ref()
        .is_some_and(|s| s.code == StatusCode::Error as i32)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The binary, exporting to `collector` only when it shuts down.
async fn start_exporting(
    dir: &std::path::Path,
    collector: &Collector,
    extra_env: &[(&str, &str)],
) -> ServerProcess {
    let endpoint = collector.endpoint();
    let mut env = vec![
        ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "3600000"),
    ];
    env.extend_from_slice(extra_env);
    ServerProcess::start(dir, &env).await
}

/// SIGTERM, then waits for the process to exit.
async fn terminate(mut server: ServerProcess) -> ExitStatus {
    server.sigterm_and_wait(Duration::from_secs(30)).await
}

fn ids(ids: impl IntoIterator<Item = u32>) -> Vec<UserRequest> {
    ids.into_iter().map(|id| UserRequest { id }).collect()
}

/// Each of the five RPCs once, successfully.
async fn call_all_five(client: &mut UserManagerClient<Channel>) {
    let found = client.get_user(UserRequest { id: 1 }).await.unwrap();
    assert_eq!(found.into_inner().user.unwrap().id, 1);
    let added = client.add_user(user(100, "Zoe", GUEST)).await.unwrap();
    assert!(!added.into_inner().error);
    let normal: Vec<_> = client
        .get_users_by_type(UserTypeRequest { user_type: NORMAL })
        .await
        .unwrap()
        .into_inner()
        .collect()
        .await;
    assert_eq!(normal.len(), 3, "{normal:?}");
    let counted = client
        .count_already_users(stream::iter(ids([1, 2, 99])))
        .await
        .unwrap();
    assert_eq!(counted.into_inner().user_cnt, 2);
    let by_ids: Vec<_> = client
        .get_users_by_ids(stream::iter(ids([1, 3, 4, 42])))
        .await
        .unwrap()
        .into_inner()
        .collect()
        .await;
    assert_eq!(by_ids.len(), 3, "{by_ids:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_rpc_gets_one_server_span_flushed_on_sigterm() {
    let collector = Collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = start_exporting(
        dir.path(),
        &collector,
        &[("OTEL_RESOURCE_ATTRIBUTES", "deployment.environment=test")],
    )
    .await;
    call_all_five(&mut server.client().await).await;
    // Health and reflection are served next to UserManager but not traced.
    assert!(common::health_status(&server.url(), "").await.is_some());
    reflection_lists_services(&server.url()).await;

    assert!(collector.spans().is_empty(), "exported before shutdown");
    assert!(terminate(server).await.success());

    let spans = collector.server_spans();
    let mut names: Vec<_> = spans.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        [
            "UserManager/AddUser",
            "UserManager/CountAlreadyUsers",
            "UserManager/GetUser",
            "UserManager/GetUsersByIds",
            "UserManager/GetUsersByType",
        ]
    );
    // (method, request messages, response messages)
    for (method, requests, responses) in [
        ("GetUser", 1, 1),
        ("AddUser", 1, 1),
        ("GetUsersByType", 1, 3),
        ("CountAlreadyUsers", 3, 1),
        ("GetUsersByIds", 4, 3),
    ] {
        let span = &spans[&format!("UserManager/{method}")];
        let a = &span.attributes;
        assert_eq!(str_attr(a, "rpc.system"), "grpc", "{method}");
        assert_eq!(str_attr(a, "rpc.service"), "UserManager", "{method}");
        assert_eq!(str_attr(a, "rpc.method"), method);
        assert_eq!(int_attr(a, "rpc.grpc.status_code"), 0, "{method}");
        assert_eq!(
            int_attr(a, "rpc.request.message_count"),
            requests,
            "{method}"
        );
        assert_eq!(
            int_attr(a, "rpc.response.message_count"),
            responses,
            "{method}"
        );
        assert!(!is_error(span), "{method}");
        assert!(span.parent_span_id.is_empty(), "{method} is a root");
    }

    // Every other span is a database span inside one of those calls.
    let all = collector.spans();
    for Exported { span, resource } in &all {
        assert_eq!(str_attr(resource, "service.name"), "user-manager");
        assert_eq!(
            str_attr(resource, "service.version"),
            env!("CARGO_PKG_VERSION")
        );
        assert_eq!(str_attr(resource, "deployment.environment"), "test");
        if span.kind != SpanKind::Server as i32 {
            assert_eq!(str_attr(&span.attributes, "db.system"), "sqlite");
            assert!(
                spans.values().any(|s| s.span_id == span.parent_span_id),
                "{} has no server parent",
                span.name
            );
        }
    }
    assert!(all.len() > spans.len(), "no database spans");
}

/// Lists services through reflection v1, as grpcurl does.
async fn reflection_lists_services(url: &str) {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest,
    };
    let channel = Channel::from_shared(url.to_owned())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let list = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let answers: Vec<_> = ServerReflectionClient::new(channel)
        .server_reflection_info(stream::iter([list]))
        .await
        .unwrap()
        .into_inner()
        .collect()
        .await;
    assert!(matches!(&answers[..], [Ok(_)]), "{answers:?}");
}

/// Writes users with ids `first..=last` of `user_type` into the server's
/// database behind its back, plus `extra` (SQL) if any, and waits until the
/// server has noticed (at its next readiness check: SQLite's one writer
/// otherwise answers from the ids it holds in memory).
async fn insert_users(
    server: &ServerProcess,
    dir: &std::path::Path,
    first: u32,
    last: u32,
    user_type: i32,
    extra: &str,
) {
    let logged = server.log().len();
    let url = format!("sqlite://{}", common::db_path(dir).display());
    let mut db = SqliteConnection::connect(&url).await.unwrap();
    let bulk = format!(
        "WITH RECURSIVE n(i) AS (SELECT {first} UNION ALL SELECT i + 1 FROM n WHERE i < {last}) \
         INSERT INTO users (id, nickname, mail_address, user_type) \
         SELECT i, 'u' || i, 'u' || i || '@example.com', {user_type} FROM n; {extra}"
    );
    // Test-made SQL from numbers and a constant.
    sqlx::raw_sql(sqlx::AssertSqlSafe(bulk))
        .execute(&mut db)
        .await
        .unwrap();
    db.close().await.unwrap();
    server
        .wait_for_log(logged, "another process wrote to the database")
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_faults_are_errors_and_client_faults_are_not() {
    let collector = Collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = start_exporting(dir.path(), &collector, &[]).await;
    // A user the service can't read back (an empty nickname), id 5000, after
    // 601 readable DISABLED ones: the stream of those fails after a page.
    let unreadable = "INSERT INTO users (id, nickname, mail_address, user_type) \
         VALUES (5000, '', 'broken@example.com', 4)";
    insert_users(&server, dir.path(), 1000, 1600, DISABLED, unreadable).await;
    let mut client = server.client().await;

    let internal = client.get_user(UserRequest { id: 5000 }).await.unwrap_err();
    assert_eq!(internal.code(), Code::Internal);
    let invalid = client.add_user(user(7, "", GUEST)).await.unwrap_err();
    assert_eq!(invalid.code(), Code::InvalidArgument);
    // The first page (troll and 1000..=1510) arrives, then the second fails.
    let mut disabled = client
        .get_users_by_type(UserTypeRequest {
            user_type: DISABLED,
        })
        .await
        .unwrap()
        .into_inner();
    let mut received = 0;
    let failed = loop {
        match disabled.next().await.unwrap() {
            Ok(_) => received += 1,
            Err(status) => break status,
        }
    };
    assert_eq!((received, failed.code()), (512, Code::Internal));
    let mut grpc = tonic::client::Grpc::new(
        Channel::from_shared(server.url())
            .unwrap()
            .connect()
            .await
            .unwrap(),
    );
    grpc.ready().await.unwrap();
    let unknown = grpc
        .unary::<_, user_manager::proto::UserResponse, _>(
            Request::new(UserRequest { id: 1 }),
            PathAndQuery::from_static("/UserManager/Nope"),
            tonic_prost::ProstCodec::default(),
        )
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::Unimplemented);
    assert!(terminate(server).await.success());

    let spans = collector.server_spans();
    // (span, gRPC status, span status error?, response messages)
    for (name, code, error, responses) in [
        ("UserManager/GetUser", Code::Internal, true, 0),
        ("UserManager/AddUser", Code::InvalidArgument, false, 0),
        ("UserManager/GetUsersByType", Code::Internal, true, 512),
        ("UserManager/_OTHER", Code::Unimplemented, true, 0),
    ] {
        let span = spans.get(name).unwrap_or_else(|| panic!("no {name}"));
        let a = &span.attributes;
        assert_eq!(int_attr(a, "rpc.grpc.status_code"), code as i64, "{name}");
        assert_eq!(is_error(span), error, "{name}");
        assert_eq!(
            int_attr(a, "rpc.response.message_count"),
            responses,
            "{name}"
        );
    }
    assert_eq!(spans.len(), 4, "{:?}", spans.keys());
}

/// The caller's span, as a W3C traceparent names it.
const PARENT: &str = "00f067aa0ba902b7";

/// `message` as sent from inside the caller's sampled span `PARENT` of `trace`.
fn with_parent<T>(trace: &str, message: T) -> Request<T> {
    let mut request = Request::new(message);
    let traceparent = format!("00-{trace}-{PARENT}-01");
    let metadata = request.metadata_mut();
    metadata.insert("traceparent", traceparent.parse().unwrap());
    metadata.insert("tracestate", "vendor=opaque".parse().unwrap());
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_traceparent_makes_the_server_span_its_child() {
    const TRACE_A: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
    const TRACE_B: &str = "0af7651916cd43dd8448eb211c80319c";
    let collector = Collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let endpoint = collector.endpoint();
    // The endpoint through the configuration this time; and only calls whose
    // caller sampled them are recorded.
    let server = ServerProcess::start(
        dir.path(),
        &[
            ("USER_MANAGER__TELEMETRY__OTLP_ENDPOINT", &endpoint),
            ("OTEL_BSP_SCHEDULE_DELAY", "3600000"),
            ("OTEL_TRACES_SAMPLER", "parentbased_always_off"),
        ],
    )
    .await;
    let mut client = server.client().await;
    client
        .get_user(with_parent(TRACE_A, UserRequest { id: 1 }))
        .await
        .unwrap();
    client
        .add_user(with_parent(TRACE_B, user(100, "Zoe", GUEST)))
        .await
        .unwrap();
    // No traceparent: a root, which this sampler drops.
    client.get_user(UserRequest { id: 2 }).await.unwrap();
    assert!(terminate(server).await.success());

    let spans = collector.spans();
    let server_spans = collector.server_spans();
    assert_eq!(server_spans.len(), 2, "{:?}", server_spans.keys());
    for (name, trace, db_operation) in [
        ("UserManager/GetUser", TRACE_A, "SELECT"),
        ("UserManager/AddUser", TRACE_B, "INSERT"),
    ] {
        let server_span = &server_spans[name];
        assert_eq!(hex(&server_span.trace_id), trace, "{name}");
        assert_eq!(hex(&server_span.parent_span_id), PARENT, "{name}");
        assert_eq!(server_span.trace_state, "vendor=opaque", "{name}");
        let db: Vec<_> = spans
            .iter()
            .map(|e| &e.span)
            .filter(|s| s.parent_span_id == server_span.span_id)
            .collect();
        let [db] = &db[..] else {
            panic!("{name}: one database span expected, got {db:?}");
        };
        assert_eq!(db.name, format!("{db_operation} users"));
        assert_eq!(db.trace_id, server_span.trace_id);
        assert_eq!(str_attr(&db.attributes, "db.system"), "sqlite");
        assert_eq!(str_attr(&db.attributes, "db.operation"), db_operation);
    }
    assert_eq!(spans.len(), 4, "two calls, a database span each");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_endpoint_nothing_is_exported_and_the_server_works() {
    let collector = Collector::start().await;
    let endpoint = collector.endpoint();
    for env in [
        &[][..],
        // Endpoints, with export turned off either standard way.
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_TRACES_EXPORTER", "none"),
        ][..],
        &[
            ("USER_MANAGER__TELEMETRY__OTLP_ENDPOINT", endpoint.as_str()),
            ("OTEL_SDK_DISABLED", "true"),
        ][..],
    ] {
        let dir = tempfile::tempdir().unwrap();
        let server = ServerProcess::start(dir.path(), env).await;
        call_all_five(&mut server.client().await).await;
        assert!(terminate(server).await.success(), "{env:?}");
    }
    assert!(collector.spans().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_is_down_costs_clients_nothing() {
    let (_held, refusing) = common::refusing_addr();
    let nobody = format!("http://{refusing}");
    let dir = tempfile::tempdir().unwrap();
    // Exports are attempted (and fail) every 50 ms while clients call.
    let server = ServerProcess::start(
        dir.path(),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &nobody),
            ("OTEL_BSP_SCHEDULE_DELAY", "50"),
        ],
    )
    .await;
    let mut client = server.client().await;
    call_all_five(&mut client).await;
    for id in 1..=100 {
        client.get_user(UserRequest { id }).await.unwrap();
    }
    // The flush fails too, within its bound, and the exit stays clean.
    assert!(terminate(server).await.success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_and_timed_out_streams_end_their_spans_with_that_status() {
    let collector = Collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let server = start_exporting(dir.path(), &collector, &[]).await;
    let mut client = server.client().await;

    // A bidirectional call whose client stops answering: its deadline ends it.
    let (ids_sender, ids) = mpsc::channel(1);
    let mut request = Request::new(ReceiverStream::new(ids));
    request.set_timeout(Duration::from_millis(300));
    ids_sender.send(UserRequest { id: 1 }).await.unwrap();
    let mut answers = client.get_users_by_ids(request).await.unwrap().into_inner();
    assert_eq!(answers.next().await.unwrap().unwrap().user.unwrap().id, 1);
    let expired = answers.next().await.unwrap().unwrap_err();
    assert_eq!(expired.code(), Code::DeadlineExceeded);
    drop(ids_sender);

    // A stream the client walks away from after the first answer, too long
    // for flow control to let the server finish it first.
    insert_users(&server, dir.path(), 1000, 30999, NORMAL, "").await;
    let mut answers = client
        .get_users_by_type(UserTypeRequest { user_type: NORMAL })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answers.next().await.unwrap().unwrap().user.unwrap().id, 3);
    drop(answers);
    assert!(terminate(server).await.success());

    let spans = collector.server_spans();
    let expired = &spans["UserManager/GetUsersByIds"];
    let a = &expired.attributes;
    assert_eq!(
        int_attr(a, "rpc.grpc.status_code"),
        Code::DeadlineExceeded as i64
    );
    assert!(is_error(expired));
    assert_eq!(int_attr(a, "rpc.request.message_count"), 1);
    assert_eq!(int_attr(a, "rpc.response.message_count"), 1);
    let cancelled = &spans["UserManager/GetUsersByType"];
    let a = &cancelled.attributes;
    assert_eq!(int_attr(a, "rpc.grpc.status_code"), Code::Cancelled as i64);
    assert!(!is_error(cancelled), "the client's doing");
    let sent = int_attr(a, "rpc.response.message_count");
    assert!((1..30_000).contains(&sent), "{sent} of 30003 sent");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_lines_carry_the_trace_and_span_ids() {
    let collector = Collector::start().await;
    let dir = tempfile::tempdir().unwrap();
    let endpoint = collector.endpoint();
    let mut server = ServerProcess::start(
        dir.path(),
        &[
            ("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint),
            ("USER_MANAGER__LOG__FORMAT", "json"),
            ("USER_MANAGER__LOG__LEVEL", "info"),
        ],
    )
    .await;
    let unreadable = "INSERT INTO users (id, nickname, mail_address, user_type) \
         VALUES (5000, '', 'broken@example.com', 4)";
    insert_users(&server, dir.path(), 1000, 1000, DISABLED, unreadable).await;
    let mut client = server.client().await;
    let failed = client.get_user(UserRequest { id: 5000 }).await.unwrap_err();
    assert_eq!(failed.code(), Code::Internal);
    let status = server.sigterm_and_wait(Duration::from_secs(30)).await;
    assert!(status.success());

    let span = &collector.server_spans()["UserManager/GetUser"];
    let lines: Vec<serde_json::Value> = server
        .stdout_lines()
        .iter()
        .map(|line| serde_json::from_str(line).expect(line))
        .collect();
    // The handler logs the storage error inside the call's span.
    let inside: Vec<_> = lines
        .iter()
        .filter(|l| l.get("trace_id").is_some())
        .collect();
    let [error] = &inside[..] else {
        panic!("one line inside a span expected: {lines:#?}");
    };
    assert_eq!(error["level"], "ERROR");
    assert_eq!(error["trace_id"], hex(&span.trace_id));
    assert_eq!(error["span_id"], hex(&span.span_id));
    // Lines outside any span (startup, shutdown) have none.
    assert!(lines.len() > 1, "{lines:#?}");
    assert!(
        lines
            .iter()
            .all(|l| l.get("span_id").is_some() == l.get("trace_id").is_some())
    );
}
