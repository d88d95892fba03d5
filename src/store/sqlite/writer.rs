//! The one write connection and its group commit: AddUser calls queue up
//! while a commit runs, then go in together, in one transaction and one WAL
//! sync, and each caller hears back only after COMMIT.

use std::{collections::HashSet, sync::Arc};

use sqlx::SqliteConnection;
use tokio::sync::{Mutex, mpsc, oneshot};

use super::{SELECT_EXISTING, classify, closed, file::DbFile, ids::Ids};
use crate::{
    domain::{User, UserId},
    store::{AddOutcome, StoreError},
};

/// Inserts committed in one transaction at most; bounds a commit's latency.
pub(super) const MAX_GROUP_COMMIT: usize = 256;
/// AddUser calls waiting for the writer before callers wait to enqueue.
pub(super) const INSERT_QUEUE: usize = 1024;

const INSERT: &str = "INSERT INTO users (id, nickname, mail_address, user_type) \
     VALUES (?1, ?2, ?3, ?4) ON CONFLICT (id) DO NOTHING";

pub(super) struct InsertRequest {
    pub(super) user: User,
    pub(super) reply: oneshot::Sender<Result<AddOutcome, StoreError>>,
}

/// The write connection; `None` once the store is closed.
pub(super) type Writer = Arc<Mutex<Option<SqliteConnection>>>;

pub(super) async fn run_writer(
    writer: Writer,
    mut queue: mpsc::Receiver<InsertRequest>,
    file: Option<Arc<DbFile>>,
    ids: Arc<Ids>,
) {
    let mut batch = Vec::with_capacity(MAX_GROUP_COMMIT);
    while queue.recv_many(&mut batch, MAX_GROUP_COMMIT).await > 0 {
        // A caller that went away was never acknowledged: don't write for it.
        batch.retain(|r| !r.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        crate::instruments::get().group_commit(batch.len());
        let result = match writer.lock().await.as_mut() {
            Some(conn) => commit_group(conn, &batch, file.as_deref(), &ids).await,
            None => Err(closed()),
        };
        match result {
            Ok(outcomes) => {
                // Before any caller hears of it: a count after an
                // acknowledged add must see it.
                ids.committed(
                    batch
                        .iter()
                        .zip(&outcomes)
                        .filter(|(_, o)| **o == AddOutcome::Added)
                        .map(|(r, _)| r.user.id.get()),
                );
                for (req, outcome) in batch.drain(..).zip(outcomes) {
                    let _ = req.reply.send(Ok(outcome));
                }
            }
            Err(e) => {
                for req in batch.drain(..) {
                    let _ = req.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// Commits a group, asking the ids in memory which ids are taken when they
/// are complete (a statement fewer), the database otherwise. Should memory
/// be wrong (a row it lacks: another process wrote to the file since the
/// last readiness check), it is dropped and the group tried again the way
/// that asks the database.
async fn commit_group(
    conn: &mut SqliteConnection,
    batch: &[InsertRequest],
    file: Option<&DbFile>,
    ids: &Ids,
) -> Result<Vec<AddOutcome>, StoreError> {
    let asked: Vec<UserId> = batch.iter().map(|r| r.user.id).collect();
    let taken = ids
        .present(&asked)
        .map(|present| present.into_iter().map(UserId::get).collect());
    match insert_batch(conn, batch, file, taken).await {
        Ok(outcomes) => Ok(outcomes),
        Err(Failed::Store(e)) => Err(e),
        Err(Failed::Stale) => {
            ids.invalidate("a commit found users the ids in memory lacked");
            match insert_batch(conn, batch, file, None).await {
                Ok(outcomes) => Ok(outcomes),
                Err(Failed::Store(e)) => Err(e),
                Err(Failed::Stale) => Err(StoreError::Internal(
                    "adding users: fewer inserted than found new".into(),
                )),
            }
        }
    }
}

/// Why a group's transaction did not commit.
enum Failed {
    /// Fewer users were inserted than the ids believed free: none committed.
    Stale,
    Store(StoreError),
}

impl From<StoreError> for Failed {
    fn from(e: StoreError) -> Self {
        Failed::Store(e)
    }
}

/// Inserts every request's user in one transaction: all commit, or none do.
///
/// The transaction is plain SQL, not sqlx's `Transaction`: when COMMIT fails
/// (a full disk), sqlx still counts a transaction as open, so its next
/// `begin()` issues a SAVEPOINT and its "commit" a RELEASE inside a
/// transaction that never commits: adds acknowledged, never written.
async fn insert_batch(
    conn: &mut SqliteConnection,
    batch: &[InsertRequest],
    file: Option<&DbFile>,
    taken: Option<HashSet<u32>>,
) -> Result<Vec<AddOutcome>, Failed> {
    let ctx = "adding users";
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut *conn)
        .await
        .map_err(|e| classify(e, ctx))?;
    let result = async {
        let outcomes = insert_group(conn, batch, taken).await?;
        // Never acknowledge adds into a file deleted or replaced under us.
        file.map_or(Ok(()), DbFile::ensure_same)?;
        sqlx::query("COMMIT")
            .execute(&mut *conn)
            .await
            .map_err(|e| classify(e, ctx))?;
        Ok(outcomes)
    }
    .await;
    if result.is_err() {
        // SQLite ends the transaction itself on some failures (FULL, IOERR)
        // and not on others (BUSY): after this ROLLBACK none is open.
        let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
    }
    result
}

/// Inserts users given as a JSON array of [id, nickname, mail_address,
/// user_type]. `jsonb_each` parses the array once and gives each row as
/// JSONB, which `->>` reads as it is; `json_each` gives each row as text,
/// which each of the four `->>` parsed again. (`WHERE true` tells SQLite's
/// parser that ON CONFLICT belongs to the INSERT, not to a join.)
const INSERT_MANY: &str = "INSERT INTO users (id, nickname, mail_address, user_type) \
     SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3 FROM jsonb_each(?1) WHERE true \
     ON CONFLICT (id) DO NOTHING";

/// Inserts a group's users with two statements, whatever its size: which ids
/// exist already (unless `taken` says), then every new user at once. Each statement is a round trip
/// to the connection's thread, so one per user cost more than the inserts.
/// Within the transaction (and with this the only writer) nothing changes
/// between the two, so the outcomes are exact: a user whose id exists, or
/// came earlier in the group, already exists.
async fn insert_group(
    conn: &mut SqliteConnection,
    batch: &[InsertRequest],
    taken: Option<HashSet<u32>>,
) -> Result<Vec<AddOutcome>, Failed> {
    let ctx = "adding users";
    let mut taken = match taken {
        Some(taken) => taken,
        None => existing_ids(conn, batch).await?,
    };
    let mut new = Vec::with_capacity(batch.len());
    let outcomes: Vec<AddOutcome> = batch
        .iter()
        .map(|r| {
            let u = &r.user;
            if taken.insert(u.id.get()) {
                new.push((
                    u.id.get(),
                    u.nickname.as_str(),
                    u.mail_address.as_str(),
                    u.user_type.number(),
                ));
                AddOutcome::Added
            } else {
                AddOutcome::AlreadyExists
            }
        })
        .collect();
    if !new.is_empty() {
        let rows = serde_json::to_string(&new).map_err(|e| StoreError::Internal(e.to_string()))?;
        let inserted = sqlx::query(INSERT_MANY)
            .bind(rows)
            .execute(&mut *conn)
            .await
            .map_err(|e| classify(e, ctx))?
            .rows_affected();
        if inserted != new.len() as u64 {
            tracing::warn!(
                inserted,
                new = new.len(),
                "a group's ids were taken after all"
            );
            return Err(Failed::Stale);
        }
    }
    Ok(outcomes)
}

/// Which of the group's ids have a user, from the database.
async fn existing_ids(
    conn: &mut SqliteConnection,
    batch: &[InsertRequest],
) -> Result<HashSet<u32>, StoreError> {
    let ids: Vec<u32> = batch.iter().map(|r| r.user.id.get()).collect();
    let existing: String = sqlx::query_scalar(SELECT_EXISTING)
        .bind(serde_json::to_string(&ids).map_err(|e| StoreError::Internal(e.to_string()))?)
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| classify(e, "adding users"))?;
    serde_json::from_str::<Vec<u32>>(&existing)
        .map(|ids| ids.into_iter().collect())
        .map_err(|e| StoreError::Internal(format!("decoding existing ids: {e}")))
}

/// Inserts one user unless the id is taken; returns the rows inserted (0 or 1).
pub(super) async fn insert(conn: &mut SqliteConnection, user: &User) -> Result<usize, sqlx::Error> {
    let done = sqlx::query(INSERT)
        .bind(i64::from(user.id.get()))
        .bind(user.nickname.as_str())
        .bind(user.mail_address.as_str())
        .bind(user.user_type.number())
        .execute(conn)
        .await?;
    Ok(done.rows_affected() as usize)
}
