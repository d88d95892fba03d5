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

use tokio::sync::{Mutex, Notify, mpsc, oneshot};

use super::{
    Answers, COUNT_MANY, SELECT_BY_ID, SELECT_EXISTING, SELECT_MANY, classify, closed,
    encoded_users, json_array,
    readers::{Reader, Readers},
};
use crate::{domain::UserId, store::StoreError, wire::EncodedUser};

/// Lookups answered by one query at most: bounds one query's latency.
const MAX_COALESCED: usize = 64;
/// Lookups waiting for a connection before callers wait to queue theirs.
const QUEUE: usize = 1024;

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
    Users(Vec<EncodedUser>),
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
        let flight = Arc::new(InFlight::default());
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        for _ in 0..cores.min(readers.max() as usize).max(1) {
            tokio::spawn(serve(rx.clone(), readers.clone(), flight.clone()));
        }
        Self {
            readers,
            queue,
            busy: Arc::new(AtomicUsize::new(0)),
        }
    }

    /// The users among `ids`, in the order asked, repeats included.
    pub(super) async fn users(&self, ids: Vec<UserId>) -> Result<Vec<EncodedUser>, StoreError> {
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

/// Moves what is queued now into `batch`, up to `MAX_COALESCED` lookups;
/// returns the number of ids moved.
fn drain(queue: &mut mpsc::Receiver<Queued>, batch: &mut Vec<Queued>) -> usize {
    let mut ids = 0;
    while batch.len() < MAX_COALESCED {
        let Ok(next) = queue.try_recv() else {
            break;
        };
        ids += next.ids.len();
        batch.push(next);
    }
    ids
}

/// Counts a query as ended when dropped, and tells the tasks waiting on it.
struct Ended<'a>(&'a InFlight);

impl Drop for Ended<'_> {
    fn drop(&mut self) {
        self.0.queries.fetch_sub(1, Ordering::AcqRel);
        self.0.ended.notify_waiters();
    }
}

/// Queued ids from which a batch runs beside a query already under way
/// instead of waiting for it to end. Lookups of one or a few ids (GetUser)
/// gain from waiting: everything queued meanwhile joins the batch, and each
/// query costs a round trip to a connection's thread, so two half-size
/// queries at once cost more CPU than one. Big batches (the bulk streams',
/// up to 512 ids each) are worth a connection each: SQLite's seeks are most
/// of their cost, and one connection at a time made bulk GetUsersByIds 20 %
/// slower. Measured idle with the build before beside it (BENCHMARKS.md):
/// GetUser 79 → 73 µs of server CPU and 0.45 → 0.33 context switches per
/// call, the bulk streams unchanged.
const PARALLEL_IDS: usize = 256;

/// Queries of queued lookups under way, and a signal when one ends.
#[derive(Default)]
struct InFlight {
    queries: AtomicUsize,
    ended: Notify,
}

/// Answers queued lookups. The task waiting for the next lookup holds the
/// queue: once one arrives, it gathers a batch (see `PARALLEL_IDS`), waits
/// for a connection, and everything queued meanwhile goes into the same
/// query. The other tasks wait their turn, each with the connection it will
/// use being the next to come free.
async fn serve(
    queue: Arc<Mutex<mpsc::Receiver<Queued>>>,
    readers: Arc<Readers>,
    flight: Arc<InFlight>,
) {
    let ctx = "reading users by id";
    let mut batch = Vec::with_capacity(MAX_COALESCED);
    loop {
        let conn = {
            let mut queue = queue.lock().await;
            let Some(first) = queue.recv().await else {
                return;
            };
            let mut ids = first.ids.len();
            batch.push(first);
            loop {
                ids += drain(&mut queue, &mut batch);
                if ids >= PARALLEL_IDS || batch.len() >= MAX_COALESCED {
                    break;
                }
                let ended = flight.ended.notified();
                tokio::pin!(ended);
                // Registered before the check: an end between the two is seen.
                ended.as_mut().enable();
                if flight.queries.load(Ordering::Acquire) == 0 {
                    break;
                }
                tokio::select! {
                    () = &mut ended => {}
                    next = queue.recv() => match next {
                        Some(q) => {
                            ids += q.ids.len();
                            batch.push(q);
                        }
                        None => break,
                    },
                }
            }
            let conn = readers.acquire().await;
            drain(&mut queue, &mut batch);
            conn
        };
        flight.queries.fetch_add(1, Ordering::AcqRel);
        let _ended = Ended(&flight);
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

/// Answers every lookup in `batch` (emptying it): one query for all the
/// lookups of users, one for all the counts, each over the union of their
/// ids. A query per lookup, or a subquery per lookup aggregated in order,
/// cost SQLite a sorted temporary B-tree each: flat, a GetUser cost 4.3k
/// instructions in SQLite instead of 7.1k, an id of a 100-id lookup 4.7k
/// instead of 7.9k.
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
            let answers: Answers = sqlx::query_scalar(SELECT_BY_ID)
                .bind(i64::from(id.get()))
                .fetch_one(&mut **conn)
                .await
                .map_err(failed)?;
            Ok(Found::Users(encoded_users(answers)?))
        }
        (Want::Users, _) => {
            let found = users_of(conn, &union([ids]), context).await?;
            let mut answers = distribute(&[ids], found);
            Ok(Found::Users(answers.pop().unwrap_or_default()))
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

/// Several lookups of one kind in one query over the union of their ids,
/// each answered from what it found.
async fn together(conn: &mut Reader<'_>, group: Vec<Queued>, want: Want) {
    let context = "reading users by id";
    let lists: Vec<&[UserId]> = group.iter().map(|q| q.ids.as_slice()).collect();
    let ids = union(lists.iter().copied());
    let answers: Result<Vec<Found>, StoreError> = match want {
        Want::Users => users_of(conn, &ids, context).await.map(|found| {
            distribute(&lists, found)
                .into_iter()
                .map(Found::Users)
                .collect()
        }),
        Want::Count => existing(conn, &ids, context).await.map(|found| {
            lists
                .iter()
                .map(|ids| {
                    let n = ids.iter().filter(|id| found.binary_search(id).is_ok());
                    Found::Count(n.count() as u64)
                })
                .collect()
        }),
    };
    match answers {
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

/// Every id of `lists` once, ascending: SQLite then seeks in key order.
fn union<'a>(lists: impl IntoIterator<Item = &'a [UserId]>) -> Vec<UserId> {
    let mut ids: Vec<UserId> = lists.into_iter().flatten().copied().collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// The users of `ids` (distinct), ascending by id.
async fn users_of(
    conn: &mut Reader<'_>,
    ids: &[UserId],
    context: &str,
) -> Result<Vec<EncodedUser>, StoreError> {
    let answers: Answers = sqlx::query_scalar(SELECT_MANY)
        .bind(json_array(ids))
        .fetch_one(&mut **conn)
        .await
        .map_err(|e| classify(e, context))?;
    encoded_users(answers)
}

/// Which of `ids` (distinct) have a user, ascending.
async fn existing(
    conn: &mut Reader<'_>,
    ids: &[UserId],
    context: &str,
) -> Result<Vec<UserId>, StoreError> {
    let json: String = sqlx::query_scalar(SELECT_EXISTING)
        .bind(json_array(ids))
        .fetch_one(&mut **conn)
        .await
        .map_err(|e| classify(e, context))?;
    let mut found: Vec<UserId> = serde_json::from_str::<Vec<u32>>(&json)
        .map_err(|e| StoreError::Internal(format!("decoding stored ids: {e}")))?
        .into_iter()
        .map(|id| UserId::new(id).ok_or_else(|| StoreError::Internal("a stored id of 0".into())))
        .collect::<Result<_, _>>()?;
    found.sort_unstable();
    Ok(found)
}

/// Each list's users, in its order and with its repeats, from `found` (the
/// users of the union of the lists, ascending by id). A user asked for once
/// is moved into its answer; one asked for again is copied (its bytes are
/// shared, not copied).
fn distribute(lists: &[&[UserId]], found: Vec<EncodedUser>) -> Vec<Vec<EncodedUser>> {
    // Where each list's users are in `found`, and how often each is asked for.
    let index: Vec<Vec<usize>> = lists
        .iter()
        .map(|ids| {
            ids.iter()
                .filter_map(|id| found.binary_search_by_key(id, EncodedUser::id).ok())
                .collect()
        })
        .collect();
    let mut asked = vec![0u32; found.len()];
    for &i in index.iter().flatten() {
        asked[i] += 1;
    }
    let mut found: Vec<Option<EncodedUser>> = found.into_iter().map(Some).collect();
    index
        .into_iter()
        .map(|indices| {
            indices
                .into_iter()
                .filter_map(|i| {
                    asked[i] -= 1;
                    if asked[i] == 0 {
                        found[i].take()
                    } else {
                        found[i].clone()
                    }
                })
                .collect()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::User;

    fn user(id: u32) -> EncodedUser {
        EncodedUser::encode(&User::parse(id, format!("u{id}"), format!("u{id}@x.io"), 1).unwrap())
    }

    fn ids(raw: &[u32]) -> Vec<UserId> {
        raw.iter().filter_map(|&id| UserId::new(id)).collect()
    }

    #[test]
    fn each_list_gets_its_users_in_its_order_with_its_repeats() {
        let lists = [
            ids(&[7, 3, 7]),
            ids(&[]),
            ids(&[9, 8]),
            ids(&[3]),
            ids(&[5]),
        ];
        let lists: Vec<&[UserId]> = lists.iter().map(Vec::as_slice).collect();
        assert_eq!(union(lists.iter().copied()), ids(&[3, 5, 7, 8, 9]));
        // 8 and 5 have no user.
        let answers = distribute(&lists, vec![user(3), user(7), user(9)]);
        let got: Vec<Vec<u32>> = answers
            .iter()
            .map(|users| users.iter().map(|u| u.id().get()).collect())
            .collect();
        assert_eq!(got, [vec![7, 3, 7], vec![], vec![9], vec![3], vec![]]);
        // Whole users, copies included.
        assert_eq!(answers[0], [user(7), user(3), user(7)]);
        assert_eq!(answers[3], [user(3)]);
    }

    #[test]
    fn nothing_found_answers_every_list_with_nothing() {
        let lists = [ids(&[1, 2]), ids(&[2])];
        let lists: Vec<&[UserId]> = lists.iter().map(Vec::as_slice).collect();
        assert_eq!(distribute(&lists, Vec::new()), [vec![], vec![]]);
    }
}
