//! OpenTelemetry tracing (OTLP), off by default (`[tracing] otlp_endpoint`).
//!
//! The spans are the `tracing` spans the code already opens, sent through
//! `tracing-opentelemetry`: only those this module lets through (see [`exported`]), so logs
//! stay logs:
//! - `task`: one pull of a task on this node (`task.id`, `bytes`, `parent_bytes`,
//!   `origin_bytes`, `result`);
//! - `parent`: one parent of that task's download from peers, from the moment it is added to
//!   the moment it is dropped or the download ends (`peer`, `pieces`, `bytes`, `result`);
//! - `source`: one back-to-source request (`url`, `offset`, `length`, `bytes`, `result`).
//!
//! Spans go in batches over OTLP/HTTP (protobuf, `<endpoint>/v1/traces`) or OTLP/gRPC, with
//! the resource's `service.name` (`tracing.service_name`) and this node's address as
//! `service.instance.id`. [`Telemetry`]'s drop flushes what is left.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_subscriber::filter::FilterFn;
use tracing_subscriber::Layer;

use crate::config::TracingConfig;

/// The span names exported.
pub const SPANS: [&str; 3] = ["task", "parent", "source"];

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("tracing.otlp_endpoint = {endpoint:?}: {detail}")]
    Exporter { endpoint: String, detail: String },
}

/// The tracer provider while tracing runs; dropping it flushes and stops the exporter.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Err(e) = self.provider.shutdown() {
            eprintln!("starling: tracing: the last spans were not all exported: {e}");
        }
    }
}

/// Whether a span is one of ours to export.
pub fn exported(meta: &tracing::Metadata<'_>) -> bool {
    meta.is_span() && meta.target().starts_with("starling") && SPANS.contains(&meta.name())
}

/// The exporting layer, and the guard that flushes it; None when tracing is off. Call inside
/// the tokio runtime (the gRPC exporter needs it).
pub fn layer<S>(
    cfg: &TracingConfig,
    instance: &str,
) -> Result<Option<(impl Layer<S> + Send + Sync + 'static, Telemetry)>, TelemetryError>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a> + Send + Sync,
{
    if cfg.otlp_endpoint.is_empty() {
        return Ok(None);
    }
    let err = |detail: String| TelemetryError::Exporter {
        endpoint: cfg.otlp_endpoint.clone(),
        detail,
    };
    let exporter = match cfg.protocol.as_str() {
        "grpc" => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(cfg.otlp_endpoint.clone())
            .build(),
        _ => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_endpoint(format!(
                "{}/v1/traces",
                cfg.otlp_endpoint.trim_end_matches('/')
            ))
            .build(),
    }
    .map_err(|e| err(e.to_string()))?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name(cfg.service_name.clone())
        .with_attribute(opentelemetry::KeyValue::new(
            "service.instance.id",
            instance.to_string(),
        ))
        .with_attribute(opentelemetry::KeyValue::new(
            "service.version",
            env!("CARGO_PKG_VERSION"),
        ))
        .build();
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            cfg.sample_ratio,
        ))))
        .with_resource(resource)
        .build();
    let tracer = provider.tracer("starling");
    let layer = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(FilterFn::new(exported));
    Ok(Some((layer, Telemetry { provider })))
}
