//! Logs to stderr, and traces over OTLP/HTTP when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set.

use anyhow::Context as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Level;
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// What to flush before the process exits.
#[must_use = "call `shutdown` before exiting, or spans still queued are lost"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Exports the spans still queued; call before exiting.
    pub fn shutdown(self) {
        if let Some(provider) = self.provider
            && let Err(e) = provider.shutdown()
        {
            eprintln!("exporting the last spans failed: {e}");
        }
    }
}

/// Whether the environment asks for trace export.
pub fn export_requested() -> bool {
    [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some_and(|v| !v.is_empty()))
}

/// Installs the `tracing` subscriber (logs filtered by `RUST_LOG`, else `default_filter`) and,
/// when [`export_requested`], an OTLP/HTTP span exporter as the global tracer provider, named
/// by `OTEL_SERVICE_NAME` or else `service`.
pub fn init(default_filter: &str, service: &str) -> anyhow::Result<Telemetry> {
    // Whatever RUST_LOG says, two library logs stay off: sqlx's warning about a connection
    // parameter it does not know prints the parameter's value (an `sslpassword`, say) in
    // clear, and lapin logs a returned message whole, body included (we report returns
    // ourselves, without the body).
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_filter.into());
    for quiet in [
        "sqlx_postgres::options=error",
        "lapin::returned_messages=error",
    ] {
        filter = filter.add_directive(quiet.parse().expect("a valid directive"));
    }
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_filter(filter);
    let provider = export_requested()
        .then(|| tracer_provider(service))
        .transpose()?;
    // Spans go to the exporter whatever RUST_LOG says of logs: the saga's own, at INFO.
    let spans = provider.as_ref().map(|provider| {
        tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("saga"))
            .with_filter(Targets::new().with_target("saga_core", Level::INFO))
    });
    tracing_subscriber::registry().with(logs).with(spans).init();
    Ok(Telemetry { provider })
}

fn tracer_provider(service: &str) -> anyhow::Result<SdkTracerProvider> {
    // Built without a TLS client, to keep the example programs lean: refuse, rather than drop
    // every span in silence.
    for variable in [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ] {
        if let Ok(v) = std::env::var(variable)
            && v.trim_start().to_ascii_lowercase().starts_with("https:")
        {
            anyhow::bail!(
                "{variable}: the example programs export over plain http (to a collector on \
                 the same host or network); got `{v}`"
            );
        }
    }
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .build()
        .context("OTEL_EXPORTER_OTLP_ENDPOINT: cannot build the OTLP exporter")?;
    let name = std::env::var("OTEL_SERVICE_NAME").unwrap_or_else(|_| service.to_owned());
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_id_generator(saga_core::otel::SagaIdGenerator::default())
        .with_resource(Resource::builder().with_service_name(name).build())
        .build();
    opentelemetry::global::set_tracer_provider(provider.clone());
    Ok(provider)
}
