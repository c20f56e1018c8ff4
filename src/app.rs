//! Wiring: binds the listeners, connects the pieces, runs until shutdown, then drains.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::admin::{self, AdminState};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::receive::{self, Ingest};
use crate::store::{self, Writer, WriterConfig};

/// The three listening sockets, bound before the service starts (tests bind port 0).
pub struct Listeners {
    pub grpc: TcpListener,
    pub http: TcpListener,
    pub admin: TcpListener,
}

impl Listeners {
    pub async fn bind(config: &Config) -> anyhow::Result<Listeners> {
        let bind = |addr: SocketAddr, what: &'static str| async move {
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("cannot listen on {addr} ({what})"))
        };
        Ok(Listeners {
            grpc: bind(config.otlp.grpc_listen, "otlp.grpc_listen").await?,
            http: bind(config.otlp.http_listen, "otlp.http_listen").await?,
            admin: bind(config.admin.listen, "admin.listen").await?,
        })
    }

    pub fn addrs(&self) -> std::io::Result<(SocketAddr, SocketAddr, SocketAddr)> {
        Ok((
            self.grpc.local_addr()?,
            self.http.local_addr()?,
            self.admin.local_addr()?,
        ))
    }
}

/// Creates the database if configured to, waits for it up to `connect_timeout`, and migrates.
pub async fn prepare_database(config: &Config) -> anyhow::Result<sqlx::PgPool> {
    let opts = store::connect_options(&config.database.url)?;
    let shown = store::url_without_password(&config.database.url);
    let deadline = Instant::now() + config.database.connect_timeout;
    let mut delay = Duration::from_millis(250);
    loop {
        let attempt = async {
            if config.database.create_database {
                store::create_database_if_missing(&opts).await?;
            }
            store::query_pool(&opts, config.database.query_connections).await
        };
        match attempt.await {
            Ok(pool) => {
                store::migrate(&pool).await.context("applying migrations")?;
                return Ok(pool);
            }
            Err(e) if e.is_retryable() && Instant::now() < deadline => {
                tracing::warn!(database = %shown, error = %e, "database not reachable yet, retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
            Err(e) => return Err(e).with_context(|| format!("connecting to {shown}")),
        }
    }
}

/// Runs the service on `listeners` until `shutdown` resolves, then stops accepting, finishes
/// the exports in flight, flushes the write queue and returns.
pub async fn run(
    config: Config,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    // Bad rule files stop the start, every problem listed.
    let rule_files = crate::evaluate::run::load_rules(&config.rules.files)?;
    let pool = prepare_database(&config).await?;
    let opts = store::connect_options(&config.database.url)?;
    let metrics = Arc::new(Metrics::new());
    let ready = Arc::new(AtomicBool::new(true));
    metrics.db_up.set(1);

    let close_writer = CancellationToken::new();
    let (writer, writer_task) = Writer::spawn(
        &opts,
        &WriterConfig {
            writers: config.ingest.writers,
            batch_rows: config.ingest.batch_rows,
            queue_rows: config.ingest.queue_rows,
        },
        metrics.clone(),
        close_writer.clone(),
    );
    let auth = if config.auth.ingest_required() {
        let auth = crate::receive::auth::Auth::new(
            config.auth.tokens.clone(),
            config.auth.tokens_file.clone(),
            config.auth.admin_token.clone(),
        )
        .map_err(anyhow::Error::msg)?;
        Arc::new(auth)
    } else {
        Arc::new(crate::receive::auth::Auth::open())
    };
    if config.auth.allow_unauthenticated {
        for (key, addr) in config.exposed_listeners() {
            let open = if key == "admin.listen" {
                config.auth.admin_token.is_none()
            } else {
                !config.auth.ingest_required()
            };
            if open {
                tracing::warn!(listener = key, address = %addr, "listening without authentication on a non-loopback address (auth.allow_unauthenticated)");
            }
        }
    }
    let ingest = Arc::new(
        Ingest::new(
            writer,
            config.normalize_options(),
            config.otlp.max_concurrent_exports,
            metrics.clone(),
            ready.clone(),
        )
        .with_auth(auth.clone())
        .with_cardinality(config.cardinality())
        .with_decode_budget(config.otlp.decode_budget_bytes),
    );

    let stop = CancellationToken::new();
    let (grpc_addr, http_addr, admin_addr) = listeners.addrs()?;

    let dead_tasks = admin::DeadTasks::default();
    let supervise =
        |name: &'static str, task| supervise(name, task, dead_tasks.clone(), metrics.clone());
    let token_watch = supervise(
        "token_watch",
        tokio::spawn(auth.watch(metrics.clone(), stop.clone())),
    );
    let pruner = supervise(
        "pruner",
        tokio::spawn(prune_periodically(
            pool.clone(),
            config.retention.clone(),
            stop.clone(),
        )),
    );
    let own_metrics = supervise(
        "own_metrics",
        tokio::spawn(record_own_metrics(
            pool.clone(),
            metrics.clone(),
            config.admin.record_metrics_every,
            stop.clone(),
        )),
    );
    let health = supervise(
        "database_probe",
        tokio::spawn(watch_database(
            pool.clone(),
            ready.clone(),
            metrics.clone(),
            stop.clone(),
        )),
    );
    let tls_files = config.tls.files();
    let acceptor = |verify_clients: bool| -> anyhow::Result<_> {
        Ok(match &tls_files {
            Some(f) => Some(tokio_rustls::TlsAcceptor::from(
                f.server_config(verify_clients)?,
            )),
            None => None,
        })
    };
    let connections = crate::listener::fit_descriptors(&config);
    let otlp_limits = crate::listener::Limits {
        max_connections: connections,
        idle_timeout: config.otlp.idle_timeout,
        handshake_timeout: config.otlp.idle_timeout.min(Duration::from_secs(10)),
    };
    let accept = |listener, name, tls, limits| {
        crate::listener::accept(listener, name, tls, limits, metrics.clone(), stop.clone())
    };
    let grpc = tokio::spawn(receive::grpc::serve(
        accept(listeners.grpc, "grpc", acceptor(true)?, otlp_limits),
        ingest.clone(),
        receive::grpc::Limits {
            max_decoded_bytes: config.otlp.max_decompressed_bytes,
            request_timeout: config.otlp.body_timeout * 2,
        },
        stop.clone().cancelled_owned(),
    ));
    let http_router = receive::http::router(
        ingest.clone(),
        receive::http::Limits {
            max_body_bytes: config.otlp.max_request_bytes,
            max_decoded_bytes: config.otlp.max_decompressed_bytes,
            body_timeout: config.otlp.body_timeout,
        },
    );
    let http = tokio::spawn(crate::listener::serve_http(
        accept(listeners.http, "http", acceptor(true)?, otlp_limits),
        http_router,
        config.otlp.idle_timeout,
        stop.clone(),
    ));
    let shared_rules = Arc::new(std::sync::RwLock::new(rule_files.clone()));
    let admin_router = admin::router(AdminState {
        pool: pool.clone(),
        metrics: metrics.clone(),
        ready: ready.clone(),
        dead_tasks: dead_tasks.clone(),
        rules: shared_rules.clone(),
        admin_token: config.auth.admin_token.clone(),
    });
    let evaluator = config.rules.enabled.then(|| {
        let ev = crate::evaluate::run::Evaluator::new(pool.clone(), rule_files);
        let source = crate::evaluate::run::RuleSource {
            files: config.rules.files.clone(),
            shared: shared_rules.clone(),
        };
        supervise(
            "evaluator",
            tokio::spawn(crate::evaluate::run::run(
                ev,
                opts.clone(),
                source,
                metrics.clone(),
                stop.clone(),
            )),
        )
    });
    // Notifications follow the rules: a replica that does not evaluate does not notify either.
    let notifier = config.rules.enabled.then(|| {
        supervise(
            "notifier",
            tokio::spawn(crate::notify::run::run(
                Arc::new(config.notify.clone()),
                pool.clone(),
                opts.clone(),
                metrics.clone(),
                stop.clone(),
            )),
        )
    });
    // The admin port verifies no client certificates: it has its own token, and probes must
    // reach it. Its connections are bounded apart from the OTLP ports', so a flood there leaves
    // probes and metrics reachable.
    let admin_tls = if config.tls.plain_admin {
        None
    } else {
        acceptor(false)?
    };
    let admin_limits = crate::listener::Limits {
        max_connections: crate::listener::ADMIN_CONNECTIONS,
        ..otlp_limits
    };
    let admin = tokio::spawn(crate::listener::serve_http(
        accept(listeners.admin, "admin", admin_tls, admin_limits),
        admin_router,
        config.otlp.idle_timeout,
        stop.clone(),
    ));
    drop(ingest);
    tracing::info!(grpc = %grpc_addr, http = %http_addr, admin = %admin_addr, "toolsight is listening");

    tokio::select! {
        _ = shutdown => tracing::info!("shutting down: no new exports, flushing accepted ones"),
        _ = stop.cancelled() => {}
    }
    stop.cancel();
    // Exports in progress get `drain_timeout` to finish; a client still sending after that
    // (a slow body, a stream that never ends) is cut rather than holding the shutdown.
    let (grpc_abort, http_abort, admin_abort) = (
        grpc.abort_handle(),
        http.abort_handle(),
        admin.abort_handle(),
    );
    match tokio::time::timeout(config.otlp.drain_timeout, async {
        tokio::join!(grpc, http, admin)
    })
    .await
    {
        Ok((g, h, a)) => {
            g?.context("otlp/grpc server")?;
            h?;
            a?;
        }
        Err(_) => {
            tracing::warn!(
                timeout = ?config.otlp.drain_timeout,
                "exports still in progress at the drain timeout; closing their connections"
            );
            grpc_abort.abort();
            http_abort.abort();
            admin_abort.abort();
        }
    }
    // The write queue takes no more exports; what it holds is written, then the writers stop.
    close_writer.cancel();
    writer_task.await?;
    health.await?;
    own_metrics.await?;
    token_watch.await?;
    pruner.await?;
    if let Some(ev) = evaluator {
        ev.await?;
    }
    if let Some(n) = notifier {
        n.await?;
    }
    pool.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// Watches a background task: when it dies (panics), the death is logged at error, counted in
/// `toolsight_background_task_failures_total{task}`, and `/readyz` answers 503 from then on,
/// so an orchestrator replaces the replica instead of it running on without, say, pruning.
pub fn supervise(
    name: &'static str,
    task: tokio::task::JoinHandle<()>,
    dead: admin::DeadTasks,
    metrics: Arc<Metrics>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = task.await
            && e.is_panic()
        {
            let panic = e.into_panic();
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(task = name, panic = %message, "background task died; the service reports not ready");
            metrics
                .task_failures
                .get_or_create(&crate::metrics::TaskLabel { task: name })
                .inc();
            if let Ok(mut d) = dead.lock() {
                d.push(name);
            }
        }
    })
}

/// Samples the service's own metrics into PostgreSQL (the collector health dashboard reads
/// them); retention prunes them with the rest (`retention.own_metrics`).
async fn record_own_metrics(
    pool: sqlx::PgPool,
    metrics: Arc<Metrics>,
    every: Duration,
    stop: CancellationToken,
) {
    if every.is_zero() {
        return;
    }
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "toolsight".into());
    let instance = format!("{host}:{}", std::process::id());
    let mut tick = tokio::time::interval(every);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let now = chrono::Utc::now();
        if let Err(e) = store::stats::record(&pool, now, &instance, &metrics.samples()).await {
            tracing::debug!(error = %e, "recording own metrics failed");
        }
    }
}

/// Prunes old data on `retention.every` (the first run an interval after start).
async fn prune_periodically(
    pool: sqlx::PgPool,
    retention: crate::store::retention::Retention,
    stop: CancellationToken,
) {
    if retention.every.is_zero() {
        return;
    }
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(retention.every) => {}
        }
        let started = Instant::now();
        let result = store::retention::prune(
            &pool,
            &retention,
            chrono::Utc::now(),
            false,
            |table, before, n| {
                if n > 0 {
                    tracing::info!(table, before = %before, rows = n, "pruned");
                }
            },
        )
        .await;
        match result {
            Ok(n) => tracing::debug!(
                rows = n,
                ms = started.elapsed().as_millis() as u64,
                "retention pass done"
            ),
            Err(e) => tracing::warn!(error = %e, "pruning failed; trying again next time"),
        }
    }
}

/// Probes the database every 2 s; readiness follows it.
async fn watch_database(
    pool: sqlx::PgPool,
    ready: Arc<AtomicBool>,
    metrics: Arc<Metrics>,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        let ok = tokio::time::timeout(Duration::from_secs(2), store::ping(&pool))
            .await
            .is_ok_and(|r| r.is_ok());
        let was = ready.swap(ok, Ordering::Relaxed);
        metrics.db_up.set(i64::from(ok));
        if was != ok {
            if ok {
                tracing::info!("database reachable again: accepting exports");
            } else {
                tracing::warn!("database unreachable: refusing exports with retryable errors");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_dead_background_task_is_logged_counted_and_reported() {
        let dead = admin::DeadTasks::default();
        let metrics = Arc::new(Metrics::new());
        let fine = supervise(
            "fine",
            tokio::spawn(async {}),
            dead.clone(),
            metrics.clone(),
        );
        let dying = supervise(
            "pruner",
            tokio::spawn(async { panic!("DateTime - TimeDelta overflowed") }),
            dead.clone(),
            metrics.clone(),
        );
        fine.await.unwrap();
        dying.await.unwrap();
        assert_eq!(*dead.lock().unwrap(), ["pruner"]);
        let text = metrics.encode();
        assert!(
            text.contains("toolsight_background_task_failures_total{task=\"pruner\"} 1"),
            "{text}"
        );
    }
}
