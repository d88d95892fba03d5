//! The sources and their layering: embedded defaults, `config/$APP_ENV.toml`,
//! `--config FILE`, the environment; later layers win key by key.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use config::{Config, ConfigBuilder, Environment, File, FileFormat, builder::DefaultState};

use super::{DEFAULT_CONFIG, ENV_CONFIG_DIR, ENV_PREFIX, Settings, errors::ConfigError};

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

/// Lists settable from the environment, comma-separated.
const LIST_KEYS: [&str; 4] = [
    "auth.read_tokens",
    "auth.write_tokens",
    "auth.read_subjects",
    "auth.write_subjects",
];

/// Settings flattened: `section.key` → the value as TOML would spell it.
pub(super) type Flat = BTreeMap<String, String>;

/// One layer of configuration, in the order they apply.
pub(super) enum Layer {
    Embedded,
    File { path: PathBuf, required: bool },
    Env(Option<config::Map<String, String>>),
}

impl Layer {
    fn add_to(&self, builder: ConfigBuilder<DefaultState>) -> ConfigBuilder<DefaultState> {
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

    /// Where `key`'s value came from in this layer: `default`, `file PATH` or
    /// `env VAR`, the variable spelt as it was set.
    pub(super) fn label(&self, key: &str) -> String {
        match self {
            Layer::Embedded => "default".into(),
            Layer::File { path, .. } => format!("file {}", path.display()),
            Layer::Env(map) => {
                let given = match map {
                    Some(map) => map
                        .keys()
                        .find(|name| env_key(name).as_deref() == Some(key))
                        .cloned(),
                    None => std::env::vars_os()
                        .filter_map(|(name, _)| name.into_string().ok())
                        .find(|name| env_key(name).as_deref() == Some(key)),
                };
                format!("env {}", given.unwrap_or_else(|| env_var(key)))
            }
        }
    }

    pub(super) fn is_env(&self) -> bool {
        matches!(self, Layer::Env(_))
    }
}

/// The variable that sets `key`: `server.listen` → `USER_MANAGER__SERVER__LISTEN`.
pub(super) fn env_var(key: &str) -> String {
    format!("{ENV_PREFIX}__{}", key.replace('.', "__").to_uppercase())
}

/// The key a variable sets, if it has our prefix (any case, as the `config`
/// crate lowercases).
fn env_key(name: &str) -> Option<String> {
    let prefix = format!("{ENV_PREFIX}__");
    let head = name.get(..prefix.len())?;
    head.eq_ignore_ascii_case(&prefix)
        .then(|| name[prefix.len()..].to_lowercase().replace("__", "."))
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

    pub(super) fn layers(&self) -> Result<Vec<Layer>, ConfigError> {
        let mut layers = vec![Layer::Embedded];
        if let Some(app_env) = &self.app_env {
            layers.push(Layer::File {
                path: Path::new(ENV_CONFIG_DIR).join(format!("{app_env}.toml")),
                required: false,
            });
        }
        if let Some(file) = &self.file {
            if !file.is_file() {
                return Err(ConfigError::other(format!(
                    "config file {} does not exist or is not a file (--config FILE)",
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

/// All layers merged.
pub(super) fn merged(layers: &[Layer]) -> Result<Config, config::ConfigError> {
    layers
        .iter()
        .fold(Config::builder(), |builder, layer| layer.add_to(builder))
        .build()
}

/// One layer alone, flattened; a layer that can't be read has no keys here
/// (reading all of them together reports why).
pub(super) fn flat_layer(layer: &Layer) -> Flat {
    layer
        .add_to(Config::builder())
        .build()
        .ok()
        .and_then(|c| flat(&c).ok())
        .unwrap_or_default()
}

pub(super) fn flat(config: &Config) -> Result<Flat, config::ConfigError> {
    config
        .clone()
        .try_deserialize::<serde_json::Value>()
        .map(|v| flatten(&v))
}

/// `{"a": {"b": 1}}` as `a.b = 1`, values spelled as TOML would.
fn flatten(value: &serde_json::Value) -> Flat {
    fn walk(prefix: &str, value: &serde_json::Value, out: &mut Flat) {
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
    let mut out = Flat::new();
    walk("", value, &mut out);
    out
}

impl Settings {
    /// Reads the process's own sources: `APP_ENV`, the given file and the environment.
    pub fn load(file: Option<PathBuf>) -> Result<Self, ConfigError> {
        Self::load_from(Sources::of_process(file))
    }

    pub fn load_from(sources: Sources) -> Result<Self, ConfigError> {
        let layers = sources.layers()?;
        let config = merged(&layers).map_err(|e| ConfigError::from_config(e, &layers))?;
        ConfigError::check_keys(&config, &layers)?;
        let settings: Settings = config
            .try_deserialize()
            .map_err(|e| ConfigError::from_config(e, &layers))?;
        settings
            .validate()
            .map_err(|(key, problem)| ConfigError::setting(&key, problem, &layers))?;
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
}
