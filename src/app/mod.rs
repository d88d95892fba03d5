//! Composition: the store prepared (migrations, seed), the UserManager
//! service next to health and reflection behind the middleware, all built
//! by `Application::build`; then served until a shutdown signal.

mod signals;

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use futures::future::BoxFuture;
use tokio::{net::TcpListener, sync::oneshot, task::AbortHandle};
use tonic::transport::{Server, server::TcpIncoming};

use crate::{
    config::Settings,
    grpc::{
        methods::Method,
        middleware::{
            auth::{AuthLayer, Authorizer},
            deadline::DeadlineLayer,
            drain::{DrainLayer, DrainTrigger, drain_pair},
            limits,
            metrics::RpcMetricsLayer,
            trace::RpcTraceLayer,
        },
        proto::{self, user_manager_server::UserManagerServer},
        service::UserManagerService,
        tls::{self, ReloadingTls},
    },
    health::Health,
    seed,
    store::{SeedOutcome, Store, UserStore},
    telemetry::endpoint::MetricsListener,
};

/// `user-manager migrate`: the schema brought up to date and the seed
/// imported, then the store closed (for init containers and jobs).
pub async fn migrate(settings: &Settings) -> anyhow::Result<()> {
    prepare_store(settings).await?.close().await;
    Ok(())
}

/// Opens the database, brings its schema up to date and imports the seed
/// once. The seed file is read and checked first, so a bad one fails before
/// the database is touched.
async fn prepare_store(settings: &Settings) -> anyhow::Result<Store> {
    let seed = settings.seed.file().map(seed::load).transpose()?;
    let store = Store::open(&settings.database).await?;
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

/// The server, built and ready: everything that can fail has been
/// constructed (store, listeners, TLS, authorization, reflection, the
/// layered router); running only serves and shuts down.
pub struct Application {
    local_addr: SocketAddr,
    settings: Settings,
    store: Store,
    health: Health,
    /// The gRPC server on `server.listen`, not yet polled.
    serving: Serving,
    /// Closes `server.listen` (tonic then drains its connections).
    stop_accepting: oneshot::Sender<()>,
    /// Ends the calls still open at the drain deadline.
    drain_trigger: DrainTrigger,
    /// `server.health_listen`: plaintext, the health service only.
    health_only: Option<Serving>,
    /// `telemetry.metrics_listen`: plaintext HTTP, `GET /metrics`.
    metrics: Option<MetricsListener>,
    tls: Option<Arc<ReloadingTls>>,
}

type Serving = BoxFuture<'static, Result<(), tonic::transport::Error>>;

impl Application {
    /// Prepares the store, binds the listeners and builds the server; the
    /// port is known (and connectable) when this returns, so tests can bind
    /// port 0.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        // Certificate and token files are checked before the database is touched.
        let tls_settings = &settings.server.tls;
        let tls = tls_settings
            .enabled()
            .then(|| ReloadingTls::load(tls_settings))
            .transpose()?;
        let authorizer = Authorizer::from_settings(&settings.auth)?;
        // v1 for newer grpcurl (it tries v1 first), v1alpha for grpcurl up to
        // 1.8.7 and evans, which speak only that.
        let (reflection_v1, reflection_v1alpha) = if settings.reflection.enabled {
            (
                Some(reflection().build_v1()?),
                Some(reflection().build_v1alpha()?),
            )
        } else {
            (None, None)
        };
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
        let metrics = match settings.telemetry.metrics_listen {
            Some(addr) => Some(MetricsListener::bind(addr).await?),
            None => None,
        };
        let (health, health_server) = Health::new(Method::SERVICE).await;
        health.set_database_ok(store.check().await.is_ok()).await;

        let limits = &settings.limits;
        let (drain_trigger, drain) = drain_pair();
        let service =
            UserManagerServer::new(UserManagerService::new(store.clone(), health.clone()))
                .max_decoding_message_size(limits.max_message_bytes)
                .max_encoding_message_size(limits.max_message_bytes);
        // Outermost first: metrics and the trace see every status the layers
        // inside them answer with (auth and limits refusals included); the
        // drain is innermost, so every layer sees its end.
        let router = limits::apply(Server::builder(), limits)
            .layer(RpcMetricsLayer::new())
            .layer(RpcTraceLayer::new())
            .layer(AuthLayer::new(authorizer))
            .layer(limits::LimitsLayer::new(limits))
            .layer(DeadlineLayer::new(ms(settings.server.request_timeout_ms)))
            .layer(DrainLayer::new(drain))
            .add_service(health_server.clone())
            .add_optional_service(reflection_v1)
            .add_optional_service(reflection_v1alpha)
            .add_service(service);
        let (stop_accepting, stopped_accepting) = oneshot::channel::<()>();
        let stop = async {
            let _ = stopped_accepting.await;
        };
        let serving: Serving = match tls.clone() {
            Some(tls) => {
                let incoming = tls::incoming(listener, tls, limits.max_concurrent_tls_handshakes);
                let incoming = limits::with_max_age(incoming, limits);
                Box::pin(router.serve_with_incoming_shutdown(incoming, stop))
            }
            None => {
                let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
                let incoming = limits::with_max_age(incoming, limits);
                Box::pin(router.serve_with_incoming_shutdown(incoming, stop))
            }
        };
        let health_only = health_listener.map(|listener| -> Serving {
            let incoming = TcpIncoming::from(listener).with_nodelay(Some(true));
            Box::pin(
                limits::apply(Server::builder(), limits)
                    .layer(limits::LimitsLayer::new(limits))
                    .add_service(health_server)
                    .serve_with_incoming(limits::with_max_age(incoming, limits)),
            )
        });
        tracing::info!(
            listen = %local_addr,
            database = %settings.database.redacted_url(),
            "user-manager ready to serve"
        );
        Ok(Self {
            local_addr,
            settings,
            store,
            health,
            serving,
            stop_accepting,
            drain_trigger,
            health_only,
            metrics,
            tls,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The address `telemetry.metrics_listen` bound, if set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics.as_ref().map(MetricsListener::local_addr)
    }

    /// Serves until SIGTERM or SIGINT.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        self.run_until(signals::shutdown_signal()).await
    }

    /// Serves until `shutdown` completes, then shuts down in bounded time:
    /// readiness NOT_SERVING at once, the lame-duck delay, the listener
    /// closed, in-flight calls drained up to the drain deadline, remaining
    /// calls ended with UNAVAILABLE, the store closed.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        let Self {
            settings,
            store,
            health,
            serving,
            stop_accepting,
            drain_trigger,
            health_only,
            metrics,
            tls,
            ..
        } = self;
        let server_settings = &settings.server;
        let mut serving = tokio::spawn(serving);
        let checker = health.spawn_checker(store.clone(), ms(settings.health.check_interval_ms));
        // Until this function returns: probes keep their answers through the
        // drain, and certificates keep reloading.
        let mut background = AbortOnDrop(Vec::new());
        if let Some(health_only) = health_only {
            background.0.push(
                tokio::spawn(async move {
                    if let Err(e) = health_only.await {
                        tracing::error!(error = %e, "the health-only listener failed");
                    }
                })
                .abort_handle(),
            );
        }
        // Scrapes keep working through the drain; the listener and its
        // connections close with the server, before this returns.
        let metrics = metrics.map(|metrics| tokio::spawn(metrics.serve()));
        if let Some(tls) = tls {
            let interval = ms(server_settings.tls.reload_interval_ms);
            background.0.push(
                tls.spawn_reloader(interval, signals::reload_requests())
                    .abort_handle(),
            );
        }

        tokio::pin!(shutdown);
        let ended_early = tokio::select! {
            result = &mut serving => Some(result),
            () = &mut shutdown => None,
        };
        checker.abort();
        if let Some(result) = ended_early {
            stop_serving_metrics(metrics).await;
            store.close().await;
            return result.context("server task")?.context("serving gRPC");
        }

        health.shutting_down().await;
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
                tracing::warn!(
                    "drain deadline passed, ending the remaining calls with UNAVAILABLE"
                );
                drain_trigger.fire();
                // Long enough for ended calls to send their UNAVAILABLE;
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
        stop_serving_metrics(metrics).await;
        store.close().await;
        tracing::info!("shutdown complete");
        served
    }
}

/// Ends the metrics listener's task and waits until it is gone: its
/// listener and connections are closed when this returns.
async fn stop_serving_metrics(task: Option<tokio::task::JoinHandle<()>>) {
    if let Some(task) = task {
        task.abort();
        let _ = task.await;
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
