//! Logging through `tracing`: human-readable or JSON lines, filtered by
//! `log.level`.

use tracing_subscriber::{EnvFilter, fmt, layer::SubscriberExt, util::SubscriberInitExt};

use crate::config::{LogFormat, LogSettings};

/// Installs the global subscriber. Call once, from `main`.
pub fn init(settings: &LogSettings) -> anyhow::Result<()> {
    let filter = EnvFilter::builder().parse(&settings.level)?;
    let registry = tracing_subscriber::registry().with(filter);
    match settings.format {
        LogFormat::Pretty => registry.with(fmt::layer()).try_init()?,
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false),
            )
            .try_init()?,
    }
    Ok(())
}
