//! Security, against the real server: TLS and mTLS on server.listen,
//! certificates rotated while serving (by polling and on SIGHUP), startup
//! errors for bad files, the plaintext health-only listener, bearer tokens
//! and client-certificate subjects as scopes, secrets kept out of the logs
//! and `user-manager config`, the `healthcheck` TLS flags and the TLS
//! deployment variants. Certificates are made per test. (The supply-chain policy,
//! `cargo deny`, is a step of .ci/run: it needs a tool, not the server.)

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::Output,
    time::Duration,
};

use crate::{
    common::{
        self, Binary, ServerProcess, eventually, grpc_frame, health_status, raw_grpc_call, tls,
        tools::{REPO, run_tool_ok as run_tool, text},
        user,
    },
    k8s::{self, Manifests},
};
use futures::stream;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use serde_norway::Value;
use tokio_rustls::rustls::{
    RootCertStore,
    pki_types::{CertificateDer, ServerName},
};
use tonic::{
    Code, Request, Status,
    metadata::{Ascii, MetadataValue},
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity},
};
use tonic_health::pb::health_check_response::ServingStatus;
use user_manager::{
    config::{Secret, Settings, Sources},
    proto::{UserRequest, UserTypeRequest, user_manager_client::UserManagerClient},
};

const GUEST: i32 = 3;
const ADMINISTRATOR: i32 = 2;
const READ_TOKEN: &str = "read-token-3f9c2a71d8e4b6a0";
const WRITE_TOKEN: &str = "write-token-8b1e6d0c4a7f2953";

// ---------------------------------------------------------------- certificates

/// A certificate authority made for one test.
pub(crate) struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// A certificate and its key, as PEM, and the certificate as DER.
pub(crate) struct Leaf {
    cert_pem: String,
    key_pem: String,
    der: Vec<u8>,
}

impl Ca {
    pub(crate) fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().unwrap();
        let pem = params.self_signed(&key).unwrap().pem();
        Ca {
            pem,
            issuer: Issuer::new(params, key),
        }
    }

    fn issue(
        &self,
        common_name: &str,
        alt_names: Vec<SanType>,
        usage: ExtendedKeyUsagePurpose,
    ) -> Leaf {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.subject_alt_names = alt_names;
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }

    /// A server certificate for `localhost`, the name clients verify.
    pub(crate) fn server(&self) -> Leaf {
        let localhost = SanType::DnsName("localhost".try_into().unwrap());
        self.issue(
            "user-manager",
            vec![localhost],
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    pub(crate) fn client(&self, common_name: &str, alt_names: Vec<SanType>) -> Leaf {
        self.issue(common_name, alt_names, ExtendedKeyUsagePurpose::ClientAuth)
    }
}

/// The server's files in `dir`: its certificate and key, and the CA bundle
/// client certificates are checked against.
pub(crate) struct TlsFiles {
    cert: PathBuf,
    key: PathBuf,
    client_ca: PathBuf,
}

impl TlsFiles {
    pub(crate) fn write(dir: &Path, server: &Leaf, client_ca: &Ca) -> Self {
        let files = TlsFiles {
            cert: dir.join("server.crt"),
            key: dir.join("server.key"),
            client_ca: dir.join("client-ca.crt"),
        };
        files.replace(server);
        std::fs::write(&files.client_ca, &client_ca.pem).unwrap();
        files
    }

    /// Swaps in a new certificate and key the way a secret update does: each
    /// file replaced whole by a rename, the key first.
    fn replace(&self, server: &Leaf) {
        for (path, text) in [(&self.key, &server.key_pem), (&self.cert, &server.cert_pem)] {
            let partial = path.with_extension("partial");
            std::fs::write(&partial, text).unwrap();
            std::fs::rename(&partial, path).unwrap();
        }
    }

    /// As the environment: TLS on, mTLS with `mtls`.
    pub(crate) fn env(&self, mtls: bool) -> Vec<(String, String)> {
        let mut env = vec![
            env_var("SERVER__TLS__CERT_PATH", self.cert.display()),
            env_var("SERVER__TLS__KEY_PATH", self.key.display()),
        ];
        if mtls {
            env.push(env_var(
                "SERVER__TLS__CLIENT_CA_PATH",
                self.client_ca.display(),
            ));
        }
        env
    }

    fn apply(&self, settings: &mut Settings, mtls: bool) {
        settings.server.tls.cert_path = self.cert.clone();
        settings.server.tls.key_path = self.key.clone();
        if mtls {
            settings.server.tls.client_ca_path = self.client_ca.clone();
        }
    }
}

fn env_var(key: &str, value: impl std::fmt::Display) -> (String, String) {
    (format!("USER_MANAGER__{key}"), value.to_string())
}

// ---------------------------------------------------------------- clients

/// A channel to `addr` over TLS, trusting `ca`, presenting `identity`.
pub(crate) async fn tls_channel(
    addr: SocketAddr,
    ca: &Ca,
    identity: Option<&Leaf>,
) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(&ca.pem))
        .domain_name("localhost");
    if let Some(leaf) = identity {
        tls = tls.identity(Identity::from_pem(&leaf.cert_pem, &leaf.key_pem));
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(5))
        .tls_config(tls)?
        .connect()
        .await
}

fn plaintext_channel(addr: SocketAddr) -> Channel {
    Endpoint::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect_lazy()
}

/// Adds `authorization: Bearer TOKEN` to every call, if there is a token.
#[derive(Clone)]
struct Bearer(Option<MetadataValue<Ascii>>);

impl Bearer {
    fn new(token: Option<&str>) -> Self {
        Bearer(token.map(|t| format!("Bearer {t}").parse().unwrap()))
    }
}

impl Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

type Client = UserManagerClient<InterceptedService<Channel, Bearer>>;

fn client(channel: Channel, token: Option<&str>) -> Client {
    UserManagerClient::with_interceptor(channel, Bearer::new(token))
}

fn code<T>(result: Result<T, Status>) -> Code {
    result.err().map_or(Code::Ok, |status| status.code())
}

/// GetUser over `channel`: the nickname of user 1, or the failure.
async fn get_admin(channel: Channel, token: Option<&str>) -> Result<String, Status> {
    let reply = client(channel, token)
        .get_user(UserRequest { id: 1 })
        .await?
        .into_inner();
    Ok(reply.user.expect("user 1 is seeded").nickname)
}

/// Each of the five RPCs once, in proto order; AddUser adds user `new_id`.
/// The streams are read to their end, so a failure anywhere counts.
async fn every_rpc(client: &mut Client, new_id: u32) -> [(&'static str, Code); 5] {
    let get_user = client.get_user(UserRequest { id: 1 }).await;
    let add_user = client
        .add_user(user(new_id, &format!("sec{new_id}"), GUEST))
        .await
        .and_then(|reply| match reply.into_inner().error {
            false => Ok(()),
            true => Err(Status::internal("AddUser answered error")),
        });
    let count = client
        .count_already_users(stream::iter(vec![UserRequest { id: 1 }]))
        .await;
    let by_type = async {
        let mut replies = client
            .get_users_by_type(UserTypeRequest {
                user_type: ADMINISTRATOR,
            })
            .await?
            .into_inner();
        let mut n = 0;
        while replies.message().await?.is_some() {
            n += 1;
        }
        assert!(n > 0, "the seed has an administrator");
        Ok::<_, Status>(())
    }
    .await;
    let by_ids = async {
        let mut replies = client
            .get_users_by_ids(stream::iter(vec![
                UserRequest { id: 1 },
                UserRequest { id: 2 },
            ]))
            .await?
            .into_inner();
        while replies.message().await?.is_some() {}
        Ok::<_, Status>(())
    }
    .await;
    [
        ("GetUser", code(get_user)),
        ("AddUser", code(add_user)),
        ("CountAlreadyUsers", code(count)),
        ("GetUsersByType", code(by_type)),
        ("GetUsersByIds", code(by_ids)),
    ]
}

fn expect(codes: [(&'static str, Code); 5], add_user: Code, others: Code, who: &str) {
    for (method, got) in codes {
        let want = if method == "AddUser" {
            add_user
        } else {
            others
        };
        assert_eq!(got, want, "{method} with {who}");
    }
}

/// The certificate a new TLS connection to `addr` is served, verified
/// against `ca` for `localhost`.
async fn served_certificate(addr: SocketAddr, ca: &Ca) -> Result<Vec<u8>, std::io::Error> {
    let mut roots = RootCertStore::empty();
    for cert in rustls_pemfile_certs(&ca.pem) {
        roots.add(cert).unwrap();
    }
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let tls = tls::connector(roots)
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await?;
    let (_, session) = tls.get_ref();
    Ok(session.peer_certificates().unwrap()[0].to_vec())
}

fn rustls_pemfile_certs(pem: &str) -> Vec<CertificateDer<'static>> {
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap()
}

// ---------------------------------------------------------------- the binary

/// `user-manager` configured by `env` over the database in `dir`, with a
/// health-only listener to tell when it is up (server.listen may speak TLS).
fn binary(dir: &Path, env: &[(String, String)]) -> Binary {
    Binary::new(dir).health_listener().envs(env)
}

/// SIGTERM, a clean exit, then the whole log.
async fn stop(server: &mut ServerProcess) -> String {
    let status = server.sigterm_and_wait(Duration::from_secs(30)).await;
    assert!(status.success(), "exit {status}");
    server.log()
}

// ---------------------------------------------------------------- TLS

#[tokio::test]
async fn tls_serves_clients_that_trust_its_ca_and_no_one_in_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("server CA");
    let files = TlsFiles::write(dir.path(), &ca.server(), &ca);
    let app = common::spawn_app_in(dir, |s| files.apply(s, false)).await;

    let channel = tls_channel(app.addr, &ca, None).await.unwrap();
    assert_eq!(get_admin(channel.clone(), None).await.unwrap(), "admin");
    let mut tls_client = client(channel, None);
    expect(
        every_rpc(&mut tls_client, 7001).await,
        Code::Ok,
        Code::Ok,
        "TLS",
    );

    let stranger = Ca::new("another CA");
    assert!(
        tls_channel(app.addr, &stranger, None).await.is_err(),
        "a client that doesn't trust the server's CA must not connect"
    );
    let plaintext = get_admin(plaintext_channel(app.addr), None).await;
    assert!(plaintext.is_err(), "plaintext on a TLS port: {plaintext:?}");
}

#[tokio::test]
async fn mtls_refuses_clients_without_a_certificate_or_with_another_cas() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let files = TlsFiles::write(dir.path(), &server_ca.server(), &client_ca);
    let app = common::spawn_app_in(dir, |s| files.apply(s, true)).await;

    let good = client_ca.client("reporting", vec![]);
    let channel = tls_channel(app.addr, &server_ca, Some(&good))
        .await
        .unwrap();
    assert_eq!(get_admin(channel, None).await.unwrap(), "admin");

    // TLS 1.3 clients finish their side of the handshake before the server
    // has checked their certificate, so the refusal may come at connect or
    // at the first call.
    let forged = Ca::new("client CA").client("reporting", vec![]);
    for (who, identity) in [("no certificate", None), ("another CA's", Some(&forged))] {
        let outcome = match tls_channel(app.addr, &server_ca, identity).await {
            Ok(channel) => get_admin(channel, None).await.map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        assert!(outcome.is_err(), "{who}: {outcome:?}");
    }
}

#[tokio::test]
async fn a_rotated_certificate_is_served_to_new_connections_while_old_ones_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("server CA");
    let first = ca.server();
    let files = TlsFiles::write(dir.path(), &first, &ca);
    let app = common::spawn_app_in(dir, |s| {
        files.apply(s, false);
        s.server.tls.reload_interval_ms = 100;
    })
    .await;
    assert_eq!(served_certificate(app.addr, &ca).await.unwrap(), first.der);
    let old_connection = tls_channel(app.addr, &ca, None).await.unwrap();

    let second = ca.server();
    assert_ne!(first.der, second.der);
    files.replace(&second);
    eventually(
        Duration::from_secs(10),
        "a new connection gets the new certificate",
        || async { served_certificate(app.addr, &ca).await.ok().as_ref() == Some(&second.der) },
    )
    .await;
    assert_eq!(
        get_admin(old_connection, None).await.unwrap(),
        "admin",
        "a connection made before the rotation still serves calls"
    );
    let new_connection = tls_channel(app.addr, &ca, None).await.unwrap();
    assert_eq!(get_admin(new_connection, None).await.unwrap(), "admin");
}

#[tokio::test]
async fn sighup_reloads_and_a_mismatched_pair_leaves_the_old_certificate_serving() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("server CA");
    let first = ca.server();
    let files = TlsFiles::write(dir.path(), &first, &ca);
    let mut env = files.env(false);
    // No polling: only SIGHUP reloads.
    env.push(env_var("SERVER__TLS__RELOAD_INTERVAL_MS", 0));
    let mut server = binary(dir.path(), &env).start().await;
    assert_eq!(
        served_certificate(server.addr, &ca).await.unwrap(),
        first.der
    );

    // A new certificate with the old key: refused, and said so.
    let second = ca.server();
    std::fs::write(&files.cert, &second.cert_pem).unwrap();
    let seen = server.log().len();
    server.signal("HUP");
    let seen = server.wait_for_log(seen, "TLS files not reloaded").await;
    assert!(
        server.log().contains("is not the key of the certificate"),
        "{}",
        server.log()
    );
    assert_eq!(
        served_certificate(server.addr, &ca).await.unwrap(),
        first.der
    );

    files.replace(&second);
    server.signal("HUP");
    server.wait_for_log(seen, "TLS files reloaded").await;
    assert_eq!(
        served_certificate(server.addr, &ca).await.unwrap(),
        second.der
    );
    stop(&mut server).await;
}

/// `serve` with `env`: it must fail before touching the database, and say
/// `expected` on stderr.
fn assert_refuses_to_start(env: &[(String, String)], expected: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let output = Binary::new(dir.path()).envs(env).arg("serve").output();
    let stderr = text(&output.stderr);
    assert!(!output.status.success(), "started with {env:?}");
    for needle in expected {
        assert!(stderr.contains(needle), "{needle:?} not in:\n{stderr}");
    }
    assert!(
        !dir.path().join("users.db").exists(),
        "the database was touched"
    );
}

#[test]
fn missing_unreadable_or_mismatched_files_stop_the_server_at_startup() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("server CA");
    let files = TlsFiles::write(dir.path(), &ca.server(), &ca);
    let env = |overrides: &[(&str, String)]| {
        let mut env = files.env(true);
        for (key, value) in overrides {
            env.retain(|(k, _)| *k != format!("USER_MANAGER__{key}"));
            env.push(env_var(key, value));
        }
        env
    };
    let missing = dir.path().join("missing.crt");
    assert_refuses_to_start(
        &env(&[("SERVER__TLS__CERT_PATH", missing.display().to_string())]),
        &[
            "server.tls.cert_path",
            &missing.display().to_string(),
            "No such file",
        ],
    );
    // A directory can't be read, even by root.
    assert_refuses_to_start(
        &env(&[("SERVER__TLS__KEY_PATH", dir.path().display().to_string())]),
        &["server.tls.key_path", "Is a directory"],
    );
    let other_key = dir.path().join("other.key");
    std::fs::write(&other_key, ca.server().key_pem).unwrap();
    assert_refuses_to_start(
        &env(&[("SERVER__TLS__KEY_PATH", other_key.display().to_string())]),
        &["is not the key of the certificate", "server.tls.cert_path"],
    );
    let garbage = dir.path().join("garbage");
    std::fs::write(&garbage, "not a key\n").unwrap();
    assert_refuses_to_start(
        &env(&[("SERVER__TLS__KEY_PATH", garbage.display().to_string())]),
        &["server.tls.key_path", "no PEM private key"],
    );
    assert_refuses_to_start(
        &env(&[("SERVER__TLS__CLIENT_CA_PATH", garbage.display().to_string())]),
        &["server.tls.client_ca_path", "no CERTIFICATE"],
    );
    assert_refuses_to_start(
        &env(&[("SERVER__TLS__KEY_PATH", String::new())]),
        &["server.tls", "cert_path and key_path go together"],
    );
    assert_refuses_to_start(
        &[env_var("AUTH__ENABLED", true)],
        &["auth.enabled", "no credential could pass"],
    );
    assert_refuses_to_start(
        &[
            env_var("AUTH__ENABLED", true),
            env_var("AUTH__WRITE_TOKENS", "short"),
        ],
        &["auth.write_tokens", "entry 1", "at least 16"],
    );
}

// ---------------------------------------------------------------- health listener

#[tokio::test]
async fn the_health_listener_answers_health_in_plaintext_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("server CA");
    let files = TlsFiles::write(dir.path(), &ca.server(), &ca);
    // The binary, which reports the health-only listener's address.
    let app = binary(dir.path(), &files.env(true)).start().await;
    let health = app.health.unwrap();
    let url = format!("http://{health}");
    for service in ["", "readiness", "liveness", "UserManager"] {
        assert_eq!(
            health_status(&url, service).await,
            Some(ServingStatus::Serving),
            "{service:?}"
        );
    }
    let get_user = raw_grpc_call(
        health,
        "/UserManager/GetUser",
        &[],
        grpc_frame(&UserRequest { id: 1 }),
        false,
    )
    .await;
    assert_eq!(get_user.grpc_status, Some(Code::Unimplemented as i32));
    let reflection = raw_grpc_call(
        health,
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        &[],
        bytes::Bytes::new(),
        false,
    )
    .await;
    assert_eq!(reflection.grpc_status, Some(Code::Unimplemented as i32));
    assert_eq!(
        health_status(&format!("http://{}", app.addr), "").await,
        None,
        "server.listen speaks TLS only"
    );
}

// ---------------------------------------------------------------- authorization

#[tokio::test]
async fn tokens_gate_every_rpc_by_scope_and_health_stays_open() {
    let app = common::spawn_app_in(tempfile::tempdir().unwrap(), |s| {
        s.auth.enabled = true;
        s.auth.read_tokens = vec![Secret::from(READ_TOKEN)];
        s.auth.write_tokens = vec![Secret::from(WRITE_TOKEN)];
    })
    .await;
    let channel = app.channel().await;
    let callers = [
        (None, Code::Unauthenticated, Code::Unauthenticated),
        (
            Some("read-token-0000000000000000"),
            Code::Unauthenticated,
            Code::Unauthenticated,
        ),
        (Some(READ_TOKEN), Code::PermissionDenied, Code::Ok),
        (Some(WRITE_TOKEN), Code::Ok, Code::Ok),
    ];
    for (n, (token, add_user, others)) in callers.into_iter().enumerate() {
        let mut caller = client(channel.clone(), token);
        let who = format!("token {token:?}");
        expect(
            every_rpc(&mut caller, 7100 + n as u32).await,
            add_user,
            others,
            &who,
        );
    }
    // Only the write token's AddUser reached the database.
    let mut reader = client(channel, Some(READ_TOKEN));
    for (n, (_, add_user, _)) in callers.into_iter().enumerate() {
        let id = 7100 + n as u32;
        let reply = reader
            .get_user(UserRequest { id })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(reply.user.is_some(), add_user == Code::Ok, "user {id}");
    }
    assert_eq!(
        health_status(&app.url(), "").await,
        Some(ServingStatus::Serving),
        "health needs no token"
    );
}

#[tokio::test]
async fn client_certificate_subjects_map_to_scopes() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let files = TlsFiles::write(dir.path(), &server_ca.server(), &client_ca);
    let importer = "spiffe://example.org/ns/jobs/sa/importer";
    let app = common::spawn_app_in(dir, |s| {
        files.apply(s, true);
        s.auth.enabled = true;
        s.auth.write_tokens = vec![Secret::from(WRITE_TOKEN)];
        s.auth.read_subjects = vec!["reporting".into()];
        s.auth.write_subjects = vec!["ops.example.org".into(), importer.into()];
    })
    .await;
    let dns = |name: &str| SanType::DnsName(name.try_into().unwrap());
    let uri = |name: &str| SanType::URI(name.try_into().unwrap());
    let cases = [
        // Common name → read.
        ("reporting", vec![], None, Code::PermissionDenied, Code::Ok),
        // DNS name → write.
        (
            "ops",
            vec![dns("ops.example.org")],
            None,
            Code::Ok,
            Code::Ok,
        ),
        // URI (SPIFFE ID) → write.
        ("importer", vec![uri(importer)], None, Code::Ok, Code::Ok),
        // A good certificate that maps to nothing: no scope.
        (
            "stranger",
            vec![dns("stranger.example.org")],
            None,
            Code::Unauthenticated,
            Code::Unauthenticated,
        ),
        // ... unless it brings a token.
        ("stranger", vec![], Some(WRITE_TOKEN), Code::Ok, Code::Ok),
        // A token adds to a certificate's scope.
        ("reporting", vec![], Some(WRITE_TOKEN), Code::Ok, Code::Ok),
    ];
    for (n, (common_name, alt_names, token, add_user, others)) in cases.into_iter().enumerate() {
        let identity = client_ca.client(common_name, alt_names);
        let channel = tls_channel(app.addr, &server_ca, Some(&identity))
            .await
            .unwrap();
        let mut client = client(channel, token);
        let who = format!("{common_name}'s certificate, token {token:?}");
        expect(
            every_rpc(&mut client, 7200 + n as u32).await,
            add_user,
            others,
            &who,
        );
    }
}

// ---------------------------------------------------------------- secrets

#[tokio::test]
async fn no_token_or_key_reaches_the_logs_or_the_config_output() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let server_leaf = server_ca.server();
    let files = TlsFiles::write(dir.path(), &server_leaf, &client_ca);
    let file_token = "file-token-5d2c8e0a9b7f1364";
    let forged_token = "forged-token-c0ffee0ddba11000";
    let tokens_file = dir.path().join("tokens");
    std::fs::write(&tokens_file, format!("# ops\nwrite {file_token}\n")).unwrap();
    let mut env = files.env(true);
    env.extend([
        env_var("LOG__LEVEL", "debug"),
        env_var("AUTH__ENABLED", true),
        env_var("AUTH__READ_TOKENS", format!("{READ_TOKEN},")),
        env_var("AUTH__WRITE_TOKENS", WRITE_TOKEN),
        env_var("AUTH__TOKENS_FILE", tokens_file.display()),
        env_var("AUTH__READ_SUBJECTS", "reporting"),
    ]);
    let mut server = binary(dir.path(), &env).start().await;
    let identity = client_ca.client("someone", vec![]);
    let channel = tls_channel(server.addr, &server_ca, Some(&identity))
        .await
        .unwrap();
    let calls = [
        (READ_TOKEN, Code::PermissionDenied, Code::Ok),
        (WRITE_TOKEN, Code::Ok, Code::Ok),
        (file_token, Code::Ok, Code::Ok),
        (forged_token, Code::Unauthenticated, Code::Unauthenticated),
    ];
    for (n, (token, add_user, others)) in calls.into_iter().enumerate() {
        let mut client = client(channel.clone(), Some(token));
        expect(
            every_rpc(&mut client, 7300 + n as u32).await,
            add_user,
            others,
            token,
        );
    }
    let log = stop(&mut server).await;

    let config = binary(dir.path(), &env).arg("config").output();
    assert!(config.status.success(), "{}", text(&config.stderr));
    let config = text(&config.stdout);
    for key in ["auth.read_tokens", "auth.write_tokens"] {
        let line = config
            .lines()
            .find(|line| line.starts_with(&format!("{key} =")))
            .unwrap_or_else(|| panic!("{key} in:\n{config}"));
        assert!(line.contains("<redacted>"), "{line}");
    }

    // The log did record the calls, refusals included...
    for needle in [
        "TLS on",
        "authorization on",
        "call refused",
        "Unauthenticated",
    ] {
        assert!(log.contains(needle), "{needle:?} not in the log:\n{log}");
    }
    // ...but no secret, in the log or in `config`: no token, presented or
    // configured, and no line of the server's private key.
    let key_lines = server_leaf
        .key_pem
        .lines()
        .filter(|line| !line.starts_with("-----"));
    let secrets = [READ_TOKEN, WRITE_TOKEN, file_token, forged_token]
        .into_iter()
        .chain(key_lines);
    for secret in secrets {
        assert!(!log.contains(secret), "{secret:?} is in the log");
        assert!(!config.contains(secret), "{secret:?} is in `config`");
    }
}

// ---------------------------------------------------------------- healthcheck

#[tokio::test]
async fn healthcheck_speaks_tls_with_a_client_certificate_or_uses_the_health_listener() {
    let dir = tempfile::tempdir().unwrap();
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let files = TlsFiles::write(dir.path(), &server_ca.server(), &client_ca);
    let mut server = binary(dir.path(), &files.env(true)).start().await;
    let probe = client_ca.client("probe", vec![]);
    let pem = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let (ca, cert, key) = (
        pem("probe-ca.crt", &server_ca.pem),
        pem("probe.crt", &probe.cert_pem),
        pem("probe.key", &probe.key_pem),
    );
    let addr = server.addr.to_string();
    let healthcheck = |args: &[&str]| -> Output {
        Binary::new(dir.path())
            .env("USER_MANAGER__SERVER__LISTEN", server.addr)
            .env(
                "USER_MANAGER__SERVER__HEALTH_LISTEN",
                server.health.unwrap(),
            )
            .arg("healthcheck")
            .args(args)
            .output()
    };
    let tls = [
        "--addr",
        &addr,
        "--tls",
        "--ca",
        &ca,
        "--server-name",
        "localhost",
    ];
    let with_identity = [&tls[..], &["--cert", &cert, "--key", &key]].concat();
    let output = healthcheck(&with_identity);
    assert!(output.status.success(), "{}", text(&output.stderr));
    assert_eq!(text(&output.stdout).trim(), "SERVING");

    let without = healthcheck(&tls);
    assert_eq!(without.status.code(), Some(1), "mTLS wants a certificate");
    let plaintext = healthcheck(&["--addr", &addr]);
    assert_eq!(
        plaintext.status.code(),
        Some(1),
        "server.listen is TLS only"
    );
    // Without --addr and --tls: the health-only listener, as compose and the
    // image's HEALTHCHECK ask it.
    let default = healthcheck(&["--service", "readiness"]);
    assert!(default.status.success(), "{}", text(&default.stderr));
    let no_ca = healthcheck(&["--addr", &addr, "--tls"]);
    assert_eq!(no_ca.status.code(), Some(2), "--tls needs --ca");
    stop(&mut server).await;
}

// ---------------------------------------------------------------- deployment

const TLS_OVERLAY: &str = "deploy/k8s/overlays/tls";

#[tokio::test]
async fn the_tls_overlay_validates_and_its_settings_serve_over_tls_with_probes_on_the_health_port()
{
    let rendered = k8s::kustomize(TLS_OVERLAY);
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), &rendered).unwrap();
    for version in ["1.30.0", "1.37.0"] {
        run_tool(
            "kubernetes-validate",
            &[
                "--strict",
                "--quiet",
                "--kubernetes-version",
                version,
                file.path().to_str().unwrap(),
            ],
            "scripts/test installs it from tests/requirements.txt",
        );
    }
    let manifests = Manifests::parse(TLS_OVERLAY, &rendered);
    let pod = manifests.pod();
    let server = pod
        .containers
        .iter()
        .find(|c| c.name == "user-manager")
        .unwrap();
    let config_toml = manifests
        .config_maps
        .iter()
        .find_map(|c| c.data.get("config.toml"))
        .unwrap();

    // The settings the container gets: the ConfigMap's file and its environment.
    let work = tempfile::tempdir().unwrap();
    let config_file = work.path().join("config.toml");
    std::fs::write(&config_file, config_toml).unwrap();
    let env: BTreeMap<String, String> = server
        .env
        .iter()
        .filter(|var| var.name.starts_with("USER_MANAGER__"))
        .map(|var| (var.name.clone(), var.value.clone().expect("a plain value")))
        .collect();
    let settings = Settings::load_from(Sources {
        app_env: None,
        file: Some(config_file.clone()),
        env: Some(env.clone().into_iter().collect()),
    })
    .unwrap();
    assert!(settings.server.tls.enabled() && settings.server.tls.client_ca().is_some());
    assert!(settings.auth.enabled && settings.auth.tokens_file().is_some());
    assert!(!settings.reflection.enabled, "production: no reflection");
    let health = settings.server.health_listen.expect("server.health_listen");
    assert_ne!(health.port(), settings.server.listen.port());
    for probe in [
        &server.startup_probe,
        &server.readiness_probe,
        &server.liveness_probe,
    ] {
        let probe = probe.as_ref().unwrap();
        assert_eq!(
            probe.grpc.port,
            health.port(),
            "probes can't speak TLS: {probe:?}"
        );
    }
    assert!(
        server
            .ports
            .iter()
            .any(|p| p.container_port == health.port())
    );

    // Every file the server reads comes from a Secret mounted as a directory
    // (a subPath mount would never see a renewed certificate).
    let secret_of = |path: &Path| {
        let mount = server
            .volume_mounts
            .iter()
            .find(|m| path.parent() == Some(Path::new(&m.mount_path)))
            .unwrap_or_else(|| panic!("no mount holds {}", path.display()));
        assert!(mount.sub_path.is_none(), "{}: subPath", mount.mount_path);
        let volume = pod.volumes.iter().find(|v| v.name == mount.name).unwrap();
        volume
            .secret
            .as_ref()
            .unwrap_or_else(|| panic!("{} is not a Secret", mount.name))
            .secret_name
            .clone()
    };
    let tls = &settings.server.tls;
    for path in [&tls.cert_path, &tls.key_path, &tls.client_ca_path] {
        assert_eq!(secret_of(path), "user-manager-tls");
    }
    // The keys cert-manager writes, and the README's kubectl create secret.
    let names: Vec<_> = [&tls.cert_path, &tls.key_path, &tls.client_ca_path]
        .iter()
        .map(|p| p.file_name().unwrap().to_str().unwrap())
        .collect();
    assert_eq!(names, ["tls.crt", "tls.key", "ca.crt"]);
    let tokens_path = settings.auth.tokens_file().unwrap().to_owned();
    assert_eq!(secret_of(&tokens_path), "user-manager-tokens");

    // Run the binary with those settings, the Secrets' files laid out in a
    // temporary directory and the ports on loopback.
    let server_ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let leaf = server_ca.server();
    let relocate = |path: &Path| work.path().join(path.strip_prefix("/").unwrap());
    for (path, contents) in [
        (&tls.cert_path, leaf.cert_pem.clone()),
        (&tls.key_path, leaf.key_pem.clone()),
        (&tls.client_ca_path, client_ca.pem.clone()),
        (
            &tokens_path,
            format!("read {READ_TOKEN}\nwrite {WRITE_TOKEN}\n"),
        ),
    ] {
        let target = relocate(path);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::write(target, contents).unwrap();
    }
    let mut launch_env: Vec<(String, String)> = env
        .into_iter()
        .filter(|(name, _)| !name.ends_with("__HEALTH_LISTEN"))
        .map(|(name, value)| {
            let value = if value.starts_with('/') {
                relocate(Path::new(&value)).display().to_string()
            } else {
                value
            };
            (name, value)
        })
        .collect();
    launch_env.push(env_var("LOG__FORMAT", "pretty"));
    let config_arg = config_file.display().to_string();
    let mut running = binary(work.path(), &launch_env)
        .args(["--config", &config_arg, "serve"])
        .start()
        .await;
    for probe in [
        &server.startup_probe,
        &server.readiness_probe,
        &server.liveness_probe,
    ] {
        let service = probe.as_ref().unwrap().grpc.service.as_str();
        assert_eq!(
            health_status(&running.health_url().unwrap(), service).await,
            Some(ServingStatus::Serving),
            "probe of {service:?}"
        );
    }
    let identity = client_ca.client("reporting", vec![]);
    let channel = tls_channel(running.addr, &server_ca, Some(&identity))
        .await
        .unwrap();
    let mut reader = client(channel, Some(READ_TOKEN));
    expect(
        every_rpc(&mut reader, 7400).await,
        Code::PermissionDenied,
        Code::Ok,
        "the overlay's read token",
    );
    stop(&mut running).await;
}

#[test]
fn the_compose_tls_variant_mounts_its_files_and_keeps_the_healthcheck_in_plaintext() {
    let files = [
        "-f",
        "deploy/compose.yaml",
        "-f",
        "deploy/compose.tls.yaml",
        "config",
    ];
    let comes_from =
        "scripts/test installs it into target/compose-venv (tests/requirements-compose.txt)";
    run_tool(
        "docker-compose",
        &[&files[..], &["-q"]].concat(),
        comes_from,
    );
    let merged: Value =
        serde_norway::from_str(&run_tool("docker-compose", &files, comes_from)).unwrap();
    let service = &merged["services"]["user-manager"];
    let env = &service["environment"];
    let var = |name: &str| {
        env[format!("USER_MANAGER__{name}").as_str()]
            .as_str()
            .unwrap_or_else(|| panic!("{name} in {env:?}"))
            .to_owned()
    };
    let volumes: Vec<&str> = service["volumes"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    let tls_dir = format!("{REPO}/deploy/tls");
    let mount = volumes
        .iter()
        .find_map(|v| v.strip_prefix(&format!("{tls_dir}:")))
        .unwrap_or_else(|| panic!("deploy/tls is mounted: {volumes:?}"));
    let (target, mode) = mount.split_once(':').unwrap();
    assert_eq!(mode, "ro");
    for name in [
        "SERVER__TLS__CERT_PATH",
        "SERVER__TLS__KEY_PATH",
        "SERVER__TLS__CLIENT_CA_PATH",
        "AUTH__TOKENS_FILE",
    ] {
        let path = var(name);
        assert_eq!(
            Path::new(&path).parent(),
            Some(Path::new(target)),
            "{name}: in the mounted directory, not a file mount"
        );
    }
    assert_eq!(var("AUTH__ENABLED"), "true");
    assert_eq!(var("REFLECTION__ENABLED"), "false");
    let health: SocketAddr = var("SERVER__HEALTH_LISTEN").parse().unwrap();
    // The health check asks the default address, which is the health-only
    // listener when one is set (tested above with the binary).
    let test: Vec<&str> = service["healthcheck"]["test"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(test.contains(&"healthcheck"), "{test:?}");
    assert!(
        !test.contains(&"--addr") && !test.contains(&"--tls"),
        "{test:?}"
    );
    assert_ne!(health.port(), 1234);
}
