//! `user-manager config`: every effective key, its value (secrets redacted)
//! and the layer it came from.

use super::{
    Settings,
    errors::ConfigError,
    load::{Sources, flat, flat_layer, merged},
};

/// One effective setting, for `user-manager config`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Explained {
    /// `section.key`
    pub key: String,
    /// The value as TOML would spell it, secrets replaced by `"<redacted>"`.
    pub value: String,
    /// `default`, `file PATH` or `env VAR`.
    pub source: String,
}

/// Hides values that are secrets by name, and passwords inside URLs. What is
/// hidden is the value, not its shape: an empty list or string stays empty
/// (so "no tokens" is visible), a list shows how many entries it has, and a
/// file's path is not a secret.
pub(super) fn redact(key: &str, value: String) -> String {
    let name = key.rsplit('.').next().unwrap_or(key);
    let secret = ["token", "secret", "password"]
        .iter()
        .any(|s| name.contains(s))
        && !name.ends_with("_file")
        && !name.ends_with("_path");
    if secret {
        return match serde_json::from_str::<serde_json::Value>(&value) {
            Ok(serde_json::Value::Array(items)) => {
                let hidden = vec!["\"<redacted>\""; items.len()];
                format!("[{}]", hidden.join(", "))
            }
            Ok(serde_json::Value::String(s)) if s.is_empty() => value,
            _ => "\"<redacted>\"".into(),
        };
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
    /// Every effective key with its value and the layer it came from (the
    /// last one that sets it), secrets redacted: what `user-manager config`
    /// prints. Fails as loading would, so it also checks a configuration.
    pub fn explain(sources: Sources) -> Result<Vec<Explained>, ConfigError> {
        Self::load_from(sources.clone())?;
        let layers = sources.layers()?;
        let merged = merged(&layers)
            .and_then(|config| flat(&config))
            .map_err(|e| ConfigError::from_config(e, &layers))?;
        let per_layer: Vec<_> = layers
            .iter()
            .map(|layer| (layer, flat_layer(layer)))
            .collect();
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
}
