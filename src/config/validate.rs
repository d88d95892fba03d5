//! What serde can't check: cross-field and semantic constraints. Each error
//! is `(key, problem)`; [`super::ConfigError::setting`] adds the value and
//! where it came from.

use super::{DATABASE_SCHEMES, LimitsSettings, Settings};

/// The shortest token accepted: guessing one is out of reach.
pub const MIN_TOKEN_LEN: usize = 16;

/// Whether `token` may be used: long enough, and visible ASCII only, as HTTP
/// header values are. The reason never quotes the token. This is the rule;
/// configuration checks it before anything starts, and token files are read
/// with it.
pub fn check_token(token: &str) -> Result<(), String> {
    if token.len() < MIN_TOKEN_LEN {
        return Err(format!("a token needs at least {MIN_TOKEN_LEN} characters"));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err("a token is visible ASCII characters only (no spaces)".into());
    }
    Ok(())
}

type Invalid = (String, String);

fn bad(key: &str, why: impl Into<String>) -> Result<(), Invalid> {
    Err((key.to_owned(), why.into()))
}

impl Settings {
    pub(super) fn validate(&self) -> Result<(), Invalid> {
        if self.database.backend().is_none() {
            return bad(
                "database.url",
                format!(
                    "expected a {DATABASE_SCHEMES} URL, e.g. \"sqlite://data/users.db\" \
                     or \"postgres://user:password@host:5432/users\""
                ),
            );
        }
        // Both sections are checked whatever runs, so switching backends
        // never meets an error that was there all along.
        if self.database.sqlite.max_connections == 0 {
            return bad("database.sqlite.max_connections", "must be at least 1");
        }
        if self.database.postgres.max_connections == 0 {
            return bad("database.postgres.max_connections", "must be at least 1");
        }
        if self.database.postgres.connect_timeout_ms == 0 {
            return bad("database.postgres.connect_timeout_ms", "must be at least 1");
        }
        self.limits.validate()?;
        if let Err(e) = tracing_subscriber::EnvFilter::builder().parse(&self.log.level) {
            return bad(
                "log.level",
                format!(
                    "not a tracing filter ({e}): expected a level (\"error\", \"warn\", \
                     \"info\", \"debug\", \"trace\") or directives like \"info,sqlx=warn\""
                ),
            );
        }
        let tls = &self.server.tls;
        if tls.enabled() == tls.key_path.as_os_str().is_empty() {
            return bad(
                "server.tls",
                "cert_path and key_path go together: set both or neither",
            );
        }
        if tls.client_ca().is_some() && !tls.enabled() {
            return bad(
                "server.tls.client_ca_path",
                "client certificates (mTLS) need TLS: set cert_path and key_path too",
            );
        }
        if self.server.health_listen == Some(self.server.listen) && self.server.listen.port() != 0 {
            return bad("server.health_listen", "must differ from server.listen");
        }
        let auth = &self.auth;
        let subjects = !auth.read_subjects.is_empty() || !auth.write_subjects.is_empty();
        if subjects && tls.client_ca().is_none() {
            let key = if auth.read_subjects.is_empty() {
                "auth.write_subjects"
            } else {
                "auth.read_subjects"
            };
            return bad(
                key,
                "mapping client-certificate subjects needs server.tls.client_ca_path (mTLS)",
            );
        }
        for (key, tokens) in [
            ("auth.read_tokens", &auth.read_tokens),
            ("auth.write_tokens", &auth.write_tokens),
        ] {
            // Empty entries (a trailing comma) are skipped.
            for (n, token) in tokens.iter().enumerate() {
                if !token.expose().is_empty()
                    && let Err(why) = check_token(token.expose())
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
                 auth.write_tokens, auth.read_subjects or auth.write_subjects",
            );
        }
        Ok(())
    }
}

impl LimitsSettings {
    fn validate(&self) -> Result<(), Invalid> {
        // A valid User (64 four-byte characters, a 254-byte address) encodes
        // to about 530 bytes; a smaller limit would refuse valid requests.
        const SMALLEST_MESSAGE_LIMIT: usize = 1024;
        if self.max_message_bytes < SMALLEST_MESSAGE_LIMIT {
            return bad(
                "limits.max_message_bytes",
                format!("must be at least {SMALLEST_MESSAGE_LIMIT}"),
            );
        }
        for (key, value) in [
            (
                "limits.max_concurrent_streams",
                self.max_concurrent_streams as usize,
            ),
            (
                "limits.max_calls_per_connection",
                self.max_calls_per_connection,
            ),
            ("limits.max_open_streams", self.max_open_streams),
            (
                "limits.max_concurrent_tls_handshakes",
                self.max_concurrent_tls_handshakes,
            ),
        ] {
            if value == 0 {
                return bad(key, "must be at least 1");
            }
        }
        if self.max_calls_per_connection > self.max_concurrent_streams as usize {
            return bad(
                "limits.max_calls_per_connection",
                format!(
                    "{} is more than limits.max_concurrent_streams ({}), so it could never shed",
                    self.max_calls_per_connection, self.max_concurrent_streams
                ),
            );
        }
        Ok(())
    }
}
