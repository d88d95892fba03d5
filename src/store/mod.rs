//! Storage behind a narrow interface. Handlers only see [`UserStore`]; every
//! line of SQL lives in a backend module, so another backend (a Postgres-wire
//! one is planned) is a new module here and nothing else.

mod sqlite;

use std::future::Future;

pub use sqlite::SqliteStore;

use crate::domain::{User, UserId, UserType};
pub use crate::error::StoreError;

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

    fn get(&self, id: UserId) -> impl Future<Output = Result<Option<User>, StoreError>> + Send;

    /// The users among `ids`, in the order asked, repeated as often as asked;
    /// ids with no user are left out.
    fn get_many(
        &self,
        ids: &[UserId],
    ) -> impl Future<Output = Result<Vec<User>, StoreError>> + Send;

    /// How many of `ids` have a user, counting repeats each time.
    fn count_existing(
        &self,
        ids: &[UserId],
    ) -> impl Future<Output = Result<u64, StoreError>> + Send;

    /// Inserts `user` unless its id is taken; returns once committed.
    fn add(&self, user: User) -> impl Future<Output = Result<AddOutcome, StoreError>> + Send;

    /// Up to `limit` users of `user_type` with ids above `after`, ascending.
    /// Each call is its own short read: nothing is held between pages.
    fn page_by_type(
        &self,
        user_type: UserType,
        after: Option<UserId>,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<User>, StoreError>> + Send;

    /// Cheap proof that the database can be read, for readiness.
    fn check(&self) -> impl Future<Output = Result<(), StoreError>> + Send;

    /// Finishes pending writes and closes every connection.
    fn close(&self) -> impl Future<Output = ()> + Send;
}
