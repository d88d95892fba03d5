//! The one mapping of PostgreSQL driver errors to [`StoreError`], by what a
//! client can do about them. The text goes to the log; `error.rs` keeps it
//! from clients.

use crate::store::StoreError;

/// Sorts `err` by SQLSTATE class or kind; `context` says what was being done.
pub(super) fn classify(err: sqlx::Error, context: &str) -> StoreError {
    let detail = format!("{context}: {err}");
    // Marks the database span this error ends, if any.
    tracing::Span::current().record("otel.status_code", "error");
    match &err {
        sqlx::Error::Database(db) => match sqlstate(db.code().as_deref().unwrap_or("")) {
            Kind::Full => StoreError::Full(detail),
            Kind::Unavailable => StoreError::Unavailable(detail),
            Kind::Internal => StoreError::Internal(detail),
        },
        // The server went away, could not be reached, or no connection came
        // free within connect_timeout_ms: all worth retrying elsewhere/later.
        sqlx::Error::Io(_)
        | sqlx::Error::Tls(_)
        | sqlx::Error::Protocol(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed => StoreError::Unavailable(detail),
        _ => StoreError::Internal(detail),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Kind {
    Full,
    Unavailable,
    Internal,
}

/// What a SQLSTATE means for the client (PostgreSQL's appendix A).
fn sqlstate(code: &str) -> Kind {
    match code {
        // disk_full
        "53100" => Kind::Full,
        // query_canceled, which is what statement_timeout raises: the
        // database was too slow or blocked, not the request wrong. A client
        // may retry, so UNAVAILABLE rather than DEADLINE_EXCEEDED (StoreError
        // has no such kind, and the client's own deadline had not passed).
        "57014"
        // admin_shutdown, crash_shutdown, cannot_connect_now
        | "57P01" | "57P02" | "57P03"
        // insufficient_resources, out_of_memory, too_many_connections
        | "53000" | "53200" | "53300"
        // serialization_failure, deadlock_detected: retrying succeeds
        | "40001" | "40P01"
        // read_only_sql_transaction: a standby, mid-failover
        | "25006" => Kind::Unavailable,
        // connection_exception and its subclasses
        c if c.starts_with("08") => Kind::Unavailable,
        _ => Kind::Internal,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_map_by_what_a_client_can_do() {
        assert_eq!(sqlstate("53100"), Kind::Full);
        for code in ["57014", "57P01", "08006", "08001", "53300", "40001"] {
            assert_eq!(sqlstate(code), Kind::Unavailable, "{code}");
        }
        for code in ["23505", "42P01", "22003", ""] {
            assert_eq!(sqlstate(code), Kind::Internal, "{code}");
        }
    }
}
