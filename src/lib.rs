//! user-manager: the UserManager gRPC service over SQLite.
//!
//! `main.rs` only wires the command line to [`app::Application`]; tests go
//! through the same `Application::build` path.

#![forbid(unsafe_code)]

// Public: what the binary, the benchmark and the tests use. The store, the
// domain types and `wire` (the form the store reads users in) are public for
// the store's own contract tests, the seed parser for the benchmark's check
// of the seed files it writes.
pub mod app;
pub mod config;
pub mod domain;
pub mod seed;
pub mod store;
pub mod telemetry;
pub mod wire;

mod error;
mod grpc;
mod health;
mod instruments;

// The generated messages and client: the one public path into `grpc`.
pub use grpc::proto;
