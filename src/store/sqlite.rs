//! SQLite through sqlx. Reads use a few connections (see `readers`); all
//! writes go through one dedicated connection (SQLite has a single writer),
//! and concurrent AddUser calls are committed together: one transaction and
//! one WAL sync for all inserts that arrived while the previous commit ran
//! (group commit).

mod file;
mod ids;
mod lookups;
mod readers;
mod writer;

use std::{str::FromStr, sync::Arc, time::Duration};

use sqlx::{
    Connection, SqliteConnection,
    sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous},
};
use tokio::sync::{Mutex, mpsc, oneshot};
use tracing::field::Empty;

use self::{
    file::{AtPath, DbFile, FileId},
    ids::Ids,
    lookups::Lookups,
    readers::Readers,
    writer::{INSERT_QUEUE, InsertRequest, Writer, insert, run_writer},
};
use super::{AddOutcome, SeedOutcome, StoreError, UserStore};
use crate::{
    config::{SqliteSettings, Synchronous},
    domain::{User, UserId, UserType},
    wire::EncodedUser,
};

// Reads of users answer with `wire`, the bytes of each user's answer (see
// the migration that made it), concatenated into one blob when there are
// many: one value crosses from sqlx's connection thread, not one message per
// row (see BENCHMARKS.md), and nothing is decoded or encoded again but
// checked (`EncodedUser::split`). group_concat skips NULLs, so a row whose
// `wire` is NULL (too long to be valid) gives a 0 byte instead, where no
// message can start: an error, not a gap. (Counting the rows twice to
// notice it cost 4 % of a streamed user.)
const SELECT_BY_ID: &str = "SELECT CAST(group_concat(coalesce(wire, x'00'), '') AS BLOB) \
     FROM users WHERE id = ?1";
// No ORDER BY: it would sort every answer through a temporary B-tree.
// Lookups ask for distinct ids in ascending order and hand out the users by
// id (`lookups::distribute`).
const SELECT_MANY: &str = "SELECT CAST(group_concat(coalesce(u.wire, x'00'), '') AS BLOB) \
     FROM json_each(?1) AS j CROSS JOIN users AS u ON u.id = j.value";
/// The ids among `?1` (a JSON array) that have a user, each as often as it
/// is listed: for a batch of counts (answered from the distinct ids) and
/// for the group commit (which ids are taken). A join, not `id IN (SELECT
/// …)`, which makes SQLite build a temporary B-tree of the ids first.
const SELECT_EXISTING: &str = "SELECT json_group_array(u.id) \
     FROM json_each(?1) AS j CROSS JOIN users AS u ON u.id = j.value";
const COUNT_MANY: &str =
    "SELECT COUNT(*) FROM json_each(?1) AS j CROSS JOIN users AS u ON u.id = j.value";
// A page of users of one type, as `SELECT_MANY` answers. The page comes in
// id order from the index; ordering the aggregate again would make SQLite
// sort it through a temporary B-tree. The order is checked when decoding,
// and restored if ever needed. The limit is written into the SQL, not bound:
// bound, SQLite prepared the statement again on every execution (a fifth of
// a page's cost in SQLite outside the rows), and the service asks for one
// page size only.
fn select_page_by_type(limit: u32) -> String {
    format!(
        "SELECT CAST(group_concat(coalesce(wire, x'00'), '') AS BLOB) \
         FROM (SELECT wire FROM users WHERE user_type = ?1 AND id > ?2 ORDER BY id LIMIT {limit})"
    )
}

/// What the reads of users answer: the concatenated `wire`s (NULL when none).
type Answers = Option<Vec<u8>>;

/// `PRAGMA cache_size` of every connection, in KiB (negative: SQLite's unit
/// for KiB), instead of SQLite's default 2000 KiB. What the default cost
/// (BENCHMARKS.md, resident memory after the workloads): each sqlx connection
/// runs on its own thread, so its page cache lives in that thread's glibc
/// malloc arena, and a cache filled one random leaf at a time over the whole
/// run ends up scattered among the thread's short-lived allocations (the
/// JSON of every answer, then), pinning the arena at 9 to 12 MiB where massif
/// counts about 2 MiB live: 61.4 MiB idle after `bench --full` (the target:
/// under 48), 60.2 MiB at the GetUsersByIds streams' peak (limit 64). That
/// was with every connection's cache in one pool (see below); 512 KiB then
/// gave 34.3 and 38.8 MiB.
///
/// What the cache is for: the interior pages of the users B-tree (55 at 1M
/// users since the `wire` column), which every lookup reads; a leaf is
/// nearly always one `pread` from the OS page cache whatever the size. At
/// 512 KiB (about 120 pages) the leaves streaming through evicted the
/// interior pages between two visits: 1.23 reads per looked-up id, against
/// 1.02 at 1024 KiB and 0.98 at 2048 (`strace`, 20,000 ids in 100-id calls);
/// each read costs the kernel 1.5 to 2 µs here. 1024 KiB cost 3.4 MiB of
/// resident memory after the workloads (30.3 against 26.9 MiB). It needs
/// each connection to have a cache of its own, which the bundled SQLite's
/// build doesn't give by default (`.cargo/config.toml`): pooled, a random
/// id cost 1.84 reads.
const CACHE_KIB: i64 = 1024;

#[derive(Clone)]
pub struct SqliteStore {
    reads: Arc<Readers>,
    lookups: Lookups,
    /// Every stored id, once built (see `ids`).
    ids: Arc<Ids>,
    writer: Writer,
    inserts: mpsc::Sender<InsertRequest>,
    /// The database file, for readiness checks; `None` for in-memory databases.
    file: Option<Arc<DbFile>>,
    options: SqliteConnectOptions,
}

impl SqliteStore {
    /// Opens (creating when missing) the database, its directory included.
    /// Must be called inside a tokio runtime: it spawns the writer task.
    pub async fn open(url: &str, settings: &SqliteSettings) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::Unavailable(format!("database.url: {e}")))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(match settings.synchronous {
                Synchronous::Normal => SqliteSynchronous::Normal,
                Synchronous::Full => SqliteSynchronous::Full,
            })
            .busy_timeout(Duration::from_millis(settings.busy_timeout_ms))
            .foreign_keys(true)
            .pragma("cache_size", format!("-{CACHE_KIB}"));
        let file = Some(options.get_filename().to_path_buf())
            .filter(|p| !p.as_os_str().is_empty() && p.as_os_str() != ":memory:");
        if let Some(dir) = file.as_deref().and_then(std::path::Path::parent)
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|e| {
                StoreError::Unavailable(format!("creating directory {}: {e}", dir.display()))
            })?;
        }

        // The writer connects first: it creates the file and switches it to WAL.
        let writer = SqliteConnection::connect_with(&options)
            .await
            .map_err(|e| classify(e, "opening the database"))?;
        // Reads never create the file: one that vanished stays missing.
        let reads = Readers::open(
            options.clone().create_if_missing(false),
            settings.max_connections,
            Duration::from_millis(settings.busy_timeout_ms),
        )
        .await
        .map_err(|e| classify(e, "opening the read connections"))?;

        let file = file.map(DbFile::new).transpose()?.map(Arc::new);

        let reads = Arc::new(reads);
        let lookups = Lookups::start(reads.clone());
        let writer: Writer = Arc::new(Mutex::new(Some(writer)));
        let ids = Arc::new(Ids::default());
        let (inserts, queue) = mpsc::channel(INSERT_QUEUE);
        tokio::spawn(run_writer(writer.clone(), queue, file.clone(), ids.clone()));
        Ok(Self {
            reads,
            lookups,
            ids,
            writer,
            inserts,
            file,
            options,
        })
    }

    /// Moves every connection to the file now at the path (a restored
    /// backup, say), unless the WAL there is the replaced file's.
    async fn reopen(&self, file: &DbFile, now: FileId) -> Result<(), StoreError> {
        if file.stale_wal() {
            return Err(StoreError::Unavailable(format!(
                "{0} was replaced but {0}-wal is the old file's; put the old file back, \
                 or delete {0}-wal and {0}-shm to use the new one",
                file.path().display()
            )));
        }
        let fresh = SqliteConnection::connect_with(&self.options.clone().create_if_missing(false))
            .await
            .map_err(|e| classify(e, "reopening the database"))?;
        let old = {
            let mut writer = self.writer.lock().await;
            if writer.is_none() {
                return Err(closed());
            }
            writer.replace(fresh)
        };
        // SQLite neither checkpoints into nor deletes the WAL of a file that
        // is no longer at its path when closing it.
        if let Some(old) = old
            && let Err(e) = old.close().await
        {
            tracing::warn!(error = %e, "closing the replaced database");
        }
        self.reads.reopen();
        self.ids.invalidate("the database file was replaced");
        self.ids.forget_data_version();
        file.reopened(now);
        tracing::warn!(path = %file.path().display(), "the database file was replaced: reopened");
        Ok(())
    }

    #[tracing::instrument(name = "SELECT users", level = "debug", skip_all, fields(db.system = "sqlite",
        db.operation = "SELECT", db.sql.table = "users", otel.status_code = Empty))]
    async fn select_by_ids(&self, ids: Vec<UserId>) -> Result<Vec<EncodedUser>, StoreError> {
        self.lookups.users(ids).await
    }

    #[tracing::instrument(name = "SELECT users", level = "debug", skip_all, fields(db.system = "sqlite",
        db.operation = "SELECT", db.sql.table = "users", otel.status_code = Empty))]
    async fn count_by_query(&self, ids: Vec<UserId>) -> Result<u64, StoreError> {
        self.lookups.count(ids).await
    }

    /// Whether every stored id is in memory (see `ids`): for tests.
    pub fn ids_in_memory(&self) -> bool {
        self.ids.is_complete()
    }

    /// Notices a commit by another process (the write connection's
    /// `data_version` moved), then builds the ids in memory if they aren't.
    async fn watch_ids(&self) -> Result<(), StoreError> {
        let version: i64 = {
            let mut writer = self.writer.lock().await;
            let conn = writer.as_mut().ok_or_else(closed)?;
            sqlx::query_scalar("PRAGMA data_version")
                .fetch_one(conn)
                .await
                .map_err(|e| classify(e, "checking the database"))?
        };
        self.ids.observe_data_version(version);
        self.ids.build_in_background(self.reads.clone());
        Ok(())
    }

    async fn reader(&self, context: &str) -> Result<readers::Reader<'_>, StoreError> {
        self.reads.acquire().await.map_err(|e| classify(e, context))
    }
}

impl UserStore for SqliteStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        // Through a pool of its own: sqlx's `Acquire` for `&mut SqliteConnection`
        // is not general enough for a `Send` future. The writer is idle meanwhile.
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect_with(self.options.clone())
            .await
            .map_err(|e| classify(e, "migrating"))?;
        let migrated = sqlx::migrate!("./migrations/sqlite").run(&pool).await;
        pool.close().await;
        migrated.map_err(|e| match e {
            sqlx::migrate::MigrateError::Execute(e) => classify(e, "migrating"),
            other => StoreError::Internal(format!("migrating: {other}")),
        })
    }

    async fn seed(&self, users: &[User]) -> Result<SeedOutcome, StoreError> {
        let mut guard = self.writer.lock().await;
        let conn = guard.as_mut().ok_or_else(closed)?;
        let ctx = "importing the seed";
        let mut tx = conn.begin().await.map_err(|e| classify(e, ctx))?;
        let done: Option<i64> = sqlx::query_scalar("SELECT 1 FROM seed_state")
            .fetch_optional(&mut *tx)
            .await
            .map_err(|e| classify(e, ctx))?;
        if done.is_some() {
            return Ok(SeedOutcome::AlreadyImported);
        }
        let mut imported = 0;
        for user in users {
            imported += insert(&mut tx, user).await.map_err(|e| classify(e, ctx))?;
        }
        sqlx::query(
            "INSERT INTO seed_state (singleton, applied_at, user_count) \
             VALUES (1, strftime('%Y-%m-%dT%H:%M:%fZ', 'now'), ?1)",
        )
        .bind(imported as i64)
        .execute(&mut *tx)
        .await
        .map_err(|e| classify(e, ctx))?;
        tx.commit().await.map_err(|e| classify(e, ctx))?;
        // Every seed id has a user now: imported, or there before.
        self.ids.committed(users.iter().map(|u| u.id.get()));
        Ok(SeedOutcome::Imported { users: imported })
    }

    async fn get(&self, id: UserId) -> Result<Option<EncodedUser>, StoreError> {
        if self.ids.count(&[id]) == Some(0) {
            return Ok(None);
        }
        Ok(self.select_by_ids(vec![id]).await?.into_iter().next())
    }

    async fn get_many(&self, ids: &[UserId]) -> Result<Vec<EncodedUser>, StoreError> {
        match self.ids.present(ids) {
            Some(present) if present.is_empty() => Ok(Vec::new()),
            Some(present) => self.select_by_ids(present).await,
            None => self.select_by_ids(ids.to_vec()).await,
        }
    }

    async fn count_existing(&self, ids: &[UserId]) -> Result<u64, StoreError> {
        match self.ids.count(ids) {
            Some(n) => Ok(n),
            None => self.count_by_query(ids.to_vec()).await,
        }
    }

    #[tracing::instrument(name = "INSERT users", level = "debug", skip_all, fields(db.system = "sqlite",
        db.operation = "INSERT", db.sql.table = "users", otel.status_code = Empty))]
    async fn add(&self, user: User) -> Result<AddOutcome, StoreError> {
        let (reply, outcome) = oneshot::channel();
        self.inserts
            .send(InsertRequest { user, reply })
            .await
            .map_err(|_| closed())?;
        outcome.await.map_err(|_| closed())?
    }

    #[tracing::instrument(name = "SELECT users", level = "debug", skip_all, fields(db.system = "sqlite",
        db.operation = "SELECT", db.sql.table = "users", otel.status_code = Empty))]
    async fn page_by_type(
        &self,
        user_type: UserType,
        after: Option<UserId>,
        limit: u32,
    ) -> Result<Vec<EncodedUser>, StoreError> {
        let mut conn = self.reader("reading users by type").await?;
        let answers: Answers =
            // Only a number is written in (`limit`), nothing a caller sent.
            sqlx::query_scalar(sqlx::AssertSqlSafe(select_page_by_type(limit)))
                .bind(user_type.number())
                .bind(after.map_or(0, |id| i64::from(id.get())))
                .fetch_one(&mut *conn)
                .await
                .map_err(|e| classify(e, "reading users by type"))?;
        encoded_users(answers)
    }

    async fn check(&self) -> Result<(), StoreError> {
        let ctx = "checking the database";
        if let Some(file) = &self.file {
            if let AtPath::Replaced { now } = file.at_path() {
                self.reopen(file, now).await?;
            }
            file.ensure_same()?;
            file.check_access()?;
        }
        // A fresh connection, to learn whether the file at the path can still
        // be opened and read. Read-only: closing it never checkpoints into, nor
        // deletes the WAL of, whatever file it found there.
        let options = self
            .options
            .clone()
            .create_if_missing(false)
            .read_only(true);
        let mut conn = SqliteConnection::connect_with(&options)
            .await
            .map_err(|e| classify(e, ctx))?;
        let result = sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM seed_state")
            .fetch_one(&mut conn)
            .await
            .map(drop)
            .map_err(|e| classify(e, ctx));
        let _ = conn.close().await;
        if let Some(file) = &self.file {
            // What was read is what the connections have open.
            file.ensure_same()?;
            file.note_wal();
        }
        result?;
        self.watch_ids().await
    }

    async fn close(&self) {
        self.reads.close().await;
        // The last connection to close checkpoints the WAL into the database file.
        if let Some(conn) = self.writer.lock().await.take()
            && let Err(e) = conn.close().await
        {
            tracing::warn!(error = %e, "closing the database");
        }
    }
}

/// The users a read answered, checked, ascending by id (as SQLite gives
/// them today; restored if ever not).
fn encoded_users(answers: Answers) -> Result<Vec<EncodedUser>, StoreError> {
    let mut users = EncodedUser::split(answers.unwrap_or_default().into())?;
    if !users.is_sorted_by_key(EncodedUser::id) {
        users.sort_unstable_by_key(EncodedUser::id);
    }
    Ok(users)
}

/// Ids as a JSON array, for `json_each`: one statement for any batch size.
/// (itoa, not `write!`: the formatting machinery cost 500 instructions an id.)
fn json_array(ids: &[UserId]) -> String {
    let mut json = String::with_capacity(ids.len() * 8 + 2);
    let mut digits = itoa::Buffer::new();
    json.push('[');
    for (i, id) in ids.iter().enumerate() {
        if i > 0 {
            json.push(',');
        }
        json.push_str(digits.format(id.get()));
    }
    json.push(']');
    json
}

fn closed() -> StoreError {
    StoreError::Unavailable("the store is closed".into())
}

/// Sorts driver errors by what a client can do about them (see SQLite's
/// primary result codes); the text goes to the log, never to the client.
fn classify(err: sqlx::Error, context: &str) -> StoreError {
    const SQLITE_PERM: i32 = 3;
    const SQLITE_BUSY: i32 = 5;
    const SQLITE_LOCKED: i32 = 6;
    const SQLITE_READONLY: i32 = 8;
    const SQLITE_IOERR: i32 = 10;
    const SQLITE_FULL: i32 = 13;
    const SQLITE_CANTOPEN: i32 = 14;
    const SQLITE_PROTOCOL: i32 = 15;
    let detail = format!("{context}: {err}");
    // Marks the database span this error ends, if any (see the instrumented reads).
    tracing::Span::current().record("otel.status_code", "error");
    match &err {
        sqlx::Error::Database(db) => {
            let primary = db
                .code()
                .and_then(|c| c.parse::<i32>().ok())
                .map_or(0, |c| c & 0xff);
            match primary {
                SQLITE_FULL => StoreError::Full(detail),
                SQLITE_PERM | SQLITE_BUSY | SQLITE_LOCKED | SQLITE_READONLY | SQLITE_IOERR
                | SQLITE_CANTOPEN | SQLITE_PROTOCOL => StoreError::Unavailable(detail),
                _ => StoreError::Internal(detail),
            }
        }
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => StoreError::Unavailable(detail),
        _ => StoreError::Internal(detail),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn each_connection_keeps_its_own_page_cache() {
        // .cargo/config.toml undefines this for the bundled SQLite (see
        // CACHE_KIB); with it, the connections' caches are one pool.
        let mut conn = SqliteConnection::connect("sqlite::memory:").await.unwrap();
        let pooled: i64 =
            sqlx::query_scalar("SELECT sqlite_compileoption_used('ENABLE_MEMORY_MANAGEMENT')")
                .fetch_one(&mut conn)
                .await
                .unwrap();
        assert_eq!(
            pooled, 0,
            "SQLite was built with SQLITE_ENABLE_MEMORY_MANAGEMENT: \
             is LIBSQLITE3_FLAGS in .cargo/config.toml still read?"
        );
    }

    #[test]
    fn json_array_lists_ids_in_order() {
        let ids: Vec<UserId> = [3, 1, 3].into_iter().filter_map(UserId::new).collect();
        assert_eq!(json_array(&ids), "[3,1,3]");
        assert_eq!(json_array(&[]), "[]");
        let extremes: Vec<UserId> = [1, u32::MAX].into_iter().filter_map(UserId::new).collect();
        assert_eq!(json_array(&extremes), "[1,4294967295]");
    }
}
