//! What each command does, once `main` has parsed the arguments: `serve` and the database
//! commands here, the admin API client (`silence`), rule backtest output (`rules`), the tool
//! table (`tools`) and the demo (`demo`).

mod demo;
mod rules;
mod silence;
mod tools;

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
    // Like `promtool`, the rule commands read only their files, and a silence client given
    // its server and token reads nothing else: they work where the service config is missing
    // or made for a container.
    let command = match cli.command {
        Command::Rules {
            command: RulesCommand::Check { files, json },
        } => return rules::check(files, json),
        Command::Rules {
            command: RulesCommand::Test { files, json },
        } => return rules::test(&files, json),
        Command::Silence {
            url: Some(url),
            token: Some(token),
            command,
        } => return silence(&url, Some(&token), command).await,
        other => other,
    };
    let mut config = Config::load(cli.config.as_deref())?;
    if matches!(
        command,
        Command::Serve | Command::Demo { .. } | Command::Config
    ) {
        // Only what listens needs its listeners closed to strangers.
        config.check_servable()?;
    }
    if matches!(command, Command::Demo { .. }) {
        // The demo's own lines tell the story; the service speaks only of problems.
        config.log.level = "warn".into();
    }
    init_logging(&config);
    if !matches!(command, Command::Serve | Command::Demo { .. }) {
        store::cluster::use_running(&mut config.database);
    }
    match command {
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
            let since = since.to_string();
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
        Command::Prune { dry_run, json } => {
            let opts = store::connect_options(&config.database.url)?;
            let pool = store::query_pool(&opts, 1)
                .await
                .context("connecting to the database")?;
            let started = std::time::Instant::now();
            let verb = if dry_run { "would delete" } else { "deleted" };
            let mut pruned = Vec::new();
            let total = store::retention::prune(
                &pool,
                &config.retention,
                chrono::Utc::now(),
                dry_run,
                |p| {
                    let (table, n, before) = (p.table, p.rows, p.before);
                    if json {
                        pruned.push(serde_json::json!({
                            "table": table, "rows": n, "before": before, "partition": p.partition,
                        }));
                        return;
                    }
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
            let seconds = started.elapsed().as_secs_f64();
            if json {
                let report = serde_json::json!({
                    "dryRun": dry_run, "pruned": pruned, "rows": total, "seconds": seconds,
                });
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("{verb} {total} rows in {seconds:.1} s");
            }
            Ok(())
        }
        Command::Config => {
            print!("{}", config.to_toml());
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
            let base = url.unwrap_or_else(|| admin_base(&config));
            silence(&base, token.as_deref(), command).await
        }
        Command::Healthcheck { url, timeout } => {
            let base = url.unwrap_or_else(|| admin_base(&config));
            healthcheck(&base, &config, timeout.into()).await
        }
        Command::Rules {
            command: RulesCommand::Check { .. } | RulesCommand::Test { .. },
        } => unreachable!("rule commands return before the config is loaded"),
    }
}

/// The admin API as this host reaches it: the configured `admin.listen`, on loopback when it
/// listens on every interface, https when TLS is configured for it.
fn admin_base(config: &Config) -> String {
    let mut a = config.admin.listen;
    if a.ip().is_unspecified() {
        a.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let tls = config.tls.cert_file.is_some() && !config.tls.plain_admin;
    format!("{}://{a}", if tls { "https" } else { "http" })
}

/// `GET {base}/readyz`: Ok when it answers 200. The certificates of `tls.cert_file` are trusted
/// besides the platform's, so a private CA in the served chain works.
async fn healthcheck(
    base: &str,
    config: &Config,
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    let mut http = reqwest::Client::builder().timeout(timeout);
    if let Some(cert) = &config.tls.cert_file {
        let pem = std::fs::read(cert).with_context(|| format!("reading {}", cert.display()))?;
        http = http.tls_certs_merge(reqwest::Certificate::from_pem_bundle(&pem)?);
    }
    let url = format!("{}/readyz", base.trim_end_matches('/'));
    let r = http
        .build()?
        .get(&url)
        .send()
        .await
        .with_context(|| format!("reaching {url}"))?;
    let status = r.status();
    let body = r.text().await.unwrap_or_default();
    if !status.is_success() {
        anyhow::bail!("not ready ({status}): {}", body.trim());
    }
    println!("ready");
    Ok(())
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
