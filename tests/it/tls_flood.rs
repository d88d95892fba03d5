//! `limits.max_concurrent_tls_handshakes`: connections that never send a
//! ClientHello hold at most the cap of handshakes; past it the server stops
//! accepting (the kernel's backlog holds the rest) instead of spawning a
//! handshake per socket, and handshakes proceed again as soon as the flood's
//! end or time out.

use std::time::Duration;

use crate::common::{spawn_app_in, tls};
use tokio::net::TcpStream;
use tokio_rustls::rustls::{
    RootCertStore,
    pki_types::{CertificateDer, ServerName},
};

const CAP: usize = 2;

#[tokio::test]
async fn silent_connections_hold_at_most_the_cap_of_handshakes() {
    let dir = tempfile::tempdir().unwrap();
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let cert_path = dir.path().join("server.crt");
    let key_path = dir.path().join("server.key");
    std::fs::write(&cert_path, certified.cert.pem()).unwrap();
    std::fs::write(&key_path, certified.signing_key.serialize_pem()).unwrap();
    let app = spawn_app_in(dir, |s| {
        s.server.tls.cert_path = cert_path;
        s.server.tls.key_path = key_path;
        s.limits.max_concurrent_tls_handshakes = CAP;
    })
    .await;

    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(certified.cert.der().to_vec()))
        .unwrap();
    let connector = tls::connector(roots);
    let handshake = || {
        let connector = connector.clone();
        let addr = app.addr;
        async move {
            let tcp = TcpStream::connect(addr).await?;
            connector
                .connect(ServerName::try_from("localhost").unwrap(), tcp)
                .await
        }
    };
    // The server handshakes when nothing holds it.
    tokio::time::timeout(Duration::from_secs(5), handshake())
        .await
        .expect("a handshake in time")
        .expect("a good handshake");

    // A flood of connections that never say a word: the kernel completes
    // their TCP handshakes, the server takes CAP of them and waits.
    let mut flood = Vec::new();
    for _ in 0..10 * CAP {
        flood.push(TcpStream::connect(app.addr).await.unwrap());
    }
    let waiting = tokio::spawn(handshake());
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !waiting.is_finished(),
        "a handshake went through while {CAP} silent connections held the cap"
    );

    // When they go (closed here; by the 10 s handshake timeout otherwise),
    // the server accepts again and the waiting client is served.
    drop(flood);
    tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("the waiting handshake completes once the flood is gone")
        .unwrap()
        .expect("a good handshake");
    app.stop().await;
}
