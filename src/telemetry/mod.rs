//! Logging and traces through `tracing`; metrics (in [`metrics`], served by
//! [`endpoint`]).
//!
//! Logs: human-readable or JSON lines, filtered by `log.level`; JSON lines
//! written inside a traced span carry its `trace_id` and `span_id`.
//!
//! Traces: exported over OTLP/gRPC when `telemetry.otlp_endpoint` or
//! `OTEL_EXPORTER_OTLP_ENDPOINT` is set. Otherwise no OpenTelemetry layer is
//! installed at all and [`crate::grpc::middleware::trace`] passes requests
//! straight through.
//! The standard `OTEL_*` variables for the service name, resource, sampler,
//! propagators, batching and exporter work as the specification says.
//!
//! Metrics: one meter provider with an OTLP reader (same endpoint) and a
//! Prometheus reader (`telemetry.metrics_listen`); see [`metrics`].

pub mod endpoint;
mod metrics;

use std::{
    io::IsTerminal as _,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use anyhow::Context as _;
use opentelemetry::{
    KeyValue,
    propagation::{TextMapCompositePropagator, TextMapPropagator},
    trace::{TraceContextExt, TracerProvider as _},
};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::{
    Resource,
    metrics::SdkMeterProvider,
    propagation::{BaggagePropagator, TraceContextPropagator},
    resource::{EnvResourceDetector, TelemetryResourceDetector},
    trace::{BatchSpanProcessor, SdkTracer, SdkTracerProvider},
};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::{
    EnvFilter, Layer,
    filter::filter_fn,
    fmt::{
        self, FmtContext, FormatEvent, MakeWriter,
        format::{Json, JsonFields, Writer},
    },
    layer::SubscriberExt,
    registry::LookupSpan,
    util::SubscriberInitExt,
};

use crate::config::{LogFormat, LogSettings, Settings};

/// `service.name` unless `OTEL_SERVICE_NAME` or `OTEL_RESOURCE_ATTRIBUTES` names one.
pub const DEFAULT_SERVICE_NAME: &str = "user-manager";
/// How long [`TelemetryGuard::shutdown`] waits for the last spans to be
/// exported: plenty for a collector that answers, and short enough that a
/// hung one keeps the exit within the drain deadline + 2 s.
pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(1);

/// Whether spans are exported; read by [`crate::grpc::middleware::trace`] so
/// that without an exporter no per-request span is even created.
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// Whether [`init`] installed an exporter in this process.
pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Keeps the tracer and meter providers, to flush them on shutdown.
#[must_use = "spans are lost unless the guard is shut down"]
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
    meters: Option<SdkMeterProvider>,
}

impl TelemetryGuard {
    /// Exports the spans still queued and stops the exporter, waiting at most
    /// [`SHUTDOWN_TIMEOUT`]. Call after the server drained, inside the runtime:
    /// the exporter's connection runs on it.
    pub async fn shutdown(self) {
        // The SDK blocks while it flushes; a blocking thread leaves the runtime's
        // workers free to drive the export itself. Both at once: the exit
        // stays within one SHUTDOWN_TIMEOUT.
        let spans = self.provider.map(|provider| {
            tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(SHUTDOWN_TIMEOUT))
        });
        let meters = self.meters.map(|meters| {
            tokio::task::spawn_blocking(move || meters.shutdown_with_timeout(SHUTDOWN_TIMEOUT))
        });
        for (what, task) in [("spans", spans), ("metrics", meters)] {
            let Some(task) = task else { continue };
            let flushed = task
                .await
                .map_err(anyhow::Error::from)
                .and_then(|result| result.map_err(anyhow::Error::from));
            if let Err(e) = flushed {
                tracing::warn!(error = %e, "flushing {what} on shutdown");
            }
        }
    }
}

/// Installs the global subscriber (logs, and traces when an endpoint is
/// configured). Call once, inside the tokio runtime: the OTLP exporter's
/// channel is spawned on it.
pub fn init(settings: &Settings) -> anyhow::Result<TelemetryGuard> {
    let logs = log_layer(
        &settings.log,
        std::io::stdout,
        colour(std::io::stdout().is_terminal()),
    )?;
    let readers = metrics::readers(settings, |name| std::env::var(name).ok());
    let Some(endpoint) = otlp_endpoint(&settings.telemetry.otlp_endpoint) else {
        tracing_subscriber::registry().with(logs).try_init()?;
        return Ok(TelemetryGuard {
            provider: None,
            meters: metrics::init(&readers)?,
        });
    };
    let provider = tracer_provider(endpoint)?;
    tracing_subscriber::registry()
        .with(logs)
        .with(trace_layer(provider.tracer("user-manager")))
        .try_init()?;
    opentelemetry::global::set_text_map_propagator(propagator());
    EXPORTING.store(true, Ordering::Relaxed);
    Ok(TelemetryGuard {
        provider: Some(provider),
        meters: metrics::init(&readers)?,
    })
}

/// Whether "pretty" lines get colours: only on a terminal (escape codes in a
/// file or a log collector are noise), and never with `NO_COLOR` set to
/// anything but "" (<https://no-color.org>).
fn colour(terminal: bool) -> bool {
    terminal && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Log lines to `writer`, in `log.format`, filtered by `log.level`, with ANSI
/// colours if `ansi`.
fn log_layer<S, W>(settings: &LogSettings, writer: W, ansi: bool) -> anyhow::Result<impl Layer<S>>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'w> MakeWriter<'w> + Send + Sync + 'static,
{
    let filter = EnvFilter::builder().parse(&settings.level)?;
    let layer = fmt::layer().with_writer(writer).with_ansi(ansi);
    let layer = match settings.format {
        LogFormat::Pretty => layer.boxed(),
        LogFormat::Json => layer
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .map_event_format(WithTraceIds)
            .boxed(),
    };
    Ok(layer.with_filter(filter))
}

/// Our spans to OpenTelemetry, with the attributes we set and no others.
fn trace_layer<S>(tracer: SdkTracer) -> impl Layer<S>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    tracing_opentelemetry::layer()
        .with_tracer(tracer)
        // Span status follows the gRPC status alone (see rpc_trace), not error logs.
        .with_error_events_to_status(false)
        .with_location(false)
        .with_threads(false)
        .with_target(false)
        .with_tracked_inactivity(false)
        .with_filter(filter_fn(|meta| {
            // Our own spans (database spans are DEBUG, so they cost nothing when
            // logs don't want them and no exporter is installed), and notable
            // events, which become span events.
            meta.target().starts_with("user_manager")
                && (meta.is_span() || *meta.level() <= Level::INFO)
        }))
}

/// Where to export: the configured endpoint; or `""` when only the
/// environment names one (the exporter reads `OTEL_EXPORTER_OTLP_*ENDPOINT`
/// itself); or `None`: export is off.
fn otlp_endpoint(configured: &str) -> Option<&str> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
    // The standard off switches win over any endpoint.
    let sdk_disabled =
        env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    let no_exporter = env("OTEL_TRACES_EXPORTER").is_some_and(|v| v.trim() == "none");
    if sdk_disabled || no_exporter {
        return None;
    }
    if !configured.is_empty() {
        return Some(configured);
    }
    let from_env = env("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
        || env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some();
    from_env.then_some("")
}

fn tracer_provider(endpoint: &str) -> anyhow::Result<SdkTracerProvider> {
    let mut exporter = opentelemetry_otlp::SpanExporter::builder().with_tonic();
    if !endpoint.is_empty() {
        exporter = exporter.with_endpoint(endpoint);
    }
    let exporter = exporter.build().context("configuring the OTLP exporter")?;
    // The batch queue is bounded (OTEL_BSP_MAX_QUEUE_SIZE, 2048 by default):
    // with the collector down, spans beyond it are dropped, never queued
    // without limit, and requests never wait for the export.
    let processor = BatchSpanProcessor::builder(exporter).build();
    // The sampler comes from OTEL_TRACES_SAMPLER(_ARG), read by the SDK's defaults.
    Ok(SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource())
        .build())
}

/// `service.name` (OTEL_SERVICE_NAME, else OTEL_RESOURCE_ATTRIBUTES, else
/// ours), `service.version`, the SDK's attributes and OTEL_RESOURCE_ATTRIBUTES.
fn resource() -> Resource {
    let builder = Resource::builder_empty()
        .with_service_name(DEFAULT_SERVICE_NAME)
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
        .with_detectors(&[
            Box::new(TelemetryResourceDetector),
            Box::new(EnvResourceDetector::new()),
        ]);
    match std::env::var("OTEL_SERVICE_NAME") {
        Ok(name) if !name.is_empty() => builder.with_service_name(name),
        _ => builder,
    }
    .build()
}

/// The propagators OTEL_PROPAGATORS lists (default `tracecontext,baggage`);
/// the SDK's global default would silently propagate nothing.
fn propagator() -> TextMapCompositePropagator {
    let listed = std::env::var("OTEL_PROPAGATORS")
        .ok()
        .filter(|v| !v.trim().is_empty())
        .unwrap_or_else(|| "tracecontext,baggage".into());
    let mut propagators: Vec<Box<dyn TextMapPropagator + Send + Sync>> = Vec::new();
    for name in listed.split(',').map(str::trim) {
        match name {
            "tracecontext" => propagators.push(Box::new(TraceContextPropagator::new())),
            "baggage" => propagators.push(Box::new(BaggagePropagator::new())),
            "none" | "" => {}
            other => tracing::warn!(
                propagator = other,
                "OTEL_PROPAGATORS names a propagator this build lacks; ignoring it"
            ),
        }
    }
    TextMapCompositePropagator::new(propagators)
}

/// The JSON event format with the current OpenTelemetry span's ids added,
/// so log lines can be joined with their trace.
struct WithTraceIds(fmt::format::Format<Json>);

impl<S> FormatEvent<S, JsonFields> for WithTraceIds
where
    S: Subscriber + for<'a> LookupSpan<'a>,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, JsonFields>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> std::fmt::Result {
        // The OpenTelemetry layer makes an entered span's context current.
        let ids = opentelemetry::Context::map_current(|cx| {
            let span = cx.span();
            let context = span.span_context();
            context
                .is_valid()
                .then(|| (context.trace_id(), context.span_id()))
        });
        let Some((trace_id, span_id)) = ids else {
            return self.0.format_event(ctx, writer, event);
        };
        let mut line = String::new();
        self.0.format_event(ctx, Writer::new(&mut line), event)?;
        match line.strip_prefix('{') {
            Some(rest) => write!(
                writer,
                "{{\"trace_id\":\"{trace_id}\",\"span_id\":\"{span_id}\",{rest}"
            ),
            None => writer.write_str(&line),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use opentelemetry::trace::SpanContext;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    use super::*;

    /// Log output kept in memory.
    #[derive(Clone, Default)]
    struct Buffer(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Buffer {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(bytes);
            Ok(bytes.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl MakeWriter<'_> for Buffer {
        type Writer = Buffer;

        fn make_writer(&self) -> Buffer {
            self.clone()
        }
    }

    #[test]
    fn json_lines_inside_a_span_carry_its_trace_and_span_ids() {
        let provider = SdkTracerProvider::builder().build();
        let output = Buffer::default();
        let settings = LogSettings {
            format: LogFormat::Json,
            level: "info".into(),
        };
        let subscriber = tracing_subscriber::registry()
            .with(log_layer(&settings, output.clone(), false).unwrap())
            .with(trace_layer(provider.tracer("test")));
        let inside: SpanContext = tracing::subscriber::with_default(subscriber, || {
            tracing::info!("outside");
            let span = tracing::info_span!("rpc");
            span.in_scope(|| tracing::info!(user = 7, "inside"));
            span.context().span().span_context().clone()
        });
        assert!(inside.is_valid());

        let output = String::from_utf8(output.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<serde_json::Value> = output
            .lines()
            .map(|line| serde_json::from_str(line).expect(line))
            .collect();
        let [outside_line, inside_line] = &lines[..] else {
            panic!("two lines expected: {output}");
        };
        assert_eq!(outside_line["message"], "outside");
        assert!(outside_line.get("trace_id").is_none(), "{outside_line}");
        assert!(outside_line.get("span_id").is_none(), "{outside_line}");
        assert_eq!(inside_line["message"], "inside");
        assert_eq!(inside_line["user"], 7);
        assert_eq!(inside_line["level"], "INFO");
        assert_eq!(inside_line["trace_id"], inside.trace_id().to_string());
        assert_eq!(inside_line["span_id"], inside.span_id().to_string());
    }

    #[test]
    fn pretty_lines_have_colours_only_when_asked() {
        let settings = LogSettings {
            format: LogFormat::Pretty,
            level: "info".into(),
        };
        for ansi in [false, true] {
            let output = Buffer::default();
            let subscriber = tracing_subscriber::registry()
                .with(log_layer(&settings, output.clone(), ansi).unwrap());
            tracing::subscriber::with_default(subscriber, || tracing::info!(user = 7, "hello"));
            let output = String::from_utf8(output.0.lock().unwrap().clone()).unwrap();
            assert_eq!(output.contains("\x1b["), ansi, "ansi {ansi}: {output:?}");
        }
        assert!(!colour(false), "no colours off a terminal");
    }
}
