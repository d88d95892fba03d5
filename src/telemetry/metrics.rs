//! The one meter provider, with up to two readers: OTLP/gRPC to the traces'
//! endpoint, pushed every `OTEL_METRIC_EXPORT_INTERVAL` ms (60 s by
//! default), and Prometheus, pulled from `GET /metrics` on
//! `telemetry.metrics_listen` (see [`super::endpoint`]).
//!
//! The standard switches work as the specification says: `OTEL_SDK_DISABLED=true`
//! installs no provider at all; `OTEL_METRICS_EXPORTER=none` turns OTLP
//! metrics off, `otlp` (the default when an endpoint is set) on. Without
//! any reader no provider is installed, so every instrument is a no-op.

use std::sync::OnceLock;

use anyhow::Context as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};

use crate::config::Settings;

/// The registry the Prometheus reader fills, once installed.
static REGISTRY: OnceLock<prometheus::Registry> = OnceLock::new();

/// What `GET /metrics` gathers from: the installed registry, else an empty one.
pub(crate) fn registry() -> prometheus::Registry {
    REGISTRY.get().cloned().unwrap_or_default()
}

/// Which readers to install, from the settings and the `OTEL_*` variables.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Readers<'a> {
    /// `Some("")`: OTLP to the endpoint the exporter reads from the environment.
    pub(crate) otlp: Option<&'a str>,
    pub(crate) prometheus: bool,
}

pub(crate) fn readers<'a>(
    settings: &'a Settings,
    env: impl Fn(&str) -> Option<String>,
) -> Readers<'a> {
    let env = |name: &str| env(name).filter(|v| !v.trim().is_empty());
    if env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true")) {
        return Readers {
            otlp: None,
            prometheus: false,
        };
    }
    let prometheus = settings.telemetry.metrics_listen.is_some();
    let configured = settings.telemetry.otlp_endpoint.as_str();
    let endpoint_set = !configured.is_empty()
        || env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
        || env("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT").is_some();
    let listed = env("OTEL_METRICS_EXPORTER");
    let otlp = match listed.as_deref() {
        // Not set: OTLP when there is somewhere to send it.
        None => endpoint_set,
        Some(list) => {
            let names: Vec<&str> = list.split(',').map(str::trim).collect();
            for name in &names {
                // "prometheus" is welcome: the listener is telemetry.metrics_listen.
                if !matches!(*name, "otlp" | "none" | "prometheus" | "") {
                    tracing::warn!(
                        exporter = name,
                        "OTEL_METRICS_EXPORTER names an exporter this build lacks; ignoring it"
                    );
                }
            }
            !names.contains(&"none") && names.contains(&"otlp")
        }
    };
    Readers {
        otlp: otlp.then_some(configured),
        prometheus,
    }
}

/// Builds the provider of `readers` and makes it the global one; `None` when
/// there is no reader.
pub(crate) fn init(readers: &Readers<'_>) -> anyhow::Result<Option<SdkMeterProvider>> {
    if readers.otlp.is_none() && !readers.prometheus {
        return Ok(None);
    }
    let mut builder = SdkMeterProvider::builder().with_resource(super::resource());
    if let Some(endpoint) = readers.otlp {
        let mut exporter = opentelemetry_otlp::MetricExporter::builder().with_tonic();
        if !endpoint.is_empty() {
            exporter = exporter.with_endpoint(endpoint);
        }
        let exporter = exporter
            .build()
            .context("configuring the OTLP metrics exporter")?;
        // The interval comes from OTEL_METRIC_EXPORT_INTERVAL, read by the SDK.
        builder = builder.with_reader(PeriodicReader::builder(exporter).build());
    }
    if readers.prometheus {
        let registry = REGISTRY.get_or_init(prometheus::Registry::new).clone();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry)
            // The series carry the labels the README lists and no others.
            .scope_info_enabled(false)
            .build()
            .context("configuring the Prometheus exporter")?;
        builder = builder.with_reader(exporter);
    }
    let provider = builder.build();
    opentelemetry::global::set_meter_provider(provider.clone());
    Ok(Some(provider))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(otlp: &str, listen: bool) -> Settings {
        let mut settings = Settings::embedded_default();
        settings.telemetry.otlp_endpoint = otlp.into();
        settings.telemetry.metrics_listen = listen.then(|| "127.0.0.1:0".parse().unwrap());
        settings
    }

    fn readers_with<'a>(settings: &'a Settings, vars: &[(&str, &str)]) -> Readers<'a> {
        readers(settings, |name| {
            vars.iter()
                .find(|(k, _)| *k == name)
                .map(|(_, v)| (*v).to_owned())
        })
    }

    #[test]
    fn the_standard_switches_choose_the_readers() {
        let none = settings("", false);
        assert_eq!(
            readers_with(&none, &[]),
            Readers {
                otlp: None,
                prometheus: false
            }
        );
        let both = settings("http://collector:4317", true);
        assert_eq!(
            readers_with(&both, &[]),
            Readers {
                otlp: Some("http://collector:4317"),
                prometheus: true
            }
        );
        assert_eq!(
            readers_with(&both, &[("OTEL_METRICS_EXPORTER", "none")]),
            Readers {
                otlp: None,
                prometheus: true
            }
        );
        assert_eq!(
            readers_with(&both, &[("OTEL_SDK_DISABLED", "TRUE")]),
            Readers {
                otlp: None,
                prometheus: false
            }
        );
        assert_eq!(
            readers_with(&none, &[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4317")]).otlp,
            Some("")
        );
        assert_eq!(
            readers_with(&none, &[("OTEL_METRICS_EXPORTER", "otlp")]).otlp,
            Some("")
        );
    }
}
