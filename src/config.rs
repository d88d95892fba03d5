//! Layered settings: the embedded `config/default.toml`, then the optional
//! `config/$APP_ENV.toml`, then `--config FILE`, then environment variables
//! (`USER_MANAGER__SECTION__KEY`). Everything is checked here, before anything
//! binds or opens, and every error names the key it is about.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use config::{Config, Environment, File, FileFormat};
use serde::Deserialize;

/// The checked-in defaults, compiled in.
pub const DEFAULT_CONFIG: &str = include_str!("../config/default.toml");
/// Environment variables start with this, then `__`, then `SECTION__KEY`.
pub const ENV_PREFIX: &str = "USER_MANAGER";
/// Directory searched for `$APP_ENV.toml`, relative to the working directory.
pub const ENV_CONFIG_DIR: &str = "config";

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
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    pub request_timeout_ms: u64,
    pub lame_duck_ms: u64,
    pub drain_timeout_ms: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthSettings {
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
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DatabaseSettings {
    pub url: String,
    pub max_connections: u32,
    pub busy_timeout_ms: u64,
    pub synchronous: Synchronous,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    Normal,
    Full,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedSettings {
    pub path: PathBuf,
}

impl SeedSettings {
    /// The seed file, unless seeding is turned off with an empty path.
    pub fn file(&self) -> Option<&Path> {
        (!self.path.as_os_str().is_empty()).then_some(self.path.as_path())
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

/// Where settings come from, besides the embedded defaults.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// `APP_ENV`: selects `config/$APP_ENV.toml`, if that file exists.
    pub app_env: Option<String>,
    /// `--config FILE`: must exist.
    pub file: Option<PathBuf>,
    /// The environment; `None` reads the process environment.
    pub env: Option<config::Map<String, String>>,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(String);

impl Settings {
    /// Reads the process's own sources: `APP_ENV`, the given file and the environment.
    pub fn load(file: Option<PathBuf>) -> Result<Self, ConfigError> {
        Self::load_from(Sources {
            app_env: std::env::var("APP_ENV").ok().filter(|s| !s.is_empty()),
            file,
            env: None,
        })
    }

    pub fn load_from(sources: Sources) -> Result<Self, ConfigError> {
        let mut builder =
            Config::builder().add_source(File::from_str(DEFAULT_CONFIG, FileFormat::Toml));
        if let Some(app_env) = &sources.app_env {
            let path = Path::new(ENV_CONFIG_DIR).join(format!("{app_env}.toml"));
            builder = builder.add_source(File::from(path).required(false));
        }
        if let Some(file) = &sources.file {
            if !file.is_file() {
                return Err(ConfigError(format!(
                    "config file {} does not exist or is not a file",
                    file.display()
                )));
            }
            builder = builder.add_source(File::from(file.as_path()).format(FileFormat::Toml));
        }
        let settings: Settings = builder
            .add_source(
                Environment::with_prefix(ENV_PREFIX)
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true)
                    .source(sources.env),
            )
            .build()
            .and_then(Config::try_deserialize)
            .map_err(|e| ConfigError(e.to_string()))?;
        settings.validate()?;
        Ok(settings)
    }

    /// The embedded defaults alone: what tests start from.
    pub fn embedded_default() -> Self {
        Self::load_from(Sources {
            env: Some(config::Map::new()),
            ..Sources::default()
        })
        .expect("the embedded default configuration is valid")
    }

    /// Checks what serde can't: cross-field and semantic constraints.
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |key: &str, why: String| Err(ConfigError(format!("{key}: {why}")));
        if !self.database.url.starts_with("sqlite:") {
            return bad(
                "database.url",
                format!(
                    "{:?} is not a sqlite: URL (the only backend built in)",
                    self.database.url
                ),
            );
        }
        if self.database.max_connections == 0 {
            return bad("database.max_connections", "must be at least 1".into());
        }
        if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&self.log.level) {
            return bad(
                "log.level",
                format!("{:?} is not a tracing filter: {e}", self.log.level),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_env(pairs: &[(&str, &str)]) -> Result<Settings, ConfigError> {
        Settings::load_from(Sources {
            env: Some(
                pairs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Sources::default()
        })
    }

    #[test]
    fn embedded_defaults_are_the_documented_ones() {
        let s = Settings::embedded_default();
        assert_eq!(s.server.listen, "[::]:1234".parse().unwrap());
        assert_eq!(s.database.url, "sqlite://data/users.db");
        assert_eq!(s.seed.file(), Some(Path::new("seed/users.json")));
        assert_eq!(s.log.format, LogFormat::Pretty);
        assert_eq!(s.database.synchronous, Synchronous::Full);
    }

    #[test]
    fn environment_overrides_with_double_underscores() {
        let s = with_env(&[
            ("USER_MANAGER__SERVER__LISTEN", "127.0.0.1:9000"),
            ("USER_MANAGER__DATABASE__MAX_CONNECTIONS", "9"),
            ("USER_MANAGER__LOG__FORMAT", "json"),
            ("USER_MANAGER__SEED__PATH", ""),
        ])
        .unwrap();
        assert_eq!(s.server.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(s.database.max_connections, 9);
        assert_eq!(s.log.format, LogFormat::Json);
        assert_eq!(s.seed.file(), None);
    }

    #[test]
    fn a_config_file_sits_between_defaults_and_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(
            &file,
            "[server]\nlisten = \"127.0.0.1:7\"\n[log]\nlevel = \"debug\"\n",
        )
        .unwrap();
        let s = Settings::load_from(Sources {
            file: Some(file),
            env: Some([("USER_MANAGER__LOG__LEVEL".into(), "warn".into())].into()),
            ..Sources::default()
        })
        .unwrap();
        assert_eq!(s.server.listen, "127.0.0.1:7".parse().unwrap());
        assert_eq!(s.log.level, "warn");
    }

    #[test]
    fn bad_values_name_their_key() {
        for (key, value, named) in [
            (
                "USER_MANAGER__SERVER__LISTEN",
                "not-an-address",
                "server.listen",
            ),
            (
                "USER_MANAGER__DATABASE__MAX_CONNECTIONS",
                "lots",
                "database.max_connections",
            ),
            (
                "USER_MANAGER__DATABASE__MAX_CONNECTIONS",
                "0",
                "database.max_connections",
            ),
            (
                "USER_MANAGER__DATABASE__SYNCHRONOUS",
                "sometimes",
                "database.synchronous",
            ),
            (
                "USER_MANAGER__DATABASE__URL",
                "postgres://x",
                "database.url",
            ),
            ("USER_MANAGER__LOG__FORMAT", "xml", "log.format"),
            ("USER_MANAGER__LOG__LEVEL", "info,[", "log.level"),
            ("USER_MANAGER__SERVER__LISTN", "x", "listn"),
        ] {
            let err = with_env(&[(key, value)]).unwrap_err().to_string();
            assert!(err.contains(named), "{key}={value}: {err}");
        }
    }

    #[test]
    fn a_missing_config_file_is_an_error() {
        let err = Settings::load_from(Sources {
            file: Some("/nonexistent/user-manager.toml".into()),
            env: Some(config::Map::new()),
            ..Sources::default()
        })
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/user-manager.toml"));
    }
}
