//! The one write connection and its group commit: AddUser calls queue up
//! while a commit runs, then go in together, in one transaction and one WAL
//! sync, and each caller hears back only after COMMIT.

use std::sync::Arc;

use sqlx::SqliteConnection;
use tokio::sync::{Mutex, mpsc, oneshot};

use super::{classify, closed, file::DbFile};
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
    let mut outcomes = Vec::with_capacity(batch.len());
    let mut result = Ok(());
    for req in batch {
        match insert(conn, &req.user).await {
            Ok(inserted) => outcomes.push(if inserted == 1 {
                AddOutcome::Added
            } else {
                AddOutcome::AlreadyExists
            }),
            Err(e) => {
                result = Err(classify(e, ctx));
                break;
            }
        }
    }
    if result.is_ok() {
        // Never acknowledge adds into a file deleted or replaced under us.
        result = file.map_or(Ok(()), DbFile::ensure_same);
    }
    if result.is_ok() {
        result = sqlx::query("COMMIT")
            .execute(&mut *conn)
            .await
            .map(drop)
            .map_err(|e| classify(e, ctx));
    }
    if let Err(e) = result {
        // SQLite ends the transaction itself on some failures (FULL, IOERR)
        // and not on others (BUSY): after this ROLLBACK none is open.
        let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
        return Err(e);
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
