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
    pub auth: AuthSettings,
    pub limits: LimitsSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSettings {
    pub listen: SocketAddr,
    /// A plaintext listener serving only the health service; `""` for none.
    #[serde(deserialize_with = "empty_as_none")]
    pub health_listen: Option<SocketAddr>,
    pub request_timeout_ms: u64,
    pub lame_duck_ms: u64,
    pub drain_timeout_ms: u64,
    pub tls: TlsSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub client_ca_path: PathBuf,
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

/// `""` as `None`, as TOML has no null.
fn empty_as_none<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    let text = String::deserialize(deserializer)?;
    if text.is_empty() {
        return Ok(None);
    }
    text.parse().map(Some).map_err(serde::de::Error::custom)
}

/// Resource limits; documented in `config/default.toml`, applied by `crate::limits`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSettings {
    pub max_message_bytes: usize,
    pub max_concurrent_streams: u32,
    pub max_calls_per_connection: usize,
    pub max_open_streams: usize,
    pub stream_stall_timeout_ms: u64,
    pub max_pending_accept_reset_streams: usize,
    pub max_local_error_reset_streams: usize,
    pub max_header_list_bytes: u32,
    pub keepalive_interval_ms: u64,
    pub keepalive_timeout_ms: u64,
    pub max_connection_age_ms: u64,
    pub max_connection_age_grace_ms: u64,
    pub max_concurrent_tls_handshakes: usize,
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

/// One effective setting, for `user-manager config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explained {
    /// `section.key`
    pub key: String,
    /// The value as TOML would spell it, or `"<redacted>"`.
    pub value: String,
    /// `default`, `file PATH` or `env VAR`.
    pub source: String,
}

/// Lists settable from the environment, comma-separated.
const LIST_KEYS: [&str; 4] = [
    "auth.read_tokens",
    "auth.write_tokens",
    "auth.read_subjects",
    "auth.write_subjects",
];

/// One layer of configuration, in the order they apply.
enum Layer {
    Embedded,
    File { path: PathBuf, required: bool },
    Env(Option<config::Map<String, String>>),
}

impl Layer {
    fn add_to(
        &self,
        builder: config::ConfigBuilder<config::builder::DefaultState>,
    ) -> config::ConfigBuilder<config::builder::DefaultState> {
        match self {
            Layer::Embedded => builder.add_source(File::from_str(DEFAULT_CONFIG, FileFormat::Toml)),
            Layer::File { path, required } => builder.add_source(
                File::from(path.as_path())
                    .format(FileFormat::Toml)
                    .required(*required),
            ),
            Layer::Env(map) => builder.add_source(
                LIST_KEYS.iter().fold(
                    Environment::with_prefix(ENV_PREFIX)
                        .prefix_separator("__")
                        .separator("__")
                        .try_parsing(true)
                        .list_separator(",")
                        .source(map.clone()),
                    |env, key| env.with_list_parse_key(key),
                ),
            ),
        }
    }

    fn label(&self, key: &str) -> String {
        match self {
            Layer::Embedded => "default".into(),
            Layer::File { path, .. } => format!("file {}", path.display()),
            Layer::Env(_) => format!(
                "env {ENV_PREFIX}__{}",
                key.replace('.', "__").to_uppercase()
            ),
        }
    }
}

impl Sources {
    /// This process's sources: `APP_ENV`, the given file, the environment.
    pub fn of_process(file: Option<PathBuf>) -> Self {
        Sources {
            app_env: std::env::var("APP_ENV").ok().filter(|s| !s.is_empty()),
            file,
            env: None,
        }
    }

    fn layers(&self) -> Result<Vec<Layer>, ConfigError> {
        let mut layers = vec![Layer::Embedded];
        if let Some(app_env) = &self.app_env {
            layers.push(Layer::File {
                path: Path::new(ENV_CONFIG_DIR).join(format!("{app_env}.toml")),
                required: false,
            });
        }
        if let Some(file) = &self.file {
            if !file.is_file() {
                return Err(ConfigError(format!(
                    "config file {} does not exist or is not a file",
                    file.display()
                )));
            }
            layers.push(Layer::File {
                path: file.clone(),
                required: true,
            });
        }
        layers.push(Layer::Env(self.env.clone()));
        Ok(layers)
    }
}

/// `{"a": {"b": 1}}` as `a.b = 1`, values spelled as TOML would.
fn flatten(value: &serde_json::Value) -> std::collections::BTreeMap<String, String> {
    fn walk(
        prefix: &str,
        value: &serde_json::Value,
        out: &mut std::collections::BTreeMap<String, String>,
    ) {
        match value {
            serde_json::Value::Object(map) => {
                for (k, v) in map {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            other => {
                out.insert(prefix.to_owned(), other.to_string());
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk("", value, &mut out);
    out
}

/// Hides values that are secrets by name, and passwords inside URLs.
fn redact(key: &str, value: String) -> String {
    let name = key.rsplit('.').next().unwrap_or(key);
    if ["token", "secret", "password"]
        .iter()
        .any(|s| name.contains(s))
    {
        return "\"<redacted>\"".into();
    }
    // scheme://user:password@host → scheme://user:<redacted>@host
    if let Some((scheme, rest)) = value.split_once("://")
        && let Some((userinfo, host)) = rest.split_once('@')
        && let Some((user, _password)) = userinfo.split_once(':')
    {
        return format!("{scheme}://{user}:<redacted>@{host}");
    }
    value
}

impl Settings {
    /// Reads the process's own sources: `APP_ENV`, the given file and the environment.
    pub fn load(file: Option<PathBuf>) -> Result<Self, ConfigError> {
        Self::load_from(Sources::of_process(file))
    }

    pub fn load_from(sources: Sources) -> Result<Self, ConfigError> {
        let layers = sources.layers()?;
        let settings: Settings = layers
            .iter()
            .fold(Config::builder(), |builder, layer| layer.add_to(builder))
            .build()
            .and_then(Config::try_deserialize)
            .map_err(|e| ConfigError(e.to_string()))?;
        settings.validate()?;
        Ok(settings)
    }

    /// Every effective key with its value and the layer it came from (the
    /// last one that sets it), secrets redacted: what `user-manager config`
    /// prints. Fails as loading would, so it also checks a configuration.
    pub fn explain(sources: Sources) -> Result<Vec<Explained>, ConfigError> {
        Self::load_from(sources.clone())?;
        let layers = sources.layers()?;
        let flat = |builder: config::ConfigBuilder<config::builder::DefaultState>| {
            builder
                .build()
                .and_then(Config::try_deserialize::<serde_json::Value>)
                .map(|v| flatten(&v))
                .map_err(|e| ConfigError(e.to_string()))
        };
        let merged = flat(
            layers
                .iter()
                .fold(Config::builder(), |builder, layer| layer.add_to(builder)),
        )?;
        let per_layer = layers
            .iter()
            .map(|layer| Ok((layer, flat(layer.add_to(Config::builder()))?)))
            .collect::<Result<Vec<_>, ConfigError>>()?;
        Ok(merged
            .into_iter()
            .map(|(key, value)| {
                let source = per_layer
                    .iter()
                    .rev()
                    .find(|(_, keys)| keys.contains_key(&key))
                    .map_or_else(|| "default".to_owned(), |(layer, _)| layer.label(&key));
                let value = redact(&key, value);
                Explained { key, value, source }
            })
            .collect())
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
        self.limits.check().map_err(ConfigError)?;
        if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&self.log.level) {
            return bad(
                "log.level",
                format!("{:?} is not a tracing filter: {e}", self.log.level),
            );
        }
        let tls = &self.server.tls;
        if tls.enabled() == tls.key_path.as_os_str().is_empty() {
            return bad(
                "server.tls",
                "cert_path and key_path go together: set both or neither".into(),
            );
        }
        if tls.client_ca().is_some() && !tls.enabled() {
            return bad(
                "server.tls.client_ca_path",
                "client certificates (mTLS) need TLS: set cert_path and key_path too".into(),
            );
        }
        if self.server.health_listen == Some(self.server.listen) && self.server.listen.port() != 0 {
            return bad(
                "server.health_listen",
                "must differ from server.listen".into(),
            );
        }
        let auth = &self.auth;
        let subjects = !auth.read_subjects.is_empty() || !auth.write_subjects.is_empty();
        if subjects && tls.client_ca().is_none() {
            return bad(
                "auth.read_subjects/auth.write_subjects",
                "mapping client-certificate subjects needs server.tls.client_ca_path (mTLS)".into(),
            );
        }
        for (key, tokens) in [
            ("auth.read_tokens", &auth.read_tokens),
            ("auth.write_tokens", &auth.write_tokens),
        ] {
            // Empty entries (a trailing comma) are skipped.
            for (n, token) in tokens.iter().enumerate() {
                if !token.expose().is_empty()
                    && let Err(why) = crate::auth::check_token(token.expose())
                {
                    return bad(key, format!("entry {}: {why}", n + 1));
                }
            }
        }
        let tokens = auth.tokens_file().is_some()
            || auth
                .read_tokens
                .iter()
                .chain(&auth.write_tokens)
                .any(|t| !t.expose().is_empty());
        if auth.enabled && !tokens && !subjects {
            return bad(
                "auth.enabled",
                "no credential could pass: set auth.tokens_file, auth.read_tokens, \
                 auth.write_tokens, auth.read_subjects or auth.write_subjects"
                    .into(),
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
    fn explain_names_the_layer_each_value_came_from() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("c.toml");
        std::fs::write(&file, "[log]\nlevel = \"debug\"\n").unwrap();
        let explained = Settings::explain(Sources {
            file: Some(file.clone()),
            env: Some(
                [
                    ("USER_MANAGER__SERVER__LISTEN".into(), "127.0.0.1:9".into()),
                    (
                        "USER_MANAGER__DATABASE__URL".into(),
                        "sqlite://u:hunter2@host/db".into(),
                    ),
                ]
                .into(),
            ),
            ..Sources::default()
        })
        .unwrap();
        let find = |key: &str| explained.iter().find(|e| e.key == key).unwrap().clone();
        assert_eq!(find("server.listen").value, "\"127.0.0.1:9\"");
        assert_eq!(
            find("server.listen").source,
            "env USER_MANAGER__SERVER__LISTEN"
        );
        assert_eq!(find("log.level").source, format!("file {}", file.display()));
        assert_eq!(find("log.format").source, "default");
        assert_eq!(find("database.max_connections").value, "4");
        let url = find("database.url").value;
        assert!(
            !url.contains("hunter2") && url.contains("<redacted>"),
            "{url}"
        );
        assert_eq!(
            redact("auth.write_token", "\"abc\"".into()),
            "\"<redacted>\""
        );
    }

    #[test]
    fn tls_and_auth_settings_are_checked_together() {
        for (pairs, named) in [
            (
                &[("USER_MANAGER__SERVER__TLS__CERT_PATH", "c.pem")][..],
                "cert_path and key_path go together",
            ),
            (
                &[("USER_MANAGER__SERVER__TLS__CLIENT_CA_PATH", "ca.pem")],
                "server.tls.client_ca_path",
            ),
            (
                &[("USER_MANAGER__AUTH__READ_SUBJECTS", "reporting")],
                "needs server.tls.client_ca_path",
            ),
            (&[("USER_MANAGER__AUTH__ENABLED", "true")], "auth.enabled"),
            (
                &[(
                    "USER_MANAGER__AUTH__READ_TOKENS",
                    "ok-token-0123456789,has space x",
                )],
                "auth.read_tokens: entry 2",
            ),
            (
                &[("USER_MANAGER__SERVER__HEALTH_LISTEN", "nowhere")],
                "health_listen",
            ),
        ] {
            let err = with_env(pairs).unwrap_err().to_string();
            assert!(err.contains(named), "{pairs:?}: {err}");
            assert!(!err.contains("has space"), "a token in an error: {err}");
        }
        let s = with_env(&[
            ("USER_MANAGER__AUTH__ENABLED", "true"),
            // Lists from the environment are comma-separated; empty entries skipped.
            (
                "USER_MANAGER__AUTH__WRITE_TOKENS",
                "token-one-0123456789,token-two-0123456789,",
            ),
            ("USER_MANAGER__SERVER__HEALTH_LISTEN", "127.0.0.1:8081"),
        ])
        .unwrap();
        let tokens: Vec<&str> = s.auth.write_tokens.iter().map(Secret::expose).collect();
        assert_eq!(
            tokens[..2],
            ["token-one-0123456789", "token-two-0123456789"]
        );
        assert_eq!(
            s.server.health_listen,
            Some("127.0.0.1:8081".parse().unwrap())
        );
        assert!(
            !format!("{s:?}").contains("token-one"),
            "Debug shows a token"
        );
        let explained = Settings::explain(Sources {
            env: Some(
                [(
                    "USER_MANAGER__AUTH__READ_TOKENS".to_owned(),
                    "token-one-0123456789".to_owned(),
                )]
                .into(),
            ),
            ..Sources::default()
        })
        .unwrap();
        let line = explained
            .iter()
            .find(|e| e.key == "auth.read_tokens")
            .unwrap();
        assert_eq!(line.value, "\"<redacted>\"");
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
