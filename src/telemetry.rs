//! Logging: RUST_LOG filters (default `info`), text or JSON lines on stderr.
//! With an OTLP endpoint, the spans of every RPC are also exported as
//! OpenTelemetry traces (OTLP over HTTP/protobuf), continuing the W3C trace
//! context (`traceparent`) a caller sends.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::filter::{EnvFilter, LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

use crate::config::LogFormat;

/// Flushes the trace exporter when dropped (at the end of `main`).
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take()
            && let Err(e) = p.shutdown()
        {
            eprintln!("user-service: flushing traces failed: {e}");
        }
    }
}

/// Installs the global subscriber. `otlp`: the collector's base URL
/// (e.g. `http://127.0.0.1:4318`); traces go to `{otlp}/v1/traces`.
pub fn init(format: LogFormat, otlp: Option<&str>) -> Result<Telemetry, String> {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt: Box<dyn Layer<Registry> + Send + Sync> = match format {
        LogFormat::Text => fmt.with_filter(filter).boxed(),
        LogFormat::Json => fmt
            .json()
            .with_current_span(true)
            .with_span_list(false)
            .with_filter(filter)
            .boxed(),
    };
    let mut provider = None;
    let otel = match otlp {
        None => None,
        Some(endpoint) => {
            let p = tracer_provider(endpoint)?;
            let tracer = p.tracer("user-service");
            provider = Some(p);
            opentelemetry::global::set_text_map_propagator(
                opentelemetry_sdk::propagation::TraceContextPropagator::new(),
            );
            // The RPC spans (and what runs inside them) whatever RUST_LOG
            // says about log lines.
            Some(
                tracing_opentelemetry::layer()
                    .with_tracer(tracer)
                    .with_filter(Targets::new().with_target("user_service", LevelFilter::INFO)),
            )
        }
    };
    // A subscriber set earlier (tests) stays in place.
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init();
    Ok(Telemetry { provider })
}

fn tracer_provider(endpoint: &str) -> Result<SdkTracerProvider, String> {
    use opentelemetry_otlp::WithExportConfig;
    let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(url)
        .with_timeout(std::time::Duration::from_secs(5))
        .build()
        .map_err(|e| format!("cannot export traces to {endpoint}: {e}"))?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name("user-service")
                .build(),
        )
        .build())
}

/// Continues the caller's W3C trace context (`traceparent`, `tracestate`)
/// in `span`, when traces are exported.
pub fn continue_trace(span: &tracing::Span, headers: &http::HeaderMap) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    if !headers.contains_key("traceparent") {
        return;
    }
    let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(&Headers(headers)));
    let _ = span.set_parent(cx);
}

struct Headers<'a>(&'a http::HeaderMap);

/// Longest `tracestate` continued (W3C allows dropping it): a caller must
/// not make every exported span carry kilobytes of its own.
const MAX_TRACESTATE: usize = 512;

impl opentelemetry::propagation::Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        let v = self.0.get(key)?.to_str().ok()?;
        (key != "tracestate" || v.len() <= MAX_TRACESTATE).then_some(v)
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}
