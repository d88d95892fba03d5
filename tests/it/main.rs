//! Every integration test, in one test binary: each test binary links the
//! whole dependency tree (tonic, sqlx, rustls, OpenTelemetry), so one binary
//! instead of eight builds in a fraction of the time. Select a part by its
//! module path, e.g. `cargo nextest run --test it -- e2e::`.
//!
//! The modules that need tools besides Rust (`e2e`: grpcurl and Python
//! grpcio; `deploy`: kubectl, kubernetes-validate, docker-compose, hadolint)
//! are here too rather than in a binary of their own: a second binary would
//! link everything again, while a name filter selects them just as well, and
//! a missing tool fails its test saying where the tool comes from.

#[path = "../common/mod.rs"]
mod common;

mod abuse;
mod api;
mod deploy;
mod e2e;
mod ops;
mod safety;
mod security;
mod traces;
