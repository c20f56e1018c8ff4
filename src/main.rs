//! The `toolsight` command line: the arguments, parsed here; each command runs in `cli`.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

mod cli;

// Ingest allocates and frees many small strings per span; mimalloc does that far faster than
// the system allocator (about 40% of the service's CPU went to glibc malloc/free).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "toolsight",
    version,
    about = "OTLP collector and alerting for MCP tool calls"
)]
pub(crate) struct Cli {
    /// Config file (TOML); environment variables TOOLSIGHT_<SECTION>__<KEY> override it.
    #[arg(long, short, global = true, env = "TOOLSIGHT_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Run the service: OTLP receivers, writers and the admin API.
    Serve,
    /// Create the database if missing and apply migrations, then exit.
    Migrate,
    /// Per-tool calls, errors, empty results and latency quantiles, as a table.
    Tools {
        /// Time range to summarize, e.g. 15m, 2h, 7d.
        #[arg(long, default_value = "15m")]
        since: humantime::Duration,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Validate the configuration and print the effective settings.
    Config,
    /// Delete data older than the retention settings (the service also does this every
    /// `retention.every`), in bounded batches.
    Prune {
        /// Count what would be deleted, delete nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON (each table or partition, the total) instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// See every alert kind fire and resolve in minutes: the service on a fresh `toolsight_demo`
    /// database with short-window demo rules, fed the incidents scenario, each alert printed as
    /// it fires and resolves.
    Demo {
        /// Length of the traffic (healthy, incidents, healthy again: a third each).
        #[arg(long, default_value = "6m")]
        duration: humantime::Duration,
    },
    /// Alert rule files.
    Rules {
        #[command(subcommand)]
        command: RulesCommand,
    },
    /// Exit 0 when the service answers ready (`GET /readyz` 200), 1 otherwise: for a container
    /// HEALTHCHECK or a supervisor's probe.
    Healthcheck {
        /// The admin API (default: the configured admin.listen, https when tls is configured).
        #[arg(long)]
        url: Option<String>,
        /// Give up after this long.
        #[arg(long, default_value = "5s")]
        timeout: humantime::Duration,
    },
    /// Silences: alerts matching them are not notified (through the admin API).
    Silence {
        /// The admin API (default: the configured admin.listen).
        #[arg(long, global = true)]
        url: Option<String>,
        /// The admin token (default: the configured auth.admin_token).
        #[arg(
            long,
            global = true,
            env = "TOOLSIGHT_ADMIN_TOKEN",
            hide_env_values = true
        )]
        token: Option<String>,
        #[command(subcommand)]
        command: SilenceCommand,
    },
}

#[derive(Subcommand)]
pub(crate) enum SilenceCommand {
    /// Silence alerts whose labels match every matcher (name=value, name!=value, name=~re, name!~re).
    Add {
        #[arg(required = true)]
        matchers: Vec<String>,
        /// How long, e.g. 2h.
        #[arg(long, short, default_value = "1h")]
        duration: humantime::Duration,
        #[arg(long, short = 'm')]
        comment: String,
        /// Who silences (default: $USER, else $LOGNAME, else `toolsight@<hostname>`).
        #[arg(long, short)]
        author: Option<String>,
        /// Print the created silence as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Silences in force, to come, or ended in the last 24 hours.
    List {
        #[arg(long)]
        json: bool,
    },
    /// End a silence now.
    Expire { id: i64 },
}

#[derive(Subcommand)]
pub(crate) enum RulesCommand {
    /// Validate rule files; report every problem with its file and line.
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Print JSON (files, unit-test files, problems) instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Run rule unit tests (input value series, expected firing alerts at given times).
    Test {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Print JSON (every case and what differed) instead of lines.
        #[arg(long)]
        json: bool,
    },
    /// Replay rules over the stored history: when each would have fired and resolved.
    Backtest {
        /// Rule files (default: the configured rules, or the built-in ones).
        #[arg(long, num_args = 1..)]
        rules: Vec<PathBuf>,
        /// Start: RFC 3339 (2026-11-20T08:00:00Z) or a duration ago (24h, 7d).
        #[arg(long)]
        from: String,
        /// End: RFC 3339, a duration ago, or `now`.
        #[arg(long, default_value = "now")]
        to: String,
        /// Print JSON (every event and episode) instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    toolsight::install_crypto_provider();
    let cli = Cli::parse();
    match cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("toolsight: {e:#}");
            cli::exit_code(&e)
        }
    }
}
