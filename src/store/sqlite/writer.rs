//! The one write connection and its group commit: AddUser calls queue up
//! while a commit runs, then go in together, in one transaction and one WAL
//! sync, and each caller hears back only after COMMIT.

use std::{collections::HashSet, sync::Arc};

use sqlx::SqliteConnection;
use tokio::sync::{Mutex, mpsc, oneshot};

use super::{SELECT_EXISTING, classify, closed, file::DbFile};
use crate::{
    domain::User,
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
            Some(conn) => insert_batch(conn, &batch, file.as_deref()).await,
            None => Err(closed()),
        };
        match result {
            Ok(outcomes) => {
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
) -> Result<Vec<AddOutcome>, StoreError> {
    let ctx = "adding users";
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut *conn)
        .await
        .map_err(|e| classify(e, ctx))?;
    let result = async {
        let outcomes = insert_group(conn, batch).await?;
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
/// exist already, then every new user at once. Each statement is a round trip
/// to the connection's thread, so one per user cost more than the inserts.
/// Within the transaction (and with this the only writer) nothing changes
/// between the two, so the outcomes are exact: a user whose id exists, or
/// came earlier in the group, already exists.
async fn insert_group(
    conn: &mut SqliteConnection,
    batch: &[InsertRequest],
) -> Result<Vec<AddOutcome>, StoreError> {
    let ctx = "adding users";
    let ids: Vec<u32> = batch.iter().map(|r| r.user.id.get()).collect();
    let existing: String = sqlx::query_scalar(SELECT_EXISTING)
        .bind(serde_json::to_string(&ids).map_err(|e| StoreError::Internal(e.to_string()))?)
        .fetch_one(&mut *conn)
        .await
        .map_err(|e| classify(e, ctx))?;
    let mut taken: HashSet<u32> = serde_json::from_str::<Vec<u32>>(&existing)
        .map_err(|e| StoreError::Internal(format!("decoding existing ids: {e}")))?
        .into_iter()
        .collect();
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
            return Err(StoreError::Internal(format!(
                "inserted {inserted} of {} new users",
                new.len()
            )));
        }
    }
    Ok(outcomes)
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
