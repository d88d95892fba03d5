//! The SQL, and rows back into domain types. Batches bind one array, so a
//! batch of any size is one statement and one round trip.

use crate::{
    domain::{User, UserId},
    store::StoreError,
};

pub(super) const SELECT_BY_ID: &str =
    "SELECT id, nickname, mail_address, user_type FROM users WHERE id = $1";

/// Kept in the order asked, repeats included: one output row per array
/// element that has a user, ordered by the element's position.
pub(super) const SELECT_MANY: &str = "SELECT u.id, u.nickname, u.mail_address, u.user_type \
     FROM unnest($1::bigint[]) WITH ORDINALITY AS q(id, n) \
     JOIN users AS u ON u.id = q.id ORDER BY q.n";

pub(super) const COUNT_MANY: &str =
    "SELECT COUNT(*) FROM unnest($1::bigint[]) AS q(id) JOIN users AS u ON u.id = q.id";

/// Keyset paging on the (user_type, id) index.
pub(super) const SELECT_PAGE_BY_TYPE: &str = "SELECT id, nickname, mail_address, user_type FROM users \
     WHERE user_type = $1 AND id > $2 ORDER BY id LIMIT $3";

/// Insert-if-absent in one statement: rows_affected says which happened.
pub(super) const INSERT: &str = "INSERT INTO users (id, nickname, mail_address, user_type) \
     VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO NOTHING";

/// Many users in one statement, from one array per column.
pub(super) const INSERT_MANY: &str = "INSERT INTO users (id, nickname, mail_address, user_type) \
     SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::smallint[]) \
     ON CONFLICT (id) DO NOTHING";

pub(super) type Row = (i64, String, String, i16);

pub(super) fn to_user((id, nickname, mail_address, user_type): Row) -> Result<User, StoreError> {
    let id_u32 = u32::try_from(id)
        .map_err(|_| StoreError::Internal(format!("stored id {id} is not a uint32")))?;
    User::parse(id_u32, nickname, mail_address, i32::from(user_type))
        .map_err(|e| StoreError::Internal(format!("stored user {id} is invalid: {e}")))
}

pub(super) fn to_users(rows: Vec<Row>) -> Result<Vec<User>, StoreError> {
    rows.into_iter().map(to_user).collect()
}

pub(super) fn id_array(ids: &[UserId]) -> Vec<i64> {
    ids.iter().map(|id| i64::from(id.get())).collect()
}

pub(super) fn user_type_number(user: &User) -> i16 {
    // 1..=4 by the domain's rules; the column's CHECK says the same.
    i16::try_from(user.user_type.number()).unwrap_or(0)
}
