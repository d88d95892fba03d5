//! user-manager: the UserManager gRPC service over SQLite.
//!
//! `main.rs` only wires the command line to [`app::Application`]; tests go
//! through the same `Application::build` path.

#![forbid(unsafe_code)]

pub mod app;
pub mod config;
pub mod domain;
pub mod error;
pub mod grpc;
pub mod health;
pub mod seed;
pub mod store;
pub mod telemetry;

// The generated messages and client, for the benchmark and the tests: the
// one public path clients of this crate need into `grpc`.
pub use grpc::proto;
