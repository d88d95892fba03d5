//! The one place where internal errors become gRPC statuses, so handlers can
//! use `?` and no SQL, path or driver text ever reaches a client.

use tonic::{Code, Status};

use crate::domain::ValidationError;

/// What can go wrong in a store, by what a client can do about it. The
/// detail is for the log only.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database can't be reached or is busy: retrying later may work.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The disk or database is full: writes fail until space returns.
    #[error("database full: {0}")]
    Full(String),
    /// Anything else: a bug, or data that is not what we wrote.
    #[error("storage failure: {0}")]
    Internal(String),
}

impl From<StoreError> for Status {
    fn from(err: StoreError) -> Self {
        let (code, message) = match &err {
            StoreError::Unavailable(_) => (
                Code::Unavailable,
                "the user database is unavailable, try again later",
            ),
            StoreError::Full(_) => (
                Code::ResourceExhausted,
                "the user database is out of space, writes are refused until space is freed",
            ),
            StoreError::Internal(_) => (Code::Internal, "internal storage error"),
        };
        tracing::error!(error = %err, "storage request failed");
        Status::new(code, message)
    }
}

impl From<ValidationError> for Status {
    fn from(err: ValidationError) -> Self {
        Status::invalid_argument(err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_errors_map_to_codes_without_leaking_detail() {
        let detail = "no such table: users at /secret/path.db";
        for (err, code) in [
            (StoreError::Unavailable(detail.into()), Code::Unavailable),
            (StoreError::Full(detail.into()), Code::ResourceExhausted),
            (StoreError::Internal(detail.into()), Code::Internal),
        ] {
            let status = Status::from(err);
            assert_eq!(status.code(), code);
            assert!(!status.message().contains("secret"), "{}", status.message());
            assert!(!status.message().contains("table"), "{}", status.message());
        }
    }

    #[test]
    fn validation_errors_name_the_field() {
        let status = Status::from(ValidationError {
            field: "nickname",
            reason: "must not be empty".into(),
        });
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(status.message(), "invalid nickname: must not be empty");
    }
}
