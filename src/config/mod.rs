//! Layered settings: the embedded `config/default.toml`, then the optional
//! `config/$APP_ENV.toml`, then `--config FILE`, then environment variables
//! (`USER_MANAGER__SECTION__KEY`). Everything is checked here, before anything
//! binds or opens, and every error names the key, where its value came from,
//! the value and what is allowed ([`errors`]).
//!
//! This file is the schema; [`load`] layers the sources, [`explain`] prints
//! them for `user-manager config`, [`validate`] checks what serde can't.
//! Nothing here depends on the rest of the crate (the rest depends on this).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, de::Error as _};

mod errors;
mod explain;
mod load;
mod validate;

pub use errors::ConfigError;
pub use explain::{Explained, redact_url};
pub use load::Sources;
pub use validate::{MIN_TOKEN_LEN, check_token};

/// The checked-in defaults, compiled in.
pub const DEFAULT_CONFIG: &str = include_str!("../../config/default.toml");
/// Environment variables start with this, then `__`, then `SECTION__KEY`.
pub const ENV_PREFIX: &str = "USER_MANAGER";
/// Directory searched for `$APP_ENV.toml`, relative to the working directory.
pub const ENV_CONFIG_DIR: &str = "config";
/// The `seed.path` that means the users compiled into the binary (the
/// repository's `seed/users.json`), so the binary needs no file to start.
pub const EMBEDDED_SEED: &str = "embedded";

/// An enum spelled as one of a few strings. Its error lists them: serde's
/// derive (through the `config` crate) would say `enum LogFormat does not
/// have variant constructor xml`.
macro_rules! choices {
    ($ty:ident { $($name:literal => $variant:ident),+ $(,)? }) => {
        impl $ty {
            /// Every spelling, in the order the documentation lists them.
            pub const CHOICES: &[(&str, $ty)] = &[$(($name, $ty::$variant)),+];
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = String::deserialize(deserializer)?;
                Self::CHOICES
                    .iter()
                    .find(|(name, _)| *name == text)
                    .map(|(_, value)| *value)
                    .ok_or_else(|| {
                        let names: Vec<String> =
                            Self::CHOICES.iter().map(|(name, _)| format!("{name:?}")).collect();
                        D::Error::custom(format!("expected one of {}", names.join(", ")))
                    })
            }
        }
    };
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub server: ServerSettings,
    pub database: DatabaseSettings,
    pub seed: SeedSettings,
    pub health: HealthSettings,
    pub reflection: ReflectionSettings,
    pub telemetry: TelemetrySettings,
    pub log: LogSettings,
    pub auth: AuthSettings,
    pub limits: LimitsSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    #[serde(deserialize_with = "socket_addr")]
    pub listen: SocketAddr,
    /// A plaintext listener serving only the health service; `""` for none.
    #[serde(deserialize_with = "optional_socket_addr")]
    pub health_listen: Option<SocketAddr>,
    #[serde(deserialize_with = "whole")]
    pub request_timeout_ms: u64,
    #[serde(deserialize_with = "whole")]
    pub lame_duck_ms: u64,
    #[serde(deserialize_with = "whole")]
    pub drain_timeout_ms: u64,
    pub tls: TlsSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub client_ca_path: PathBuf,
    #[serde(deserialize_with = "whole")]
    pub reload_interval_ms: u64,
}

impl TlsSettings {
    /// TLS is on when a certificate is configured.
    pub fn enabled(&self) -> bool {
        !self.cert_path.as_os_str().is_empty()
    }

    /// The CA bundle client certificates must chain to, if mTLS is on.
    pub fn client_ca(&self) -> Option<&Path> {
        (!self.client_ca_path.as_os_str().is_empty()).then_some(self.client_ca_path.as_path())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthSettings {
    pub enabled: bool,
    /// Lines of `read TOKEN` or `write TOKEN`; empty for none.
    pub tokens_file: PathBuf,
    pub read_tokens: Vec<Secret>,
    pub write_tokens: Vec<Secret>,
    /// Client-certificate subjects (CN, DNS or URI SAN) granted each scope.
    pub read_subjects: Vec<String>,
    pub write_subjects: Vec<String>,
}

impl AuthSettings {
    pub fn tokens_file(&self) -> Option<&Path> {
        (!self.tokens_file.as_os_str().is_empty()).then_some(self.tokens_file.as_path())
    }
}

/// A value that must never be printed: `Debug` shows `<redacted>`, so a
/// logged `Settings` can't leak it.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl From<&str> for Secret {
    fn from(value: &str) -> Self {
        Secret(value.to_owned())
    }
}

/// Resource limits; documented in `config/default.toml`, applied by
/// `crate::grpc::middleware::limits`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSettings {
    #[serde(deserialize_with = "whole")]
    pub max_message_bytes: usize,
    #[serde(deserialize_with = "whole")]
    pub max_concurrent_streams: u32,
    #[serde(deserialize_with = "whole")]
    pub max_calls_per_connection: usize,
    #[serde(deserialize_with = "whole")]
    pub max_open_streams: usize,
    #[serde(deserialize_with = "whole")]
    pub stream_stall_timeout_ms: u64,
    #[serde(deserialize_with = "whole")]
    pub max_pending_accept_reset_streams: usize,
    #[serde(deserialize_with = "whole")]
    pub max_local_error_reset_streams: usize,
    #[serde(deserialize_with = "whole")]
    pub max_header_list_bytes: u32,
    #[serde(deserialize_with = "whole")]
    pub keepalive_interval_ms: u64,
    #[serde(deserialize_with = "whole")]
    pub keepalive_timeout_ms: u64,
    #[serde(deserialize_with = "whole")]
    pub max_connection_age_ms: u64,
    #[serde(deserialize_with = "whole")]
    pub max_connection_age_grace_ms: u64,
    pub max_concurrent_tls_handshakes: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSettings {
    #[serde(deserialize_with = "whole")]
    pub check_interval_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReflectionSettings {
    pub enabled: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetrySettings {
    pub otlp_endpoint: String,
    /// A plaintext HTTP listener serving Prometheus metrics at `/metrics`;
    /// `""` for none.
    #[serde(deserialize_with = "optional_socket_addr")]
    pub metrics_listen: Option<SocketAddr>,
}

/// `database.url` picks the backend by its scheme; each backend's own keys
/// live in its section, read only when that backend runs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    pub url: String,
    pub sqlite: SqliteSettings,
    pub postgres: PostgresSettings,
}

/// The storage engines built in, as `database.url`'s scheme names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// The URL schemes `database.url` accepts, for errors and documentation.
pub const DATABASE_SCHEMES: &str = "sqlite:, postgres:// or postgresql://";

impl DatabaseSettings {
    /// The backend `url` names, if it names one built in.
    pub fn backend(&self) -> Option<Backend> {
        let url = self.url.trim_start();
        if url.starts_with("sqlite:") {
            Some(Backend::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Some(Backend::Postgres)
        } else {
            None
        }
    }

    /// `url` with any password replaced by `<redacted>`: what logs print.
    pub fn redacted_url(&self) -> String {
        redact_url(&self.url)
    }
}

/// `[database.sqlite]`: read only when `database.url` is a `sqlite:` URL.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqliteSettings {
    #[serde(deserialize_with = "whole")]
    pub max_connections: u32,
    #[serde(deserialize_with = "whole")]
    pub busy_timeout_ms: u64,
    pub synchronous: Synchronous,
}

/// `[database.postgres]`: read only when `database.url` is a PostgreSQL URL.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresSettings {
    #[serde(deserialize_with = "whole")]
    pub max_connections: u32,
    #[serde(deserialize_with = "whole")]
    pub connect_timeout_ms: u64,
    #[serde(deserialize_with = "whole")]
    pub statement_timeout_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Synchronous {
    Normal,
    Full,
}

choices!(Synchronous { "normal" => Normal, "full" => Full });

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedSettings {
    pub path: PathBuf,
}

impl SeedSettings {
    /// The seed to import, unless seeding is turned off with an empty path:
    /// a file, or [`EMBEDDED_SEED`] for the users compiled in (`seed::load`
    /// tells them apart).
    pub fn file(&self) -> Option<&Path> {
        (!self.path.as_os_str().is_empty()).then_some(self.path.as_path())
    }

    /// Whether the seed is the one compiled into the binary.
    pub fn is_embedded(&self) -> bool {
        self.path.as_os_str() == EMBEDDED_SEED
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Pretty,
    Json,
}

choices!(LogFormat { "pretty" => Pretty, "json" => Json });

/// What an address setting takes, for its error.
const ADDRESS_EXAMPLE: &str = "an IP address and port, e.g. \"127.0.0.1:1234\" or \"[::]:1234\"";

fn socket_addr<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<SocketAddr, D::Error> {
    let text = String::deserialize(deserializer)?;
    text.parse()
        .map_err(|_| D::Error::custom(format!("expected {ADDRESS_EXAMPLE}")))
}

/// `""` as `None`, as TOML has no null.
fn optional_socket_addr<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<SocketAddr>, D::Error> {
    let text = String::deserialize(deserializer)?;
    if text.is_empty() {
        return Ok(None);
    }
    text.parse()
        .map(Some)
        .map_err(|_| D::Error::custom(format!("expected {ADDRESS_EXAMPLE}, or \"\" for none")))
}

/// An unsigned integer setting of type `T`, from a number or a string of
/// digits (the environment's values are strings). Its error gives the range:
/// the `config` crate would say `expected an unsigned 64 bit or less integer`.
fn whole<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<u64>,
{
    struct Whole(u64);

    impl Whole {
        fn fail<E: serde::de::Error>(&self) -> E {
            E::custom(format!("expected a whole number from 0 to {}", self.0))
        }
    }

    impl serde::de::Visitor<'_> for Whole {
        type Value = u64;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "a whole number from 0 to {}", self.0)
        }

        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<u64, E> {
            if v <= self.0 { Ok(v) } else { Err(self.fail()) }
        }

        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<u64, E> {
            u64::try_from(v)
                .map_err(|_| self.fail())
                .and_then(|v| self.visit_u64(v))
        }

        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<u64, E> {
            v.trim()
                .parse()
                .map_err(|_| self.fail())
                .and_then(|v| self.visit_u64(v))
        }

        fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<u64, E> {
            Err(self.fail())
        }

        fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<u64, E> {
            Err(self.fail())
        }
    }

    // The largest value of T: the largest u64 that converts.
    let max = [
        u64::MAX,
        u64::from(u32::MAX),
        u64::from(u16::MAX),
        u64::from(u8::MAX),
    ]
    .into_iter()
    .find(|&m| T::try_from(m).is_ok())
    .unwrap_or(0);
    let value = deserializer.deserialize_any(Whole(max))?;
    T::try_from(value)
        .map_err(|_| D::Error::custom(format!("expected a whole number from 0 to {max}")))
}

#[cfg(test)]
mod tests;
