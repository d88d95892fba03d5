//! Composition: the store prepared (migrations, seed), the UserManager
//! service next to health and reflection, and the server run until a
//! shutdown signal.

use std::{future::Future, net::SocketAddr};

use anyhow::Context;
use tokio::net::TcpListener;
use tonic::transport::{Server, server::TcpIncoming};
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::{
    config::Settings,
    proto::{self, user_manager_server::UserManagerServer},
    seed,
    service::UserManagerService,
    store::{SeedOutcome, SqliteStore, UserStore},
};

/// The health names that follow the service's readiness: the whole server
/// ("") and the UserManager service.
pub const READINESS_SERVICES: [&str; 2] = ["", "UserManager"];

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
    health: HealthReporter,
    health_service:
        tonic_health::pb::health_server::HealthServer<tonic_health::server::HealthService>,
}

impl Application {
    /// Prepares the store and binds the listener; the port is known (and
    /// connectable) when this returns, so tests can bind port 0.
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let store = prepare_store(&settings).await?;
        let listener = TcpListener::bind(settings.server.listen)
            .await
            .with_context(|| format!("binding server.listen {}", settings.server.listen))?;
        let local_addr = listener.local_addr()?;
        let health = HealthReporter::new();
        for name in READINESS_SERVICES {
            health
                .set_service_status(name, ServingStatus::NotServing)
                .await;
        }
        let health_service = tonic_health::pb::health_server::HealthServer::new(
            tonic_health::server::HealthService::from_health_reporter(health.clone()),
        );
        tracing::info!(
            listen = %local_addr,
            database = %settings.database.url,
            "user-manager ready to serve"
        );
        Ok(Self {
            listener,
            local_addr,
            store,
            health,
            health_service,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Serves until SIGTERM or SIGINT.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        self.run_until(shutdown_signal()).await
    }

    /// Serves until `shutdown` completes, then closes the store.
    pub async fn run_until(self, shutdown: impl Future<Output = ()> + Send) -> anyhow::Result<()> {
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()?;
        let service = UserManagerServer::new(UserManagerService::new(self.store.clone()));

        for name in READINESS_SERVICES {
            self.health
                .set_service_status(name, ServingStatus::Serving)
                .await;
        }
        let incoming = TcpIncoming::from(self.listener).with_nodelay(Some(true));
        let served = Server::builder()
            .layer(crate::rpc_trace::RpcTraceLayer::new())
            .add_service(self.health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await;
        self.store.close().await;
        served.context("serving gRPC")
    }
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
