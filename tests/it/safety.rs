//! Data safety, against the real binary: kill -9 under write load, a full
//! disk, a database file that becomes unreadable, is replaced or vanishes,
//! writers racing for one id, and stalled readers next to a busy writer. Each
//! test names the protection it checks and fails without it.

use crate::common;

use std::{
    io::{BufRead, BufReader, Write},
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use crate::common::{ServerProcess, health_status, user};
use futures::{StreamExt, stream};
use tonic::{Code, Response, Status, Streaming, transport::Channel};
use tonic_health::pb::health_check_response::ServingStatus;
use user_manager::proto::{
    User, UserRequest, UserResponse, UserTypeRequest, user_manager_client::UserManagerClient,
};

type Client = UserManagerClient<Channel>;

const GUEST: i32 = 3;
/// Ids the tests add start here, clear of the seed's.
const FIRST_ID: u32 = 10_000;
const ENOSPC: i32 = 28;

/// What the tests send for `id`: lengths, bytes (UTF-8 included) and type
/// vary with the id, so a torn row or one mixed up with another can't pass.
fn sent(id: u32) -> User {
    let nickname = format!("n{id}-{}", "ü".repeat((id % 20) as usize));
    user(id, &nickname, 1 + (id % 4) as i32)
}

/// Runs `sql` with python3's sqlite3 module (a different SQLite than the
/// server's) through `wrapper` when the file is only visible in a namespace;
/// returns the rows as JSON.
fn sqlite_rows(wrapper: &[&str], db: &Path, sql: &str) -> serde_json::Value {
    let script = "import json,sqlite3,sys\n\
                  c=sqlite3.connect('file:'+sys.argv[1]+'?mode=rw', uri=True)\n\
                  print(json.dumps(c.execute(sys.argv[2]).fetchall()))";
    let mut line: Vec<&str> = wrapper.to_vec();
    line.extend(["python3", "-c", script]);
    let out = Command::new(line[0])
        .args(&line[1..])
        .arg(db)
        .arg(sql)
        .output()
        .unwrap();
    assert!(out.status.success(), "{sql}: {out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

fn assert_integrity_ok(wrapper: &[&str], db: &Path) {
    let rows = sqlite_rows(wrapper, db, "PRAGMA integrity_check");
    assert_eq!(rows, serde_json::json!([["ok"]]));
}

/// Every row the tests added, as python's SQLite reads it from the file.
fn stored_rows(wrapper: &[&str], db: &Path) -> Vec<User> {
    let rows = sqlite_rows(
        wrapper,
        db,
        &format!(
            "SELECT id, nickname, mail_address, user_type FROM users \
             WHERE id >= {FIRST_ID} ORDER BY id"
        ),
    );
    let rows: Vec<(u32, String, String, i32)> = serde_json::from_value(rows).unwrap();
    rows.into_iter()
        .map(|(id, nickname, mail_address, user_type)| User {
            id,
            nickname,
            mail_address,
            user_type,
        })
        .collect()
}

/// Waits until `service`'s health is `want`.
async fn wait_health(url: &str, service: &str, want: ServingStatus) {
    let what = format!("health {service:?} {want:?}");
    common::eventually(Duration::from_secs(30), &what, || async {
        health_status(url, service).await == Some(want)
    })
    .await;
}

fn is_root() -> bool {
    std::fs::metadata("/proc/self").unwrap().uid() == 0
}

async fn collect(call: Result<Response<Streaming<UserResponse>>, Status>) -> Vec<User> {
    call.unwrap()
        .into_inner()
        .map(|r| r.unwrap().user.unwrap())
        .collect()
        .await
}

/// Each RPC answers from a database that holds exactly `stored` among the
/// tests' ids, and none of `absent`.
async fn assert_serves(client: &mut Client, stored: &[User], absent: &[u32]) {
    let mut stored = stored.to_vec();
    stored.sort_by_key(|u| u.id);
    let asked: Vec<UserRequest> = stored
        .iter()
        .map(|u| u.id)
        .chain(absent.iter().copied())
        .map(|id| UserRequest { id })
        .collect();

    for u in [stored.first(), stored.last()].into_iter().flatten() {
        let r = client.get_user(UserRequest { id: u.id }).await.unwrap();
        assert_eq!(r.into_inner().user.as_ref(), Some(u));
    }
    for &id in absent {
        let r = client.get_user(UserRequest { id }).await.unwrap();
        assert_eq!(r.into_inner().message, "not found", "id {id}");
    }
    let by_ids = collect(client.get_users_by_ids(stream::iter(asked.clone())).await).await;
    assert!(
        by_ids == stored,
        "GetUsersByIds differs from what was stored"
    );
    let count = client.count_already_users(stream::iter(asked)).await;
    assert_eq!(count.unwrap().into_inner().user_cnt as usize, stored.len());
    for user_type in 1..=4 {
        let of_type: Vec<User> = collect(
            client
                .get_users_by_type(UserTypeRequest { user_type })
                .await,
        )
        .await
        .into_iter()
        .filter(|u| u.id >= FIRST_ID)
        .collect();
        let want: Vec<&User> = stored.iter().filter(|u| u.user_type == user_type).collect();
        assert!(
            of_type.iter().eq(want),
            "GetUsersByType({user_type}) differs from what was stored"
        );
    }
}

/// The status of a streaming call: the call's own, or its first message's.
async fn stream_code<T>(call: Result<Response<Streaming<T>>, Status>) -> Option<Code> {
    match call {
        Err(status) => Some(status.code()),
        Ok(response) => response
            .into_inner()
            .message()
            .await
            .err()
            .map(|s| s.code()),
    }
}

/// Every RPC, unary and streaming, is refused with UNAVAILABLE.
async fn assert_every_rpc_unavailable(client: &mut Client) {
    let ids = || stream::iter([UserRequest { id: 1 }, UserRequest { id: 2 }]);
    let codes = [
        client
            .get_user(UserRequest { id: 1 })
            .await
            .err()
            .map(|s| s.code()),
        client.add_user(sent(1)).await.err().map(|s| s.code()),
        stream_code(
            client
                .get_users_by_type(UserTypeRequest { user_type: GUEST })
                .await,
        )
        .await,
        client
            .count_already_users(ids())
            .await
            .err()
            .map(|s| s.code()),
        stream_code(client.get_users_by_ids(ids()).await).await,
    ];
    assert_eq!(codes, [Some(Code::Unavailable); 5]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_load_loses_no_acknowledged_add_and_tears_no_row() {
    const WRITERS: usize = 8;
    const KILL_AFTER: usize = 1500;
    let dir = tempfile::tempdir().unwrap();
    let db = common::db_path(dir.path());
    let mut server = ServerProcess::start(dir.path(), &[]).await;

    let next_id = Arc::new(AtomicU32::new(FIRST_ID));
    let acked = Arc::new(Mutex::new(Vec::new()));
    let mut writers = Vec::new();
    for _ in 0..WRITERS {
        // One connection each: the server sees independent clients.
        let mut client = server.client().await;
        let (next_id, acked) = (next_id.clone(), acked.clone());
        writers.push(tokio::spawn(async move {
            loop {
                let id = next_id.fetch_add(1, Ordering::Relaxed);
                match client.add_user(sent(id)).await {
                    Ok(r) => {
                        assert!(!r.get_ref().error, "{id}: {r:?}");
                        acked.lock().unwrap().push(id);
                    }
                    // The server is gone; whether this add committed is unknown.
                    Err(_) => return,
                }
            }
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while acked.lock().unwrap().len() < KILL_AFTER {
        assert!(Instant::now() < deadline, "the load never got going");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    server.kill_9().await; // with every writer mid-call
    for writer in writers {
        writer.await.unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    let sent_below = next_id.load(Ordering::Relaxed);

    // The crashed files themselves, before the server recovers them.
    assert_integrity_ok(&[], &db);
    let rows = stored_rows(&[], &db);
    for row in &rows {
        assert!(row.id < sent_below, "row {} was never sent", row.id);
        assert_eq!(row, &sent(row.id), "a torn or mixed-up row");
    }
    let on_disk: std::collections::HashSet<u32> = rows.iter().map(|u| u.id).collect();
    let lost: Vec<u32> = acked
        .iter()
        .copied()
        .filter(|id| !on_disk.contains(id))
        .collect();
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");

    let server = ServerProcess::start(dir.path(), &[]).await;
    let mut client = server.client().await;
    assert_serves(&mut client, &rows, &[sent_below, sent_below + 1]).await;
    assert_integrity_ok(&[], &db);
}

/// A tmpfs of `size` mounted over a fresh directory in a private mount
/// namespace. `unshare` makes it in an unprivileged user namespace, so root
/// is not needed, and nothing outlives the test: the holder process exits
/// when its stdin closes.
struct SmallFs {
    holder: Child,
    dir: tempfile::TempDir,
}

impl SmallFs {
    fn mount(size: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut holder = Command::new("unshare")
            .args(["--user", "--map-root-user", "--mount", "sh", "-c"])
            .arg(r#"mount -t tmpfs -o "size=$0" tmpfs "$1" && echo mounted && exec cat >/dev/null"#)
            .arg(size)
            .arg(dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("unshare (util-linux) runs");
        let mut line = String::new();
        BufReader::new(holder.stdout.as_mut().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(
            line.trim(),
            "mounted",
            "can't mount a tmpfs in a user namespace (unprivileged user namespaces off?)"
        );
        Self { holder, dir }
    }

    /// The command line that runs a program inside the namespace.
    fn enter(&self) -> Vec<String> {
        let pid = self.holder.id().to_string();
        ["nsenter", "--target", &pid, "--user", "--mount"]
            .into_iter()
            .chain(["--preserve-credentials", "--"])
            .map(String::from)
            .collect()
    }

    /// `name` in the tmpfs, reached from outside the namespace.
    fn outside(&self, name: &str) -> PathBuf {
        let inside = self.dir.path().join(name);
        PathBuf::from(format!(
            "/proc/{}/root{}",
            self.holder.id(),
            inside.display()
        ))
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        drop(self.holder.stdin.take());
        let _ = self.holder.wait();
    }
}

/// Fills the filesystem with one file, until the disk is full.
fn fill(path: &Path) {
    let mut file = std::fs::File::create(path).unwrap();
    let chunk = vec![0x5a; 64 * 1024];
    loop {
        match file.write(&chunk) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(ENOSPC) => return,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
}

#[tokio::test]
async fn a_full_disk_refuses_adds_keeps_reads_and_recovers_without_damage() {
    let fs = SmallFs::mount("8m");
    let enter = fs.enter();
    let enter: Vec<&str> = enter.iter().map(String::as_str).collect();
    let db = common::db_path(fs.dir.path());
    let mut server = ServerProcess::start_via(&enter, fs.dir.path(), &[]).await;
    let mut client = server.client().await;
    let mut stored: Vec<User> = (FIRST_ID..FIRST_ID + 200).map(sent).collect();
    for u in &stored {
        assert!(!client.add_user(u.clone()).await.unwrap().get_ref().error);
    }

    fill(&fs.outside("filler"));
    // Adds go on until the database needs space it can't get, and then some.
    let mut refused = Vec::new();
    let mut id = FIRST_ID + 200;
    let mut after_full = 0;
    while after_full < 50 {
        assert!(id < FIRST_ID + 50_000, "AddUser never ran out of space");
        match client.add_user(sent(id)).await {
            Ok(r) => {
                assert!(!r.get_ref().error, "{r:?}");
                stored.push(sent(id));
            }
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert!(status.message().contains("out of space"), "{status:?}");
                refused.push(id);
            }
        }
        after_full += usize::from(!refused.is_empty());
        id += 1;
    }

    // Every add acknowledged is there and no refused one is. Reads don't
    // need space: they go on, and the server stays ready for them.
    assert_serves(&mut client, &stored, &refused).await;
    assert_eq!(
        health_status(&server.url(), "").await,
        Some(ServingStatus::Serving)
    );

    std::fs::remove_file(fs.outside("filler")).unwrap();
    // A refused add stored nothing: the same user is added now.
    for &id in &refused {
        let r = client.add_user(sent(id)).await.unwrap().into_inner();
        assert!(!r.error, "{id} after space returned: {r:?}");
        stored.push(sent(id));
    }
    assert_serves(&mut client, &stored, &[]).await;
    assert_integrity_ok(&enter, &db);

    server.kill_9().await;
    let server = ServerProcess::start_via(&enter, fs.dir.path(), &[]).await;
    assert_serves(&mut server.client().await, &stored, &[]).await;
    assert_integrity_ok(&enter, &db);
}

/// Breaks the database file under a running server (`wrapper` runs it), then
/// checks: readiness goes NOT_SERVING while liveness stays SERVING, every RPC
/// is refused with UNAVAILABLE, the process lives on. Then repairs it and
/// checks that the server serves again, and that what it acknowledges after
/// the repair is in the file on disk (it survives a kill -9).
async fn outage_and_recovery(wrapper: &[&str], break_file: fn(&Path), repair: fn(&Path)) {
    let dir = tempfile::tempdir().unwrap();
    let db = common::db_path(dir.path());
    let env = [("USER_MANAGER__HEALTH__CHECK_INTERVAL_MS", "100")];
    let mut server = ServerProcess::start_via(wrapper, dir.path(), &env).await;
    let url = server.url();
    let mut client = server.client().await;
    let mut stored = vec![sent(FIRST_ID)];
    assert!(
        !client
            .add_user(sent(FIRST_ID))
            .await
            .unwrap()
            .get_ref()
            .error
    );
    // Reads of every kind before the outage, and sixteen at once so that
    // more than one read connection is open: all of them to the file that
    // then breaks, and none may answer from it after the repair.
    assert_serves(&mut client, &stored, &[FIRST_ID + 1]).await;
    reads_at_once(&client, &stored[0]).await;

    break_file(dir.path());
    wait_health(&url, "", ServingStatus::NotServing).await;
    let expected = [
        ("UserManager", ServingStatus::NotServing),
        ("readiness", ServingStatus::NotServing),
        ("liveness", ServingStatus::Serving),
    ];
    for (name, status) in expected {
        assert_eq!(health_status(&url, name).await, Some(status), "{name}");
    }
    assert_every_rpc_unavailable(&mut client).await;
    assert!(server.is_running(), "the server died");

    repair(dir.path());
    wait_health(&url, "", ServingStatus::Serving).await;
    let added = sent(FIRST_ID + 1);
    let r = client.add_user(added.clone()).await.unwrap().into_inner();
    assert_eq!(r.user.as_ref(), Some(&added), "{r:?}");
    stored.push(added.clone());
    assert_serves(&mut client, &stored, &[FIRST_ID + 2]).await;
    // Whichever connection answers: the user added after the repair is there.
    for _ in 0..4 {
        reads_at_once(&client, &added).await;
    }

    server.kill_9().await;
    let server = ServerProcess::start(dir.path(), &[]).await;
    assert_serves(&mut server.client().await, &stored, &[FIRST_ID + 2]).await;
    assert_integrity_ok(&[], &db);
}

/// Sixteen GetUsers of `user` at once, each expected to find it.
async fn reads_at_once(client: &Client, user: &User) {
    let reads = (0..16).map(|_| {
        let mut client = client.clone();
        async move { client.get_user(UserRequest { id: user.id }).await }
    });
    for read in futures::future::join_all(reads).await {
        assert_eq!(read.unwrap().into_inner().user.as_ref(), Some(user));
    }
}

#[tokio::test]
async fn an_unreadable_database_file_is_unavailable_until_readable_again() {
    // Root reads any file whatever its mode: run the server as a root
    // without capabilities, which file modes do stop.
    let wrapper: &[&str] = if is_root() {
        &["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--"]
    } else {
        &[]
    };
    outage_and_recovery(wrapper, |dir| chmod(dir, 0o000), |dir| chmod(dir, 0o644)).await;
}

fn chmod(dir: &Path, mode: u32) {
    let permissions = std::fs::Permissions::from_mode(mode);
    std::fs::set_permissions(common::db_path(dir), permissions).unwrap();
}

#[tokio::test]
async fn garbage_in_place_of_the_database_is_unavailable_until_it_is_back() {
    outage_and_recovery(
        &[],
        |dir| {
            let db = common::db_path(dir);
            std::fs::rename(&db, dir.join("aside.db")).unwrap();
            std::fs::write(&db, vec![0xa5; 64 * 1024]).unwrap();
        },
        |dir| std::fs::rename(dir.join("aside.db"), common::db_path(dir)).unwrap(),
    )
    .await;
}

#[tokio::test]
async fn a_deleted_database_is_unavailable_and_a_restored_backup_is_written_to() {
    outage_and_recovery(
        &[],
        |dir| {
            let db = common::db_path(dir);
            let backup = dir.join("backup.db");
            sqlite_rows(&[], &db, &format!("VACUUM INTO '{}'", backup.display()));
            for suffix in ["", "-wal", "-shm"] {
                std::fs::remove_file(format!("{}{suffix}", db.display())).unwrap();
            }
        },
        // A new file at the path: connections to the deleted one must go.
        |dir| {
            std::fs::copy(dir.join("backup.db"), common::db_path(dir)).unwrap();
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_readiness_notices_a_deleted_file_no_add_is_acknowledged_nor_file_made() {
    let dir = tempfile::tempdir().unwrap();
    let db = common::db_path(dir.path());
    // Readiness checks at start and then not for an hour: every call below
    // comes before it could notice.
    let env = [("USER_MANAGER__HEALTH__CHECK_INTERVAL_MS", "3600000")];
    let server = ServerProcess::start(dir.path(), &env).await;
    let client = server.client().await;
    for suffix in ["", "-wal", "-shm"] {
        std::fs::remove_file(format!("{}{suffix}", db.display())).unwrap();
    }

    // Concurrent reads need new read connections: they may answer from the
    // open ones or be refused, but none may create a database at the path.
    let reads = (0..16).map(|_| {
        let mut client = client.clone();
        let ids = (0..3000).map(|i| UserRequest { id: 1 + i % 6 });
        async move {
            match client.get_users_by_ids(stream::iter(ids)).await {
                Ok(answers) => answers.into_inner().map(|r| r.err()).collect().await,
                Err(status) => vec![Some(status)],
            }
        }
    });
    for errors in futures::future::join_all(reads).await {
        for status in errors.into_iter().flatten() {
            assert_eq!(status.code(), Code::Unavailable, "{status:?}");
        }
    }
    assert!(!db.exists(), "a read made a new database file");

    let status = client.clone().add_user(sent(FIRST_ID)).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(!db.exists(), "the add made a new database file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_adds_of_one_id_over_many_connections_have_one_lasting_winner() {
    // 64 calls in flight per connection: under limits.max_calls_per_connection.
    const CONNECTIONS: u32 = 16;
    const CALLS_PER_CONNECTION: u32 = 4;
    const IDS: u32 = 16;
    let dir = tempfile::tempdir().unwrap();
    let mut server = ServerProcess::start(dir.path(), &[]).await;
    let mut clients = Vec::new();
    for _ in 0..CONNECTIONS {
        clients.push(server.client().await);
    }
    // Every candidate for every id at once: 1024 calls in flight.
    let mut calls = Vec::new();
    for id in FIRST_ID..FIRST_ID + IDS {
        for (c, client) in clients.iter().enumerate() {
            for k in 0..CALLS_PER_CONNECTION {
                let candidate = user(id, &format!("c{c}k{k}"), 1 + (k % 4) as i32);
                let mut client = client.clone();
                calls.push(tokio::spawn(async move {
                    let r = client.add_user(candidate.clone()).await.unwrap();
                    (candidate, r.into_inner())
                }));
            }
        }
    }
    let mut winners = std::collections::BTreeMap::new();
    for call in calls {
        let (candidate, r) = call.await.unwrap();
        if r.error {
            assert_eq!(r.message, "already exist", "{r:?}");
        } else {
            assert_eq!(r.user.as_ref(), Some(&candidate));
            let earlier = winners.insert(candidate.id, candidate);
            assert!(earlier.is_none(), "two winners: {earlier:?}, {r:?}");
        }
    }
    assert_eq!(winners.len(), IDS as usize);
    let winners: Vec<User> = winners.into_values().collect();
    assert_serves(&mut clients[0], &winners, &[]).await;

    server.kill_9().await;
    let server = ServerProcess::start(dir.path(), &[]).await;
    assert_serves(&mut server.client().await, &winners, &[]).await;
}

/// Bytes the process has written with write(2) and friends, from /proc.
fn bytes_written(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    io.lines()
        .find_map(|l| l.strip_prefix("wchar: "))
        .unwrap()
        .parse()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_and_slow_readers_never_hold_back_wal_checkpoints() {
    // SQLite checkpoints the WAL at 1000 pages (about 4 MiB) and then reuses
    // it, unless a reader still needs old frames. A reader that held one
    // transaction for its whole stream would let the WAL grow with every
    // write: here, at least WRITTEN bytes.
    const GUESTS: u32 = 20_000;
    const WRITTEN: u64 = 96 << 20;
    const WAL_BOUND: u64 = 16 << 20;
    let dir = tempfile::tempdir().unwrap();
    let seed_path = dir.path().join("guests.json");
    let guests: Vec<User> = (FIRST_ID..FIRST_ID + GUESTS)
        .map(|id| user(id, &format!("g{id}"), GUEST))
        .collect();
    let seed: serde_json::Map<String, serde_json::Value> = guests
        .iter()
        .map(|u| {
            let entry = serde_json::json!({"nickname": u.nickname,
                "mail_address": u.mail_address, "user_type": "GUEST"});
            (u.id.to_string(), entry)
        })
        .collect();
    std::fs::write(&seed_path, serde_json::to_vec(&seed).unwrap()).unwrap();
    let server = ServerProcess::start(
        dir.path(),
        &[
            ("USER_MANAGER__SEED__PATH", seed_path.to_str().unwrap()),
            // The stalled stream stays open however long the writers take.
            ("USER_MANAGER__LIMITS__STREAM_STALL_TIMEOUT_MS", "0"),
        ],
    )
    .await;
    let wal = PathBuf::from(format!("{}-wal", common::db_path(dir.path()).display()));

    let mut client = server.client().await;
    let guests_stream = || UserTypeRequest { user_type: GUEST };
    // One stream read to its first message and then left alone...
    let mut stalled = client
        .get_users_by_type(guests_stream())
        .await
        .unwrap()
        .into_inner();
    let first = stalled.message().await.unwrap().unwrap().user.unwrap();
    // ...and one read a message every 2 ms while the writers run.
    let done = Arc::new(AtomicBool::new(false));
    let mut slow = server
        .client()
        .await
        .get_users_by_type(guests_stream())
        .await
        .unwrap()
        .into_inner();
    let slow_reader = tokio::spawn({
        let done = done.clone();
        async move {
            let mut seen = Vec::new();
            while !done.load(Ordering::Relaxed) {
                match slow.message().await.unwrap() {
                    Some(r) => seen.push(r.user.unwrap()),
                    None => panic!("the slow stream ended before the writers did"),
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (seen, slow)
        }
    });

    let wal_max = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampler = tokio::spawn({
        let (done, wal_max, wal) = (done.clone(), wal_max.clone(), wal.clone());
        async move {
            while !done.load(Ordering::Relaxed) {
                let len = std::fs::metadata(&wal).map_or(0, |m| m.len());
                wal_max.fetch_max(len, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    });

    // Writers add NORMAL users at ids scattered over the id space (an odd
    // multiplier is a bijection on u32), so each commit dirties many pages,
    // until the server has written WRITTEN bytes.
    let pid = server.pid();
    let written_before = bytes_written(pid);
    let next = Arc::new(AtomicU32::new(1));
    let mut writers = Vec::new();
    for _ in 0..16 {
        let mut client = server.client().await;
        let (next, done) = (next.clone(), done.clone());
        writers.push(tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                let id = next
                    .fetch_add(1, Ordering::Relaxed)
                    .wrapping_mul(2_654_435_761);
                if id < FIRST_ID + GUESTS {
                    continue;
                }
                let r = client
                    .add_user(user(id, &format!("w{id}"), 1))
                    .await
                    .unwrap();
                assert!(!r.get_ref().error, "{r:?}");
            }
        }));
    }
    while bytes_written(pid) - written_before < WRITTEN {
        assert!(
            next.load(Ordering::Relaxed) < 2_000_000,
            "the writers wrote too little"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    done.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.await.unwrap();
    }
    sampler.await.unwrap();
    let (mut slow_seen, slow) = slow_reader.await.unwrap();

    let wal_max = wal_max.load(Ordering::Relaxed);
    assert!(
        wal_max < WAL_BOUND,
        "the WAL grew to {wal_max} bytes while {WRITTEN} were written"
    );
    // Both streams still deliver every guest, in order, once.
    // The seed here is the guests alone.
    let want = guests;
    let mut stalled_seen = vec![first];
    stalled_seen.extend(collect(Ok(Response::new(stalled))).await);
    assert!(stalled_seen == want, "the stalled stream lost its way");
    slow_seen.extend(collect(Ok(Response::new(slow))).await);
    assert!(slow_seen == want, "the slow stream lost its way");
}

/// scripts/soak, shortened to a smoke run against the test binary: mixed load,
/// one SIGTERM and one kill -9 restart, and every check of the full soak.
#[test]
fn a_short_soak_passes() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/soak");
    let out = Command::new(script)
        .args(["--seconds", "20", "--restart-every", "7", "--clients", "3"])
        .args(["--binary", common::BINARY])
        .stdin(Stdio::null())
        .output()
        .expect("scripts/soak runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("restarts: {'SIGTERM': 1, 'SIGKILL': 1}"),
        "{stdout}"
    );
    assert!(stdout.trim_end().ends_with("PASS"), "{stdout}");
}
