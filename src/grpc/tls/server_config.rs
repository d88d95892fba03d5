//! The rustls server configuration built from the certificate, key and
//! client CA files, every error naming the setting and the path.

use std::{path::Path, sync::Arc, time::SystemTime};

use anyhow::{Context as _, anyhow, bail};
use tokio_rustls::rustls::{
    self, InconsistentKeys, RootCertStore, ServerConfig,
    pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    server::WebPkiClientVerifier,
};
use x509_cert::{Certificate, der::Decode};

use crate::config::TlsSettings;

/// The configured files' contents.
#[derive(Clone, PartialEq, Eq)]
pub(super) struct Files {
    cert: Vec<u8>,
    key: Vec<u8>,
    client_ca: Option<Vec<u8>>,
}

impl Files {
    pub(super) fn read(settings: &TlsSettings) -> anyhow::Result<Self> {
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

/// A checked configuration from the files, and a description of the leaf.
pub(super) fn build(
    settings: &TlsSettings,
    files: &Files,
) -> anyhow::Result<(Arc<ServerConfig>, String)> {
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
