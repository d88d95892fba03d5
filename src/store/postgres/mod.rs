//! PostgreSQL through sqlx: one pool per replica, every statement short and
//! on its own, so any number of replicas can share one database.
//!
//! Durability: an AddUser is acknowledged after its INSERT commits, and with
//! `synchronous_commit = on` (PostgreSQL's default, and set on every
//! connection here so a server configured otherwise can't weaken it) a commit
//! returns only once its WAL record is flushed to disk. An acknowledged add
//! survives a kill -9 of any replica and a crash of the server, and every
//! replica sees it at once (read committed, one primary).

mod errors;
mod metrics;
mod queries;
mod seed;

use std::{str::FromStr, time::Duration};

use sqlx::{
    PgPool,
    postgres::{PgConnectOptions, PgPoolOptions},
};
use tracing::field::Empty;

use self::{
    errors::classify,
    queries::{
        COUNT_MANY, INSERT, Row, SELECT_BY_ID, SELECT_MANY, SELECT_PAGE_BY_TYPE, id_array, to_user,
        to_users, user_type_number,
    },
};
use super::{AddOutcome, SeedOutcome, StoreError, UserStore};
use crate::{
    config::PostgresSettings,
    domain::{User, UserId, UserType},
    wire::EncodedUser,
};

#[derive(Clone)]
pub struct PostgresStore {
    pool: PgPool,
    /// How long a readiness check may take.
    check_timeout: Duration,
}

impl PostgresStore {
    /// Builds the pool without connecting: the first statement connects, and
    /// a server that is down now only makes calls UNAVAILABLE until it is up.
    /// The URL's parts win over the `PG*` environment variables, which sqlx
    /// reads for what the URL leaves out.
    pub fn open(url: &str, settings: &PostgresSettings) -> Result<Self, StoreError> {
        // sqlx's parse errors don't quote the URL, so no password leaks here.
        let mut options = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Unavailable(format!("database.url: {e}")))?
            .application_name("user-manager");
        let mut startup = vec![("synchronous_commit", "on".to_owned())];
        if settings.statement_timeout_ms > 0 {
            startup.push((
                "statement_timeout",
                format!("{}ms", settings.statement_timeout_ms),
            ));
        }
        options = options.options(startup);
        let connect_timeout = Duration::from_millis(settings.connect_timeout_ms);
        let pool = PgPoolOptions::new()
            .max_connections(settings.max_connections)
            .min_connections(0)
            // Bounds connecting and waiting for a free connection alike.
            .acquire_timeout(connect_timeout)
            // A pooled connection the server dropped (a restart) is found out
            // before a call uses it, and replaced.
            .test_before_acquire(true)
            .connect_lazy_with(options);
        metrics::observe_pool(&pool, settings.max_connections);
        Ok(Self {
            pool,
            check_timeout: connect_timeout,
        })
    }
}

impl UserStore for PostgresStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        // sqlx's migrator holds pg_advisory_lock for the whole run, so
        // replicas migrating at once apply each migration exactly once.
        sqlx::migrate!("./migrations/postgres")
            .run(&self.pool)
            .await
            .map_err(|e| match e {
                sqlx::migrate::MigrateError::Execute(e) => classify(e, "migrating"),
                other => StoreError::Internal(format!("migrating: {other}")),
            })
    }

    async fn seed(&self, users: &[User]) -> Result<SeedOutcome, StoreError> {
        seed::import_once(&self.pool, users).await
    }

    #[tracing::instrument(name = "SELECT users", level = "debug", skip_all, fields(db.system = "postgresql",
        db.operation = "SELECT", db.sql.table = "users", otel.status_code = Empty))]
    async fn get(&self, id: UserId) -> Result<Option<EncodedUser>, StoreError> {
        let row = sqlx::query_as::<_, Row>(SELECT_BY_ID)
            .bind(i64::from(id.get()))
            .fetch_optional(&self.pool)
            .await
            .map_err(|e| classify(e, "reading a user"))?;
        Ok(row
            .map(to_user)
            .transpose()?
            .as_ref()
            .map(EncodedUser::encode))
    }

    #[tracing::instrument(name = "SELECT users", level = "debug", skip_all, fields(db.system = "postgresql",
        db.operation = "SELECT", db.sql.table = "users", otel.status_code = Empty))]
    async fn get_many(&self, ids: &[UserId]) -> Result<Vec<EncodedUser>, StoreError> {
        let rows = sqlx::query_as::<_, Row>(SELECT_MANY)
            .bind(id_array(ids))
            .fetch_all(&self.pool)
            .await
            .map_err(|e| classify(e, "reading users by id"))?;
        // Validated as read, then encoded as the answers (SQLite keeps them so).
        Ok(to_users(rows)?.iter().map(EncodedUser::encode).collect())
    }

    #[tracing::instrument(name = "SELECT users", level = "debug", skip_all, fields(db.system = "postgresql",
        db.operation = "SELECT", db.sql.table = "users", otel.status_code = Empty))]
    async fn count_existing(&self, ids: &[UserId]) -> Result<u64, StoreError> {
        let n: i64 = sqlx::query_scalar(COUNT_MANY)
            .bind(id_array(ids))
            .fetch_one(&self.pool)
            .await
            .map_err(|e| classify(e, "counting users"))?;
        Ok(n.try_into().unwrap_or(0))
    }

    #[tracing::instrument(name = "INSERT users", level = "debug", skip_all, fields(db.system = "postgresql",
        db.operation = "INSERT", db.sql.table = "users", otel.status_code = Empty))]
    async fn add(&self, user: User) -> Result<AddOutcome, StoreError> {
        // One autocommit statement: committed (durably, see above) when it returns.
        let done = sqlx::query(INSERT)
            .bind(i64::from(user.id.get()))
            .bind(user.nickname.as_str())
            .bind(user.mail_address.as_str())
            .bind(user_type_number(&user))
            .execute(&self.pool)
            .await
            .map_err(|e| classify(e, "adding a user"))?;
        Ok(if done.rows_affected() == 1 {
            AddOutcome::Added
        } else {
            AddOutcome::AlreadyExists
        })
    }

    #[tracing::instrument(name = "SELECT users", level = "debug", skip_all, fields(db.system = "postgresql",
        db.operation = "SELECT", db.sql.table = "users", otel.status_code = Empty))]
    async fn page_by_type(
        &self,
        user_type: UserType,
        after: Option<UserId>,
        limit: u32,
    ) -> Result<Vec<EncodedUser>, StoreError> {
        let rows = sqlx::query_as::<_, Row>(SELECT_PAGE_BY_TYPE)
            .bind(i16::try_from(user_type.number()).unwrap_or(0))
            .bind(after.map_or(0, |id| i64::from(id.get())))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await
            .map_err(|e| classify(e, "reading users by type"))?;
        // Validated as read, then encoded as the answers (SQLite keeps them so).
        Ok(to_users(rows)?.iter().map(EncodedUser::encode).collect())
    }

    async fn check(&self) -> Result<(), StoreError> {
        let ctx = "checking the database";
        let probe = sqlx::query_scalar::<_, i32>("SELECT 1").fetch_one(&self.pool);
        match tokio::time::timeout(self.check_timeout, probe).await {
            Ok(result) => result.map(drop).map_err(|e| classify(e, ctx)),
            Err(_) => Err(StoreError::Unavailable(format!("{ctx}: timed out"))),
        }
    }

    async fn close(&self) {
        self.pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> PostgresSettings {
        PostgresSettings {
            max_connections: 2,
            connect_timeout_ms: 100,
            statement_timeout_ms: 1000,
        }
    }

    #[tokio::test]
    async fn the_url_forms_sqlx_accepts_open_a_lazy_pool() {
        for url in [
            "postgres://app:secret@db.example:5432/users",
            "postgresql://app@db.example/users?sslmode=require",
            "postgres://app@db.example/users?sslmode=verify-full&application_name=x",
            "postgres:///users?host=/run/postgresql",
            "postgres://%2Frun%2Fpostgresql/users",
        ] {
            let store = PostgresStore::open(url, &settings());
            assert!(store.is_ok(), "{url}");
        }
    }

    #[tokio::test]
    async fn an_unreachable_server_is_unavailable_not_a_hang() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let store =
            PostgresStore::open(&format!("postgres://app:pw@{addr}/users"), &settings()).unwrap();
        let started = std::time::Instant::now();
        let err = store.check().await.unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        assert!(!err.to_string().contains("pw@"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
        let err = store.get(UserId::new(1).unwrap()).await.unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    }
}
