//! `toolsight-loadgen`: realistic MCP telemetry (FastMCP, semantic-convention, OpenLLMetry and
//! LLM spans) to a running toolsight or any OTLP receiver, at a fixed rate or as fast as it is
//! answered, or the `incidents` scenario that every default alert rule catches.

use clap::Parser;
use toolsight_loadgen::{LoadConfig, Protocol};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "toolsight-loadgen",
    version,
    about = "Send realistic MCP telemetry to toolsight (or any OTLP receiver)"
)]
struct Cli {
    /// OTLP transport.
    #[arg(long, value_enum, default_value = "grpc")]
    protocol: Protocol,
    /// Receiver host:port (default 127.0.0.1:4317 for grpc, 127.0.0.1:4318 for http).
    #[arg(long)]
    endpoint: Option<String>,
    /// Spans per second (open loop). Without it, sends as fast as the receiver answers.
    #[arg(long)]
    rate: Option<f64>,
    /// Concurrent exporters (closed loop) or most requests in flight (open loop).
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    #[arg(long, default_value_t = 1000)]
    spans_per_request: usize,
    /// Compress requests with gzip.
    #[arg(long)]
    gzip: bool,
    /// How long to run, e.g. 30s, 5m.
    #[arg(long, default_value = "30s")]
    duration: humantime::Duration,
    /// Per-request timeout.
    #[arg(long, default_value = "10s")]
    timeout: humantime::Duration,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// No progress line.
    #[arg(long)]
    quiet: bool,
    /// `incidents`: healthy traffic, then every failure the alert rules catch, then healthy
    /// again (one small export per second; --duration sets the whole timeline, default 6m).
    #[arg(long, value_enum)]
    scenario: Option<Scenario>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Scenario {
    Incidents,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    toolsight::install_crypto_provider();
    match run(Cli::parse()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("toolsight-loadgen: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(a: Cli) -> anyhow::Result<()> {
    let endpoint = a.endpoint.unwrap_or_else(|| match a.protocol {
        Protocol::Grpc => "127.0.0.1:4317".into(),
        _ => "127.0.0.1:4318".into(),
    });
    let cfg = LoadConfig {
        protocol: a.protocol,
        endpoint,
        gzip: a.gzip,
        concurrency: a.concurrency,
        spans_per_request: a.spans_per_request,
        rate: a.rate,
        duration: a.duration.into(),
        progress: !a.quiet,
        run_id: (std::process::id() & 0xFFFF) as u16,
        timeout: a.timeout.into(),
    };
    let report = match a.scenario {
        Some(Scenario::Incidents) => toolsight_loadgen::incidents::run(&cfg).await?,
        None => toolsight_loadgen::run(cfg).await?,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        report.print();
    }
    Ok(())
}
