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

// The paths main.rs, config and the tests use; they can go once those name
// `app` and `grpc::…` directly.
pub use app as server;
pub use grpc::{middleware::auth, proto};
