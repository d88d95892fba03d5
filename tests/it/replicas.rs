//! Several `user-manager` processes on one PostgreSQL database, as replicas
//! behind a load balancer run: the real binary (`common::Binary`), a real
//! server (`common::postgres`).

use std::time::{Duration, Instant};

use futures::{StreamExt, future::join_all};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use user_manager::proto::{UserRequest, UserTypeRequest};

use crate::common::{Binary, ServerProcess, big_seed, eventually, health_status, postgres, user};

const GUEST: i32 = 3;

/// `n` replicas of `serve` on the database at `url`, started at once.
async fn replicas(
    dir: &std::path::Path,
    url: &str,
    n: usize,
    extra: &[(&str, &str)],
) -> Vec<ServerProcess> {
    let binary = Binary::new(dir)
        .env("USER_MANAGER__DATABASE__URL", url)
        .envs(extra);
    join_all((0..n).map(|_| binary.start())).await
}

async fn count_users(url: &str) -> i64 {
    use sqlx::Connection;
    let mut conn = sqlx::PgConnection::connect(url).await.unwrap();
    sqlx::query_scalar("SELECT COUNT(*) FROM users")
        .fetch_one(&mut conn)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn replicas_starting_together_migrate_once_and_import_the_seed_once() {
    let dir = tempfile::tempdir().unwrap();
    let url = postgres::fresh_database().await;
    let servers = replicas(dir.path(), &url, 3, &[]).await;
    for server in &servers {
        assert_eq!(
            health_status(&server.url(), "").await,
            Some(ServingStatus::Serving)
        );
    }
    assert_eq!(count_users(&url).await, 6, "the six seed users, once");
    let imported = servers
        .iter()
        .filter(|s| s.log().contains("imported the seed"))
        .count();
    assert_eq!(imported, 1, "exactly one replica imports the seed");
    for server in &servers {
        server.assert_serves_seeded_users().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn add_user_racing_across_replicas_has_exactly_one_winner() {
    let dir = tempfile::tempdir().unwrap();
    let url = postgres::fresh_database().await;
    let servers = replicas(dir.path(), &url, 3, &[]).await;
    let mut calls = Vec::new();
    for (n, server) in servers.iter().enumerate() {
        for k in 0..4 {
            let mut client = server.client().await;
            calls.push(tokio::spawn(async move {
                client
                    .add_user(user(4_000_000_000, &format!("racer{n}x{k}"), GUEST))
                    .await
                    .unwrap()
                    .into_inner()
            }));
        }
    }
    let mut winners = 0;
    for call in calls {
        let answer = call.await.unwrap();
        if answer.error {
            assert_eq!(answer.message, "already exist");
        } else {
            winners += 1;
        }
    }
    assert_eq!(winners, 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_add_acknowledged_by_a_killed_replica_is_visible_through_another_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let url = postgres::fresh_database().await;
    let mut servers = replicas(dir.path(), &url, 2, &[]).await;
    let zoe = user(4_294_967_295, "Zoe", GUEST);
    let added = servers[0]
        .client()
        .await
        .add_user(zoe.clone())
        .await
        .unwrap()
        .into_inner();
    assert!(!added.error, "{}", added.message);
    servers[0].kill_9().await;
    let found = servers[1]
        .client()
        .await
        .get_user(UserRequest { id: zoe.id })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(found.user, Some(zoe));
}

/// Its own server, as it stops and starts it.
#[tokio::test(flavor = "multi_thread")]
async fn health_and_calls_follow_the_database_and_heal_without_a_restart() {
    let mut cluster = postgres::Cluster::start();
    let url = postgres::fresh_database_on(&cluster.admin_url()).await;
    let dir = tempfile::tempdir().unwrap();
    let seed = big_seed(dir.path(), 5_000);
    let seed = seed.to_str().unwrap();
    let interval = Duration::from_millis(500);
    let servers = replicas(
        dir.path(),
        &url,
        2,
        &[
            ("USER_MANAGER__HEALTH__CHECK_INTERVAL_MS", "500"),
            ("USER_MANAGER__SEED__PATH", seed),
            (
                "USER_MANAGER__DATABASE__POSTGRES__CONNECT_TIMEOUT_MS",
                "1000",
            ),
        ],
    )
    .await;

    // A stream in flight: the first page read, the rest still to come.
    let mut client = servers[0].client().await;
    let mut stream = client
        .get_users_by_type(UserTypeRequest { user_type: GUEST })
        .await
        .unwrap()
        .into_inner();
    assert!(stream.next().await.unwrap().is_ok());

    cluster.stop();
    let stopped = Instant::now();
    // The stream ends with UNAVAILABLE once its next page can't be read.
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.next().await {
                Some(Ok(_)) => {}
                Some(Err(status)) => break Some(status),
                None => break None,
            }
        }
    })
    .await
    .expect("the stream ends, it does not hang");
    let status = ended.expect("the stream ends with an error, not as if complete");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");

    for server in &servers {
        eventually(Duration::from_secs(10), "readiness NOT_SERVING", || async {
            health_status(&server.url(), "").await == Some(ServingStatus::NotServing)
        })
        .await;
    }
    assert!(
        stopped.elapsed() < interval * 3 + Duration::from_secs(2),
        "NOT_SERVING took {:?}",
        stopped.elapsed()
    );
    for server in &servers {
        let mut request = tonic::Request::new(UserRequest { id: 1 });
        request.set_timeout(Duration::from_secs(5));
        let started = Instant::now();
        let status = server.client().await.get_user(request).await.unwrap_err();
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    // Liveness stays SERVING: an outage is no reason to restart.
    assert_eq!(
        health_status(&servers[0].url(), "liveness").await,
        Some(ServingStatus::Serving)
    );

    cluster.restart();
    for server in &servers {
        eventually(Duration::from_secs(15), "SERVING again", || async {
            health_status(&server.url(), "").await == Some(ServingStatus::Serving)
        })
        .await;
        server.assert_serves_seeded_users().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_runs_once_however_many_run_at_once_and_again_is_a_no_op() {
    let dir = tempfile::tempdir().unwrap();
    let url = postgres::fresh_database().await;
    let binary = Binary::new(dir.path())
        .env("USER_MANAGER__DATABASE__URL", &url)
        .arg("migrate");
    let runs = join_all((0..3).map(|_| {
        let binary = binary.clone();
        tokio::task::spawn_blocking(move || binary.output())
    }))
    .await;
    for run in runs {
        let out = run.unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    let again = binary.output();
    assert!(again.status.success(), "{again:?}");
    assert_eq!(count_users(&url).await, 6);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_database_password_reaches_no_log_nor_config_output() {
    const PASSWORD: &str = "pw-that-must-not-leak";
    let dir = tempfile::tempdir().unwrap();
    // The test server trusts every local connection, so any password works.
    let url =
        postgres::fresh_database()
            .await
            .replacen("postgres@", &format!("postgres:{PASSWORD}@"), 1);
    let servers = replicas(dir.path(), &url, 1, &[]).await;
    let log = servers[0].log();
    assert!(
        log.contains("ready to serve") && log.contains("<redacted>"),
        "{log}"
    );
    assert!(!log.contains(PASSWORD), "{log}");

    let config = Binary::new(dir.path())
        .env("USER_MANAGER__DATABASE__URL", &url)
        .arg("config")
        .output();
    let shown = String::from_utf8_lossy(&config.stdout);
    assert!(
        config.status.success() && shown.contains("<redacted>"),
        "{shown}"
    );
    assert!(!shown.contains(PASSWORD), "{shown}");

    // Nor when the server can't be reached: the error names no password.
    let (_refusing, addr) = crate::common::refusing_addr();
    let failed = Binary::new(dir.path())
        .env(
            "USER_MANAGER__DATABASE__URL",
            format!("postgres://app:{PASSWORD}@{addr}/users"),
        )
        .env(
            "USER_MANAGER__DATABASE__POSTGRES__CONNECT_TIMEOUT_MS",
            "500",
        )
        .arg("migrate")
        .output();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&failed.stdout),
        String::from_utf8_lossy(&failed.stderr)
    );
    assert!(!failed.status.success(), "{text}");
    assert!(!text.contains(PASSWORD), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_standard_pg_variables_fill_in_what_the_url_leaves_out() {
    let dir = tempfile::tempdir().unwrap();
    let url = postgres::fresh_database().await;
    // postgres://postgres@127.0.0.1:PORT/NAME, split into PG* variables.
    let rest = url.strip_prefix("postgres://postgres@").unwrap();
    let (host_port, database) = rest.split_once('/').unwrap();
    let (host, port) = host_port.split_once(':').unwrap();
    let pg_env = [
        ("PGHOST", host),
        ("PGPORT", port),
        ("PGUSER", "postgres"),
        ("PGDATABASE", database),
    ];
    let servers = replicas(dir.path(), "postgres://", 1, &pg_env).await;
    servers[0].assert_serves_seeded_users().await;
    assert_eq!(
        count_users(&url).await,
        6,
        "seeded the database PGDATABASE names"
    );
}

/// `statement_timeout` bounds the statements of calls, not the one-time
/// seed import: a seed whose single INSERT takes longer than the timeout
/// still imports (200,000 users take well over 200 ms to insert).
#[tokio::test(flavor = "multi_thread")]
async fn a_seed_larger_than_the_statement_timeout_still_imports() {
    const GUESTS: u32 = 200_000;
    let dir = tempfile::tempdir().unwrap();
    let url = postgres::fresh_database().await;
    let seed = big_seed(dir.path(), GUESTS);
    let out = Binary::new(dir.path())
        .env("USER_MANAGER__DATABASE__URL", &url)
        .env(
            "USER_MANAGER__DATABASE__POSTGRES__STATEMENT_TIMEOUT_MS",
            "200",
        )
        .env("USER_MANAGER__SEED__PATH", seed.display())
        .arg("migrate")
        .output();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(count_users(&url).await, 6 + i64::from(GUESTS));
}
