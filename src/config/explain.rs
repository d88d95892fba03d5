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
    redact_url(&value)
}

/// A URL with its password hidden: `scheme://user:password@host` becomes
/// `scheme://user:<redacted>@host`, and a `password=` query parameter's value
/// `<redacted>` too. Anything else comes back as it was. The one helper for
/// every place a database URL is printed or logged.
pub fn redact_url(url: &str) -> String {
    let mut out = url.to_owned();
    if let Some(start) = out.find("://").map(|i| i + 3) {
        // The last '@' ends the userinfo, so an unescaped '@' or '/' in the
        // password is hidden too; at worst more than the password is.
        if let Some(at) = out[start..].rfind('@').map(|i| start + i)
            && let Some(colon) = out[start..at].find(':').map(|i| start + i)
        {
            out.replace_range(colon + 1..at, "<redacted>");
        }
    }
    let mut from = 0;
    while let Some(found) = out[from..].find("password=").map(|i| from + i) {
        let begin = found + "password=".len();
        let end = out[begin..]
            .find(['&', '"', ' '])
            .map_or(out.len(), |i| begin + i);
        out.replace_range(begin..end, "<redacted>");
        from = begin + "<redacted>".len();
    }
    out
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
