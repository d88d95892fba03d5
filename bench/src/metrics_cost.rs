//! `--metrics-cost`: the server's CPU time per GetUser with metrics off and
//! on, in one run, and the difference (the target is at most +5 %).
//!
//! "On" is the Prometheus listener (`telemetry.metrics_listen`) scraped
//! every second during the load, as a Prometheus server would, only more
//! often. The two configurations take turns, each started fresh on the same
//! database and measured over the same window; the best (lowest) CPU per
//! call of each is kept, since other processes only ever add to it. Take
//! the figure on an idle machine: it is printed, not judged.

use std::{
    net::SocketAddr,
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::{
    CALLERS, CONNECTIONS,
    load::{self, Window},
    process::{Database, ServerProcess, free_addr},
};

/// How often "on" is scraped during the load.
const SCRAPE_EVERY: Duration = Duration::from_secs(1);

/// CPU time per call of each configuration, best of `passes`.
pub struct Cost {
    pub off: Duration,
    pub on: Duration,
    pub scrapes: u64,
}

impl Cost {
    /// On relative to off, in percent.
    pub fn difference(&self) -> f64 {
        (self.on.as_secs_f64() / self.off.as_secs_f64().max(1e-12) - 1.0) * 100.0
    }

    pub fn render(&self, passes: usize) -> String {
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        format!(
            "Server CPU per GetUser ({CALLERS} callers, best of {passes} pass(es) each):\n\
             - metrics off: {:.2} µs\n\
             - metrics on (Prometheus /metrics scraped every {}s, {} scrapes): {:.2} µs\n\
             - difference: {:+.1} % (target: at most +5 %; take it on an idle machine)\n",
            us(self.off),
            SCRAPE_EVERY.as_secs(),
            self.scrapes,
            us(self.on),
            self.difference(),
        )
    }
}

pub async fn measure(
    binary: &Path,
    db: &Database,
    logs: &Path,
    users: u32,
    window: Window,
    passes: usize,
) -> anyhow::Result<(Cost, u64)> {
    let (mut off, mut on) = (Duration::MAX, Duration::MAX);
    let (mut scrapes, mut failures) = (0, 0);
    for pass in 0..passes.max(1) {
        for metrics in [false, true] {
            let metrics_addr = metrics.then(free_addr).transpose()?;
            let mut env = Vec::new();
            if let Some(addr) = metrics_addr {
                env.push(("USER_MANAGER__TELEMETRY__METRICS_LISTEN", addr.to_string()));
            }
            let log = logs.join(format!(
                "metrics-{}-{pass}.log",
                if metrics { "on" } else { "off" }
            ));
            let mut server = ServerProcess::user_manager_with(binary, db, &log, &env)?;
            server.wait_serving(std::time::Instant::now()).await?;
            let channels = server.connect(CONNECTIONS).await?;
            let scraped = Arc::new(AtomicU64::new(0));
            let scraper =
                metrics_addr.map(|addr| tokio::spawn(scrape_every(addr, scraped.clone())));
            let cpu = server.cpu_time();
            let outcome = load::get_user(&channels, users, CALLERS, window, None).await;
            let used = server.cpu_time().saturating_sub(cpu);
            if let Some(scraper) = scraper {
                scraper.abort();
                let _ = scraper.await;
                scrapes += scraped.load(Ordering::Relaxed);
            }
            failures += outcome.failures;
            if let Some(first) = &outcome.first_failure {
                eprintln!("bench: metrics cost: a GetUser failed: {first}");
            }
            let calls = match outcome.ops_total {
                0 => outcome.ops,
                n => n,
            }
            .max(1);
            let per_call = used / u32::try_from(calls).unwrap_or(u32::MAX);
            let best = if metrics { &mut on } else { &mut off };
            *best = (*best).min(per_call);
            server.terminate()?;
        }
    }
    Ok((Cost { off, on, scrapes }, failures))
}

/// Scrapes `/metrics` on `addr` every [`SCRAPE_EVERY`] until aborted,
/// counting the scrapes answered with 200 in `answered`.
async fn scrape_every(addr: SocketAddr, answered: Arc<AtomicU64>) {
    let mut ticks = tokio::time::interval(SCRAPE_EVERY);
    loop {
        ticks.tick().await;
        if scrape(addr).await.is_ok() {
            answered.fetch_add(1, Ordering::Relaxed);
        }
    }
}

async fn scrape(addr: SocketAddr) -> std::io::Result<()> {
    let mut tcp = tokio::net::TcpStream::connect(addr).await?;
    tcp.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .await?;
    let mut body = Vec::new();
    tcp.read_to_end(&mut body).await?;
    if body.starts_with(b"HTTP/1.1 200") {
        Ok(())
    } else {
        Err(std::io::Error::other("not 200"))
    }
}
