//! TLS on server.listen: rustls (ring) through tokio-rustls, with certificate
//! files that are re-read while serving. tonic's own `tls_config` is fixed
//! for the server's life, so connections are accepted and handshaken here and
//! handed to tonic as a stream; tonic's `Connected` impl for the TLS stream
//! puts the client's certificates in each request's extensions.
//!
//! A reload builds a whole new `ServerConfig` (certificate, key and client
//! verifier together) and swaps it in for new connections; open connections
//! keep theirs. A fresh config also means a fresh session cache, so a session
//! resumed after the CA bundle changed can't skip the new verification.

use std::{
    convert::Infallible,
    path::Path,
    pin::Pin,
    sync::{Arc, Mutex, PoisonError, RwLock},
    task::{Context, Poll},
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, anyhow, bail};
use futures::Stream;
use tokio::{
    net::{TcpListener, TcpStream},
    sync::mpsc,
    task::JoinHandle,
};
use tokio_rustls::{
    TlsAcceptor,
    rustls::{
        self, InconsistentKeys, RootCertStore, ServerConfig,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
        server::WebPkiClientVerifier,
    },
    server::TlsStream,
};
use x509_cert::{
    Certificate,
    der::{Decode, Tag, Tagged, asn1::Any, oid::AssociatedOid, oid::db::rfc4519},
    ext::pkix::{SubjectAltName, name::GeneralName},
};

use crate::config::TlsSettings;

/// A client that hasn't finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// After a failed accept (out of file descriptors, say), before the next.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// Handshaken connections waiting for tonic to take them.
const ACCEPTED_QUEUE: usize = 64;

/// The configured files' contents.
#[derive(Clone, PartialEq, Eq)]
struct Files {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

impl Files {
    fn read(settings: &TlsSettings) -> anyhow::Result<Self> {
        fn read(key: &str, path: &Path) -> anyhow::Result<Vec<u8>> {
            std::fs::read(path).with_context(|| format!("{key} {}", path.display()))
        }
        Ok(Files {
            cert: read("server.tls.cert_path", &settings.cert_path)?,
            key: read("server.tls.key_path", &settings.key_path)?,
            client_ca: settings
                .client_ca()
                .map(|path| read("server.tls.client_ca_path", path))
                .transpose()?,
        })
    }
}

/// The server's TLS configuration, swapped when its files change.
pub struct ReloadingTls {
    settings: TlsSettings,
    current: RwLock<Arc<ServerConfig>>,
    /// What the last reload read, good or bad: a bad pair is reported once,
    /// not at every interval, and retried when the files change again.
    last_read: Mutex<Files>,
}

impl ReloadingTls {
    /// Reads and checks the files; every error names the setting and path.
    pub fn load(settings: &TlsSettings) -> anyhow::Result<Arc<Self>> {
        let files = Files::read(settings)?;
        let (config, leaf) = build(settings, &files)?;
        tracing::info!(
            certificate = %leaf,
            client_certificates = if settings.client_ca().is_some() { "required" } else { "not asked for" },
            "TLS on"
        );
        Ok(Arc::new(ReloadingTls {
            settings: settings.clone(),
            current: RwLock::new(config),
            last_read: Mutex::new(files),
        }))
    }

    /// An acceptor with the current configuration, for one connection.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(
            self.current
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone(),
        )
    }

    /// Re-reads the files and swaps the configuration in if they changed
    /// (or `force`) and are good; a bad set leaves the current one serving.
    /// Returns whether it swapped.
    pub fn reload(&self, force: bool) -> anyhow::Result<bool> {
        let files = Files::read(&self.settings)?;
        let mut last_read = self
            .last_read
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if !force && *last_read == files {
            return Ok(false);
        }
        let built = build(&self.settings, &files);
        *last_read = files;
        let (config, leaf) = built?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = config;
        tracing::info!(certificate = %leaf, "TLS files reloaded; new connections use them");
        Ok(true)
    }

    /// Reloads every `interval` (zero: never) and on SIGHUP, until aborted.
    pub fn spawn_reloader(self: Arc<Self>, interval: Duration) -> JoinHandle<()> {
        tokio::spawn(async move {
            let mut hangup = hangup_signals();
            let mut ticks = (!interval.is_zero()).then(|| {
                let mut ticks =
                    tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
                ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                ticks
            });
            let mut last_error: Option<String> = None;
            loop {
                let force = tokio::select! {
                    () = next_tick(&mut ticks) => false,
                    Some(()) = next_hangup(&mut hangup) => {
                        tracing::info!("SIGHUP received, reloading the TLS files");
                        true
                    }
                };
                let tls = self.clone();
                let outcome = tokio::task::spawn_blocking(move || tls.reload(force)).await;
                match outcome.map_err(anyhow::Error::from).and_then(|r| r) {
                    Ok(_) => last_error = None,
                    Err(e) => {
                        let error = format!("{e:#}");
                        if force || last_error.as_ref() != Some(&error) {
                            tracing::warn!(
                                error = %error,
                                "TLS files not reloaded; still serving the previous certificate"
                            );
                        }
                        last_error = Some(error);
                    }
                }
            }
        })
    }
}

async fn next_tick(ticks: &mut Option<tokio::time::Interval>) {
    match ticks {
        Some(ticks) => {
            ticks.tick().await;
        }
        None => std::future::pending().await,
    }
}

#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = ();

#[cfg(unix)]
fn hangup_signals() -> Hangup {
    use tokio::signal::unix::{SignalKind, signal};
    signal(SignalKind::hangup())
        .inspect_err(|e| tracing::warn!(error = %e, "can't listen for SIGHUP"))
        .ok()
}

#[cfg(not(unix))]
fn hangup_signals() -> Hangup {}

#[cfg(unix)]
async fn next_hangup(hangup: &mut Hangup) -> Option<()> {
    match hangup {
        Some(signal) => signal.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(not(unix))]
async fn next_hangup(_: &mut Hangup) -> Option<()> {
    std::future::pending().await
}

/// A checked configuration from the files, and a description of the leaf.
fn build(settings: &TlsSettings, files: &Files) -> anyhow::Result<(Arc<ServerConfig>, String)> {
    let cert_path = settings.cert_path.display();
    let key_path = settings.key_path.display();
    let chain = CertificateDer::pem_slice_iter(&files.cert)
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("server.tls.cert_path {cert_path}: not a PEM file"))?;
    let Some(leaf) = chain.first() else {
        bail!("server.tls.cert_path {cert_path}: no CERTIFICATE block in it");
    };
    let leaf = describe(leaf).with_context(|| format!("server.tls.cert_path {cert_path}"))?;
    // The key's own parse errors could quote it: say only what was expected.
    let key = PrivateKeyDer::from_pem_slice(&files.key).map_err(|_| {
        anyhow!(
            "server.tls.key_path {key_path}: no PEM private key in it \
             (PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY)"
        )
    })?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = match (&files.client_ca, settings.client_ca()) {
        (Some(pem), Some(path)) => {
            let path = path.display();
            let mut roots = RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert
                    .with_context(|| format!("server.tls.client_ca_path {path}: not a PEM file"))?;
                roots.add(cert).with_context(|| {
                    format!("server.tls.client_ca_path {path}: a bad CA certificate")
                })?;
            }
            if roots.is_empty() {
                bail!("server.tls.client_ca_path {path}: no CERTIFICATE block in it");
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .with_context(|| format!("server.tls.client_ca_path {path}"))?;
            builder.with_client_cert_verifier(verifier)
        }
        _ => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| match e {
        rustls::Error::InconsistentKeys(InconsistentKeys::KeyMismatch) => anyhow!(
            "server.tls.key_path {key_path} is not the key of the certificate in \
             server.tls.cert_path {cert_path}"
        ),
        other => anyhow!("server.tls.key_path {key_path}: {other}"),
    })?;
    // gRPC is HTTP/2; clients such as grpc-go insist on negotiating it.
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok((Arc::new(config), leaf))
}

/// "subject CN=…, serial …, valid until …", warning if it has expired.
fn describe(leaf: &CertificateDer<'_>) -> anyhow::Result<String> {
    let cert = Certificate::from_der(leaf).context("the first certificate can't be parsed")?;
    let tbs = &cert.tbs_certificate;
    let not_after = tbs.validity.not_after;
    if not_after.to_system_time() < SystemTime::now() {
        tracing::warn!(%not_after, "the TLS certificate has expired; clients will refuse it");
    }
    Ok(format!(
        "subject {}, serial {}, valid until {not_after}",
        tbs.subject, tbs.serial_number
    ))
}

/// The names a client certificate claims: subject common names, and DNS
/// names and URIs among its subject alternative names.
pub fn subject_names(cert: &CertificateDer<'_>) -> Vec<String> {
    let Ok(cert) = Certificate::from_der(cert) else {
        return Vec::new();
    };
    let tbs = &cert.tbs_certificate;
    let common_names = tbs
        .subject
        .0
        .iter()
        .flat_map(|rdn| rdn.0.iter())
        .filter(|attribute| attribute.oid == rfc4519::CN)
        .filter_map(|attribute| directory_string(&attribute.value));
    let alt_names = tbs
        .extensions
        .iter()
        .flatten()
        .filter(|extension| extension.extn_id == SubjectAltName::OID)
        .filter_map(|extension| SubjectAltName::from_der(extension.extn_value.as_bytes()).ok())
        .flat_map(|san| san.0)
        .filter_map(|name| match name {
            GeneralName::DnsName(name) | GeneralName::UniformResourceIdentifier(name) => {
                Some(name.to_string())
            }
            _ => None,
        });
    common_names.chain(alt_names).collect()
}

/// A DirectoryString's text, for the string types certificates use.
fn directory_string(value: &Any) -> Option<String> {
    match value.tag() {
        Tag::Utf8String | Tag::PrintableString | Tag::Ia5String => {
            std::str::from_utf8(value.value()).ok().map(str::to_owned)
        }
        _ => None,
    }
}

/// Handshaken TLS connections from `listener`, for tonic's
/// `serve_with_incoming_shutdown`. Handshakes run concurrently, each on its
/// own task, so a slow client delays no one. Dropping this (tonic does when
/// it stops accepting) closes the listener.
pub struct TlsIncoming {
    accepted: mpsc::Receiver<TlsStream<TcpStream>>,
    accepting: JoinHandle<()>,
}

pub fn incoming(listener: TcpListener, tls: Arc<ReloadingTls>) -> TlsIncoming {
    let (handshaken, accepted) = mpsc::channel(ACCEPTED_QUEUE);
    let accepting = tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(connection) => connection,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a connection failed");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            // As tonic's own TcpIncoming is set up in server.rs.
            let _ = tcp.set_nodelay(true);
            let acceptor = tls.acceptor();
            let handshaken = handshaken.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(stream)) => {
                        let _ = handshaken.send(stream).await;
                    }
                    Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                }
            });
        }
    });
    TlsIncoming {
        accepted,
        accepting,
    }
}

impl Stream for TlsIncoming {
    type Item = Result<TlsStream<TcpStream>, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.accepted.poll_recv(cx).map(|stream| stream.map(Ok))
    }
}

impl Drop for TlsIncoming {
    fn drop(&mut self) {
        self.accepting.abort();
    }
}
