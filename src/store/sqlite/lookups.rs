//! Reads by id, coalesced across callers. Every query is a round trip to the
//! thread of a sqlx connection (a channel send, a wake-up, the answer sent
//! back, another wake-up): it costs more than SQLite's lookup itself, and
//! with many callers those thread switches are most of the server's CPU (see
//! BENCHMARKS.md). So a lone caller (no other lookup under way) runs its own
//! query at once, exactly as it always did; any other queues its ids, and
//! the next free connection answers everything queued with one query that
//! gives each caller's ids their own answer.
//! The writes' group commit (`writer.rs`) is the same idea.

use std::sync::{
    Arc,
    atomic::{AtomicUsize, Ordering},
};

use tokio::sync::{Mutex, mpsc, oneshot};

use super::{
    COUNT_MANY, Row, SELECT_BY_ID, SELECT_MANY, classify, closed, json_array,
    readers::{Reader, Readers},
    rows, to_user,
};
use crate::{
    domain::{User, UserId},
    store::StoreError,
};

/// Lookups answered by one query at most: bounds one query's latency.
const MAX_COALESCED: usize = 64;
/// Lookups waiting for a connection before callers wait to queue theirs.
const QUEUE: usize = 1024;

/// Several lookups' users at once: given a JSON array of id arrays, one
/// array of users per id array, in order (each like `SELECT_MANY`'s).
const SELECT_GROUPED: &str = "SELECT json_group_array(json((\
     SELECT json_group_array(\
     json_array(u.id, u.nickname, u.mail_address, u.user_type) ORDER BY j.key) \
     FROM json_each(r.value) AS j CROSS JOIN users AS u ON u.id = j.value)) ORDER BY r.key) \
     FROM json_each(?1) AS r";
/// Users by id, in no particular order, each found id as often as it is
/// listed: the single-id lookups of a batch, answered by id. Unlike
/// `SELECT_GROUPED`, no subquery per lookup and no ORDER BY in an aggregate,
/// which makes SQLite build and sort a temporary B-tree per lookup (about a
/// tenth of a GetUser's instructions). The row format is `SELECT_MANY`'s,
/// decoded by `users_from_json`.
const SELECT_BY_IDS: &str = "SELECT json_group_array(\
     json_array(u.id, u.nickname, u.mail_address, u.user_type)) \
     FROM json_each(?1) AS j CROSS JOIN users AS u ON u.id = j.value";
/// Several lookups' counts at once: one count per id array, in order.
const COUNT_GROUPED: &str = "SELECT json_group_array((\
     SELECT COUNT(*) FROM json_each(r.value) AS j CROSS JOIN users AS u ON u.id = j.value) \
     ORDER BY r.key) \
     FROM json_each(?1) AS r";

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
    /// Lookups under way, run alone or queued.
    busy: Arc<AtomicUsize>,
}

/// Counts a lookup as under way until dropped.
struct Busy<'a>(&'a AtomicUsize);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Lookups {
    /// Starts the tasks that answer queued lookups, one per core (more
    /// queries at once than cores only makes each batch smaller), at most
    /// one per read connection; they end when the last `Lookups` is dropped.
    /// Must be called inside a tokio runtime.
    pub(super) fn start(readers: Arc<Readers>) -> Self {
        let (queue, rx) = mpsc::channel(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        for _ in 0..cores.min(readers.max() as usize).max(1) {
            tokio::spawn(serve(rx.clone(), readers.clone()));
        }
        Self {
            readers,
            queue,
            busy: Arc::new(AtomicUsize::new(0)),
        }
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
        let alone_now = self.busy.fetch_add(1, Ordering::Relaxed) == 0;
        let _busy = Busy(&self.busy);
        // The only lookup under way, with a connection idle: it runs as it is.
        // Otherwise it joins the queue, even with a connection idle: lookups
        // answered one by one while others wait would make every batch small.
        if alone_now && let Some(mut conn) = self.readers.try_acquire() {
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

/// Answers queued lookups. The task waiting for the next lookup holds the
/// queue: once one arrives, it waits for a connection, and everything queued
/// meanwhile goes into the same query. The other tasks wait their turn, each
/// with the connection it will use being the next to come free.
async fn serve(queue: Arc<Mutex<mpsc::Receiver<Queued>>>, readers: Arc<Readers>) {
    let ctx = "reading users by id";
    let mut batch = Vec::with_capacity(MAX_COALESCED);
    loop {
        let conn = {
            let mut queue = queue.lock().await;
            let Some(first) = queue.recv().await else {
                return;
            };
            batch.push(first);
            let conn = readers.acquire().await;
            while batch.len() < MAX_COALESCED {
                let Ok(next) = queue.try_recv() else {
                    break;
                };
                batch.push(next);
            }
            conn
        };
        // A caller that went away needs no answer.
        batch.retain(|q| !q.reply.is_closed());
        match conn {
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

/// Answers every lookup in `batch` (emptying it): the lookups of one id
/// with one flat query, the others with one query per kind.
async fn answer(conn: &mut Reader<'_>, batch: &mut Vec<Queued>) {
    let mut singles = Vec::new();
    let mut lists = Vec::new();
    let mut counts = Vec::new();
    for q in batch.drain(..) {
        match (q.want, q.ids.len()) {
            (Want::Users, 1) => singles.push(q),
            (Want::Users, _) => lists.push(q),
            (Want::Count, _) => counts.push(q),
        }
    }
    if singles.len() > 1 {
        by_id(conn, singles).await;
    } else {
        lists.append(&mut singles);
    }
    for (group, want) in [(lists, Want::Users), (counts, Want::Count)] {
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

/// Lookups of one id each, in one query: the users of every id asked for,
/// each lookup given the one with its id (or none).
async fn by_id(conn: &mut Reader<'_>, group: Vec<Queued>) {
    let mut ids: Vec<UserId> = group.iter().flat_map(|q| q.ids.iter().copied()).collect();
    ids.sort_unstable();
    ids.dedup();
    let result = sqlx::query_scalar::<_, String>(SELECT_BY_IDS)
        .bind(json_array(&ids))
        .fetch_one(&mut **conn)
        .await
        .map_err(|e| classify(e, "reading users by id"))
        .and_then(|json| users_from_json(&json));
    let mut users = match result {
        Ok(users) => users,
        Err(e) => {
            for q in group {
                let _ = q.reply.send(Err(e.clone()));
            }
            return;
        }
    };
    let wanted: Vec<UserId> = group.iter().map(|q| q.ids[0]).collect();
    for (i, q) in group.into_iter().enumerate() {
        let id = wanted[i];
        let found = match users.iter().position(|u| u.id == id) {
            // Another lookup after this one wants the same user: a copy.
            Some(at) if wanted[i + 1..].contains(&id) => {
                vec![users[at].clone()]
            }
            Some(at) => vec![users.swap_remove(at)],
            None => Vec::new(),
        };
        let _ = q.reply.send(Ok(Found::Users(found)));
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
            Ok(Found::Users(rows::in_order_of(ids, rows::users(&json)?)))
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

/// Several lookups of one kind in one query: their id lists side by side,
/// one answer per list back, in order.
async fn together(conn: &mut Reader<'_>, group: Vec<Queued>, want: Want) {
    let lists: Vec<String> = group.iter().map(|q| json_array(&q.ids)).collect();
    let query = match want {
        Want::Users => SELECT_GROUPED,
        Want::Count => COUNT_GROUPED,
    };
    let result = sqlx::query_scalar::<_, String>(query)
        .bind(format!("[{}]", lists.join(",")))
        .fetch_one(&mut **conn)
        .await
        .map_err(|e| classify(e, "reading users by id"))
        .and_then(|json| split(&json, group.len(), want));
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

/// One `Found` per lookup from a grouped answer, which must have `lookups`.
fn split(json: &str, lookups: usize, want: Want) -> Result<Vec<Found>, StoreError> {
    let decode = |e: serde_json::Error| StoreError::Internal(format!("decoding stored users: {e}"));
    let found: Vec<Found> = match want {
        Want::Users => rows::groups(json)?.into_iter().map(Found::Users).collect(),
        Want::Count => serde_json::from_str::<Vec<u64>>(json)
            .map_err(decode)?
            .into_iter()
            .map(Found::Count)
            .collect(),
    };
    if found.len() != lookups {
        return Err(StoreError::Internal(format!(
            "{} answers for {lookups} lookups",
            found.len()
        )));
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(found: Vec<Found>) -> Vec<u64> {
        found
            .into_iter()
            .map(|f| match f {
                Found::Count(n) => n,
                Found::Users(_) => panic!("asked for counts"),
            })
            .collect()
    }

    #[test]
    fn a_grouped_answer_gives_each_lookup_its_own() {
        assert_eq!(counts(split("[2,0,1]", 3, Want::Count).unwrap()), [2, 0, 1]);
        let json = r#"[[[7,"a","a@x.io",1],[7,"a","a@x.io",1]],[],[[9,"c","c@x.io",2]]]"#;
        let ids: Vec<Vec<u32>> = split(json, 3, Want::Users)
            .unwrap()
            .into_iter()
            .map(|f| match f {
                Found::Users(users) => users.into_iter().map(|u| u.id.get()).collect(),
                Found::Count(_) => panic!("asked for users"),
            })
            .collect();
        assert_eq!(ids, [vec![7, 7], vec![], vec![9]]);
    }

    #[test]
    fn an_answer_for_another_number_of_lookups_is_an_error_not_a_mixup() {
        assert!(split("[1,2]", 3, Want::Count).is_err());
        assert!(split("[[]]", 2, Want::Users).is_err());
    }
}
