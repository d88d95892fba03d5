//! The one TLS client the raw-TLS tests use (the tonic-based ones go through
//! `ClientTlsConfig`): rustls with ring, trusting only `roots`.

use std::sync::Arc;

use tokio_rustls::{
    TlsConnector,
    rustls::{ClientConfig, RootCertStore},
};

/// A connector that verifies servers against `roots` and offers no client
/// certificate.
pub fn connector(roots: RootCertStore) -> TlsConnector {
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    TlsConnector::from(Arc::new(config))
}
