//! user-manager: the UserManager gRPC service over SQLite.
//!
//! `main.rs` only wires the command line to [`server::Application`]; tests go
//! through the same `Application::build` path.

#![forbid(unsafe_code)]

pub mod auth;
pub mod codec;
pub mod config;
pub mod deadline;
pub mod domain;
pub mod error;
pub mod health;
pub mod limits;
pub mod proto;
pub mod rpc_trace;
pub mod seed;
pub mod server;
pub mod service;
pub mod shutdown;
pub mod store;
pub mod telemetry;
pub mod tls;
