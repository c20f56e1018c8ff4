//! Wiring: binds the listeners, connects the pieces, runs until shutdown, then drains.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_util::FutureExt;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, AdminState};
use crate::config::Config;
use crate::metrics::Metrics;
use crate::receive::{self, Ingest};
use crate::store::{self, Writer};

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
                store::partitions::prepare(
                    &pool,
                    &config.retention,
                    config.ingest.max_clock_skew,
                    chrono::Utc::now(),
                )
                .await
                .context("creating partitions")?;
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

/// What the service's tasks share.
#[derive(Clone)]
struct Parts {
    pool: sqlx::PgPool,
    opts: sqlx::postgres::PgConnectOptions,
    metrics: Arc<Metrics>,
    /// False while the database is unreachable: `/readyz` and ingest answer "unavailable".
    ready: Arc<AtomicBool>,
    dead_tasks: admin::DeadTasks,
    /// The rules in force (reloaded by the evaluator, read by the API).
    rules: crate::evaluate::run::SharedRules,
    /// Cancelled at shutdown: every task and listener stops.
    stop: CancellationToken,
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
    let parts = Parts {
        opts: store::connect_options(&config.database.url)?,
        pool,
        metrics: Arc::new(Metrics::new()),
        ready: Arc::new(AtomicBool::new(true)),
        dead_tasks: admin::DeadTasks::default(),
        rules: Arc::new(std::sync::RwLock::new(rule_files.clone())),
        stop: CancellationToken::new(),
    };
    parts.metrics.db_up.set(1);
    let close_writer = CancellationToken::new();
    let (writer, writer_task) = Writer::spawn(
        &parts.opts,
        &config.ingest,
        config.retention.partition,
        parts.metrics.clone(),
        close_writer.clone(),
    );
    let auth = ingest_auth(&config)?;
    // Forwarding outlives the listeners: what they accepted while draining still goes out.
    let stop_forwarding = CancellationToken::new();
    let (forwarder, forwarding) = crate::forward::Forwarder::start(
        &config.forward,
        &parts.metrics,
        config.otlp.drain_timeout,
        stop_forwarding.clone(),
    )?;
    let ingest = Arc::new(
        Ingest::new(
            writer,
            config.normalize_options(),
            config.otlp.max_concurrent_exports,
            parts.metrics.clone(),
            parts.ready.clone(),
        )
        .with_auth(auth.clone())
        .with_cardinality(config.cardinality())
        .with_decode_budget(config.otlp.decode_budget_bytes)
        .with_forwarder(forwarder),
    );
    let background = start_background(&config, &parts, auth, rule_files);
    let servers = serve_listeners(&config, &parts, listeners, ingest)?;

    tokio::select! {
        _ = shutdown => tracing::info!("shutting down: no new exports, flushing accepted ones"),
        _ = parts.stop.cancelled() => {}
    }
    parts.stop.cancel();
    drain(servers, config.otlp.drain_timeout).await?;
    // The write queue takes no more exports; what it holds is written, then the writers stop.
    close_writer.cancel();
    writer_task.await?;
    stop_forwarding.cancel();
    forwarding.wait().await;
    background.wait().await;
    parts.pool.close().await;
    tracing::info!("stopped");
    Ok(())
}

/// Who may send: the configured tokens (and token file), or anyone.
fn ingest_auth(config: &Config) -> anyhow::Result<Arc<crate::receive::auth::Auth>> {
    if config.auth.allow_unauthenticated {
        for (key, addr, _) in config.open_listeners() {
            tracing::warn!(listener = key, address = %addr, "listening without authentication on a non-loopback address (auth.allow_unauthenticated)");
        }
    }
    Ok(Arc::new(if config.auth.ingest_required() {
        crate::receive::auth::Auth::new(
            config.auth.tokens.clone(),
            config.auth.tokens_file.clone(),
            config.auth.admin_token.clone(),
        )
        .map_err(anyhow::Error::msg)?
    } else {
        crate::receive::auth::Auth::open()
    }))
}

/// The background tasks, each watched (a panic makes the replica unready) and tracked, so
/// shutdown waits for them all once they saw `stop`.
fn start_background(
    config: &Config,
    parts: &Parts,
    auth: Arc<crate::receive::auth::Auth>,
    rule_files: Vec<(String, crate::evaluate::rules::RuleFile)>,
) -> TaskTracker {
    let background = TaskTracker::new();
    let Parts {
        pool,
        opts,
        metrics,
        ready,
        stop,
        ..
    } = parts.clone();
    let spawn = |name: &'static str, task: BoxFuture| {
        background.spawn(supervise(
            name,
            task,
            parts.dead_tasks.clone(),
            metrics.clone(),
        ));
    };
    spawn(
        "token_watch",
        Box::pin(auth.watch(metrics.clone(), stop.clone())),
    );
    spawn(
        "pruner",
        Box::pin(prune_periodically(
            pool.clone(),
            config.retention.clone(),
            stop.clone(),
        )),
    );
    spawn(
        "partitioner",
        Box::pin(create_partitions_ahead(
            pool.clone(),
            config.retention.clone(),
            config.ingest.max_clock_skew,
            stop.clone(),
        )),
    );
    spawn(
        "own_metrics",
        Box::pin(record_own_metrics(
            pool.clone(),
            metrics.clone(),
            config.admin.record_metrics_every,
            stop.clone(),
        )),
    );
    spawn(
        "database_probe",
        Box::pin(watch_database(
            pool.clone(),
            ready,
            metrics.clone(),
            stop.clone(),
        )),
    );
    // Notifications follow the rules: a replica that does not evaluate does not notify either.
    if config.rules.enabled {
        let source = crate::evaluate::run::RuleSource {
            files: config.rules.files.clone(),
            shared: parts.rules.clone(),
        };
        spawn(
            "evaluator",
            Box::pin(crate::evaluate::run::run(
                crate::evaluate::run::Evaluator::new(pool.clone(), rule_files),
                opts.clone(),
                source,
                metrics.clone(),
                stop.clone(),
            )),
        );
        spawn(
            "notifier",
            Box::pin(crate::notify::run::run(
                Arc::new(config.notify.clone()),
                pool,
                opts,
                metrics.clone(),
                stop,
            )),
        );
    }
    background.close();
    background
}

/// The three listeners: one accept loop each (connection bounds, idle time, TLS), then its
/// server (OTLP/gRPC; OTLP/HTTP and the admin API on the same HTTP server code).
fn serve_listeners(
    config: &Config,
    parts: &Parts,
    listeners: Listeners,
    ingest: Arc<Ingest>,
) -> anyhow::Result<JoinSet<anyhow::Result<()>>> {
    let (grpc_addr, http_addr, admin_addr) = listeners.addrs()?;
    let tls_files = config.tls.files();
    let acceptor = |verify_clients: bool| -> anyhow::Result<_> {
        tls_files
            .as_ref()
            .map(|f| {
                Ok(tokio_rustls::TlsAcceptor::from(
                    f.server_config(verify_clients)?,
                ))
            })
            .transpose()
    };
    let otlp_limits = crate::listener::Limits {
        max_connections: crate::listener::fit_descriptors(config),
        idle_timeout: config.otlp.idle_timeout,
        handshake_timeout: config.otlp.idle_timeout.min(Duration::from_secs(10)),
    };
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
    let accept = |listener, name, tls, limits| {
        crate::listener::accept(
            listener,
            name,
            tls,
            limits,
            parts.metrics.clone(),
            parts.stop.clone(),
        )
    };
    let mut servers = JoinSet::new();
    servers.spawn(
        receive::grpc::serve(
            accept(listeners.grpc, "grpc", acceptor(true)?, otlp_limits),
            ingest.clone(),
            receive::grpc::Limits {
                max_decoded_bytes: config.otlp.max_decompressed_bytes,
                request_timeout: config.otlp.body_timeout * 2,
            },
            parts.stop.clone().cancelled_owned(),
        )
        .map(|r| r.context("otlp/grpc server")),
    );
    let http_router = receive::http::router(
        ingest,
        receive::http::Limits {
            max_body_bytes: config.otlp.max_request_bytes,
            max_decoded_bytes: config.otlp.max_decompressed_bytes,
            body_timeout: config.otlp.body_timeout,
        },
    );
    let admin_router = admin::router(AdminState {
        pool: parts.pool.clone(),
        metrics: parts.metrics.clone(),
        ready: parts.ready.clone(),
        dead_tasks: parts.dead_tasks.clone(),
        rules: parts.rules.clone(),
        admin_token: config.auth.admin_token.clone(),
        notify: Arc::new(config.notify.clone()),
        started: chrono::Utc::now(),
    });
    for (listener, name, tls, limits, router) in [
        (
            listeners.http,
            "http",
            acceptor(true)?,
            otlp_limits,
            http_router,
        ),
        (
            listeners.admin,
            "admin",
            admin_tls,
            admin_limits,
            admin_router,
        ),
    ] {
        let conns = accept(listener, name, tls, limits);
        let serve = crate::listener::serve_http(
            conns,
            router,
            config.otlp.idle_timeout,
            parts.stop.clone(),
        );
        servers.spawn(serve.map(Ok));
    }
    tracing::info!(grpc = %grpc_addr, http = %http_addr, admin = %admin_addr, "toolsight is listening");
    Ok(servers)
}

/// Exports in progress get `timeout` to finish; a client still sending after that (a slow body,
/// a stream that never ends) is cut rather than holding the shutdown.
async fn drain(mut servers: JoinSet<anyhow::Result<()>>, timeout: Duration) -> anyhow::Result<()> {
    let drained = tokio::time::timeout(timeout, async {
        while let Some(done) = servers.join_next().await {
            done??;
        }
        anyhow::Ok(())
    })
    .await;
    match drained {
        Ok(result) => result,
        Err(_) => {
            tracing::warn!(
                timeout = ?timeout,
                "exports still in progress at the drain timeout; closing their connections"
            );
            servers.abort_all();
            Ok(())
        }
    }
}

type BoxFuture = std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// Runs a background task and watches it: when it dies (panics), the death is logged at error,
/// counted in `toolsight_background_task_failures_total{task}`, and `/readyz` answers 503 from
/// then on, so an orchestrator replaces the replica instead of it running on without, say,
/// pruning.
pub async fn supervise(
    name: &'static str,
    task: impl Future<Output = ()> + Send + 'static,
    dead: admin::DeadTasks,
    metrics: Arc<Metrics>,
) {
    if let Err(e) = tokio::spawn(task).await
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

/// Keeps partitions ready: creates them ahead of time every 10 minutes
/// (`store::partitions::ahead`), so ingest finds them ready, and every minute gathers the
/// statistics of partitions that filled since (`store::partitions::analyze_stale`), so no plan
/// meets a large partition without them.
async fn create_partitions_ahead(
    pool: sqlx::PgPool,
    retention: crate::store::retention::Retention,
    max_clock_skew: Duration,
    stop: CancellationToken,
) {
    let mut tick: u64 = 0;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(60)) => {}
        }
        tick += 1;
        if tick.is_multiple_of(10) {
            let now = chrono::Utc::now();
            if let Err(e) = store::partitions::prepare(&pool, &retention, max_clock_skew, now).await
            {
                tracing::warn!(error = %e, "creating partitions ahead failed; trying again in 10 minutes");
            }
        }
        if let Err(e) =
            store::partitions::analyze_stale(&pool, store::partitions::ANALYZE_AFTER_ROWS).await
        {
            tracing::warn!(error = %e, "gathering partition statistics failed; trying again in a minute");
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
            |p| {
                if p.partition {
                    tracing::info!(partition = p.table, before = %p.before, rows = p.rows, "dropped expired partition");
                } else if p.rows > 0 {
                    tracing::info!(table = p.table, before = %p.before, rows = p.rows, "pruned");
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
        supervise("fine", async {}, dead.clone(), metrics.clone()).await;
        supervise(
            "pruner",
            async { panic!("DateTime - TimeDelta overflowed") },
            dead.clone(),
            metrics.clone(),
        )
        .await;
        assert_eq!(*dead.lock().unwrap(), ["pruner"]);
        let text = metrics.encode();
        assert!(
            text.contains("toolsight_background_task_failures_total{task=\"pruner\"} 1"),
            "{text}"
        );
    }
}
