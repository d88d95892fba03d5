//! Which ids have a user, held in memory beside the database: a compressed
//! bitmap (roaring) of every stored id, so that CountAlreadyUsers, lookups of
//! ids with no user, and the group commit's "is this id taken?" are answered
//! without a query. A query per id is a B-tree seek and, for random ids, a
//! `pread` of a leaf the page cache doesn't hold: about 2 µs an id, against
//! tens of nanoseconds here (BENCHMARKS.md). The set is small: one bit per id
//! where ids are dense (128 KiB for ids 1 to 1M), two bytes per id where they
//! are scattered; the rows themselves stay in SQLite.
//!
//! It is exact, not a cache that may be stale: users are never deleted, this
//! process is the database's one writer (`database.url`'s contract for
//! SQLite), and every commit adds its ids here before any caller hears of it.
//! Until a build has read every stored id (`build`, started by the readiness
//! check), the set is not used and everything goes to SQLite as before. A
//! change from elsewhere (a restored file, a write by another process, which
//! the contract rules out but a person may still do) makes the set unused
//! again until rebuilt: the file's replacement at once, another process's
//! commit at the next readiness check (SQLite's `PRAGMA data_version`).

use std::sync::{
    Arc, RwLock, RwLockReadGuard, RwLockWriteGuard,
    atomic::{AtomicBool, Ordering},
};

use roaring::RoaringBitmap;

use super::{classify, readers::Readers};
use crate::{domain::UserId, store::StoreError};

/// Ids read per query while building: a page holds a read connection for a
/// few milliseconds, so lookups queued behind it wait no longer than that.
const BUILD_PAGE: u32 = 8192;

const SELECT_ID_PAGE: &str = "SELECT json_group_array(id) \
     FROM (SELECT id FROM users WHERE id > ?1 ORDER BY id LIMIT ?2)";

#[derive(Default)]
struct State {
    ids: RoaringBitmap,
    /// Whether `ids` holds every stored id: a build finished in this epoch.
    complete: bool,
    /// Bumped by `invalidate`: a build from an earlier epoch is discarded.
    epoch: u64,
    /// The write connection's `PRAGMA data_version` when the set was last
    /// known to match the database; `None` after the connection changed.
    data_version: Option<i64>,
}

#[derive(Default)]
pub(super) struct Ids {
    state: RwLock<State>,
    building: AtomicBool,
}

impl Ids {
    fn read(&self) -> RwLockReadGuard<'_, State> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, State> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    /// How many of `ids` have a user, repeats counted; `None` until built.
    pub(super) fn count(&self, ids: &[UserId]) -> Option<u64> {
        let state = self.read();
        state
            .complete
            .then(|| ids.iter().filter(|id| state.ids.contains(id.get())).count() as u64)
    }

    /// The ids among `ids` that have a user, in order, repeats kept; `None`
    /// until built.
    pub(super) fn present(&self, ids: &[UserId]) -> Option<Vec<UserId>> {
        let state = self.read();
        state.complete.then(|| {
            ids.iter()
                .copied()
                .filter(|id| state.ids.contains(id.get()))
                .collect()
        })
    }

    /// Ids that a commit has just stored. Called after every commit that
    /// adds users, whatever the set's state: one building now must not miss
    /// them (its pages may have passed them already).
    pub(super) fn committed(&self, ids: impl IntoIterator<Item = u32>) {
        self.write().ids.extend(ids);
    }

    /// Stops using the set (the database changed under it) until rebuilt.
    pub(super) fn invalidate(&self, why: &str) {
        let mut state = self.write();
        let was_complete = state.complete;
        *state = State {
            epoch: state.epoch + 1,
            ..State::default()
        };
        drop(state);
        if was_complete {
            tracing::warn!(
                why,
                "ids in memory dropped until rebuilt; reads go to the database"
            );
        }
    }

    /// Compares the write connection's `PRAGMA data_version` with the last
    /// one seen: it changes when another connection commits, and none of
    /// ours but the writer ever writes. A change drops the set.
    pub(super) fn observe_data_version(&self, version: i64) {
        let mut state = self.write();
        match state.data_version {
            None => state.data_version = Some(version),
            Some(seen) if seen == version => {}
            Some(_) => {
                drop(state);
                self.invalidate("another process wrote to the database");
                self.write().data_version = Some(version);
            }
        }
    }

    /// The write connection was replaced: its `data_version` starts afresh.
    pub(super) fn forget_data_version(&self) {
        self.write().data_version = None;
    }

    pub(super) fn is_complete(&self) -> bool {
        self.read().complete
    }

    /// Reads every stored id into the set, unless it is complete or a build
    /// is under way. Runs on its own task; lookups use the database meanwhile.
    pub(super) fn build_in_background(self: &Arc<Self>, readers: Arc<Readers>) {
        if self.read().complete || self.building.swap(true, Ordering::AcqRel) {
            return;
        }
        let ids = self.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let result = ids.build(&readers).await;
            ids.building.store(false, Ordering::Release);
            match result {
                Ok(Some(users)) => {
                    let bytes = ids.read().ids.serialized_size();
                    tracing::info!(
                        users,
                        kib = bytes / 1024,
                        ms = started.elapsed().as_millis() as u64,
                        "ids of every user now in memory"
                    );
                }
                // Invalidated meanwhile: the next readiness check starts again.
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "reading the ids into memory failed"),
            }
        });
    }

    /// Pages through the ids in ascending order. Each page is its own read:
    /// an id committed after its range was read was added by `committed`.
    /// Returns the number of ids, or `None` if invalidated meanwhile.
    async fn build(&self, readers: &Readers) -> Result<Option<u64>, StoreError> {
        let ctx = "reading the ids into memory";
        let epoch = self.read().epoch;
        let mut after: u32 = 0;
        loop {
            let json: String = {
                let mut conn = readers.acquire().await.map_err(|e| classify(e, ctx))?;
                sqlx::query_scalar(SELECT_ID_PAGE)
                    .bind(i64::from(after))
                    .bind(i64::from(BUILD_PAGE))
                    .fetch_one(&mut *conn)
                    .await
                    .map_err(|e| classify(e, ctx))?
            };
            let page: Vec<u32> = serde_json::from_str(&json)
                .map_err(|e| StoreError::Internal(format!("{ctx}: {e}")))?;
            {
                let mut state = self.write();
                if state.epoch != epoch {
                    return Ok(None);
                }
                state.ids.extend(page.iter().copied());
                if page.len() < BUILD_PAGE as usize {
                    state.complete = true;
                    return Ok(Some(state.ids.len()));
                }
            }
            after = *page.last().expect("a full page");
            // Lets the lookups waiting for this connection go first.
            tokio::task::yield_now().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(raw: &[u32]) -> Vec<UserId> {
        raw.iter().filter_map(|&id| UserId::new(id)).collect()
    }

    fn complete(raw: &[u32]) -> Ids {
        let set = Ids::default();
        set.committed(raw.iter().copied());
        set.write().complete = true;
        set
    }

    #[test]
    fn unused_until_complete() {
        let set = Ids::default();
        set.committed([1, 2]);
        assert_eq!(set.count(&ids(&[1])), None);
        assert_eq!(set.present(&ids(&[1])), None);
    }

    #[test]
    fn counts_and_filters_with_repeats_in_order() {
        let set = complete(&[1, 2, u32::MAX]);
        assert_eq!(set.count(&ids(&[2, 2, 5, u32::MAX, 1])), Some(4));
        assert_eq!(set.count(&[]), Some(0));
        assert_eq!(set.present(&ids(&[5, 2, 1, 2, 9])), Some(ids(&[2, 1, 2])));
        set.committed([5]);
        assert_eq!(set.count(&ids(&[5])), Some(1), "a commit is seen at once");
    }

    #[test]
    fn invalidating_empties_it_until_rebuilt() {
        let set = complete(&[1]);
        set.invalidate("test");
        assert_eq!(set.count(&ids(&[1])), None);
        assert!(set.read().ids.is_empty());
        assert_eq!(set.read().epoch, 1);
    }

    #[test]
    fn another_writer_is_noticed_by_data_version() {
        let set = complete(&[1]);
        set.observe_data_version(7);
        set.observe_data_version(7);
        assert_eq!(set.count(&ids(&[1])), Some(1), "no change seen");
        set.observe_data_version(8);
        assert_eq!(set.count(&ids(&[1])), None, "another commit seen");
        set.write().complete = true;
        set.observe_data_version(8);
        assert_eq!(set.count(&ids(&[1])), Some(0), "8 is the new baseline");
        set.forget_data_version();
        set.observe_data_version(1);
        assert_eq!(
            set.count(&ids(&[1])),
            Some(0),
            "a new connection's first value"
        );
    }
}
