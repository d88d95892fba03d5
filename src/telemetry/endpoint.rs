//! `GET /metrics`: the Prometheus text format on a plaintext HTTP/1.1
//! listener of its own (`telemetry.metrics_listen`), so a scrape needs no
//! gRPC, TLS or client certificate. Any other path answers 404. Serving
//! ends when the future is dropped: the listener closes and every open
//! connection with it.

use std::{convert::Infallible, net::SocketAddr, time::Duration};

use anyhow::Context as _;
use hyper::{Method, Request, Response, StatusCode, body::Incoming, service::service_fn};
use hyper_util::rt::TokioIo;
use prometheus::{Encoder as _, TextEncoder};
use tokio::{net::TcpListener, task::JoinSet};

/// The event that names the bound address, with `listen` (the test harness
/// reads it, as it reads the gRPC address).
pub const LISTENING: &str = "metrics listener";
/// Connections served at once; more are closed at accept.
const MAX_CONNECTIONS: usize = 64;
/// A connection (keep-alive included) is closed after this long.
const CONNECTION_TIMEOUT: Duration = Duration::from_secs(30);

/// The bound listener, not yet serving.
pub struct MetricsListener {
    listener: TcpListener,
}

impl MetricsListener {
    /// Binds `addr` and logs the address bound (port 0 works).
    pub async fn bind(addr: SocketAddr) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding telemetry.metrics_listen {addr}"))?;
        tracing::info!(listen = %listener.local_addr()?, "{LISTENING}");
        Ok(Self { listener })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves until dropped.
    pub async fn serve(self) {
        let mut connections = JoinSet::new();
        loop {
            let (tcp, peer) = match self.listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::debug!(error = %e, "accepting a metrics connection failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            while connections.try_join_next().is_some() {}
            if connections.len() >= MAX_CONNECTIONS {
                tracing::debug!(%peer, "too many metrics connections; closing this one");
                continue;
            }
            connections.spawn(async move {
                let connection = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tcp), service_fn(answer));
                // A connection still open at the timeout is simply closed.
                if let Ok(Err(e)) = tokio::time::timeout(CONNECTION_TIMEOUT, connection).await {
                    tracing::debug!(%peer, error = %e, "metrics connection");
                }
            });
        }
    }
}

async fn answer(request: Request<Incoming>) -> Result<Response<String>, Infallible> {
    let response = |status, body: String| {
        let mut response = Response::new(body);
        *response.status_mut() = status;
        response
    };
    if request.uri().path() != "/metrics" {
        return Ok(response(
            StatusCode::NOT_FOUND,
            "not found; try /metrics\n".into(),
        ));
    }
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return Ok(response(StatusCode::METHOD_NOT_ALLOWED, String::new()));
    }
    let encoder = TextEncoder::new();
    let families = super::metrics::registry().gather();
    let mut body = String::new();
    if let Err(e) = encoder.encode_utf8(&families, &mut body) {
        tracing::warn!(error = %e, "encoding metrics");
        return Ok(response(StatusCode::INTERNAL_SERVER_ERROR, String::new()));
    }
    let mut ok = response(StatusCode::OK, body);
    if let Ok(value) = encoder.format_type().parse() {
        ok.headers_mut().insert(http::header::CONTENT_TYPE, value);
    }
    Ok(ok)
}
