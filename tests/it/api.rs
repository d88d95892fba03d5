//! The five RPCs' behaviour, through a tonic client against the real server.

use crate::common;

use std::time::Duration;

use crate::common::{Backend, ServerProcess, spawn_app, spawn_app_in, spawn_app_on, user};
use futures::{StreamExt, stream};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;
use user_manager::proto::{UserRequest, UserResponse, UserTypeRequest};

const NORMAL: i32 = 1;
const ADMINISTRATOR: i32 = 2;
const GUEST: i32 = 3;
const DISABLED: i32 = 4;

fn ids(ids: impl IntoIterator<Item = u32>) -> Vec<UserRequest> {
    ids.into_iter().map(|id| UserRequest { id }).collect()
}

async fn users_of_type(
    client: &mut user_manager::proto::user_manager_client::UserManagerClient<
        tonic::transport::Channel,
    >,
    user_type: i32,
) -> Vec<UserResponse> {
    client
        .get_users_by_type(UserTypeRequest { user_type })
        .await
        .unwrap()
        .into_inner()
        .map(|r| r.unwrap())
        .collect()
        .await
}

async fn get_user_finds_seeded_users_and_reports_missing_ones(backend: Backend) {
    let app = spawn_app_on(backend).await;
    let mut client = app.client().await;

    let found = client
        .get_user(UserRequest { id: 1 })
        .await
        .unwrap()
        .into_inner();
    assert!(!found.error);
    assert_eq!(
        found.user.unwrap(),
        user_manager::proto::User {
            id: 1,
            nickname: "admin".into(),
            mail_address: "admin@example.com".into(),
            user_type: ADMINISTRATOR,
        }
    );

    for missing in [0, 7, u32::MAX] {
        let r = client
            .get_user(UserRequest { id: missing })
            .await
            .unwrap()
            .into_inner();
        assert!(r.error, "{missing}");
        assert_eq!(r.message, "not found");
        assert_eq!(r.user, None);
    }
}

async fn add_user_stores_and_refuses_duplicates_unchanged(backend: Backend) {
    let app = spawn_app_on(backend).await;
    let mut client = app.client().await;

    let zoe = user(100, "Zoe", GUEST);
    let added = client.add_user(zoe.clone()).await.unwrap().into_inner();
    assert!(!added.error);
    assert_eq!(added.user.as_ref(), Some(&zoe));

    let again = user(100, "Impostor", ADMINISTRATOR);
    let dup = client.add_user(again).await.unwrap().into_inner();
    assert!(dup.error);
    assert_eq!(dup.message, "already exist");

    let seeded_dup = client.add_user(user(1, "root", NORMAL)).await.unwrap();
    assert_eq!(seeded_dup.into_inner().message, "already exist");

    let stored = client.get_user(UserRequest { id: 100 }).await.unwrap();
    assert_eq!(stored.into_inner().user, Some(zoe));
    let admin = client.get_user(UserRequest { id: 1 }).await.unwrap();
    assert_eq!(admin.into_inner().user.unwrap().nickname, "admin");
}

async fn add_user_rejects_invalid_fields_by_name_and_stores_nothing(backend: Backend) {
    let app = spawn_app_on(backend).await;
    let mut client = app.client().await;
    let good = user(200, "Valid", NORMAL);
    let cases = [
        (
            user_manager::proto::User {
                id: 0,
                ..good.clone()
            },
            "id",
        ),
        (
            user_manager::proto::User {
                nickname: String::new(),
                ..good.clone()
            },
            "nickname",
        ),
        (
            user_manager::proto::User {
                nickname: "x".repeat(65),
                ..good.clone()
            },
            "nickname",
        ),
        (
            user_manager::proto::User {
                nickname: "bell\u{7}".into(),
                ..good.clone()
            },
            "nickname",
        ),
        (
            user_manager::proto::User {
                mail_address: "nope".into(),
                ..good.clone()
            },
            "mail_address",
        ),
        (
            user_manager::proto::User {
                mail_address: format!("a@{}.com", "b".repeat(300)),
                ..good.clone()
            },
            "mail_address",
        ),
        (
            user_manager::proto::User {
                user_type: 0,
                ..good.clone()
            },
            "user_type",
        ),
        (
            user_manager::proto::User {
                user_type: 99,
                ..good.clone()
            },
            "user_type",
        ),
    ];
    for (bad, field) in cases {
        let status = client.add_user(bad.clone()).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{bad:?}");
        assert!(
            status.message().contains(field),
            "{field} not named in {:?}",
            status.message()
        );
    }
    let r = client.get_user(UserRequest { id: 200 }).await.unwrap();
    assert_eq!(r.into_inner().message, "not found");
    // The id itself is still free.
    assert!(!client.add_user(good).await.unwrap().into_inner().error);
}

async fn concurrent_adds_of_one_id_have_exactly_one_winner(backend: Backend) {
    let app = spawn_app_on(backend).await;
    let channel = app.channel().await;
    let calls = (0..64).map(|i| {
        let mut client =
            user_manager::proto::user_manager_client::UserManagerClient::new(channel.clone());
        async move {
            let candidate = user(500, &format!("racer{i}"), NORMAL);
            let r = client
                .add_user(candidate.clone())
                .await
                .unwrap()
                .into_inner();
            (!r.error).then_some(candidate)
        }
    });
    let winners: Vec<_> = futures::future::join_all(calls)
        .await
        .into_iter()
        .flatten()
        .collect();
    assert_eq!(winners.len(), 1, "{winners:?}");
    let mut client = app.client().await;
    let stored = client.get_user(UserRequest { id: 500 }).await.unwrap();
    assert_eq!(stored.into_inner().user.as_ref(), Some(&winners[0]));
}

async fn count_already_users_counts_every_existing_message(backend: Backend) {
    let app = spawn_app_on(backend).await;
    let mut client = app.client().await;
    let count = |reqs: Vec<UserRequest>| {
        let mut client = client.clone();
        async move {
            client
                .count_already_users(stream::iter(reqs))
                .await
                .unwrap()
                .into_inner()
        }
    };
    let r = count(ids([1, 2, 99, 1, 0, 6])).await;
    assert!(!r.error);
    assert_eq!(r.user_cnt, 4);
    assert_eq!(count(vec![]).await.user_cnt, 0);

    // 100k ids: 1..=6 exist, so each run of 10 ids (1..=10) holds 6 hits.
    let big = (0..100_000u32).map(|i| UserRequest { id: i % 10 + 1 });
    let r = client
        .count_already_users(stream::iter(big))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.user_cnt, 60_000);
}

async fn get_users_by_type_streams_every_match_in_id_order(backend: Backend) {
    let app = spawn_app_on(backend).await;
    let mut client = app.client().await;

    let normal: Vec<u32> = users_of_type(&mut client, NORMAL)
        .await
        .into_iter()
        .map(|r| r.user.unwrap().id)
        .collect();
    assert_eq!(normal, [3, 5, 6]);
    let disabled = users_of_type(&mut client, DISABLED).await;
    assert_eq!(disabled[0].user.as_ref().unwrap().nickname, "troll");
    assert!(users_of_type(&mut client, 0).await.is_empty(), "NONE");

    // Several pages, added out of order.
    for id in (1000..3100).rev() {
        client
            .add_user(user(id, &format!("g{id}"), GUEST))
            .await
            .unwrap();
    }
    let guests: Vec<u32> = users_of_type(&mut client, GUEST)
        .await
        .into_iter()
        .map(|r| r.user.unwrap().id)
        .collect();
    let expected: Vec<u32> = std::iter::once(2).chain(1000..3100).collect();
    assert_eq!(guests, expected);

    let status = client
        .get_users_by_type(UserTypeRequest { user_type: 5 })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(status.message().contains("user_type"));
}

async fn get_users_by_ids_answers_each_id_before_the_next_is_sent(backend: Backend) {
    let app = spawn_app_on(backend).await;
    let mut client = app.client().await;
    let (tx, rx) = mpsc::channel(1);
    let mut answers = client
        .get_users_by_ids(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();

    for id in [3, 1, 6, 3] {
        tx.send(UserRequest { id }).await.unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(5), answers.next())
            .await
            .expect("answered while the request stream is still open")
            .unwrap()
            .unwrap();
        assert_eq!(answer.user.unwrap().id, id);
    }
    // Missing ids produce no message: the next message answers the next id.
    tx.send(UserRequest { id: 42 }).await.unwrap();
    tx.send(UserRequest { id: 0 }).await.unwrap();
    tx.send(UserRequest { id: 2 }).await.unwrap();
    let next = answers.next().await.unwrap().unwrap();
    assert_eq!(next.user.unwrap().id, 2);

    drop(tx); // half-close: the call ends
    let end = tokio::time::timeout(Duration::from_secs(5), answers.next()).await;
    assert!(matches!(end, Ok(None)), "{end:?}");
}

async fn get_users_by_ids_streams_in_request_order_at_volume(backend: Backend) {
    let app = spawn_app_on(backend).await;
    let mut client = app.client().await;
    let requests = (0..20_000u32).map(|i| UserRequest { id: i % 8 + 1 });
    let got: Vec<u32> = client
        .get_users_by_ids(stream::iter(requests))
        .await
        .unwrap()
        .into_inner()
        .map(|r| r.unwrap().user.unwrap().id)
        .collect()
        .await;
    let expected: Vec<u32> = (0..20_000u32)
        .map(|i| i % 8 + 1)
        .filter(|id| *id <= 6)
        .collect();
    assert_eq!(got, expected);
}

#[tokio::test]
async fn users_and_seed_survive_a_restart_without_duplication() {
    let app = spawn_app().await;
    let mut client = app.client().await;
    client.add_user(user(77, "Kept", NORMAL)).await.unwrap();
    let dir = app.stop().await;

    let app = spawn_app_in(dir, |_| {}).await;
    let mut client = app.client().await;
    let kept = client.get_user(UserRequest { id: 77 }).await.unwrap();
    assert_eq!(kept.into_inner().user.unwrap().nickname, "Kept");
    let normal: Vec<u32> = users_of_type(&mut client, NORMAL)
        .await
        .into_iter()
        .map(|r| r.user.unwrap().id)
        .collect();
    assert_eq!(normal, [3, 5, 6, 77]);
}

#[tokio::test]
async fn acknowledged_adds_survive_kill_9() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(dir.path(), &[]).await;
    let mut client = server.client().await;
    for id in 300..340 {
        let r = client
            .add_user(user(id, &format!("k{id}"), GUEST))
            .await
            .unwrap();
        assert!(!r.into_inner().error);
    }
    // Killed right after the last acknowledgement: no shutdown code runs.
    server.kill_9().await;

    let server = ServerProcess::start(dir.path(), &[]).await;
    let mut client = server.client().await;
    let got: Vec<u32> = client
        .get_users_by_ids(stream::iter(ids(300..340)))
        .await
        .unwrap()
        .into_inner()
        .map(|r| r.unwrap().user.unwrap().id)
        .collect()
        .await;
    assert_eq!(got, (300..340).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_malformed_seed_fails_startup_and_leaves_no_database() {
    let dir = tempfile::tempdir().unwrap();
    let seed = dir.path().join("bad.json");
    std::fs::write(
        &seed,
        r#"{"1": {"nickname": "ok", "mail_address": "ok@example.com", "user_type": "GUEST"},
            "2": {"nickname": "bad", "mail_address": "not-a-mail", "user_type": "GUEST"}}"#,
    )
    .unwrap();
    let mut settings = common::test_settings(dir.path());
    settings.seed.path = seed.clone();
    let err = user_manager::app::Application::build(settings)
        .await
        .err()
        .expect("startup fails")
        .to_string();
    assert!(err.contains(&seed.display().to_string()), "{err}");
    assert!(
        err.contains("\"2\"") && err.contains("mail_address"),
        "{err}"
    );
    assert!(!common::db_path(dir.path()).exists());
}

#[tokio::test]
async fn storage_failures_are_internal_without_driver_text() {
    let app = spawn_app().await;
    let mut client = app.client().await;
    // Break the schema behind the server's back.
    let conn = std::process::Command::new("python3")
        .args([
            "-c",
            "import sqlite3,sys; c=sqlite3.connect(sys.argv[1]); c.execute('DROP TABLE users'); c.commit()",
        ])
        .arg(common::db_path(app.dir.path()))
        .status()
        .unwrap();
    assert!(conn.success());
    let status = client.get_user(UserRequest { id: 1 }).await.unwrap_err();
    assert_eq!(status.code(), Code::Internal);
    for leak in ["users", "sqlite", "table", app.dir.path().to_str().unwrap()] {
        assert!(!status.message().contains(leak), "{}", status.message());
    }
}

async fn health_and_reflection_v1_describe_the_service(backend: Backend) {
    use tonic_reflection::pb::v1::{
        ServerReflectionRequest, server_reflection_client::ServerReflectionClient,
        server_reflection_request::MessageRequest, server_reflection_response::MessageResponse,
    };
    let app = spawn_app_on(backend).await;
    for name in ["", "UserManager"] {
        assert_eq!(
            common::health_status(&app.url(), name).await,
            Some(tonic_health::pb::health_check_response::ServingStatus::Serving),
            "{name:?}"
        );
    }
    let mut reflection = ServerReflectionClient::new(app.channel().await);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let Some(MessageResponse::ListServicesResponse(list)) =
        responses.next().await.unwrap().unwrap().message_response
    else {
        panic!("not a list response");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for expected in ["UserManager", "grpc.health.v1.Health"] {
        assert!(names.iter().any(|n| n == expected), "{names:?}");
    }
}

/// The behaviour tests, once per backend: `api::sqlite::NAME` and
/// `api::postgres::NAME` (a fresh PostgreSQL database each). The tests above
/// without a backend poke at SQLite's file and run on it alone.
macro_rules! on_every_backend {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Backend::Sqlite).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Backend::Postgres).await;
                }
            )*
        }
    };
}

on_every_backend!(
    get_user_finds_seeded_users_and_reports_missing_ones,
    add_user_stores_and_refuses_duplicates_unchanged,
    add_user_rejects_invalid_fields_by_name_and_stores_nothing,
    concurrent_adds_of_one_id_have_exactly_one_winner,
    count_already_users_counts_every_existing_message,
    get_users_by_type_streams_every_match_in_id_order,
    get_users_by_ids_answers_each_id_before_the_next_is_sent,
    get_users_by_ids_streams_in_request_order_at_volume,
    health_and_reflection_v1_describe_the_service,
);
