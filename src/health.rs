//! Health that tells the truth. Readiness ("", the service's own name, e.g.
//! "UserManager", and "readiness")
//! follows a periodic database check and goes NOT_SERVING for good at
//! shutdown; liveness ("liveness") stays SERVING while the process can answer,
//! so a database outage takes the pod out of rotation without a restart loop.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::task::JoinHandle;
use tonic_health::{
    ServingStatus,
    pb::health_server::HealthServer,
    server::{HealthReporter, HealthService},
};

use crate::store::UserStore;

/// Health names that follow the database and shutdown, besides the served
/// service's own name.
pub(crate) const READINESS: [&str; 2] = ["", "readiness"];
/// Health name for liveness probes.
pub(crate) const LIVENESS: &str = "liveness";

#[derive(Clone)]
pub(crate) struct Health {
    reporter: HealthReporter,
    /// [`READINESS`] and the served service's name.
    readiness: [&'static str; 3],
    state: Arc<State>,
}

#[derive(Default)]
struct State {
    database_ok: AtomicBool,
    /// Whether a check has been recorded yet.
    checked: AtomicBool,
    shutting_down: AtomicBool,
    /// Serialises status changes so a late check can't undo a shutdown.
    changes: tokio::sync::Mutex<()>,
}

impl Health {
    /// Readiness starts NOT_SERVING: nothing is ready until the store is.
    /// `service` is the served service's name (the proto's, which the
    /// composition passes in), so clients can ask for it by name.
    pub(crate) async fn new(service: &'static str) -> (Self, HealthServer<HealthService>) {
        let reporter = HealthReporter::new();
        let readiness = [READINESS[0], service, READINESS[1]];
        for name in readiness {
            reporter
                .set_service_status(name, ServingStatus::NotServing)
                .await;
        }
        reporter
            .set_service_status(LIVENESS, ServingStatus::Serving)
            .await;
        crate::instruments::get().set_ready(false);
        let server = HealthServer::new(HealthService::from_health_reporter(reporter.clone()));
        let health = Self {
            reporter,
            readiness,
            state: Arc::default(),
        };
        (health, server)
    }

    /// Whether the last check could read the database; calls are refused
    /// with UNAVAILABLE while it can't (open connections may still read a
    /// file that was deleted, so their answers would be stale).
    pub(crate) fn database_ok(&self) -> bool {
        self.state.database_ok.load(Ordering::Acquire)
    }

    /// Records a check's result; readiness follows unless shutting down.
    pub(crate) async fn set_database_ok(&self, ok: bool) {
        let _changing = self.state.changes.lock().await;
        let was = self.state.database_ok.swap(ok, Ordering::AcqRel);
        let first = !self.state.checked.swap(true, Ordering::AcqRel);
        if self.state.shutting_down.load(Ordering::Acquire) {
            return;
        }
        if was != ok {
            self.set_readiness(ok).await;
        }
        // The first check that passes is the start, which "ready to serve"
        // announces: the database was never unreadable, so not "again".
        match (ok, was, first) {
            (true, false, false) => tracing::info!("database readable again: SERVING"),
            (false, true, _) | (false, _, true) => {
                tracing::warn!("database unreadable: NOT_SERVING");
            }
            _ => {}
        }
    }

    /// Readiness goes NOT_SERVING, for good: open Watch streams see it at once.
    pub(crate) async fn shutting_down(&self) {
        let _changing = self.state.changes.lock().await;
        self.state.shutting_down.store(true, Ordering::Release);
        self.set_readiness(false).await;
    }

    async fn set_readiness(&self, serving: bool) {
        let status = if serving {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for name in self.readiness {
            self.reporter.set_service_status(name, status).await;
        }
        crate::instruments::get().set_ready(serving);
    }

    /// Checks the database every `interval` (a check that takes longer than
    /// that counts as failed) until the task is aborted.
    pub(crate) fn spawn_checker<S: UserStore>(
        &self,
        store: S,
        interval: Duration,
    ) -> JoinHandle<()> {
        let health = self.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(interval);
            ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let ok = match tokio::time::timeout(interval, store.check()).await {
                    Ok(Ok(())) => true,
                    Ok(Err(e)) => {
                        tracing::debug!(error = %e, "readiness check failed");
                        false
                    }
                    Err(_) => false,
                };
                health.set_database_ok(ok).await;
            }
        })
    }
}
