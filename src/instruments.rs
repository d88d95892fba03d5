//! The service's own metric instruments, created once from the global meter
//! provider that [`crate::telemetry::init`] installs (or the no-op one when
//! no metrics reader is configured, so recording costs next to nothing).
//!
//! This module depends on nothing in the crate, so every layer, the store
//! included, may record into it. The RPC instruments themselves live in
//! [`crate::grpc::middleware::metrics`] with their precomputed attribute
//! sets; the README's "Metrics" section lists every series.
//!
//! Attribute sets are built once here, so recording allocates nothing.

use std::sync::LazyLock;

use opentelemetry::{
    KeyValue,
    metrics::{Counter, Gauge, Histogram, Meter},
};

/// The instrumentation scope of every instrument of the service.
pub(crate) const SCOPE: &str = "user-manager";

/// Boundaries (seconds) for durations from well under a millisecond (a
/// GetUser) to minutes (a long stream).
pub(crate) const DURATION_BUCKETS: [f64; 19] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0, 120.0,
];

/// The meter every instrument of the service comes from.
pub(crate) fn meter() -> Meter {
    opentelemetry::global::meter(SCOPE)
}

/// The instruments, created at first use: after `telemetry::init` in the
/// binary (instruments created earlier would stay no-ops).
pub(crate) fn get() -> &'static Instruments {
    static INSTRUMENTS: LazyLock<Instruments> = LazyLock::new(Instruments::new);
    &INSTRUMENTS
}

/// Each limit that refuses or ends calls, named after its configuration key
/// (the `limit` attribute of `user_manager.limit.refusals`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Limit {
    /// `limits.max_calls_per_connection`: a call shed with RESOURCE_EXHAUSTED.
    MaxCallsPerConnection,
    /// `limits.max_open_streams`: a streaming call shed with RESOURCE_EXHAUSTED.
    MaxOpenStreams,
    /// `limits.max_message_bytes`: a request message over the size.
    MaxMessageBytes,
    /// `limits.stream_stall_timeout_ms`: a stream whose client stopped reading.
    StreamStallTimeout,
    /// `limits.max_concurrent_tls_handshakes`: the accept loop paused at the
    /// cap (new connections wait in the backlog).
    MaxConcurrentTlsHandshakes,
}

impl Limit {
    const ALL: [Limit; 5] = [
        Limit::MaxCallsPerConnection,
        Limit::MaxOpenStreams,
        Limit::MaxMessageBytes,
        Limit::StreamStallTimeout,
        Limit::MaxConcurrentTlsHandshakes,
    ];

    pub(crate) const fn name(self) -> &'static str {
        match self {
            Limit::MaxCallsPerConnection => "max_calls_per_connection",
            Limit::MaxOpenStreams => "max_open_streams",
            Limit::MaxMessageBytes => "max_message_bytes",
            Limit::StreamStallTimeout => "stream_stall_timeout_ms",
            Limit::MaxConcurrentTlsHandshakes => "max_concurrent_tls_handshakes",
        }
    }
}

/// Why a TLS handshake failed (the `reason` attribute of
/// `user_manager.tls.handshake.failures`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TlsFailure {
    /// The client's certificate did not verify against the client CA.
    ClientCertificateRejected,
    /// Client certificates are required and the client sent none.
    NoClientCertificate,
    /// Any other TLS error: versions, ciphers, a bad message, not TLS at all.
    Protocol,
    /// Not finished within the handshake timeout.
    Timeout,
    /// The connection failed underneath (reset, closed early).
    Io,
}

impl TlsFailure {
    const ALL: [TlsFailure; 5] = [
        TlsFailure::ClientCertificateRejected,
        TlsFailure::NoClientCertificate,
        TlsFailure::Protocol,
        TlsFailure::Timeout,
        TlsFailure::Io,
    ];

    pub(crate) const fn name(self) -> &'static str {
        match self {
            TlsFailure::ClientCertificateRejected => "client_certificate_rejected",
            TlsFailure::NoClientCertificate => "no_client_certificate",
            TlsFailure::Protocol => "protocol",
            TlsFailure::Timeout => "timeout",
            TlsFailure::Io => "io",
        }
    }
}

/// The storage backends, for `db.system.name`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DbSystem {
    Sqlite,
    Postgres,
}

impl DbSystem {
    pub(crate) const fn name(self) -> &'static str {
        match self {
            DbSystem::Sqlite => "sqlite",
            DbSystem::Postgres => "postgresql",
        }
    }

    /// The pool's `db.client.connection.pool.name`.
    pub(crate) const fn pool_name(self) -> &'static str {
        match self {
            DbSystem::Sqlite => "sqlite_readers",
            DbSystem::Postgres => "postgres",
        }
    }

    const fn index(self) -> usize {
        self as usize
    }
}

/// The `UserStore` operations, for `db.operation.name`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DbOperation {
    Get,
    GetMany,
    CountExisting,
    PageByType,
    Add,
    Seed,
    Check,
}

impl DbOperation {
    const ALL: [DbOperation; 7] = [
        DbOperation::Get,
        DbOperation::GetMany,
        DbOperation::CountExisting,
        DbOperation::PageByType,
        DbOperation::Add,
        DbOperation::Seed,
        DbOperation::Check,
    ];

    pub(crate) const fn name(self) -> &'static str {
        match self {
            DbOperation::Get => "get",
            DbOperation::GetMany => "get_many",
            DbOperation::CountExisting => "count_existing",
            DbOperation::PageByType => "page_by_type",
            DbOperation::Add => "add",
            DbOperation::Seed => "seed",
            DbOperation::Check => "check",
        }
    }
}

const DB_SYSTEMS: [DbSystem; 2] = [DbSystem::Sqlite, DbSystem::Postgres];

/// The instruments recorded outside the RPC layer.
pub(crate) struct Instruments {
    limit_refusals: Counter<u64>,
    limit_attrs: Vec<[KeyValue; 1]>,
    tls_failures: Counter<u64>,
    tls_attrs: Vec<[KeyValue; 1]>,
    ready: Gauge<u64>,
    db_operation: Histogram<f64>,
    /// Per system × operation.
    db_operation_attrs: Vec<[KeyValue; 2]>,
    db_wait: Histogram<f64>,
    /// Per system: system and pool name.
    pool_attrs: Vec<[KeyValue; 2]>,
    group_commit: Histogram<u64>,
}

impl Instruments {
    fn new() -> Self {
        let meter = meter();
        Self {
            limit_refusals: meter
                .u64_counter("user_manager.limit.refusals")
                .with_unit("{call}")
                .with_description("Calls refused or ended by a limit, by limit")
                .build(),
            limit_attrs: Limit::ALL
                .iter()
                .map(|l| [KeyValue::new("limit", l.name())])
                .collect(),
            tls_failures: meter
                .u64_counter("user_manager.tls.handshake.failures")
                .with_unit("{handshake}")
                .with_description("TLS handshakes that failed, by reason")
                .build(),
            tls_attrs: TlsFailure::ALL
                .iter()
                .map(|r| [KeyValue::new("reason", r.name())])
                .collect(),
            ready: meter
                .u64_gauge("user_manager.ready")
                .with_description("1 while readiness is SERVING, else 0")
                .build(),
            db_operation: meter
                .f64_histogram("db.client.operation.duration")
                .with_unit("s")
                .with_description("Duration of storage operations")
                .with_boundaries(DURATION_BUCKETS.to_vec())
                .build(),
            db_operation_attrs: DB_SYSTEMS
                .iter()
                .flat_map(|system| {
                    DbOperation::ALL.iter().map(|op| {
                        [
                            KeyValue::new("db.system.name", system.name()),
                            KeyValue::new("db.operation.name", op.name()),
                        ]
                    })
                })
                .collect(),
            db_wait: meter
                .f64_histogram("db.client.connection.wait_time")
                .with_unit("s")
                .with_description("Time waited for a connection from the pool")
                .with_boundaries(DURATION_BUCKETS.to_vec())
                .build(),
            pool_attrs: DB_SYSTEMS.iter().map(|s| pool_attrs(*s)).collect(),
            group_commit: meter
                .u64_histogram("user_manager.db.group_commit.size")
                .with_unit("{user}")
                .with_description("Users inserted per SQLite group commit")
                .with_boundaries(vec![
                    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0,
                ])
                .build(),
        }
    }

    pub(crate) fn limit_refused(&self, limit: Limit) {
        self.limit_refusals
            .add(1, &self.limit_attrs[limit as usize]);
    }

    pub(crate) fn tls_failed(&self, reason: TlsFailure) {
        self.tls_failures.add(1, &self.tls_attrs[reason as usize]);
    }

    pub(crate) fn set_ready(&self, ready: bool) {
        self.ready.record(u64::from(ready), &[]);
    }

    pub(crate) fn db_operation(&self, system: DbSystem, op: DbOperation, seconds: f64) {
        let index = system.index() * DbOperation::ALL.len() + op as usize;
        self.db_operation
            .record(seconds, &self.db_operation_attrs[index]);
    }

    pub(crate) fn db_connection_wait(&self, system: DbSystem, seconds: f64) {
        self.db_wait
            .record(seconds, &self.pool_attrs[system.index()]);
    }

    pub(crate) fn group_commit(&self, users: usize) {
        self.group_commit
            .record(u64::try_from(users).unwrap_or(u64::MAX), &[]);
    }
}

/// `db.system.name` and `db.client.connection.pool.name` of `system`'s pool.
pub(crate) fn pool_attrs(system: DbSystem) -> [KeyValue; 2] {
    [
        KeyValue::new("db.system.name", system.name()),
        KeyValue::new("db.client.connection.pool.name", system.pool_name()),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_follow_the_enums() {
        for (i, limit) in Limit::ALL.iter().enumerate() {
            assert_eq!(*limit as usize, i);
        }
        for (i, reason) in TlsFailure::ALL.iter().enumerate() {
            assert_eq!(*reason as usize, i);
        }
        for (i, op) in DbOperation::ALL.iter().enumerate() {
            assert_eq!(*op as usize, i);
        }
        for (i, system) in DB_SYSTEMS.iter().enumerate() {
            assert_eq!(system.index(), i);
        }
    }
}
