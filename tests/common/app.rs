//! The server in the test process, through the same `Application::build`
//! path as `main`, on an ephemeral port with a temporary database.

use std::{net::SocketAddr, path::Path};

use tempfile::TempDir;
use tokio::{sync::oneshot, task::JoinHandle};
use tonic::transport::Channel;
use user_manager::{
    app::Application, config::Settings, proto::user_manager_client::UserManagerClient,
};

use super::SEED;

/// Settings for a test server: loopback, port 0, a database in `dir`.
pub fn test_settings(dir: &Path) -> Settings {
    let mut settings = Settings::embedded_default();
    settings.server.listen = "127.0.0.1:0".parse().unwrap();
    settings.database.url = format!("sqlite://{}", super::db_path(dir).display());
    settings.seed.path = SEED.into();
    settings
}

pub struct TestApp {
    pub addr: SocketAddr,
    /// The metrics listener's address, when `telemetry.metrics_listen` is set.
    pub metrics: Option<SocketAddr>,
    pub dir: TempDir,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<anyhow::Result<()>>,
}

/// The storage backends a test can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A file in the test's temporary directory.
    Sqlite,
    /// A fresh database on the test PostgreSQL (`super::postgres`).
    Postgres,
}

/// A server with a fresh, seeded database.
pub async fn spawn_app() -> TestApp {
    spawn_app_on(Backend::Sqlite).await
}

/// A server with a fresh, seeded database on `backend`.
pub async fn spawn_app_on(backend: Backend) -> TestApp {
    let url = database_url(backend).await;
    spawn_app_in(tempfile::tempdir().unwrap(), move |s| {
        if let Some(url) = url {
            s.database.url = url;
        }
    })
    .await
}

/// A fresh database's URL on `backend`, or `None` for SQLite's default
/// file in the test's directory.
pub async fn database_url(backend: Backend) -> Option<String> {
    match backend {
        Backend::Sqlite => None,
        Backend::Postgres => Some(super::postgres::fresh_database().await),
    }
}

/// A server over the database in `dir`, with settings adjusted by `adjust`.
pub async fn spawn_app_in(dir: TempDir, adjust: impl FnOnce(&mut Settings)) -> TestApp {
    let mut settings = test_settings(dir.path());
    adjust(&mut settings);
    let app = Application::build(settings).await.expect("server builds");
    let addr = app.local_addr();
    let metrics = app.metrics_addr();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(app.run_until(async {
        let _ = stopped.await;
    }));
    TestApp {
        addr,
        metrics,
        dir,
        stop: Some(stop),
        task,
    }
}

impl TestApp {
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn channel(&self) -> Channel {
        super::connect(self.url()).await
    }

    pub async fn client(&self) -> UserManagerClient<Channel> {
        UserManagerClient::new(self.channel().await)
    }

    /// Stops the server gracefully and hands back its database directory.
    pub async fn stop(mut self) -> TempDir {
        let _ = self.stop.take().unwrap().send(());
        self.task
            .await
            .expect("server task did not panic")
            .expect("server stopped cleanly");
        self.dir
    }
}
