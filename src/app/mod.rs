//! Composition: the store prepared (migrations, seed), the UserManager
//! service next to health and reflection, and the server run until a
//! shutdown signal.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use tokio::{net::TcpListener, sync::oneshot, task::AbortHandle};
use tonic::transport::{Server, server::TcpIncoming};
use tonic_health::{pb::health_server::HealthServer, server::HealthService};

use crate::{
    config::Settings,
    grpc::{
        middleware::{
            auth::{AuthLayer, Authorizer},
            deadline::DeadlineLayer,
            drain::drain_pair,
            limits,
            trace::RpcTraceLayer,
        },
        proto::{self, user_manager_server::UserManagerServer},
        service::UserManagerService,
        tls::{self, ReloadingTls},
    },
    health::Health,
    seed,
    store::{SeedOutcome, SqliteStore, UserStore},
};

/// Opens the database, brings its schema up to date and imports the seed
/// once. The seed file is read and checked first, so a bad one fails before
/// the database is touched.
pub async fn prepare_store(settings: &Settings) -> anyhow::Result<SqliteStore> {
    let seed = settings.seed.file().map(seed::load).transpose()?;
    let store = SqliteStore::open(&settings.database).await?;
    store.migrate().await?;
    let outcome = match &seed {
        Some(users) => Some(store.seed(users).await?),
        None => None,
    };
    match outcome {
        Some(SeedOutcome::Imported { users }) => {
            tracing::info!(users, path = %settings.seed.path.display(), "imported the seed");
        }
        Some(SeedOutcome::AlreadyImported) => {
            tracing::info!("seed already imported, leaving the users as they are");
        }
        None => tracing::info!("seeding is off (seed.path is empty)"),
    }
    Ok(store)
}

pub struct Application {
    listener: TcpListener,
    local_addr: SocketAddr,
    store: SqliteStore,
    settings: Settings,
    health: Health,
    health_server: HealthServer<HealthService>,
    /// `server.health_listen`: plaintext, the health service only.
    health_listener: Option<TcpListener>,
    tls: Option<Arc<ReloadingTls>>,
    authorizer: Option<Arc<Authorizer>>,
}

impl Application {
    /// Prepares the store and binds the listener; the port is known (and
    /// connectable) when this returns, so tests can bind port 0.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        // Certificate and token files are checked before the database is touched.
        let tls_settings = &settings.server.tls;
        let tls = tls_settings
            .enabled()
            .then(|| ReloadingTls::load(tls_settings))
            .transpose()?;
        let authorizer = Authorizer::from_settings(&settings.auth)?;
        let store = prepare_store(&settings).await?;
        let listener = TcpListener::bind(settings.server.listen)
            .await
            .with_context(|| format!("binding server.listen {}", settings.server.listen))?;
        let local_addr = listener.local_addr()?;
        let health_listener = match settings.server.health_listen {
            Some(addr) => {
                let listener = TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding server.health_listen {addr}"))?;
                tracing::info!(listen = %listener.local_addr()?, "health-only plaintext listener");
                Some(listener)
            }
            None => None,
        };
        let (health, health_server) = Health::new().await;
        health.set_database_ok(store.check().await.is_ok()).await;
        tracing::info!(
            listen = %local_addr,
            database = %settings.database.url,
            "user-manager ready to serve"
        );
        Ok(Self {
            listener,
            local_addr,
            store,
            settings,
            health,
            health_server,
            health_listener,
            tls,
            authorizer,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until SIGTERM or SIGINT.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        self.run_until(shutdown_signal()).await
    }

    /// Serves until `shutdown` completes, then shuts down in bounded time:
    /// readiness NOT_SERVING at once, the lame-duck delay, the listener
    /// closed, in-flight calls drained up to the drain deadline, remaining
    /// streams cancelled with UNAVAILABLE, the store closed.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        let server_settings = &self.settings.server;
        let (drain_trigger, drain) = drain_pair();
        // v1 for newer grpcurl (it tries v1 first), v1alpha for grpcurl up to
        // 1.8.7 and evans, which speak only that.
        let (reflection_v1, reflection_v1alpha) = if self.settings.reflection.enabled {
            (
                Some(reflection().build_v1()?),
                Some(reflection().build_v1alpha()?),
            )
        } else {
            (None, None)
        };
        let limits = &self.settings.limits;
        let service = UserManagerServer::new(UserManagerService::new(
            self.store.clone(),
            self.health.clone(),
            drain,
        ))
        .max_decoding_message_size(limits.max_message_bytes)
        .max_encoding_message_size(limits.max_message_bytes);
        let (stop_accepting, stopped_accepting) = oneshot::channel::<()>();
        let router = limits::apply(Server::builder(), limits)
            .layer(RpcTraceLayer::new())
            .layer(AuthLayer::new(self.authorizer.clone()))
            .layer(limits::LimitsLayer::new(limits))
            .layer(DeadlineLayer::new(ms(server_settings.request_timeout_ms)))
            .add_service(self.health_server.clone())
            .add_optional_service(reflection_v1)
            .add_optional_service(reflection_v1alpha)
            .add_service(service);
        let stop = async {
            let _ = stopped_accepting.await;
        };
        let mut serving = match self.tls.clone() {
            Some(tls) => {
                let incoming = tls::incoming(self.listener, tls);
                let incoming = limits::with_max_age(incoming, limits);
                tokio::spawn(router.serve_with_incoming_shutdown(incoming, stop))
            }
            None => {
                let incoming = TcpIncoming::from(self.listener).with_nodelay(Some(true));
                let incoming = limits::with_max_age(incoming, limits);
                tokio::spawn(router.serve_with_incoming_shutdown(incoming, stop))
            }
        };
        let checker = self.health.spawn_checker(
            self.store.clone(),
            ms(self.settings.health.check_interval_ms),
        );
        // Until this function returns: probes keep their answers through the
        // drain, and certificates keep reloading.
        let mut background = AbortOnDrop(Vec::new());
        if let Some(listener) = self.health_listener {
            let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
            let health_only = limits::apply(Server::builder(), limits)
                .layer(limits::LimitsLayer::new(limits))
                .add_service(self.health_server)
                .serve_with_incoming(limits::with_max_age(incoming, limits));
            background.0.push(
                tokio::spawn(async move {
                    if let Err(e) = health_only.await {
                        tracing::error!(error = %e, "the health-only listener failed");
                    }
                })
                .abort_handle(),
            );
        }
        if let Some(tls) = &self.tls {
            let interval = ms(server_settings.tls.reload_interval_ms);
            background
                .0
                .push(tls.clone().spawn_reloader(interval).abort_handle());
        }

        tokio::pin!(shutdown);
        let ended_early = tokio::select! {
            result = &mut serving => Some(result),
            () = &mut shutdown => None,
        };
        checker.abort();
        if let Some(result) = ended_early {
            self.store.close().await;
            return result.context("server task")?.context("serving gRPC");
        }

        self.health.shutting_down().await;
        let lame_duck = ms(server_settings.lame_duck_ms);
        if !lame_duck.is_zero() {
            tracing::info!(
                ?lame_duck,
                "NOT_SERVING; still accepting during the lame-duck delay"
            );
            tokio::time::sleep(lame_duck).await;
        }
        let _ = stop_accepting.send(());
        let drain_timeout = ms(server_settings.drain_timeout_ms);
        tracing::info!(?drain_timeout, "listener closed, draining in-flight calls");
        let served = match tokio::time::timeout(drain_timeout, &mut serving).await {
            Ok(result) => result.context("server task")?.context("serving gRPC"),
            Err(_) => {
                tracing::warn!("drain deadline passed, cancelling the remaining calls");
                drain_trigger.fire();
                // Long enough for cancelled streams to send their UNAVAILABLE;
                // whatever is still open after it (a Watch, a silent
                // connection) is dropped.
                if tokio::time::timeout(FINAL_FLUSH, &mut serving)
                    .await
                    .is_err()
                {
                    serving.abort();
                }
                Ok(())
            }
        };
        self.store.close().await;
        tracing::info!("shutdown complete");
        served
    }
}

/// Aborts its tasks when dropped, on every way out of `run_until`.
struct AbortOnDrop(Vec<AbortHandle>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// After the drain deadline, how long cancelled calls get to say so.
const FINAL_FLUSH: Duration = Duration::from_millis(500);

fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
}

/// Reflection over our service and the health service, so `grpcurl
/// describe` works for everything `grpcurl list` shows.
fn reflection() -> tonic_reflection::server::Builder<'static> {
    tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
}

/// Resolves on SIGTERM (how orchestrators stop us) or SIGINT (Ctrl-C).
pub async fn shutdown_signal() {
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
