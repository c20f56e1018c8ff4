//! `toolsight-bench`: the benchmark of BENCHMARKS.md. Starts `toolsight serve` on a fresh
//! database, drives it with the load generator, verifies what was stored and reports.

use clap::Parser;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "toolsight-bench",
    version,
    about = "Benchmark a toolsight service"
)]
struct Cli {
    #[command(flatten)]
    args: toolsight_loadgen::bench::BenchArgs,
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    toolsight::install_crypto_provider();
    match toolsight_loadgen::bench::run(Cli::parse().args).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("toolsight-bench: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
