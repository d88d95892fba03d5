//! The process's signals, all handled here: SIGTERM and SIGINT stop the
//! server, SIGHUP asks for the TLS files to be re-read.

use futures::{StreamExt, stream::BoxStream};

/// Resolves on SIGTERM (how orchestrators stop us) or SIGINT (Ctrl-C).
pub(super) async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "can't listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut sig) => {
                sig.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "can't listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => tracing::info!("SIGINT received, shutting down"),
        () = terminate => tracing::info!("SIGTERM received, shutting down"),
    }
}

/// One item per SIGHUP: the reload trigger handed to TLS. Never ends; empty
/// where there is no SIGHUP or it can't be listened for.
pub(super) fn reload_requests() -> BoxStream<'static, ()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::hangup()) {
            Ok(hangup) => futures::stream::unfold(hangup, |mut hangup| async move {
                hangup.recv().await?;
                tracing::info!("SIGHUP received, reloading the TLS files");
                Some(((), hangup))
            })
            .boxed(),
            Err(e) => {
                tracing::warn!(error = %e, "can't listen for SIGHUP");
                futures::stream::pending().boxed()
            }
        }
    }
    #[cfg(not(unix))]
    futures::stream::pending().boxed()
}
