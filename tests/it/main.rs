//! Every integration test, in one test binary: each test binary links the
//! whole dependency tree (tonic, sqlx, rustls, OpenTelemetry), so one binary
//! instead of eight builds in a fraction of the time. Select a part by its
//! module path, e.g. `cargo nextest run --test it -- e2e::`.
//!
//! The modules that need tools besides Rust (`e2e`: grpcurl and Python
//! grpcio; `deploy`: kubectl, kubernetes-validate, docker-compose, hadolint;
//! `monitoring`: prometheus and promtool, besides deploy's)
//! are here too rather than in a binary of their own: a second binary would
//! link everything again, while a name filter selects them just as well, and
//! a missing tool fails its test saying where the tool comes from.

// In a test binary nothing is reachable from outside: `pub` here means "used by
// another module of it", which is what the modules say.
#![allow(unreachable_pub)]

#[path = "../common/mod.rs"]
mod common;

mod abuse;
mod api;
mod deploy;
mod drain;
mod e2e;
mod k8s;
mod metrics;
mod monitoring;
mod newcomer;
mod ops;
mod replicas;
mod safety;
mod security;
mod store;
mod tls_flood;
mod traces;

/// The harness reads the addresses the binary bound from its log.
mod harness {
    use crate::common::process::{
        HEALTH_LISTENER, METRICS_LISTENER, READY, connectable, logged_listen,
    };

    #[test]
    fn listen_addresses_are_read_from_json_and_pretty_lines() {
        let json = r#"{"timestamp":"t","level":"INFO","message":"user-manager ready to serve","listen":"127.0.0.1:4321","target":"x"}"#;
        assert_eq!(
            logged_listen(json, READY),
            Some("127.0.0.1:4321".parse().unwrap())
        );
        assert_eq!(logged_listen(json, HEALTH_LISTENER), None);
        let metrics = r#"{"timestamp":"t","level":"INFO","message":"metrics listener","listen":"0.0.0.0:9464","target":"x"}"#;
        let addr = logged_listen(metrics, METRICS_LISTENER).unwrap();
        assert_eq!(connectable(addr), "127.0.0.1:9464".parse().unwrap());
        assert_eq!(logged_listen(metrics, READY), None);
        let pretty = "2026-01-01T00:00:00Z \u{1b}[32m INFO\u{1b}[0m \u{1b}[2muser_manager::server\u{1b}[0m\u{1b}[2m:\u{1b}[0m health-only plaintext listener \u{1b}[3mlisten\u{1b}[0m\u{1b}[2m=\u{1b}[0m[::]:8081";
        let addr = logged_listen(pretty, HEALTH_LISTENER).unwrap();
        assert_eq!(connectable(addr), "[::1]:8081".parse().unwrap());
    }
}
