//! An OTLP/gRPC collector for the tests: traces and metrics, on an ephemeral
//! loopback port, keeping every export it is sent.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use opentelemetry_proto::tonic::{
    collector::{
        metrics::v1::{
            ExportMetricsServiceRequest, ExportMetricsServiceResponse,
            metrics_service_server::{MetricsService, MetricsServiceServer},
        },
        trace::v1::{
            ExportTraceServiceRequest, ExportTraceServiceResponse,
            trace_service_server::{TraceService, TraceServiceServer},
        },
    },
    common::v1::KeyValue,
    metrics::v1::Metric,
    trace::v1::{Span, span::SpanKind},
};
use tonic::{
    Request, Response, Status,
    transport::{Server, server::TcpIncoming},
};

type Kept<T> = Arc<Mutex<Vec<T>>>;

pub struct Collector {
    addr: SocketAddr,
    traces: Kept<ExportTraceServiceRequest>,
    metrics: Kept<ExportMetricsServiceRequest>,
}

/// A span as the collector received it, with its resource's attributes.
pub struct Exported {
    pub resource: Vec<KeyValue>,
    pub span: Span,
}

struct Receiver<T>(Kept<T>);

#[tonic::async_trait]
impl TraceService for Receiver<ExportTraceServiceRequest> {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        self.0.lock().unwrap().push(request.into_inner());
        Ok(Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Receiver<ExportMetricsServiceRequest> {
    async fn export(
        &self,
        request: Request<ExportMetricsServiceRequest>,
    ) -> Result<Response<ExportMetricsServiceResponse>, Status> {
        self.0.lock().unwrap().push(request.into_inner());
        Ok(Response::new(ExportMetricsServiceResponse::default()))
    }
}

impl Collector {
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (traces, metrics) = (Kept::default(), Kept::default());
        tokio::spawn(
            Server::builder()
                .add_service(TraceServiceServer::new(Receiver(Arc::clone(&traces))))
                .add_service(MetricsServiceServer::new(Receiver(Arc::clone(&metrics))))
                .serve_with_incoming(TcpIncoming::from(listener)),
        );
        Self {
            addr,
            traces,
            metrics,
        }
    }

    /// For `OTEL_EXPORTER_OTLP_ENDPOINT`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Exported> {
        let received = self.traces.lock().unwrap();
        let mut spans = Vec::new();
        for resource_spans in received.iter().flat_map(|r| &r.resource_spans) {
            let resource = resource_spans
                .resource
                .as_ref()
                .map(|r| r.attributes.clone())
                .unwrap_or_default();
            for span in resource_spans.scope_spans.iter().flat_map(|s| &s.spans) {
                spans.push(Exported {
                    resource: resource.clone(),
                    span: span.clone(),
                });
            }
        }
        spans
    }

    /// The server spans by name; each name must occur once.
    pub fn server_spans(&self) -> HashMap<String, Span> {
        let mut by_name = HashMap::new();
        for Exported { span, .. } in self.spans() {
            if span.kind == SpanKind::Server as i32 {
                let name = span.name.clone();
                assert!(by_name.insert(name.clone(), span).is_none(), "two {name}");
            }
        }
        by_name
    }

    /// How many metrics exports have been received.
    pub fn metric_exports(&self) -> usize {
        self.metrics.lock().unwrap().len()
    }

    /// The newest export's metric `name`, with its resource's attributes.
    pub fn latest_metric(&self, name: &str) -> Option<(Vec<KeyValue>, Metric)> {
        let received = self.metrics.lock().unwrap();
        received.iter().rev().find_map(|export| {
            export.resource_metrics.iter().find_map(|rm| {
                let metric = rm
                    .scope_metrics
                    .iter()
                    .flat_map(|s| &s.metrics)
                    .find(|m| m.name == name)?;
                let resource = rm
                    .resource
                    .as_ref()
                    .map(|r| r.attributes.clone())
                    .unwrap_or_default();
                Some((resource, metric.clone()))
            })
        })
    }
}
