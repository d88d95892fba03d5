//! Read connections handed out directly instead of through sqlx's pool. Each
//! sqlx SQLite connection lives on its own thread, and the pool pings that
//! thread when it hands a connection out and again when it takes it back: two
//! extra thread round trips per point read, costing more than the read itself
//! (see BENCHMARKS.md). A read statement is reset when it finishes or is
//! dropped, so a returned connection is ready for the next read at once.

use std::{
    ops::{Deref, DerefMut},
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use sqlx::{Connection, SqliteConnection, sqlite::SqliteConnectOptions};
use tokio::sync::{Semaphore, SemaphorePermit};

pub(super) struct Readers {
    options: SqliteConnectOptions,
    idle: Mutex<Vec<SqliteConnection>>,
    /// One permit per connection that may be open; closed with the store.
    permits: Semaphore,
    max: u32,
    /// How long a read waits for a connection before the store is "unavailable".
    wait: Duration,
    /// Bumped by `reopen`: connections of an older generation are not reused.
    generation: AtomicU64,
}

/// A connection lent to one read; it goes back to the idle list when dropped.
pub(super) struct Reader<'a> {
    conn: Option<SqliteConnection>,
    readers: &'a Readers,
    generation: u64,
    _permit: SemaphorePermit<'a>,
}

impl Readers {
    /// Opens the first connection now, so a database that can't be read
    /// fails at start-up; the others open when concurrent reads need them.
    pub(super) async fn open(
        options: SqliteConnectOptions,
        max: u32,
        wait: Duration,
    ) -> Result<Self, sqlx::Error> {
        let first = SqliteConnection::connect_with(&options).await?;
        Ok(Self {
            options,
            idle: Mutex::new(vec![first]),
            permits: Semaphore::new(max as usize),
            max,
            wait,
            generation: AtomicU64::new(0),
        })
    }

    pub(super) async fn acquire(&self) -> Result<Reader<'_>, sqlx::Error> {
        let waiting = std::time::Instant::now();
        let permit = tokio::time::timeout(self.wait, self.permits.acquire())
            .await
            .map_err(|_| sqlx::Error::PoolTimedOut)?
            .map_err(|_| sqlx::Error::PoolClosed)?;
        let waited = waiting.elapsed().as_secs_f64();
        crate::instruments::get().db_connection_wait(crate::instruments::DbSystem::Sqlite, waited);
        let generation = self.generation.load(Ordering::Acquire);
        let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let conn = match idle {
            Some(conn) => conn,
            None => SqliteConnection::connect_with(&self.options).await?,
        };
        Ok(Reader {
            conn: Some(conn),
            readers: self,
            generation,
            _permit: permit,
        })
    }

    /// An idle connection, if one is free now and no read is waiting for one
    /// (a returned connection's permit goes to the first waiter).
    pub(super) fn try_acquire(&self) -> Option<Reader<'_>> {
        let permit = self.permits.try_acquire().ok()?;
        let generation = self.generation.load(Ordering::Acquire);
        let conn = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop()?;
        Some(Reader {
            conn: Some(conn),
            readers: self,
            generation,
            _permit: permit,
        })
    }

    /// How many connections may be open at once.
    pub(super) fn max(&self) -> u32 {
        self.max
    }

    /// Closes the idle connections, and the ones lent out when they come
    /// back: later reads connect to the file now at the path.
    pub(super) fn reopen(&self) {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        self.generation.fetch_add(1, Ordering::AcqRel);
        idle.clear();
    }

    /// Waits for the reads in flight, then closes every connection.
    pub(super) async fn close(&self) {
        if let Ok(all) = self.permits.acquire_many(self.max).await {
            self.permits.close();
            drop(all);
        }
        let idle = std::mem::take(&mut *self.idle.lock().unwrap_or_else(|e| e.into_inner()));
        for conn in idle {
            if let Err(e) = conn.close().await {
                tracing::warn!(error = %e, "closing a read connection");
            }
        }
    }
}

impl Deref for Reader<'_> {
    type Target = SqliteConnection;

    fn deref(&self) -> &SqliteConnection {
        self.conn.as_ref().expect("present until dropped")
    }
}

impl DerefMut for Reader<'_> {
    fn deref_mut(&mut self) -> &mut SqliteConnection {
        self.conn.as_mut().expect("present until dropped")
    }
}

impl Drop for Reader<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take() {
            let mut idle = self.readers.idle.lock().unwrap_or_else(|e| e.into_inner());
            // One from before `reopen` may hold a replaced file: it closes.
            if self.generation == self.readers.generation.load(Ordering::Acquire) {
                idle.push(conn);
            }
        }
    }
}
