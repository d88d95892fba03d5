//! Configuration errors in the operator's words. The `config` crate's errors
//! lose where a value came from and speak Rust (`enum LogFormat does not have
//! variant constructor xml`); these name the key, the layer that set it (the
//! file, or the environment variable as it was spelt), the value given
//! (secrets redacted) and what is allowed.

use std::fmt;

use super::{
    explain::redact,
    load::{Flat, Layer, env_var, flat, flat_layer, merged},
};

#[derive(Debug)]
pub struct ConfigError {
    /// `section.key`, when the error is about one.
    key: Option<String>,
    /// `(value, source)`: what was given for the key and where.
    given: Option<(String, String)>,
    /// What is wrong and what is allowed.
    problem: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("invalid configuration: ")?;
        match (&self.key, &self.given) {
            (Some(key), Some((value, source))) => write!(f, "{key} = {value} ({source}): ")?,
            (Some(key), None) => write!(f, "{key}: ")?,
            (None, _) => {}
        }
        f.write_str(&self.problem)
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    /// An error about no one key (a missing `--config` file).
    pub(super) fn other(problem: String) -> Self {
        Self {
            key: None,
            given: None,
            problem,
        }
    }

    /// An error about `key`, with its value and source looked up in `layers`.
    pub(super) fn setting(key: &str, problem: String, layers: &[Layer]) -> Self {
        let value = merged(layers)
            .ok()
            .and_then(|config| flat(&config).ok())
            .and_then(|mut flat| flat.remove(key));
        let source = layers
            .iter()
            .rev()
            .find(|layer| flat_layer(layer).contains_key(key))
            .map(|layer| layer.label(key));
        Self {
            key: Some(key.to_owned()),
            given: value
                .zip(source)
                .map(|(value, source)| (redact(key, value), source)),
            problem,
        }
    }

    /// From the `config` crate's error, which knows the key but not the layer.
    pub(super) fn from_config(error: config::ConfigError, layers: &[Layer]) -> Self {
        match &error {
            config::ConfigError::Type { key: Some(key), .. }
            | config::ConfigError::At { key: Some(key), .. } => {
                Self::setting(key, problem(&error), layers)
            }
            config::ConfigError::NotFound(key) => {
                Self::setting(key, "missing: every key must have a value".into(), layers)
            }
            config::ConfigError::FileParse { uri, cause } => Self::other(format!(
                "{} is not valid TOML: {cause}",
                uri.as_deref()
                    .map_or_else(|| "a config file".into(), |uri| file_as_given(uri, layers))
            )),
            _ => Self::other(error.to_string()),
        }
    }

    /// Every key set must be one the schema has; serde would only say
    /// `unknown field`, without the variable or file that set it.
    pub(super) fn check_keys(config: &config::Config, layers: &[Layer]) -> Result<(), Self> {
        let known = flat_layer(&Layer::Embedded);
        let Ok(given) = flat(config) else {
            return Ok(()); // deserializing reports it
        };
        let Some(unknown) = given.keys().find(|key| !known.contains_key(*key)) else {
            return Ok(());
        };
        let from_env = layers
            .iter()
            .rev()
            .find(|layer| flat_layer(layer).contains_key(unknown))
            .is_some_and(Layer::is_env);
        let hint = match moved(unknown) {
            Some(keys) => {
                let keys: Vec<String> = keys
                    .iter()
                    .map(|key| match from_env {
                        true => format!("{key} ({})", env_var(key)),
                        false => (*key).to_owned(),
                    })
                    .collect();
                format!("; it moved to {}", keys.join(" or "))
            }
            None => match closest(unknown, &known) {
                Some(key) if from_env => format!("; did you mean {} ({key})?", env_var(key)),
                Some(key) => format!("; did you mean {key}?"),
                None => "; `user-manager config` lists every key".into(),
            },
        };
        Err(Self::setting(unknown, format!("no such key{hint}"), layers))
    }
}

/// Keys that moved into a section of their own, and where they are now.
const MOVED: &[(&str, &[&str])] = &[
    (
        "database.max_connections",
        &[
            "database.sqlite.max_connections",
            "database.postgres.max_connections",
        ],
    ),
    (
        "database.busy_timeout_ms",
        &["database.sqlite.busy_timeout_ms"],
    ),
    ("database.synchronous", &["database.sqlite.synchronous"]),
];

fn moved(key: &str) -> Option<&'static [&'static str]> {
    MOVED
        .iter()
        .find(|(old, _)| *old == key)
        .map(|(_, new)| *new)
}

/// What went wrong, without the `config` crate's ` for key ...` suffix, and
/// its type names in words.
fn problem(error: &config::ConfigError) -> String {
    match error {
        config::ConfigError::Type { expected, .. } => match *expected {
            "a boolean" => "expected true or false".into(),
            other => format!("expected {other}"),
        },
        config::ConfigError::At { error, .. } => problem(error),
        other => other.to_string(),
    }
}

/// The known key nearest to a misspelt one, if it is near enough to be meant.
fn closest<'a>(unknown: &str, known: &'a Flat) -> Option<&'a str> {
    known
        .keys()
        .map(|key| (edit_distance(unknown, key), key.as_str()))
        .min()
        .filter(|(distance, _)| *distance <= 2.max(unknown.len() / 5))
        .map(|(_, key)| key)
}

/// Levenshtein distance, by characters.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

/// The file layer `uri` names, spelt as the operator gave it: the `config`
/// crate reports a file's path relative to the working directory
/// (`../.tmpAB12/c.toml` for `/tmp/.tmpAB12/c.toml`), which is not what was
/// typed after `--config`.
fn file_as_given(uri: &str, layers: &[Layer]) -> String {
    let named = std::fs::canonicalize(uri).ok();
    layers
        .iter()
        .find_map(|layer| match layer {
            Layer::File { path, .. }
                if named.is_some() && std::fs::canonicalize(path).ok() == named =>
            {
                Some(path.display().to_string())
            }
            _ => None,
        })
        .unwrap_or_else(|| uri.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edit_distance_counts_edits() {
        assert_eq!(edit_distance("listn", "listen"), 1);
        assert_eq!(edit_distance("server.listen", "server.listen"), 0);
        assert_eq!(edit_distance("abc", "xyz"), 3);
    }
}
