//! The benchmark's users are a pure function of their id, so the load
//! generator checks every answer without keeping a copy of the database, and
//! the reference server and SQLite hold exactly the same users.

use std::{path::Path, str::FromStr};

use anyhow::Context;
use sqlx::{
    ConnectOptions, Connection,
    sqlite::{SqliteConnectOptions, SqliteSynchronous},
};
use user_manager::{domain::UserType, proto::User};

/// The type GetUsersByType asks for: ids with `id % 4 == 1`, a quarter of them.
pub const STREAMED_TYPE: i32 = 2;

/// The type only a handful of users have (DISABLED): ids up to
/// [`RARE_BELOW`] with `id % 4 == 3`; the others with `id % 4 == 3` are
/// NORMAL. The short GetUsersByType calls ask for it.
pub const RARE_TYPE: i32 = 4;
pub const RARE_BELOW: u32 = 32;

pub fn user_type(id: u32) -> i32 {
    match id % 4 {
        3 if id > RARE_BELOW => 1,
        n => n as i32 + 1,
    }
}

/// The users of [`RARE_TYPE`] among users 1..=`users`, in id order.
pub fn rare_ids(users: u32) -> impl Iterator<Item = u32> {
    (1..=users.min(RARE_BELOW)).filter(|&id| user_type(id) == RARE_TYPE)
}

pub fn user(id: u32) -> User {
    User {
        id,
        nickname: format!("user{id}"),
        mail_address: format!("user{id}@example.com"),
        user_type: user_type(id),
    }
}

/// Whether `got` is the user the benchmark stored under `id`, without allocating.
pub fn is_user(got: &User, id: u32) -> bool {
    let number = |s: Option<&str>| s.and_then(|s| s.parse::<u32>().ok());
    got.id == id
        && got.user_type == user_type(id)
        && number(got.nickname.strip_prefix("user")) == Some(id)
        && number(
            got.mail_address
                .strip_prefix("user")
                .and_then(|s| s.strip_suffix("@example.com")),
        ) == Some(id)
}

/// How many users of `STREAMED_TYPE` a database of `users` users holds.
pub fn streamed_count(users: u32) -> u64 {
    (1..=users)
        .filter(|&id| user_type(id) == STREAMED_TYPE)
        .count() as u64
}

/// Writes users 1..=`users` into a database that `user-manager migrate` has
/// created: one statement inside SQLite, far faster than a million AddUser
/// calls. Durability is off for the load only; the server opens the file
/// with its own settings afterwards.
pub async fn populate(db: &Path, users: u32) -> anyhow::Result<()> {
    let mut conn = SqliteConnectOptions::from_str(&format!("sqlite://{}", db.display()))?
        .synchronous(SqliteSynchronous::Off)
        .connect()
        .await
        .context("opening the benchmark database")?;
    sqlx::query(
        "WITH RECURSIVE seq(id) AS (SELECT 1 UNION ALL SELECT id + 1 FROM seq WHERE id < ?1) \
         INSERT INTO users (id, nickname, mail_address, user_type) \
         SELECT id, 'user' || id, 'user' || id || '@example.com', \
         CASE WHEN id % 4 = 3 AND id > ?2 THEN 1 ELSE id % 4 + 1 END FROM seq",
    )
    .bind(i64::from(users))
    .bind(i64::from(RARE_BELOW))
    .execute(&mut conn)
    .await
    .context("inserting the users")?;
    // Starting the server must not replay a large WAL: fold it into the file.
    sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)")
        .execute(&mut conn)
        .await
        .context("checkpointing")?;
    conn.close().await?;
    Ok(())
}

/// Writes users 1..=`users` as a seed file (the format of `seed/users.json`),
/// for `user-manager migrate` to import: how the benchmark fills a database
/// it can only reach through the service, whatever its backend.
pub fn write_seed(path: &Path, users: u32) -> anyhow::Result<()> {
    use std::io::Write;
    let file = std::fs::File::create(path)
        .with_context(|| format!("creating the seed file {}", path.display()))?;
    let mut out = std::io::BufWriter::new(file);
    write!(out, "{{")?;
    for id in 1..=users {
        let user = user(id);
        let user_type = UserType::from_number(user.user_type)
            .context("a user type the service knows")?
            .name();
        let separator = if id == 1 { "" } else { "," };
        write!(
            out,
            "{separator}\n\"{id}\": {{\"nickname\": \"{}\", \"mail_address\": \"{}\", \"user_type\": \"{user_type}\"}}",
            user.nickname, user.mail_address
        )?;
    }
    writeln!(out, "\n}}")?;
    out.flush()?;
    Ok(())
}

/// SplitMix64: a tiny, fast generator; reproducible per seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A uniformly drawn id in 1..=`users`.
    pub fn id(&mut self, users: u32) -> u32 {
        (((self.next_u64() >> 32) * u64::from(users)) >> 32) as u32 + 1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_user_accepts_only_the_generated_user() {
        assert!(is_user(&user(42), 42));
        assert!(!is_user(&user(42), 43));
        let mut wrong = user(42);
        wrong.mail_address = "user42@example.org".into();
        assert!(!is_user(&wrong, 42));
    }

    #[test]
    fn ids_stay_in_range() {
        let mut rng = Rng::new(1);
        assert!(
            (0..10_000)
                .map(|_| rng.id(7))
                .all(|id| (1..=7).contains(&id))
        );
    }

    #[test]
    fn the_seed_file_holds_the_generated_users() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("seed.json");
        write_seed(&path, 9).unwrap();
        let users = user_manager::seed::load(&path).unwrap();
        assert_eq!(users.len(), 9);
        for (stored, id) in users.iter().zip(1..) {
            let expected = user(id);
            assert_eq!(stored.id.get(), id);
            assert_eq!(stored.nickname.as_str(), expected.nickname);
            assert_eq!(stored.mail_address.as_str(), expected.mail_address);
            assert_eq!(stored.user_type.number(), expected.user_type);
        }
    }

    #[test]
    fn a_handful_of_users_have_the_rare_type() {
        assert_eq!(
            rare_ids(1_000_000).collect::<Vec<_>>(),
            [3, 7, 11, 15, 19, 23, 27, 31]
        );
        assert_eq!(rare_ids(10).collect::<Vec<_>>(), [3, 7]);
        assert_eq!(
            (1..=1000).filter(|&id| user_type(id) == RARE_TYPE).count(),
            8
        );
    }

    #[test]
    fn a_quarter_of_the_users_are_streamed() {
        assert_eq!(streamed_count(1_000_000), 250_000);
        assert_eq!(streamed_count(5), 2);
    }
}
