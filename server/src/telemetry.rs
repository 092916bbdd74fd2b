//! Logging, and traces when configured: one trace per push, from the API (which takes a W3C
//! `traceparent` from the caller, HTTP header or gRPC metadata) through the gateway's
//! Deliver calls (which carry it in their metadata) to the node that hands the push to its
//! devices. Spans are exported with OpenTelemetry's OTLP/HTTP exporter to
//! `tracing.otlp_endpoint`; with none (the default) no span is recorded and nothing is
//! exported.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

use crate::config::TracingSettings;

/// Whether spans are exported (so worth creating and carrying).
static ENABLED: AtomicBool = AtomicBool::new(false);

/// The exporter of a process that exports spans: flushed and stopped when dropped.
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Err(error) = self.provider.shutdown() {
            eprintln!("pigeon: flushing the last spans failed: {error}");
        }
    }
}

/// Starts logging to stderr with `log_filter`, and, when `tracing` names an endpoint,
/// exporting the spans of pushes as the service `pigeon-<role>` (unless it names one). Call
/// outside the runtime; keep the returned value until the process ends.
pub fn init(log_filter: &str, tracing: &TracingSettings, role: &str) -> Option<Telemetry> {
    let filter = EnvFilter::try_new(log_filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(filter);
    let registry = tracing_subscriber::registry().with(logs);
    if tracing.otlp_endpoint.is_empty() {
        registry.init();
        return None;
    }
    let endpoint = format!("{}/v1/traces", tracing.otlp_endpoint.trim_end_matches('/'));
    let exporter = match opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(endpoint)
        .build()
    {
        Ok(exporter) => exporter,
        Err(error) => {
            registry.init();
            tracing::error!(%error, "cannot export spans; tracing is off");
            return None;
        }
    };
    let service = match tracing.service_name.is_empty() {
        true => format!("pigeon-{role}"),
        false => tracing.service_name.clone(),
    };
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service)
                .build(),
        )
        .build();
    let spans = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("pigeon"))
        .with_filter(EnvFilter::new("pigeon_server=info"));
    registry.with(spans).init();
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    ENABLED.store(true, Ordering::Relaxed);
    Some(Telemetry { provider })
}

/// Whether spans are exported.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The span of a push of `app` accepted by the API, a child of the caller's `traceparent`
/// (and `tracestate`) when it sent one; disabled when spans are not exported.
pub fn push_span(app: &str, carrier: &dyn Extractor) -> tracing::Span {
    if !enabled() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!("push", app);
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(carrier));
    let _ = span.set_parent(parent);
    span
}

/// The span of an internal call `name` a node serves, a child of the caller's span that
/// `metadata` carries; disabled when spans are not exported.
pub fn call_span(name: &'static str, metadata: &tonic::metadata::MetadataMap) -> tracing::Span {
    if !enabled() {
        return tracing::Span::none();
    }
    let span = tracing::info_span!("call", otel.name = name, targets = tracing::field::Empty);
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&Metadata(metadata)));
    let _ = span.set_parent(parent);
    span
}

/// Puts the current span's context in `metadata` (`traceparent`), for the callee's span.
pub fn inject(metadata: &mut tonic::metadata::MetadataMap) {
    if !enabled() {
        return;
    }
    let context = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&context, &mut MetadataMut(metadata));
    });
}

/// HTTP headers as a propagator reads them.
pub struct Headers<'a>(pub &'a axum::http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|name| name.as_str()).collect()
    }
}

/// gRPC metadata as a propagator reads it.
pub struct Metadata<'a>(pub &'a tonic::metadata::MetadataMap);

impl Extractor for Metadata<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|value| value.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|key| match key {
                tonic::metadata::KeyRef::Ascii(name) => Some(name.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// gRPC metadata as a propagator writes it.
struct MetadataMut<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataMut<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            tonic::metadata::MetadataValue::try_from(value.as_str()),
        ) {
            self.0.insert(key, value);
        }
    }
}
