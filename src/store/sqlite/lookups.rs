//! Reads by id, coalesced across callers. Every query is a round trip to the
//! thread of a sqlx connection (a channel send, a wake-up, the answer sent
//! back, another wake-up): it costs more than SQLite's lookup itself, and
//! with many callers those thread switches are most of the server's CPU (see
//! BENCHMARKS.md). So a caller that finds a read connection idle runs its
//! own query at once, exactly as a lone caller always did; one that finds
//! every connection busy queues its ids, and the next free connection
//! answers everything queued with one query, whose rows carry the position
//! of the id that found them so each caller gets its own answer back.
//! The writes' group commit (`writer.rs`) is the same idea.

use std::sync::Arc;

use tokio::sync::{Mutex, mpsc, oneshot};

use super::{
    COUNT_MANY, Row, SELECT_BY_ID, SELECT_MANY, classify, closed, json_array,
    readers::{Reader, Readers},
    to_user, users_from_json,
};
use crate::{
    domain::{User, UserId},
    store::StoreError,
};

/// Lookups answered by one query at most: bounds one query's latency.
const MAX_COALESCED: usize = 64;
/// Lookups waiting for a connection before callers wait to queue theirs.
const QUEUE: usize = 1024;

/// Like `SELECT_MANY`, with each row's position among the ids asked.
const SELECT_MANY_KEYED: &str = "SELECT json_group_array(\
     json_array(j.key, u.id, u.nickname, u.mail_address, u.user_type) ORDER BY j.key) \
     FROM json_each(?1) AS j CROSS JOIN users AS u ON u.id = j.value";
/// The positions among the ids asked that found a user.
const FOUND_KEYS: &str = "SELECT json_group_array(j.key ORDER BY j.key) \
     FROM json_each(?1) AS j CROSS JOIN users AS u ON u.id = j.value";

/// What a lookup wants to know about its ids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    /// The users, in the order asked, repeats included (`get_many`).
    Users,
    /// How many of the ids have a user, repeats counted (`count_existing`).
    Count,
}

/// What a lookup found.
#[derive(Debug)]
enum Found {
    Users(Vec<User>),
    Count(u64),
}

struct Queued {
    ids: Vec<UserId>,
    want: Want,
    reply: oneshot::Sender<Result<Found, StoreError>>,
}

#[derive(Clone)]
pub(super) struct Lookups {
    readers: Arc<Readers>,
    queue: mpsc::Sender<Queued>,
}

impl Lookups {
    /// Starts one task per read connection that may be open; they end when
    /// the last `Lookups` is dropped. Must be called inside a tokio runtime.
    pub(super) fn start(readers: Arc<Readers>) -> Self {
        let (queue, rx) = mpsc::channel(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        for _ in 0..readers.max() {
            tokio::spawn(serve(rx.clone(), readers.clone()));
        }
        Self { readers, queue }
    }

    /// The users among `ids`, in the order asked, repeats included.
    pub(super) async fn users(&self, ids: Vec<UserId>) -> Result<Vec<User>, StoreError> {
        match self.lookup(ids, Want::Users, "reading users by id").await? {
            Found::Users(users) => Ok(users),
            Found::Count(_) => Err(mismatch()),
        }
    }

    /// How many of `ids` have a user, repeats counted.
    pub(super) async fn count(&self, ids: Vec<UserId>) -> Result<u64, StoreError> {
        match self.lookup(ids, Want::Count, "counting users").await? {
            Found::Count(n) => Ok(n),
            Found::Users(_) => Err(mismatch()),
        }
    }

    async fn lookup(
        &self,
        ids: Vec<UserId>,
        want: Want,
        context: &str,
    ) -> Result<Found, StoreError> {
        // An idle connection: nobody is queued (a freed connection goes to a
        // waiting task first), so this read is alone and runs as it is.
        if let Some(mut conn) = self.readers.try_acquire() {
            return alone(&mut conn, &ids, want, context).await;
        }
        let (reply, found) = oneshot::channel();
        self.queue
            .send(Queued { ids, want, reply })
            .await
            .map_err(|_| closed())?;
        found.await.map_err(|_| closed())?
    }
}

/// A lookup answered with the other kind of answer: a bug, never the client's.
fn mismatch() -> StoreError {
    StoreError::Internal("a lookup got the wrong kind of answer".into())
}

/// Answers queued lookups: takes whatever is queued, waits for a connection
/// (more queue up meanwhile, for the next task), answers them all.
async fn serve(queue: Arc<Mutex<mpsc::Receiver<Queued>>>, readers: Arc<Readers>) {
    let mut batch = Vec::with_capacity(MAX_COALESCED);
    loop {
        let received = queue
            .lock()
            .await
            .recv_many(&mut batch, MAX_COALESCED)
            .await;
        if received == 0 {
            return;
        }
        // A caller that went away needs no answer.
        batch.retain(|q| !q.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let ctx = "reading users by id";
        match readers.acquire().await {
            Ok(mut conn) => answer(&mut conn, &mut batch).await,
            Err(e) => {
                let e = classify(e, ctx);
                for q in batch.drain(..) {
                    let _ = q.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

/// Answers every lookup in `batch` (emptying it): one query per kind.
async fn answer(conn: &mut Reader<'_>, batch: &mut Vec<Queued>) {
    let (users, counts): (Vec<Queued>, Vec<Queued>) =
        batch.drain(..).partition(|q| q.want == Want::Users);
    for (group, want) in [(users, Want::Users), (counts, Want::Count)] {
        match group.len() {
            0 => {}
            1 => {
                let q = group.into_iter().next().expect("one");
                let found = alone(conn, &q.ids, want, "reading users by id").await;
                let _ = q.reply.send(found);
            }
            _ => together(conn, group, want).await,
        }
    }
}

/// One lookup's own query: what every lookup ran before they were coalesced.
async fn alone(
    conn: &mut Reader<'_>,
    ids: &[UserId],
    want: Want,
    context: &str,
) -> Result<Found, StoreError> {
    let failed = |e| classify(e, context);
    match (want, ids) {
        (Want::Users, [id]) => {
            let row = sqlx::query_as::<_, Row>(SELECT_BY_ID)
                .bind(i64::from(id.get()))
                .fetch_optional(&mut **conn)
                .await
                .map_err(failed)?;
            Ok(Found::Users(
                row.map(to_user).transpose()?.into_iter().collect(),
            ))
        }
        (Want::Users, _) => {
            let json: String = sqlx::query_scalar(SELECT_MANY)
                .bind(json_array(ids))
                .fetch_one(&mut **conn)
                .await
                .map_err(failed)?;
            users_from_json(&json).map(Found::Users)
        }
        (Want::Count, _) => {
            let n: i64 = sqlx::query_scalar(COUNT_MANY)
                .bind(json_array(ids))
                .fetch_one(&mut **conn)
                .await
                .map_err(failed)?;
            Ok(Found::Count(n.try_into().unwrap_or(0)))
        }
    }
}

/// Several lookups of one kind in one query: their ids end to end, each
/// row tagged with its position, split back by each lookup's range.
async fn together(conn: &mut Reader<'_>, group: Vec<Queued>, want: Want) {
    let all: Vec<UserId> = group.iter().flat_map(|q| q.ids.iter().copied()).collect();
    let query = match want {
        Want::Users => SELECT_MANY_KEYED,
        Want::Count => FOUND_KEYS,
    };
    let result = sqlx::query_scalar::<_, String>(query)
        .bind(json_array(&all))
        .fetch_one(&mut **conn)
        .await
        .map_err(|e| classify(e, "reading users by id"))
        .and_then(|json| split(&json, &group, want));
    match result {
        Ok(answers) => {
            for (q, found) in group.into_iter().zip(answers) {
                let _ = q.reply.send(Ok(found));
            }
        }
        Err(e) => {
            for q in group {
                let _ = q.reply.send(Err(e.clone()));
            }
        }
    }
}

/// Splits a keyed answer into one `Found` per lookup, in order.
fn split(json: &str, group: &[Queued], want: Want) -> Result<Vec<Found>, StoreError> {
    let decode = |e: serde_json::Error| StoreError::Internal(format!("decoding stored users: {e}"));
    // Where each lookup's ids start among all the ids.
    let starts: Vec<usize> = group
        .iter()
        .scan(0usize, |next, q| {
            let start = *next;
            *next += q.ids.len();
            Some(start)
        })
        .collect();
    let total = group.iter().map(|q| q.ids.len()).sum::<usize>();
    let owner = |key: usize| {
        if key >= total {
            return Err(StoreError::Internal(format!("position {key} out of range")));
        }
        // The last lookup starting at or before `key` (empty ones are skipped).
        Ok(starts.partition_point(|&s| s <= key) - 1)
    };
    match want {
        Want::Users => {
            let mut users: Vec<Vec<User>> = group.iter().map(|_| Vec::new()).collect();
            let rows: Vec<(usize, i64, String, String, i64)> =
                serde_json::from_str(json).map_err(decode)?;
            for (key, id, nickname, mail, user_type) in rows {
                users[owner(key)?].push(to_user((id, nickname, mail, user_type))?);
            }
            Ok(users.into_iter().map(Found::Users).collect())
        }
        Want::Count => {
            let mut counts = vec![0u64; group.len()];
            for key in serde_json::from_str::<Vec<usize>>(json).map_err(decode)? {
                counts[owner(key)?] += 1;
            }
            Ok(counts.into_iter().map(Found::Count).collect())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queued(ids: &[u32], want: Want) -> Queued {
        Queued {
            ids: ids.iter().copied().filter_map(UserId::new).collect(),
            want,
            reply: oneshot::channel().0,
        }
    }

    #[test]
    fn counts_go_to_the_lookup_whose_ids_found_them() {
        let group = [
            queued(&[1, 2], Want::Count),
            queued(&[], Want::Count),
            queued(&[3], Want::Count),
            queued(&[4, 5, 6], Want::Count),
        ];
        // Positions 0 and 1 are the first lookup's, 2 the third's, 3..6 the last's.
        let found = split("[0,1,3,5]", &group, Want::Count).unwrap();
        let counts: Vec<u64> = found
            .into_iter()
            .map(|f| match f {
                Found::Count(n) => n,
                Found::Users(_) => panic!("asked for counts"),
            })
            .collect();
        assert_eq!(counts, [2, 0, 0, 2]);
    }

    #[test]
    fn users_keep_their_order_and_repeats_per_lookup() {
        let group = [queued(&[7, 7], Want::Users), queued(&[8, 9], Want::Users)];
        let json = r#"[[0,7,"a","a@x.io",1],[1,7,"a","a@x.io",1],[3,9,"c","c@x.io",2]]"#;
        let found = split(json, &group, Want::Users).unwrap();
        let ids: Vec<Vec<u32>> = found
            .into_iter()
            .map(|f| match f {
                Found::Users(users) => users.into_iter().map(|u| u.id.get()).collect(),
                Found::Count(_) => panic!("asked for users"),
            })
            .collect();
        assert_eq!(ids, [vec![7, 7], vec![9]]);
    }

    #[test]
    fn a_position_past_the_ids_is_an_error_not_a_panic() {
        let group = [queued(&[1], Want::Count)];
        assert!(split("[1]", &group, Want::Count).is_err());
    }
}
