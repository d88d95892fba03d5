//! Certificate files re-read while serving: a whole new `ServerConfig` is
//! swapped in for new connections when they change; open connections keep
//! theirs.

use std::{
    sync::{Arc, Mutex, PoisonError, RwLock},
    time::Duration,
};

use futures::{StreamExt, stream::BoxStream};
use tokio::task::JoinHandle;
use tokio_rustls::{TlsAcceptor, rustls::ServerConfig};

use super::server_config::{Files, build};
use crate::config::TlsSettings;

/// The server's TLS configuration, swapped when its files change.
pub(crate) struct ReloadingTls {
    settings: TlsSettings,
    current: RwLock<Arc<ServerConfig>>,
    /// What the last reload read, good or bad: a bad pair is reported once,
    /// not at every interval, and retried when the files change again.
    last_read: Mutex<Files>,
}

impl ReloadingTls {
    /// Reads and checks the files; every error names the setting and path.
    pub(crate) fn load(settings: &TlsSettings) -> anyhow::Result<Arc<Self>> {
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
    pub(crate) fn acceptor(&self) -> TlsAcceptor {
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
    pub(crate) fn reload(&self, force: bool) -> anyhow::Result<bool> {
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

    /// Reloads every `interval` (zero: never) and at each of `requests`
    /// (SIGHUP, from `crate::app::signals`), until aborted.
    pub(crate) fn spawn_reloader(
        self: Arc<Self>,
        interval: Duration,
        mut requests: BoxStream<'static, ()>,
    ) -> JoinHandle<()> {
        tokio::spawn(async move {
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
                    Some(()) = requests.next() => true,
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
