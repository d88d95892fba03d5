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
    wire::EncodedUser,
};

/// Inserts committed in one transaction at most; bounds a commit's latency.
pub(super) const MAX_GROUP_COMMIT: usize = 256;
/// AddUser calls waiting for the writer before callers wait to enqueue.
pub(super) const INSERT_QUEUE: usize = 1024;

// Every insert gives the user's `wire` (the answer sent for it, see
// src/wire.rs), which the table's CHECK compares with its own encoding;
// left out, a trigger would compute it with one more write of the row.
const INSERT: &str = "INSERT INTO users (id, nickname, mail_address, user_type, wire) \
     VALUES (?1, ?2, ?3, ?4, ?5) ON CONFLICT (id) DO NOTHING";

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

/// Commits a group. With every stored id in memory, which of the group's
/// users are new is known before the transaction starts, and the whole
/// transaction is one statement list, one round trip to the connection's
/// thread (`commit_known`). Otherwise, or should memory prove wrong, the
/// database is asked (`commit_asking`).
async fn commit_group(
    conn: &mut SqliteConnection,
    batch: &[InsertRequest],
    file: Option<&DbFile>,
    ids: &Ids,
) -> Result<Vec<AddOutcome>, StoreError> {
    let asked: Vec<UserId> = batch.iter().map(|r| r.user.id).collect();
    if let Some(present) = ids.present(&asked) {
        let taken = present.into_iter().map(UserId::get).collect();
        match commit_known(conn, batch, file, taken).await {
            Err(Known::Taken) => {
                // Another process wrote to the file since the last readiness check.
                ids.invalidate("a commit found users the ids in memory lacked");
            }
            Err(Known::Failed(e)) => return Err(e),
            Ok(outcomes) => return Ok(outcomes),
        }
    }
    commit_asking(conn, batch, file).await
}

/// Why `commit_known` committed nothing.
enum Known {
    /// An id believed free was taken.
    Taken,
    Failed(StoreError),
}

/// With the ids in memory: BEGIN, every new user, COMMIT in one execution.
/// No ON CONFLICT: an id memory believed free but taken fails the INSERT
/// (a unique violation) before COMMIT runs, and nothing commits.
const INSERT_KNOWN_AND_COMMIT: &str = "BEGIN IMMEDIATE; \
     INSERT INTO users (id, nickname, mail_address, user_type, wire) \
     SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, unhex(value ->> 4) \
     FROM jsonb_each(?1); \
     COMMIT";

/// Commits the group's new users, `taken` being the ids that have one.
async fn commit_known(
    conn: &mut SqliteConnection,
    batch: &[InsertRequest],
    file: Option<&DbFile>,
    taken: HashSet<u32>,
) -> Result<Vec<AddOutcome>, Known> {
    let (outcomes, new) = sort_group(batch, taken);
    if new.is_empty() {
        return Ok(outcomes);
    }
    // Never acknowledge adds into a file deleted or replaced under us.
    file.map_or(Ok(()), DbFile::ensure_same)
        .map_err(Known::Failed)?;
    let rows = serde_json::to_string(&new)
        .map_err(|e| Known::Failed(StoreError::Internal(e.to_string())))?;
    match sqlx::query(INSERT_KNOWN_AND_COMMIT)
        .bind(rows)
        .execute(&mut *conn)
        .await
    {
        Ok(_) => Ok(outcomes),
        Err(e) => {
            // Whichever statement failed, no transaction stays open.
            let _ = sqlx::query("ROLLBACK").execute(&mut *conn).await;
            match &e {
                sqlx::Error::Database(db) if db.is_unique_violation() => Err(Known::Taken),
                _ => Err(Known::Failed(classify(e, "adding users"))),
            }
        }
    }
}

/// Inserts every request's user in one transaction, asking the database
/// which ids are taken: all commit, or none do.
///
/// The transaction is plain SQL, not sqlx's `Transaction`: when COMMIT fails
/// (a full disk), sqlx still counts a transaction as open, so its next
/// `begin()` issues a SAVEPOINT and its "commit" a RELEASE inside a
/// transaction that never commits: adds acknowledged, never written.
async fn commit_asking(
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
/// user_type, wire in hex]. `jsonb_each` parses the array once and gives each row as
/// JSONB, which `->>` reads as it is; `json_each` gives each row as text,
/// which each of the four `->>` parsed again. (`WHERE true` tells SQLite's
/// parser that ON CONFLICT belongs to the INSERT, not to a join.)
const INSERT_MANY: &str = "INSERT INTO users (id, nickname, mail_address, user_type, wire) \
     SELECT value ->> 0, value ->> 1, value ->> 2, value ->> 3, unhex(value ->> 4) \
     FROM jsonb_each(?1) WHERE true \
     ON CONFLICT (id) DO NOTHING";

/// A new user as `INSERT_MANY` reads it.
type NewRow<'a> = (u32, &'a str, &'a str, i32, String);

/// Each request's outcome given the ids `taken`, and the users to insert: a
/// user whose id is taken, or came earlier in the group, already exists.
fn sort_group(
    batch: &[InsertRequest],
    mut taken: HashSet<u32>,
) -> (Vec<AddOutcome>, Vec<NewRow<'_>>) {
    let mut new = Vec::with_capacity(batch.len());
    let outcomes = batch
        .iter()
        .map(|r| {
            let u = &r.user;
            if taken.insert(u.id.get()) {
                new.push((
                    u.id.get(),
                    u.nickname.as_str(),
                    u.mail_address.as_str(),
                    u.user_type.number(),
                    hex(EncodedUser::encode(u).message()),
                ));
                AddOutcome::Added
            } else {
                AddOutcome::AlreadyExists
            }
        })
        .collect();
    (outcomes, new)
}

/// Inserts a group's users with two statements, whatever its size: which ids
/// exist already, then every new user at once. Each statement is a round
/// trip to the connection's thread, so one per user cost more than the
/// inserts. Within the transaction (and with this the only writer) nothing
/// changes between the two, so the outcomes are exact.
async fn insert_group(
    conn: &mut SqliteConnection,
    batch: &[InsertRequest],
) -> Result<Vec<AddOutcome>, StoreError> {
    let ctx = "adding users";
    let (outcomes, new) = sort_group(batch, existing_ids(conn, batch).await?);
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
        .bind(EncodedUser::encode(user).into_message().to_vec())
        .execute(conn)
        .await?;
    Ok(done.rows_affected() as usize)
}

/// Bytes as hex digits, for `unhex` (JSON carries no blobs).
fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 15)]));
    }
    out
}
