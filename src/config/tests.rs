use std::path::Path;

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

fn env_error(pairs: &[(&str, &str)]) -> String {
    with_env(pairs).unwrap_err().to_string()
}

#[test]
fn embedded_defaults_are_the_documented_ones() {
    let s = Settings::embedded_default();
    assert_eq!(s.server.listen, "[::]:1234".parse().unwrap());
    assert_eq!(s.database.url, "sqlite://data/users.db");
    assert_eq!(s.seed.file(), Some(Path::new(EMBEDDED_SEED)));
    assert!(s.seed.is_embedded());
    assert_eq!(s.log.format, LogFormat::Pretty);
    assert_eq!(s.database.sqlite.synchronous, Synchronous::Full);
    assert_eq!(s.database.backend(), Some(Backend::Sqlite));
}

#[test]
fn environment_overrides_with_double_underscores() {
    let s = with_env(&[
        ("USER_MANAGER__SERVER__LISTEN", "127.0.0.1:9000"),
        ("USER_MANAGER__DATABASE__SQLITE__MAX_CONNECTIONS", "9"),
        ("USER_MANAGER__LOG__FORMAT", "json"),
        ("USER_MANAGER__SEED__PATH", ""),
        ("USER_MANAGER__DATABASE__SQLITE__SYNCHRONOUS", "normal"),
        ("USER_MANAGER__SERVER__HEALTH_LISTEN", ""),
    ])
    .unwrap();
    assert_eq!(s.server.listen, "127.0.0.1:9000".parse().unwrap());
    assert_eq!(s.database.sqlite.max_connections, 9);
    assert_eq!(s.log.format, LogFormat::Json);
    assert_eq!(s.database.sqlite.synchronous, Synchronous::Normal);
    assert_eq!(s.seed.file(), None);
    assert_eq!(s.server.health_listen, None);
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

/// Each bad value's error names the key, the exact variable, the value given
/// and what is allowed, in words rather than Rust's.
#[test]
fn bad_values_name_key_source_value_and_what_is_allowed() {
    for (key, value, expected) in [
        (
            "USER_MANAGER__LOG__FORMAT",
            "xml",
            "log.format = \"xml\" (env USER_MANAGER__LOG__FORMAT): \
             expected one of \"pretty\", \"json\"",
        ),
        (
            "USER_MANAGER__DATABASE__SQLITE__SYNCHRONOUS",
            "off",
            "database.sqlite.synchronous = \"off\" (env USER_MANAGER__DATABASE__SQLITE__SYNCHRONOUS): \
             expected one of \"normal\", \"full\"",
        ),
        (
            "USER_MANAGER__SERVER__LISTEN",
            "nonsense",
            "server.listen = \"nonsense\" (env USER_MANAGER__SERVER__LISTEN): \
             expected an IP address and port, e.g. \"127.0.0.1:1234\" or \"[::]:1234\"",
        ),
        (
            "USER_MANAGER__SERVER__HEALTH_LISTEN",
            "nowhere",
            "server.health_listen = \"nowhere\" (env USER_MANAGER__SERVER__HEALTH_LISTEN): \
             expected an IP address and port",
        ),
        (
            "USER_MANAGER__LIMITS__MAX_MESSAGE_BYTES",
            "-1",
            "limits.max_message_bytes = -1 (env USER_MANAGER__LIMITS__MAX_MESSAGE_BYTES): \
             expected a whole number from 0 to 18446744073709551615",
        ),
        (
            "USER_MANAGER__DATABASE__SQLITE__MAX_CONNECTIONS",
            "lots",
            "database.sqlite.max_connections = \"lots\" (env USER_MANAGER__DATABASE__SQLITE__MAX_CONNECTIONS): \
             expected a whole number from 0 to 4294967295",
        ),
        (
            "USER_MANAGER__DATABASE__SQLITE__MAX_CONNECTIONS",
            "4294967296",
            "expected a whole number from 0 to 4294967295",
        ),
        (
            "USER_MANAGER__DATABASE__POSTGRES__MAX_CONNECTIONS",
            "0",
            "database.postgres.max_connections = 0 (env USER_MANAGER__DATABASE__POSTGRES__MAX_CONNECTIONS): \
             must be at least 1",
        ),
        (
            "USER_MANAGER__REFLECTION__ENABLED",
            "maybe",
            "reflection.enabled = \"maybe\" (env USER_MANAGER__REFLECTION__ENABLED): \
             expected true or false",
        ),
        (
            "USER_MANAGER__DATABASE__URL",
            "mysql://x",
            "database.url = \"mysql://x\" (env USER_MANAGER__DATABASE__URL): \
             expected a sqlite:, postgres:// or postgresql:// URL",
        ),
        (
            "USER_MANAGER__DATABASE__SYNCHRONOUS",
            "full",
            "database.synchronous = \"full\" (env USER_MANAGER__DATABASE__SYNCHRONOUS): \
             no such key; it moved to database.sqlite.synchronous \
             (USER_MANAGER__DATABASE__SQLITE__SYNCHRONOUS)",
        ),
        (
            "USER_MANAGER__DATABASE__MAX_CONNECTIONS",
            "4",
            "database.max_connections = 4 (env USER_MANAGER__DATABASE__MAX_CONNECTIONS): \
             no such key; it moved to database.sqlite.max_connections \
             (USER_MANAGER__DATABASE__SQLITE__MAX_CONNECTIONS) or \
             database.postgres.max_connections (USER_MANAGER__DATABASE__POSTGRES__MAX_CONNECTIONS)",
        ),
        (
            "USER_MANAGER__LOG__LEVEL",
            "info,[",
            "log.level = \"info,[\" (env USER_MANAGER__LOG__LEVEL): not a tracing filter",
        ),
        (
            "USER_MANAGER__LIMITS__MAX_MESSAGE_BYTES",
            "10",
            "limits.max_message_bytes = 10 (env USER_MANAGER__LIMITS__MAX_MESSAGE_BYTES): \
             must be at least 1024",
        ),
    ] {
        let err = env_error(&[(key, value)]);
        assert!(
            err.starts_with("invalid configuration: ") && err.contains(expected),
            "{key}={value}:\n  got      {err}\n  expected {expected}"
        );
        for rust in ["variant constructor", "64 bit", "syntax", "invalid type"] {
            assert!(!err.contains(rust), "{key}={value}: Rust's words in {err}");
        }
    }
}

#[test]
fn a_misspelt_variable_is_named_as_given_with_the_nearest_key() {
    let err = env_error(&[("USER_MANAGER__SERVER__LISTN", "x")]);
    assert_eq!(
        err,
        "invalid configuration: server.listn = \"x\" (env USER_MANAGER__SERVER__LISTN): \
         no such key; did you mean USER_MANAGER__SERVER__LISTEN (server.listen)?"
    );
    // Spelt in lower case, it is still named as given.
    let err = env_error(&[("user_manager__log__formt", "json")]);
    assert!(
        err.contains("(env user_manager__log__formt)")
            && err.contains("did you mean USER_MANAGER__LOG__FORMAT"),
        "{err}"
    );
    let err = env_error(&[("USER_MANAGER__NOTHING__LIKE_IT", "1")]);
    assert!(
        err.contains("nothing.like_it") && err.contains("`user-manager config` lists every key"),
        "{err}"
    );
}

#[test]
fn errors_in_a_file_name_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    std::fs::write(&file, "[log]\nformat = \"xml\"\n[server]\nlistn = 1\n").unwrap();
    let load = |file: &Path| {
        Settings::load_from(Sources {
            file: Some(file.to_owned()),
            env: Some(config::Map::new()),
            ..Sources::default()
        })
        .unwrap_err()
        .to_string()
    };
    let err = load(&file);
    assert!(
        err.contains(&format!("server.listn = 1 (file {})", file.display()))
            && err.contains("did you mean server.listen?"),
        "{err}"
    );
    std::fs::write(&file, "[log]\nformat = \"xml\"\n").unwrap();
    let err = load(&file);
    assert!(
        err.contains(&format!("log.format = \"xml\" (file {})", file.display())),
        "{err}"
    );
    std::fs::write(&file, "[log\n").unwrap();
    let err = load(&file);
    assert!(err.contains(&file.display().to_string()), "{err}");
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
    assert_eq!(find("database.sqlite.max_connections").value, "4");
    let url = find("database.url").value;
    assert!(
        !url.contains("hunter2") && url.contains("<redacted>"),
        "{url}"
    );
    // Values are redacted, emptiness and paths are not.
    assert_eq!(find("auth.read_tokens").value, "[]");
    assert_eq!(find("auth.tokens_file").value, "\"\"");
}

#[test]
fn database_urls_lose_their_passwords() {
    use super::explain::redact_url;
    for (url, shown) in [
        (
            "postgres://app:hunter2@db:5432/users",
            "postgres://app:<redacted>@db:5432/users",
        ),
        (
            "postgresql://app:p@ss/w0rd@db/users?sslmode=require",
            "postgresql://app:<redacted>@db/users?sslmode=require",
        ),
        (
            "postgres://app@db/users?password=hunter2&sslmode=disable",
            "postgres://app@db/users?password=<redacted>&sslmode=disable",
        ),
        (
            "postgres:///users?host=/run/pg",
            "postgres:///users?host=/run/pg",
        ),
        ("sqlite://data/users.db", "sqlite://data/users.db"),
    ] {
        assert_eq!(redact_url(url), shown);
    }
}

#[test]
fn database_url_picks_the_backend() {
    let mut s = Settings::embedded_default();
    for (url, backend) in [
        ("sqlite://data/users.db", Some(Backend::Sqlite)),
        ("sqlite::memory:", Some(Backend::Sqlite)),
        ("postgres://u@h/db", Some(Backend::Postgres)),
        ("postgresql://u@h/db", Some(Backend::Postgres)),
        ("mysql://u@h/db", None),
    ] {
        s.database.url = url.into();
        assert_eq!(s.database.backend(), backend, "{url}");
    }
}

#[test]
fn redaction_hides_values_not_emptiness_or_paths() {
    use super::explain::redact;
    assert_eq!(
        redact("auth.write_token", "\"abc\"".into()),
        "\"<redacted>\""
    );
    assert_eq!(
        redact("auth.write_tokens", "[\"a\",\"b\"]".into()),
        "[\"<redacted>\", \"<redacted>\"]"
    );
    assert_eq!(redact("auth.write_tokens", "[]".into()), "[]");
    assert_eq!(redact("x.password", "\"\"".into()), "\"\"");
    assert_eq!(
        redact("auth.tokens_file", "\"/run/tokens\"".into()),
        "\"/run/tokens\""
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
            "(env USER_MANAGER__AUTH__READ_TOKENS): entry 2",
        ),
        (
            &[("USER_MANAGER__SERVER__HEALTH_LISTEN", "nowhere")],
            "health_listen",
        ),
    ] {
        let err = env_error(pairs);
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
    assert_eq!(line.value, "[\"<redacted>\"]");
}

#[test]
fn token_rule() {
    assert!(check_token("0123456789abcdef").is_ok());
    assert!(check_token("short").is_err());
    let why = check_token("0123456789 abcdef").unwrap_err();
    assert!(!why.contains("abcdef"), "{why}");
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
