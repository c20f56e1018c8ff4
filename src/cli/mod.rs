//! What each command does, once `main` has parsed the arguments: `serve` and the database
//! commands here, the admin API client (`silence`), rule backtest output (`rules`), the tool
//! table (`tools`) and the demo (`demo`).

mod demo;
mod rules;
mod silence;
mod tools;

use std::path::PathBuf;

use anyhow::Context;
use toolsight::config::{Config, LogFormat};
use toolsight::{app, store};

use rules::{parse_instant, print_backtest};
use silence::silence;
use tools::print_tools;

use crate::{Cli, Command, RulesCommand};

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

pub(crate) async fn run(cli: Cli) -> anyhow::Result<()> {
    let mut config = Config::load(cli.config.as_deref())?;
    if matches!(cli.command, Command::Demo { .. }) {
        // The demo's own lines tell the story; the service speaks only of problems.
        config.log.level = "warn".into();
    }
    init_logging(&config);
    if !matches!(cli.command, Command::Serve | Command::Demo { .. }) {
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
        Command::Demo { duration } => demo::demo(config, duration.into(), shutdown_signal()).await,
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
            let rows: Vec<toolsight::admin::ToolStats> = store::queries::tool_summary(&pool, secs)
                .await?
                .into_iter()
                .map(Into::into)
                .collect();
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
                &config.retention,
                chrono::Utc::now(),
                dry_run,
                |p| {
                    let (table, n, before) = (p.table, p.rows, p.before);
                    let before = before.format("%Y-%m-%d %H:%M:%S UTC");
                    if p.partition {
                        let verb = if dry_run { "would drop" } else { "dropped" };
                        println!(
                            "{table:<34} {verb} {n:>10} rows (partition ending before {before})"
                        );
                    } else {
                        println!("{table:<34} {verb} {n:>10} rows older than {before}");
                    }
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

/// 75 (`EX_TEMPFAIL`) when the failure may pass by itself (the database unreachable, a
/// transaction that lost a conflict), so a supervisor retries; 1 when it will fail the same way
/// until someone fixes something (a bad configuration, bad rule files, TLS files). Each layer's
/// error says which it is.
pub(crate) fn exit_code(e: &anyhow::Error) -> std::process::ExitCode {
    use toolsight::{config, evaluate, notify, store, tls};
    let retryable = e.chain().any(|cause| {
        if let Some(e) = cause.downcast_ref::<store::StoreError>() {
            e.is_retryable()
        } else if let Some(e) = cause.downcast_ref::<config::ConfigError>() {
            e.is_retryable()
        } else if let Some(e) = cause.downcast_ref::<evaluate::rules::RulesError>() {
            e.is_retryable()
        } else if let Some(e) = cause.downcast_ref::<evaluate::backtest::BacktestError>() {
            e.is_retryable()
        } else if let Some(e) = cause.downcast_ref::<notify::NotifyError>() {
            e.is_retryable()
        } else if let Some(e) = cause.downcast_ref::<tls::TlsError>() {
            e.is_retryable()
        } else {
            false
        }
    });
    std::process::ExitCode::from(if retryable { 75 } else { 1 })
}
