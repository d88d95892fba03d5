//! Reads the seed: the original service's JSON, an object keyed by the id as
//! a string, user_type as the enum name. Every entry is validated before the
//! database is touched, so a bad file changes nothing.
//!
//! The repository's `seed/users.json` is compiled in: `seed.path =
//! "embedded"` (the default) imports it, so the binary runs from any
//! directory, installed or copied.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::{
    config::EMBEDDED_SEED,
    domain::{User, UserType, ValidationError},
};

/// The repository's seed, compiled in.
pub(crate) const EMBEDDED: &str = include_str!("../seed/users.json");

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error("seed file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("seed file {path}: not a JSON object of users: {source}")]
    Shape {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("seed file {path}: entry {key:?}: {reason}")]
    Entry {
        path: PathBuf,
        key: String,
        reason: String,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    /// Optional, as the key already says it; must agree with the key if present.
    id: Option<u32>,
    nickname: String,
    mail_address: String,
    user_type: String,
}

/// Reads and validates every user of the seed, in id order: `seed.path`'s
/// value, the compiled-in users for [`EMBEDDED_SEED`], else a file.
pub fn load(path: &Path) -> Result<Vec<User>, SeedError> {
    if path.as_os_str() == EMBEDDED_SEED {
        return parse(path, EMBEDDED);
    }
    let text = std::fs::read_to_string(path).map_err(|source| SeedError::Read {
        path: path.to_owned(),
        source,
    })?;
    parse(path, &text)
}

fn parse(path: &Path, text: &str) -> Result<Vec<User>, SeedError> {
    let entries: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(text).map_err(|source| SeedError::Shape {
            path: path.to_owned(),
            source,
        })?;
    let mut users = entries
        .into_iter()
        .map(|(key, value)| {
            let bad = |reason: String| SeedError::Entry {
                path: path.to_owned(),
                key: key.clone(),
                reason,
            };
            let entry: Entry = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
            let id: u32 = key
                .parse()
                .map_err(|_| bad("the key must be the user's id, a uint32".into()))?;
            if entry.id.is_some_and(|inner| inner != id) {
                return Err(bad(format!(
                    "\"id\" {} differs from the key",
                    entry.id.unwrap_or_default()
                )));
            }
            let user_type = UserType::from_name(&entry.user_type).ok_or_else(|| {
                bad(format!(
                    "user_type {:?} is not one of NORMAL, ADMINISTRATOR, GUEST, DISABLED",
                    entry.user_type
                ))
            })?;
            User::parse(id, entry.nickname, entry.mail_address, user_type.number())
                .map_err(|e: ValidationError| bad(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    users.sort_by_key(|u| u.id);
    Ok(users)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_str(text: &str) -> Result<Vec<User>, SeedError> {
        parse(Path::new("seed.json"), text)
    }

    #[test]
    fn the_shipped_seed_has_the_six_users() {
        let users = load(Path::new("seed/users.json")).unwrap();
        let embedded = load(Path::new(EMBEDDED_SEED)).unwrap();
        assert_eq!(embedded, users, "the embedded seed is seed/users.json");
        let summary: Vec<_> = users
            .iter()
            .map(|u| (u.id.get(), u.nickname.as_str(), u.user_type.name()))
            .collect();
        assert_eq!(
            summary,
            [
                (1, "admin", "ADMINISTRATOR"),
                (2, "guest", "GUEST"),
                (3, "foo", "NORMAL"),
                (4, "troll", "DISABLED"),
                (5, "Zaru", "NORMAL"),
                (6, "Saru", "NORMAL"),
            ]
        );
        assert_eq!(users[0].mail_address.as_str(), "admin@example.com");
    }

    #[test]
    fn errors_name_the_file_and_the_entry() {
        for (text, needle) in [
            (
                r#"{"7": {"nickname": "x", "mail_address": "x@y.z", "user_type": "ROOT"}}"#,
                "\"7\"",
            ),
            (
                r#"{"0": {"nickname": "x", "mail_address": "x@y.z", "user_type": "GUEST"}}"#,
                "invalid id",
            ),
            (
                r#"{"x": {"nickname": "x", "mail_address": "x@y.z", "user_type": "GUEST"}}"#,
                "\"x\"",
            ),
            (
                r#"{"8": {"id": 9, "nickname": "x", "mail_address": "x@y.z", "user_type": "GUEST"}}"#,
                "differs",
            ),
            (
                r#"{"8": {"nickname": "", "mail_address": "x@y.z", "user_type": "GUEST"}}"#,
                "nickname",
            ),
            (
                r#"{"8": {"nickname": "x", "mail_address": "x@y.z"}}"#,
                "user_type",
            ),
            (
                r#"{"8": {"nickname": "x", "mail_address": "x@y.z", "user_type": "GUEST", "age": 3}}"#,
                "age",
            ),
        ] {
            let err = parse_str(text).unwrap_err().to_string();
            assert!(err.starts_with("seed file seed.json"), "{err}");
            assert!(err.contains(needle), "{needle} not in {err}");
        }
    }

    #[test]
    fn non_objects_and_missing_files_are_errors() {
        assert!(matches!(parse_str("[1, 2]"), Err(SeedError::Shape { .. })));
        assert!(matches!(parse_str("{"), Err(SeedError::Shape { .. })));
        assert!(matches!(
            load(Path::new("/nonexistent/seed.json")),
            Err(SeedError::Read { .. })
        ));
    }
}
