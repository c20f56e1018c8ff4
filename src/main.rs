//! The `toolsight` command line.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use toolsight::config::{Config, LogFormat};
use toolsight::{app, store};

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
struct Cli {
    /// Config file (TOML); environment variables TOOLSIGHT_<SECTION>__<KEY> override it.
    #[arg(long, short, global = true, env = "TOOLSIGHT_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the service: OTLP receivers, writers and the admin API.
    Serve,
    /// Create the database if missing and apply migrations, then exit.
    Migrate,
    /// Per-tool calls, errors, empty results and latency quantiles, as a table.
    Tools {
        /// Time range to summarize, e.g. 15m, 2h, 7d.
        #[arg(long, default_value = "15m")]
        since: String,
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
    },
    /// Send realistic MCP telemetry to a running toolsight (or any OTLP receiver).
    Loadgen(LoadgenArgs),
    /// Benchmark: start the service on a fresh database, drive it, verify and report.
    Bench(toolsight::bench::BenchArgs),
    /// Alert rule files.
    Rules {
        #[command(subcommand)]
        command: RulesCommand,
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
enum SilenceCommand {
    /// Silence alerts whose labels match every matcher (name=value, name!=value, name=~re, name!~re).
    Add {
        #[arg(required = true)]
        matchers: Vec<String>,
        /// How long, e.g. 2h.
        #[arg(long, short, default_value = "1h")]
        duration: String,
        #[arg(long, short = 'm')]
        comment: String,
        /// Who silences (default: $USER).
        #[arg(long, short, env = "USER")]
        author: String,
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
enum RulesCommand {
    /// Validate rule files; report every problem with its file and line.
    Check {
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Run rule unit tests (input value series, expected firing alerts at given times).
    Test {
        #[arg(required = true)]
        files: Vec<PathBuf>,
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

#[derive(clap::Args)]
struct LoadgenArgs {
    /// OTLP transport.
    #[arg(long, value_enum, default_value = "grpc")]
    protocol: toolsight::loadgen::Protocol,
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

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match config.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! { _ = ctrl_c => {}, _ = term => {} }
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    toolsight::install_crypto_provider();
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("toolsight: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut config = Config::load(cli.config.as_deref())?;
    init_logging(&config);
    if !matches!(cli.command, Command::Serve) {
        store::cluster::use_running(&mut config.database);
    }
    match cli.command {
        Command::Serve => {
            let listeners = app::Listeners::bind(&config).await?;
            // A first run with nothing configured and no server: a private cluster.
            let mut database = config.database.clone();
            let (cluster, database) = tokio::task::spawn_blocking(move || {
                store::cluster::start_if_wanted(&mut database).map(|c| (c, database))
            })
            .await??;
            config.database = database;
            let result = app::run(config, listeners, shutdown_signal()).await;
            if let Some(mut c) = cluster {
                tokio::task::spawn_blocking(move || c.stop()).await?;
            }
            result
        }
        Command::Migrate => {
            app::prepare_database(&config).await?;
            eprintln!(
                "database {} is up to date",
                store::url_without_password(&config.database.url)
            );
            Ok(())
        }
        Command::Tools { since, json } => {
            let secs = toolsight::admin::parse_since(Some(&since)).map_err(anyhow::Error::msg)?;
            let opts = store::connect_options(&config.database.url)?;
            let pool = store::query_pool(&opts, 1)
                .await
                .context("connecting to the database")?;
            let rows = store::queries::tool_summary(&pool, secs).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                print_tools(&rows, &since);
            }
            Ok(())
        }
        Command::Prune { dry_run } => {
            let opts = store::connect_options(&config.database.url)?;
            let pool = store::query_pool(&opts, 1)
                .await
                .context("connecting to the database")?;
            let started = std::time::Instant::now();
            let verb = if dry_run { "would delete" } else { "deleted" };
            let total = store::retention::prune(
                &pool,
                &config.retention.policy(),
                chrono::Utc::now(),
                dry_run,
                |table, before, n| {
                    println!(
                        "{table:<22} {verb} {n:>10} rows older than {}",
                        before.format("%Y-%m-%d %H:%M:%S UTC")
                    )
                },
            )
            .await?;
            println!(
                "{verb} {total} rows in {:.1} s",
                started.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Command::Config => {
            print!("{}", config.to_toml());
            Ok(())
        }
        Command::Loadgen(a) => {
            use toolsight::loadgen::{self, LoadConfig, Protocol};
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
                Some(Scenario::Incidents) => loadgen::incidents::run(&cfg).await?,
                None => loadgen::run(cfg).await?,
            };
            if a.json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                report.print();
            }
            Ok(())
        }
        Command::Bench(args) => toolsight::bench::run(args).await,
        Command::Rules {
            command: RulesCommand::Check { files },
        } => {
            use toolsight::evaluate::rules::{RulesError, is_test_file, load};
            // Like `promtool check rules`: every file on its own line, every problem at its
            // own line; rule unit-test files (`alerts/*.yaml` matches them) are named, not failed.
            let (tests, files): (Vec<PathBuf>, Vec<PathBuf>) =
                files.into_iter().partition(|f| is_test_file(f));
            for t in &tests {
                println!(
                    "{}: rule unit tests, not rules (run them with `toolsight rules test {}`)",
                    t.display(),
                    t.display()
                );
            }
            let mut problems = 0;
            for file in &files {
                match load(std::slice::from_ref(file)) {
                    Ok(loaded) => {
                        for (file, f) in loaded {
                            let rules: usize = f.groups.iter().map(|g| g.rules.len()).sum();
                            println!("{file}: ok ({} groups, {rules} rules)", f.groups.len());
                        }
                    }
                    Err(RulesError::Invalid(p)) => {
                        problems += p.len();
                        p.iter().for_each(|p| println!("{p}"));
                    }
                }
            }
            // Names that clash across files.
            if problems == 0
                && let Err(RulesError::Invalid(p)) = load(&files)
            {
                problems += p.len();
                p.iter().for_each(|p| println!("{p}"));
            }
            if problems > 0 {
                anyhow::bail!("{problems} problem(s) in rule files");
            }
            Ok(())
        }
        Command::Rules {
            command:
                RulesCommand::Backtest {
                    rules,
                    from,
                    to,
                    json,
                },
        } => {
            let files = if rules.is_empty() {
                config.rules.files.clone()
            } else {
                rules
            };
            let loaded = toolsight::evaluate::run::load_rules(&files)?;
            let now = chrono::Utc::now();
            let from = parse_instant(&from, now).context("--from")?;
            let to = parse_instant(&to, now).context("--to")?;
            let opts = store::connect_options(&config.database.url)?;
            let pool = store::query_pool(&opts, 2)
                .await
                .context("connecting to the database")?;
            let bar = indicatif::ProgressBar::new(0).with_style(
                indicatif::ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:40}] {pos}/{len} evaluations, {eta} left",
                )?
                .progress_chars("=> "),
            );
            let report =
                toolsight::evaluate::backtest::run(&pool, loaded, from, to, |done, total| {
                    bar.set_length(total);
                    bar.set_position(done);
                })
                .await?;
            bar.finish_and_clear();
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_backtest(&report);
            }
            Ok(())
        }
        Command::Silence {
            url,
            token,
            command,
        } => {
            let token = token.or_else(|| {
                config
                    .auth
                    .admin_token
                    .as_ref()
                    .map(|t| t.expose().to_owned())
            });
            let base = url.unwrap_or_else(|| {
                let mut a = config.admin.listen;
                if a.ip().is_unspecified() {
                    a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
                }
                format!("http://{a}")
            });
            silence(&base, token.as_deref(), command).await
        }
        Command::Rules {
            command: RulesCommand::Test { files },
        } => {
            let (mut passed, mut failed) = (0, 0);
            for f in &files {
                let (p, x) = toolsight::evaluate::unittest::run_file(f)
                    .map_err(toolsight::evaluate::rules::RulesError::Invalid)?;
                passed += p;
                failed += x;
            }
            println!("{passed} passed, {failed} failed");
            if failed > 0 {
                anyhow::bail!("{failed} rule test(s) failed");
            }
            Ok(())
        }
    }
}

async fn silence(base: &str, token: Option<&str>, command: SilenceCommand) -> anyhow::Result<()> {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(t) = token {
        let mut v = reqwest::header::HeaderValue::from_str(&format!("Bearer {t}"))
            .context("the admin token is not a valid header value")?;
        v.set_sensitive(true);
        headers.insert(reqwest::header::AUTHORIZATION, v);
    }
    let http = reqwest::Client::builder()
        .default_headers(headers)
        .build()?;
    let url = format!("{}/api/v1/silences", base.trim_end_matches('/'));
    let answer = |r: reqwest::Response| async move {
        let status = r.status();
        let body: serde_json::Value = r.json().await.unwrap_or_default();
        if !status.is_success() {
            anyhow::bail!(
                "{status}: {}",
                body["error"].as_str().unwrap_or("no error message")
            );
        }
        Ok(body)
    };
    let send = |r: reqwest::RequestBuilder| async move {
        r.send()
            .await
            .with_context(|| format!("reaching the admin API at {base}"))
    };
    match command {
        SilenceCommand::Add {
            matchers,
            duration,
            comment,
            author,
        } => {
            let body = serde_json::json!({"matchers": matchers, "duration": duration, "comment": comment, "createdBy": author});
            let s = answer(send(http.post(&url).json(&body)).await?).await?;
            println!(
                "silence {} until {}",
                s["id"],
                s["ends_at"].as_str().unwrap_or("?")
            );
        }
        SilenceCommand::List { json } => {
            let s = answer(send(http.get(&url)).await?).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
                return Ok(());
            }
            let rows = s["silences"].as_array().cloned().unwrap_or_default();
            if rows.is_empty() {
                println!("no silences");
                return Ok(());
            }
            let mut t = comfy_table::Table::new();
            t.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY)
                .set_header(["id", "state", "matchers", "ends", "by", "comment"]);
            for r in rows {
                let matchers: Vec<String> = r["matchers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|m| m.as_str().map(str::to_owned))
                    .collect();
                let text = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
                t.add_row([
                    r["id"].to_string(),
                    text("state"),
                    matchers.join(" "),
                    text("ends_at"),
                    text("created_by"),
                    text("comment"),
                ]);
            }
            println!("{t}");
        }
        SilenceCommand::Expire { id } => {
            let r = send(http.delete(format!("{url}/{id}"))).await?;
            if r.status().is_success() {
                println!("silence {id} expired");
            } else {
                answer(r).await?;
            }
        }
    }
    Ok(())
}

/// An instant given as RFC 3339, `now`, or a duration before `now` (`24h`, `7d`).
fn parse_instant(
    s: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
    if s == "now" {
        return Ok(now);
    }
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&chrono::Utc));
    }
    match humantime::parse_duration(s) {
        Ok(d) => Ok(now - chrono::Duration::from_std(d)?),
        Err(_) => anyhow::bail!(
            "{s:?} is neither an RFC 3339 time (2026-11-20T08:00:00Z), `now`, nor a duration ago (24h)"
        ),
    }
}

fn print_backtest(r: &toolsight::evaluate::backtest::Report) {
    let fmt = |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%d %H:%M:%S").to_string();
    println!(
        "replayed {} rules over {} .. {} ({} evaluations, {} rows of history)",
        r.rules.len(),
        fmt(r.from),
        fmt(r.to),
        r.evaluations,
        r.rows
    );
    if r.episodes.is_empty() {
        println!("no alert would have fired");
        return;
    }
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY)
        .set_header([
            "alert",
            "key",
            "pending since",
            "fired",
            "resolved",
            "firing for",
            "value",
        ]);
    for e in &r.episodes {
        let end = e.resolved_at.unwrap_or(r.to);
        let firing = humantime::format_duration(std::time::Duration::from_secs(
            (end - e.fired_at).num_seconds().max(0) as u64,
        ));
        t.add_row([
            e.alert.clone(),
            e.key.clone(),
            fmt(e.pending_since),
            fmt(e.fired_at),
            e.resolved_at.map_or("still firing".into(), fmt),
            firing.to_string(),
            e.value.map_or("-".into(), |v| format!("{v:.3}")),
        ]);
    }
    println!("{t}");
    let mut per_rule: std::collections::BTreeMap<&str, usize> = Default::default();
    for e in &r.episodes {
        *per_rule.entry(e.alert.as_str()).or_default() += 1;
    }
    let quiet: Vec<&str> = r
        .rules
        .iter()
        .map(String::as_str)
        .filter(|a| !per_rule.contains_key(a))
        .collect();
    for (alert, n) in &per_rule {
        println!("{alert}: fired {n} time(s)");
    }
    if !quiet.is_empty() {
        println!("never fired: {}", quiet.join(", "));
    }
}

fn print_tools(rows: &[store::queries::ToolSummary], since: &str) {
    if rows.is_empty() {
        println!("no tool calls in the last {since}");
        return;
    }
    let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.1}"));
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY)
        .set_header([
            "service",
            "tool",
            "side",
            "calls",
            "errors",
            "cancelled",
            "empty",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "mean bytes",
            "overhead ms",
        ]);
    for r in rows {
        t.add_row([
            r.service.clone(),
            r.tool.clone(),
            r.side.clone(),
            r.calls.to_string(),
            r.errors.to_string(),
            r.cancellations.to_string(),
            if r.with_result > 0 {
                format!("{}/{}", r.empty_results, r.with_result)
            } else {
                "-".into()
            },
            ms(r.p50_ms),
            ms(r.p95_ms),
            ms(r.p99_ms),
            r.mean_result_bytes
                .map_or("-".into(), |b| format!("{b:.0}")),
            ms(r.mean_overhead_ms),
        ]);
    }
    println!("tool calls in the last {since}\n{t}");
}
