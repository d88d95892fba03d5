//! The seed, imported exactly once however many replicas start at once.

use sqlx::PgPool;

use super::{
    classify,
    queries::{INSERT_MANY, user_type_number},
};
use crate::{
    domain::User,
    store::{SeedOutcome, StoreError},
};

/// In one transaction: claim the seed_state row, and import only if the
/// claim took. A replica racing another blocks on the row's primary key
/// until the first commits (then finds it taken) or rolls back (then takes
/// it), so the users are imported exactly once, all or none.
pub(super) async fn import_once(pool: &PgPool, users: &[User]) -> Result<SeedOutcome, StoreError> {
    let ctx = "importing the seed";
    let mut tx = pool.begin().await.map_err(|e| classify(e, ctx))?;
    // statement_timeout bounds the statements of calls; the one-time import
    // is not one. A large seed's single INSERT can take longer (1M users did
    // in the benchmark), and a replica racing this one waits on the claim's
    // row lock until the import commits: either would be cancelled.
    sqlx::query("SET LOCAL statement_timeout = 0")
        .execute(&mut *tx)
        .await
        .map_err(|e| classify(e, ctx))?;
    let claimed = sqlx::query(
        "INSERT INTO seed_state (singleton, user_count) VALUES (1, 0) \
         ON CONFLICT (singleton) DO NOTHING",
    )
    .execute(&mut *tx)
    .await
    .map_err(|e| classify(e, ctx))?
    .rows_affected();
    if claimed == 0 {
        tx.rollback().await.map_err(|e| classify(e, ctx))?;
        return Ok(SeedOutcome::AlreadyImported);
    }
    let imported = sqlx::query(INSERT_MANY)
        .bind(
            users
                .iter()
                .map(|u| i64::from(u.id.get()))
                .collect::<Vec<_>>(),
        )
        .bind(
            users
                .iter()
                .map(|u| u.nickname.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(
            users
                .iter()
                .map(|u| u.mail_address.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(users.iter().map(user_type_number).collect::<Vec<_>>())
        .execute(&mut *tx)
        .await
        .map_err(|e| classify(e, ctx))?
        .rows_affected();
    sqlx::query("UPDATE seed_state SET user_count = $1 WHERE singleton = 1")
        .bind(i32::try_from(imported).unwrap_or(i32::MAX))
        .execute(&mut *tx)
        .await
        .map_err(|e| classify(e, ctx))?;
    tx.commit().await.map_err(|e| classify(e, ctx))?;
    Ok(SeedOutcome::Imported {
        users: usize::try_from(imported).unwrap_or(usize::MAX),
    })
}
