//! The `UserStore` contract, run against every backend: SQLite in a
//! temporary file, PostgreSQL in a fresh database on a real server
//! (`common::postgres`). A new backend adds one `backend!` line.

use std::time::Duration;

use tempfile::TempDir;
use user_manager::{
    config::Settings,
    domain::{User, UserId, UserType},
    store::{AddOutcome, SeedOutcome, Store, StoreError, UserStore},
    wire::EncodedUser,
};

use crate::common::postgres as pg;

/// A store over an empty, migrated database, and what keeps it alive.
/// `sqlite-ids`: SQLite with every stored id in memory (built by the
/// readiness check, as when serving), so reads and adds take those paths;
/// `sqlite`: before that, every read a query.
pub(crate) async fn open(backend: &str) -> (Store, Option<TempDir>) {
    let mut settings = Settings::embedded_default();
    let dir = match backend {
        "sqlite" | "sqlite-ids" => {
            let dir = tempfile::tempdir().unwrap();
            settings.database.url = format!("sqlite://{}", dir.path().join("users.db").display());
            Some(dir)
        }
        "postgres" => {
            settings.database.url = pg::fresh_database().await;
            None
        }
        other => panic!("no backend {other}"),
    };
    let store = Store::open(&settings.database).await.expect("store opens");
    store.migrate().await.expect("migrates");
    if backend == "sqlite-ids" {
        ids_in_memory(&store).await;
    }
    (store, dir)
}

/// Runs the readiness check, which builds the SQLite store's ids in memory,
/// until they are.
async fn ids_in_memory(store: &Store) {
    let Store::Sqlite(sqlite) = store else {
        panic!("not SQLite")
    };
    for _ in 0..500 {
        store.check().await.expect("readable");
        if sqlite.ids_in_memory() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the ids never reached memory");
}

fn sqlite_ids_in_memory(store: &Store) -> bool {
    matches!(store, Store::Sqlite(s) if s.ids_in_memory())
}

fn user(id: u32, nickname: &str, user_type: i32) -> User {
    User::parse(
        id,
        nickname.into(),
        format!("{nickname}@example.com"),
        user_type,
    )
    .unwrap()
}

fn ids(raw: &[u32]) -> Vec<UserId> {
    raw.iter().map(|&id| UserId::new(id).unwrap()).collect()
}

fn id_list(users: &[EncodedUser]) -> Vec<u32> {
    users.iter().map(|u| u.id().get()).collect()
}

/// The answers for `users` as `wire` encodes them: what a backend's reads
/// must give, byte for byte (SQLite's are computed by SQL, not by us).
fn encoded(users: &[User]) -> Vec<EncodedUser> {
    users.iter().map(EncodedUser::encode).collect()
}

async fn get_add_and_already_exists(backend: &str) {
    let (store, _dir) = open(backend).await;
    let id = UserId::new(7).unwrap();
    assert_eq!(store.get(id).await.unwrap(), None);
    let alice = user(7, "alice", 1);
    assert_eq!(store.add(alice.clone()).await.unwrap(), AddOutcome::Added);
    assert_eq!(
        store.add(user(7, "mallory", 2)).await.unwrap(),
        AddOutcome::AlreadyExists
    );
    assert_eq!(
        store.get(id).await.unwrap(),
        Some(EncodedUser::encode(&alice)),
        "left unchanged"
    );
    store.close().await;
}

async fn the_largest_id_round_trips(backend: &str) {
    let (store, _dir) = open(backend).await;
    let max = user(u32::MAX, "max", 3);
    assert_eq!(store.add(max.clone()).await.unwrap(), AddOutcome::Added);
    assert_eq!(
        store.get(max.id).await.unwrap(),
        Some(EncodedUser::encode(&max))
    );
    assert_eq!(
        store.get_many(&[max.id]).await.unwrap(),
        encoded(std::slice::from_ref(&max))
    );
    let page = store.page_by_type(UserType::Guest, None, 10).await.unwrap();
    assert_eq!(page, encoded(&[max]));
    store.close().await;
}

async fn get_many_keeps_order_and_repeats(backend: &str) {
    let (store, _dir) = open(backend).await;
    for (id, name) in [(1, "a"), (2, "b"), (3, "c")] {
        store.add(user(id, name, 1)).await.unwrap();
    }
    let found = store.get_many(&ids(&[3, 9, 1, 3, 2, 1])).await.unwrap();
    assert_eq!(id_list(&found), [3, 1, 3, 2, 1]);
    assert!(store.get_many(&[]).await.unwrap().is_empty());
    store.close().await;
}

/// Every character a valid user may hold comes back unchanged through each
/// read path (SQLite's reads decode the JSON its queries build: quotes,
/// backslashes and non-ASCII text are escaped or passed through there).
async fn any_valid_text_reads_back_unchanged(backend: &str) {
    let (store, _dir) = open(backend).await;
    let texts = [
        ("quote \" and back\\slash", "o'brien+tag@example.com"),
        ("Zäru 猿 🎉 \u{2028}/", "zaru@exämple.jp"),
        (&*"é".repeat(64), "a.b-c_d~e@x-1.example"),
        ("{\"json\": [1, 2]}", "q@q.q"),
    ];
    let mut users = Vec::new();
    for (i, (nickname, mail)) in texts.into_iter().enumerate() {
        let user = User::parse(i as u32 + 1, nickname.into(), mail.into(), 2).unwrap();
        assert_eq!(store.add(user.clone()).await.unwrap(), AddOutcome::Added);
        users.push(user);
    }
    for user in &users {
        assert_eq!(
            store.get(user.id).await.unwrap(),
            Some(EncodedUser::encode(user))
        );
    }
    let all: Vec<UserId> = users.iter().map(|u| u.id).collect();
    assert_eq!(store.get_many(&all).await.unwrap(), encoded(&users));
    let page = store.page_by_type(UserType::Administrator, None, 10).await;
    assert_eq!(page.unwrap(), encoded(&users));
    store.close().await;
}

async fn count_existing_counts_repeats(backend: &str) {
    let (store, _dir) = open(backend).await;
    store.add(user(1, "a", 1)).await.unwrap();
    store.add(user(2, "b", 1)).await.unwrap();
    assert_eq!(store.count_existing(&ids(&[1, 1, 2, 5])).await.unwrap(), 3);
    assert_eq!(store.count_existing(&[]).await.unwrap(), 0);
    store.close().await;
}

async fn page_by_type_pages_by_keyset(backend: &str) {
    let (store, _dir) = open(backend).await;
    for id in 1..=25 {
        let user_type = if id % 2 == 0 { 3 } else { 1 };
        store
            .add(user(id, &format!("u{id}"), user_type))
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    let mut after = None;
    loop {
        let page = store.page_by_type(UserType::Guest, after, 5).await.unwrap();
        assert!(page.len() <= 5);
        if page.is_empty() {
            break;
        }
        let users: Vec<User> = page.iter().map(EncodedUser::to_user).collect();
        assert_eq!(page, encoded(&users));
        assert!(users.iter().all(|u| u.user_type == UserType::Guest));
        after = page.last().map(EncodedUser::id);
        seen.extend(id_list(&page));
    }
    assert_eq!(seen, (2..=24).step_by(2).collect::<Vec<u32>>());
    assert!(
        store
            .page_by_type(UserType::Disabled, None, 5)
            .await
            .unwrap()
            .is_empty()
    );
    store.close().await;
}

async fn the_seed_is_imported_once(backend: &str) {
    let (store, _dir) = open(backend).await;
    let seed = vec![user(1, "a", 1), user(2, "b", 2)];
    assert_eq!(
        store.seed(&seed).await.unwrap(),
        SeedOutcome::Imported { users: 2 }
    );
    store.add(user(3, "c", 1)).await.unwrap();
    assert_eq!(
        store.seed(&seed).await.unwrap(),
        SeedOutcome::AlreadyImported
    );
    assert_eq!(store.count_existing(&ids(&[1, 2, 3])).await.unwrap(), 3);
    store.close().await;
}

async fn racing_adds_of_one_id_have_one_winner(backend: &str) {
    let (store, _dir) = open(backend).await;
    let racers: Vec<_> = (0..16)
        .map(|n| {
            let store = store.clone();
            tokio::spawn(async move { store.add(user(42, &format!("racer{n}"), 1)).await })
        })
        .collect();
    let mut added = 0;
    for racer in racers {
        if racer.await.unwrap().unwrap() == AddOutcome::Added {
            added += 1;
        }
    }
    assert_eq!(added, 1);
    store.close().await;
}

async fn migrating_twice_changes_nothing(backend: &str) {
    let (store, _dir) = open(backend).await;
    store.add(user(5, "kept", 4)).await.unwrap();
    store.migrate().await.unwrap();
    store.migrate().await.unwrap();
    assert!(store.get(UserId::new(5).unwrap()).await.unwrap().is_some());
    store.check().await.unwrap();
    store.close().await;
}

/// Many reads at once, of every kind, with ids found and missing and
/// repeated: each caller gets its own answer (SQLite answers callers queued
/// behind busy connections with one query and splits the rows back).
async fn concurrent_reads_each_get_their_own_answer(backend: &str) {
    let (store, _dir) = open(backend).await;
    // Odd ids exist, even ones don't.
    let adds: Vec<_> = (1..=99)
        .step_by(2)
        .map(|id| {
            let store = store.clone();
            tokio::spawn(async move { store.add(user(id, &format!("u{id}"), 1)).await })
        })
        .collect();
    for add in adds {
        assert_eq!(add.await.unwrap().unwrap(), AddOutcome::Added);
    }
    let readers: Vec<_> = (0..300u32)
        .map(|n| {
            let store = store.clone();
            tokio::spawn(async move {
                let asked: Vec<u32> = (0..n % 7 + 1).map(|k| (n * 7 + k * 3) % 100 + 1).collect();
                let odd: Vec<u32> = asked.iter().copied().filter(|id| id % 2 == 1).collect();
                match n % 3 {
                    0 => {
                        let got = store.get(UserId::new(asked[0]).unwrap()).await.unwrap();
                        assert_eq!(
                            got.map(|u| u.id().get()),
                            odd.first().copied().filter(|&id| id == asked[0]),
                            "get {asked:?}"
                        );
                    }
                    1 => {
                        let got = store.get_many(&ids(&asked)).await.unwrap();
                        assert_eq!(id_list(&got), odd, "get_many {asked:?}");
                        assert!(
                            got.iter()
                                .map(EncodedUser::to_user)
                                .all(|u| u.nickname.as_str() == format!("u{}", u.id))
                        );
                    }
                    _ => {
                        let n = store.count_existing(&ids(&asked)).await.unwrap();
                        assert_eq!(n, odd.len() as u64, "count_existing {asked:?}");
                    }
                }
            })
        })
        .collect();
    for reader in readers {
        reader.await.unwrap();
    }
    store.close().await;
}

/// Many single-id reads at once, several callers per id, some ids missing:
/// each caller gets the user of its own id, whole (SQLite answers queued
/// single-id reads with one query and hands each caller its user by id).
async fn concurrent_gets_of_the_same_ids_each_get_the_user(backend: &str) {
    let (store, _dir) = open(backend).await;
    for id in [1, 2, 4, 5] {
        store.add(user(id, &format!("u{id}"), 2)).await.unwrap();
    }
    let readers: Vec<_> = (0..400u32)
        .map(|n| {
            let store = store.clone();
            let id = n % 6 + 1;
            tokio::spawn(async move {
                let got = if n % 2 == 0 {
                    store.get(UserId::new(id).unwrap()).await.unwrap()
                } else {
                    let many = store.get_many(&ids(&[id])).await.unwrap();
                    assert!(many.len() <= 1, "one id, {} users", many.len());
                    many.into_iter().next()
                };
                match id {
                    3 | 6 => assert_eq!(got, None, "id {id} does not exist"),
                    _ => {
                        let got = got.unwrap_or_else(|| panic!("id {id} exists"));
                        assert_eq!(got, EncodedUser::encode(&user(id, &format!("u{id}"), 2)));
                    }
                }
            })
        })
        .collect();
    for reader in readers {
        reader.await.unwrap();
    }
    store.close().await;
}

/// Adds at once of new ids, ids taken before, and ids raced within the same
/// moment: each id has exactly one winner, and every caller hears the truth.
async fn concurrent_adds_are_each_told_the_truth(backend: &str) {
    let (store, _dir) = open(backend).await;
    for id in 1..=10 {
        store.add(user(id, "early", 2)).await.unwrap();
    }
    let adds: Vec<_> = (0..90u32)
        .map(|n| {
            let store = store.clone();
            // Ids 1..=30, three callers each: 1..=10 exist already.
            let id = n % 30 + 1;
            tokio::spawn(async move { (id, n, store.add(user(id, &format!("n{n}"), 3)).await) })
        })
        .collect();
    let mut winners = std::collections::HashMap::new();
    for add in adds {
        let (id, n, outcome) = add.await.unwrap();
        if outcome.unwrap() == AddOutcome::Added {
            assert!(id > 10, "id {id} existed before");
            assert!(winners.insert(id, n).is_none(), "two winners for id {id}");
        }
    }
    assert_eq!(winners.len(), 20, "each new id has a winner");
    for id in 1..=30 {
        let stored = store
            .get(UserId::new(id).unwrap())
            .await
            .unwrap()
            .unwrap()
            .to_user();
        let expected = winners
            .get(&id)
            .map_or("early".to_owned(), |n| format!("n{n}"));
        assert_eq!(stored.nickname.as_str(), expected, "id {id}");
    }
    store.close().await;
}

/// Users stored before the ids are read into memory are all there after,
/// and reads answered from memory agree with the database's answers.
#[tokio::test]
async fn sqlite_ids_in_memory_hold_the_users_stored_before() {
    within_a_minute(async {
        let (store, _dir) = open("sqlite").await;
        // More than one page of the build (8192 ids), with gaps.
        let users: Vec<User> = (1..=20_000u32)
            .filter(|id| id % 3 != 0)
            .map(|id| user(id, &format!("u{id}"), 1))
            .collect();
        assert_eq!(
            store.seed(&users).await.unwrap(),
            SeedOutcome::Imported { users: users.len() }
        );
        let asked = ids(&[3, 1, 19_999, 20_000, 20_001, 1, 9_000, 8_192, 8_194]);
        let count = store.count_existing(&asked).await.unwrap();
        let found = id_list(&store.get_many(&asked).await.unwrap());
        assert!(!sqlite_ids_in_memory(&store));
        ids_in_memory(&store).await;
        assert_eq!(store.count_existing(&asked).await.unwrap(), count);
        assert_eq!(count, 6);
        assert_eq!(id_list(&store.get_many(&asked).await.unwrap()), found);
        assert_eq!(found, [1, 19_999, 20_000, 1, 8_192, 8_194]);
        assert_eq!(store.get(UserId::new(3).unwrap()).await.unwrap(), None);
        assert!(store.get(UserId::new(2).unwrap()).await.unwrap().is_some());
        store.close().await;
    })
    .await;
}

/// Another process writing to the file breaks the one-writer contract, but
/// is still noticed: by the next readiness check (SQLite's data_version), or
/// sooner by an add of an id it took. Reads then go to the database until
/// the ids are read again.
#[tokio::test]
async fn sqlite_ids_in_memory_notice_another_writer() {
    use sqlx::Connection;
    within_a_minute(async {
        let (store, dir) = open("sqlite-ids").await;
        store.add(user(1, "ours", 1)).await.unwrap();
        let url = format!(
            "sqlite://{}",
            dir.as_ref().unwrap().path().join("users.db").display()
        );
        let mut other = sqlx::SqliteConnection::connect(&url).await.unwrap();
        for id in [2, 3] {
            sqlx::query(
                "INSERT INTO users (id, nickname, mail_address, user_type)                  VALUES (?1, 'theirs', 'theirs@example.com', 1)",
            )
            .bind(id)
            .execute(&mut other)
            .await
            .unwrap();
        }
        // An add of an id the other process took: told the truth.
        assert_eq!(
            store.add(user(2, "ours", 1)).await.unwrap(),
            AddOutcome::AlreadyExists
        );
        assert!(!sqlite_ids_in_memory(&store), "dropped by that add");
        assert_eq!(store.count_existing(&ids(&[1, 2, 3])).await.unwrap(), 3);
        ids_in_memory(&store).await;
        assert_eq!(store.count_existing(&ids(&[1, 2, 3, 4])).await.unwrap(), 3);
        // Adds work as before once the ids are read again.
        assert_eq!(
            store.add(user(3, "ours", 1)).await.unwrap(),
            AddOutcome::AlreadyExists
        );
        assert_eq!(store.add(user(5, "ours", 1)).await.unwrap(), AddOutcome::Added);
        assert_eq!(store.count_existing(&ids(&[5])).await.unwrap(), 1);

        // A write alone: the next check notices it.
        sqlx::query(
            "INSERT INTO users (id, nickname, mail_address, user_type)              VALUES (4, 'theirs', 'theirs@example.com', 1)",
        )
        .execute(&mut other)
        .await
        .unwrap();
        store.check().await.unwrap();
        assert_eq!(store.count_existing(&ids(&[4])).await.unwrap(), 1);
        assert_eq!(id_list(&store.get_many(&ids(&[4])).await.unwrap()), [4]);
        ids_in_memory(&store).await;
        assert_eq!(store.count_existing(&ids(&[1, 2, 3, 4, 5])).await.unwrap(), 5);
        other.close().await.unwrap();
        store.close().await;
    })
    .await;
}

/// Each contract test once per backend: `store::sqlite::NAME`, `store::postgres::NAME`.
macro_rules! contract {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::within_a_minute(super::$name("sqlite")).await;
                }
            )*
        }
        mod sqlite_ids {
            $(
                #[tokio::test]
                async fn $name() {
                    super::within_a_minute(super::$name("sqlite-ids")).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    super::within_a_minute(super::$name("postgres")).await;
                }
            )*
        }
    };
}

async fn within_a_minute(test: impl Future<Output = ()>) {
    tokio::time::timeout(Duration::from_secs(60), test)
        .await
        .expect("finishes within a minute");
}

contract!(
    get_add_and_already_exists,
    the_largest_id_round_trips,
    get_many_keeps_order_and_repeats,
    count_existing_counts_repeats,
    any_valid_text_reads_back_unchanged,
    page_by_type_pages_by_keyset,
    the_seed_is_imported_once,
    racing_adds_of_one_id_have_one_winner,
    migrating_twice_changes_nothing,
    concurrent_reads_each_get_their_own_answer,
    concurrent_gets_of_the_same_ids_each_get_the_user,
    concurrent_adds_are_each_told_the_truth,
);

/// Rows another process wrote without their answer get it from SQLite (the
/// trigger), and ones that break the rules are errors, never answers: an
/// empty nickname (a valid message of an invalid user), and a nickname too
/// long to encode (its `wire` is NULL, which the page must not skip). A
/// `wire` that disagrees with the columns is refused when written.
#[tokio::test]
async fn sqlite_rows_written_by_another_process_are_checked() {
    use sqlx::Connection;
    within_a_minute(async {
        let (store, dir) = open("sqlite").await;
        let url = format!(
            "sqlite://{}",
            dir.as_ref().unwrap().path().join("users.db").display()
        );
        let mut other = sqlx::SqliteConnection::connect(&url).await.unwrap();
        let insert = |id: u32, nickname: String| {
            sqlx::query(
                "INSERT INTO users (id, nickname, mail_address, user_type) \
                 VALUES (?1, ?2, 'theirs@example.com', 2)",
            )
            .bind(id)
            .bind(nickname)
        };
        insert(1, "theirs".into())
            .execute(&mut other)
            .await
            .unwrap();
        let page = store.page_by_type(UserType::Administrator, None, 10).await;
        assert_eq!(page.unwrap(), encoded(&[user(1, "theirs", 2)]));

        let wrong = sqlx::query(
            "INSERT INTO users (id, nickname, mail_address, user_type, wire) \
             VALUES (9, 'a', 'a@b.c', 2, x'1a00')",
        );
        assert!(wrong.execute(&mut other).await.is_err(), "CHECK on wire");
        let tamper = sqlx::query("UPDATE users SET nickname = 'changed' WHERE id = 1");
        assert!(tamper.execute(&mut other).await.is_err(), "CHECK on wire");

        insert(2, String::new()).execute(&mut other).await.unwrap();
        let page = store.page_by_type(UserType::Administrator, None, 10).await;
        assert!(matches!(page, Err(StoreError::Internal(_))), "{page:?}");
        sqlx::query("DELETE FROM users WHERE id = 2")
            .execute(&mut other)
            .await
            .unwrap();
        insert(3, "x".repeat(20_000))
            .execute(&mut other)
            .await
            .unwrap();
        let page = store.page_by_type(UserType::Administrator, None, 10).await;
        assert!(matches!(page, Err(StoreError::Internal(_))), "{page:?}");
        store.close().await;
    })
    .await;
}

/// A database the previous release wrote is upgraded in place: every user
/// it held gets its `wire` from SQLite (the migration rebuilds the table)
/// and reads back through every read as it was stored.
#[tokio::test]
async fn sqlite_users_stored_before_the_wire_column_read_back_after_the_upgrade() {
    use sqlx::{Connection, migrate::Migrator};
    within_a_minute(async {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("users.db");
        let url = format!("sqlite://{}?mode=rwc", path.display());
        // The migrations before the one that added `wire`, as that release ran them.
        let all = concat!(env!("CARGO_MANIFEST_DIR"), "/migrations/sqlite");
        let before = dir.path().join("before");
        std::fs::create_dir(&before).unwrap();
        for entry in std::fs::read_dir(all).unwrap() {
            let entry = entry.unwrap();
            if *entry.file_name().to_string_lossy() < *"20261130000002" {
                std::fs::copy(entry.path(), before.join(entry.file_name())).unwrap();
            }
        }
        let mut old = sqlx::SqliteConnection::connect(&url).await.unwrap();
        let older = Migrator::new(before.as_path()).await.unwrap();
        assert_eq!(older.iter().count(), 2, "the two migrations before `wire`");
        older.run(&mut old).await.unwrap();
        let users: Vec<User> = (1..=300)
            .map(|id| {
                let nickname = format!("n{id}-{}", "ü".repeat(id as usize % 30));
                user(id * 65_537, &nickname, 1 + (id % 4) as i32)
            })
            .collect();
        for u in &users {
            sqlx::query(
                "INSERT INTO users (id, nickname, mail_address, user_type) VALUES (?1, ?2, ?3, ?4)",
            )
            .bind(u.id.get())
            .bind(u.nickname.as_str())
            .bind(u.mail_address.as_str())
            .bind(u.user_type.number())
            .execute(&mut old)
            .await
            .unwrap();
        }
        old.close().await.unwrap();

        let mut settings = Settings::embedded_default();
        settings.database.url = format!("sqlite://{}", path.display());
        let store = Store::open(&settings.database).await.unwrap();
        store.migrate().await.unwrap();
        let all_ids: Vec<UserId> = users.iter().map(|u| u.id).collect();
        assert_eq!(store.get_many(&all_ids).await.unwrap(), encoded(&users));
        assert_eq!(
            store.get(users[7].id).await.unwrap(),
            Some(EncodedUser::encode(&users[7]))
        );
        for user_type in UserType::ALL {
            let of_type: Vec<User> = users
                .iter()
                .filter(|u| u.user_type == user_type)
                .cloned()
                .collect();
            let page = store.page_by_type(user_type, None, 1000).await.unwrap();
            assert_eq!(page, encoded(&of_type), "{user_type:?}");
        }
        store.close().await;
    })
    .await;
}
