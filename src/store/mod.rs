//! Storage behind a narrow interface. Handlers only see [`UserStore`]; every
//! line of SQL lives in a backend module. [`Store`] is the one place that
//! knows which backends exist: it picks one from `database.url`'s scheme,
//! once, and delegates to it (a `match`, no dynamic dispatch).

mod postgres;
mod sqlite;

use std::{future::Future, time::Instant};

pub use postgres::PostgresStore;
pub use sqlite::SqliteStore;

pub use crate::error::StoreError;
use crate::{
    config::{Backend, DatabaseSettings},
    domain::{User, UserId, UserType},
    instruments::{self, DbOperation, DbSystem},
    wire::EncodedUser,
};

/// The backend `database.url` names.
// One per process, cloned per call: a clone copies SQLite's connect options
// (no allocation), where boxing them would allocate on every clone.
#[expect(clippy::large_enum_variant, reason = "see above")]
#[derive(Clone)]
pub enum Store {
    Sqlite(SqliteStore),
    Postgres(PostgresStore),
}

impl Store {
    /// Opens the backend `settings.url`'s scheme names, with its section's
    /// settings. Must be called inside a tokio runtime.
    pub async fn open(settings: &DatabaseSettings) -> Result<Self, StoreError> {
        match settings.backend() {
            Some(Backend::Sqlite) => Ok(Self::Sqlite(
                SqliteStore::open(&settings.url, &settings.sqlite).await?,
            )),
            Some(Backend::Postgres) => Ok(Self::Postgres(PostgresStore::open(
                &settings.url,
                &settings.postgres,
            )?)),
            None => Err(StoreError::Unavailable(format!(
                "database.url {}: no backend for this scheme",
                settings.redacted_url()
            ))),
        }
    }
}

impl Store {
    fn system(&self) -> DbSystem {
        match self {
            Store::Sqlite(_) => DbSystem::Sqlite,
            Store::Postgres(_) => DbSystem::Postgres,
        }
    }

    /// Runs `operation`, recording its duration as
    /// `db.client.operation.duration`: one place for both backends.
    async fn timed<T>(&self, op: DbOperation, operation: impl Future<Output = T>) -> T {
        let started = Instant::now();
        let result = operation.await;
        instruments::get().db_operation(self.system(), op, started.elapsed().as_secs_f64());
        result
    }
}

/// Runs `$call` on whichever backend `$store` is.
macro_rules! delegate {
    ($store:expr, $s:ident => $call:expr) => {
        match $store {
            Store::Sqlite($s) => $call,
            Store::Postgres($s) => $call,
        }
    };
}

impl UserStore for Store {
    async fn migrate(&self) -> Result<(), StoreError> {
        delegate!(self, s => s.migrate().await)
    }

    async fn seed(&self, users: &[User]) -> Result<SeedOutcome, StoreError> {
        self.timed(DbOperation::Seed, async {
            delegate!(self, s => s.seed(users).await)
        })
        .await
    }

    async fn get(&self, id: UserId) -> Result<Option<EncodedUser>, StoreError> {
        self.timed(DbOperation::Get, async {
            delegate!(self, s => s.get(id).await)
        })
        .await
    }

    async fn get_many(&self, ids: &[UserId]) -> Result<Vec<EncodedUser>, StoreError> {
        self.timed(DbOperation::GetMany, async {
            delegate!(self, s => s.get_many(ids).await)
        })
        .await
    }

    async fn count_existing(&self, ids: &[UserId]) -> Result<u64, StoreError> {
        self.timed(DbOperation::CountExisting, async {
            delegate!(self, s => s.count_existing(ids).await)
        })
        .await
    }

    async fn add(&self, user: User) -> Result<AddOutcome, StoreError> {
        self.timed(DbOperation::Add, async {
            delegate!(self, s => s.add(user).await)
        })
        .await
    }

    async fn page_by_type(
        &self,
        user_type: UserType,
        after: Option<UserId>,
        limit: u32,
    ) -> Result<Vec<EncodedUser>, StoreError> {
        self.timed(DbOperation::PageByType, async {
            delegate!(self, s => s.page_by_type(user_type, after, limit).await)
        })
        .await
    }

    async fn check(&self) -> Result<(), StoreError> {
        self.timed(DbOperation::Check, async {
            delegate!(self, s => s.check().await)
        })
        .await
    }

    async fn close(&self) {
        delegate!(self, s => s.close().await);
    }
}

/// What AddUser did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddOutcome {
    /// Inserted and committed durably.
    Added,
    /// A user with that id exists; it was left unchanged.
    AlreadyExists,
}

/// What importing the seed did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeedOutcome {
    Imported { users: usize },
    AlreadyImported,
}

pub trait UserStore: Clone + Send + Sync + 'static {
    /// Brings the schema up to date.
    fn migrate(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Imports `users` in one transaction, unless a seed was imported before.
    fn seed(&self, users: &[User]) -> impl Future<Output = Result<SeedOutcome, StoreError>> + Send;

    /// The user with this id, as the answer that is sent for it (as are all
    /// reads of users: see `wire`).
    fn get(
        &self,
        id: UserId,
    ) -> impl Future<Output = Result<Option<EncodedUser>, StoreError>> + Send;

    /// The users among `ids`, in the order asked, repeated as often as asked;
    /// ids with no user are left out.
    fn get_many(
        &self,
        ids: &[UserId],
    ) -> impl Future<Output = Result<Vec<EncodedUser>, StoreError>> + Send;

    /// How many of `ids` have a user, counting repeats each time.
    fn count_existing(
        &self,
        ids: &[UserId],
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Inserts `user` unless its id is taken; returns once committed.
    fn add(&self, user: User) -> impl Future<Output = Result<AddOutcome, StoreError>> + Send;

    /// Up to `limit` users of `user_type` with ids above `after`, ascending,
    /// each as the answer that is sent for it.
    /// Each call is its own short read: nothing is held between pages.
    fn page_by_type(
        &self,
        user_type: UserType,
        after: Option<UserId>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<EncodedUser>, StoreError>> + Send;

    /// Cheap proof that the database can be read, for readiness.
    fn check(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Finishes pending writes and closes every connection.
    fn close(&self) -> impl Future<Output = ()> + Send;
}
