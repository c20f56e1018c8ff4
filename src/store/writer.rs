//! The batch writer: a bounded queue of normalized exports, drained by a few writer tasks that
//! COPY them into staging tables and move them into the raw tables and rollups in one
//! transaction. Each export is acknowledged only after that transaction commits.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Executor, PgPool};
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;

use std::collections::HashSet;

use sqlx::Connection;

use super::StoreError;
use super::copy::{CopyBuf, columns};
use super::correlate;
use super::policy::RawPolicy;
use super::rollup::{Inserted, Key, Rollups};
use crate::metrics::{KindLabel, Metrics, RetryableLabel};
use crate::normalize::Normalized;

/// The `[ingest]` settings: the writers and their queue, and the bounds the normalizer applies
/// to what they write (span age, clock skew, the cardinality guard).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Ingest {
    /// Writer tasks, one database connection each.
    pub writers: usize,
    /// A writer takes queued exports until it holds about this many records.
    pub batch_rows: usize,
    /// Records the queue holds at most; a full queue answers exports with a retryable error.
    pub queue_rows: usize,
    #[serde(with = "humantime_serde")]
    pub max_span_age: Duration,
    #[serde(with = "humantime_serde")]
    pub max_clock_skew: Duration,
    /// Cardinality guard: distinct services, and tools (methods, models, upstreams) per
    /// service, beyond which new keys fold into `__overflow__`.
    pub max_services: usize,
    pub max_keys_per_service: usize,
    /// Distinct session keys per hour, across services.
    pub max_sessions_per_hour: usize,
    /// Distinct trace-id session keys (no session attribute sent) per hour.
    pub max_trace_sessions_per_hour: usize,
    /// The raw-row policy ([`RawPolicy`]): share of traces whose ordinary calls keep their raw
    /// rows (1: all), the duration from which a call is always kept, and per-tool durations.
    pub raw_keep_ok: f64,
    #[serde(with = "humantime_serde")]
    pub raw_slow: Duration,
    pub raw_slow_tools: std::collections::BTreeMap<String, humantime_serde::Serde<Duration>>,
}

impl Ingest {
    /// The raw-row policy these settings give.
    pub fn raw_policy(&self) -> RawPolicy {
        RawPolicy {
            keep_ok: self.raw_keep_ok,
            slow: self.raw_slow,
            slow_tools: self
                .raw_slow_tools
                .iter()
                .map(|(tool, d)| (tool.clone(), **d))
                .collect(),
        }
    }
}

impl Default for Ingest {
    fn default() -> Self {
        Ingest {
            writers: 2,
            batch_rows: 10_000,
            queue_rows: 100_000,
            max_span_age: Duration::from_secs(7 * 24 * 3600),
            max_clock_skew: Duration::from_secs(3600),
            max_services: 1000,
            max_keys_per_service: 500,
            max_sessions_per_hour: 200_000,
            max_trace_sessions_per_hour: 100_000,
            raw_keep_ok: RawPolicy::default().keep_ok,
            raw_slow: RawPolicy::default().slow,
            raw_slow_tools: Default::default(),
        }
    }
}

/// Why an export could not be stored.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SubmitError {
    #[error("write queue is full")]
    QueueFull,
    #[error("writer is shutting down")]
    Closed,
    /// The database cannot store it now; the same export may be stored later.
    #[error("storing failed, retry later: {0}")]
    Unavailable(String),
    /// The database refused this export's own content (written alone, it still fails with a
    /// data error): sending it again cannot succeed.
    #[error("the database refused the export's content: {0}")]
    Rejected(String),
}

impl SubmitError {
    pub fn is_retryable(&self) -> bool {
        !matches!(self, SubmitError::Rejected(_))
    }
}

struct Job {
    records: Normalized,
    rows: usize,
    ack: oneshot::Sender<Result<(), SubmitError>>,
    _permit: OwnedSemaphorePermit,
}

/// The handle exports are submitted through. Dropping every clone lets the writers drain the
/// queue and stop.
#[derive(Clone)]
pub struct Writer {
    tx: mpsc::Sender<Job>,
    permits: Arc<Semaphore>,
    queue_rows: usize,
    metrics: Arc<Metrics>,
}

/// Per-connection staging tables, emptied at every commit: raw records (used only when a batch
/// holds spans already stored) and rollup deltas.
const STAGING: &str = "
CREATE TEMP TABLE IF NOT EXISTS stage_tool_calls (LIKE tool_calls INCLUDING DEFAULTS) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS stage_mcp_requests (LIKE mcp_requests INCLUDING DEFAULTS) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS stage_llm_calls (LIKE llm_calls INCLUDING DEFAULTS) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS stage_upstream_calls (LIKE upstream_calls INCLUDING DEFAULTS) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS stage_tool_rollup (LIKE tool_rollup_1m INCLUDING DEFAULTS) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS stage_method_rollup (LIKE mcp_method_rollup_1m INCLUDING DEFAULTS) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS stage_llm_rollup (LIKE llm_rollup_1m INCLUDING DEFAULTS) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS stage_upstream_rollup (LIKE upstream_rollup_1m INCLUDING DEFAULTS) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS stage_loop_calls (LIKE loop_calls_1m INCLUDING DEFAULTS) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS stage_session_tokens (LIKE session_tokens_1m INCLUDING DEFAULTS) ON COMMIT DELETE ROWS;
";

/// The statements that write one raw table, every column named, built once.
struct RawWrite {
    /// `COPY` straight into the table (a batch of new spans).
    copy: String,
    /// `COPY` into its staging table, then the move of the rows not stored yet.
    copy_stage: String,
    insert_new: String,
}

/// The four raw tables' statements, in `encode_records`' order.
static RAW_WRITES: std::sync::LazyLock<[RawWrite; 4]> = std::sync::LazyLock::new(|| {
    [
        ("tool_calls", &columns::TOOL_CALLS[..]),
        ("mcp_requests", &columns::MCP_REQUESTS[..]),
        ("llm_calls", &columns::LLM_CALLS[..]),
        ("upstream_calls", &columns::UPSTREAM_CALLS[..]),
    ]
    .map(|(table, columns)| {
        let list = columns.join(", ");
        RawWrite {
            copy: format!("COPY {table} ({list}) FROM STDIN (FORMAT binary)"),
            copy_stage: format!("COPY stage_{table} ({list}) FROM STDIN (FORMAT binary)"),
            insert_new: format!(
                "INSERT INTO {table} ({list}) SELECT {list} FROM stage_{table} ON CONFLICT DO NOTHING RETURNING trace_id, span_id"
            ),
        }
    })
});

/// Merges of the staged rollup deltas, in key order (the COPY order) so concurrent writers lock
/// rows in the same order: (the COPY into staging, the merge), every column named.
static MERGE_ROLLUPS: std::sync::LazyLock<[(String, String); 6]> = std::sync::LazyLock::new(|| {
    [
        merge(
            "stage_tool_rollup",
            "tool_rollup_1m",
            &columns::TOOL_ROLLUP,
            "ORDER BY service, tool, side, minute
         ON CONFLICT (service, tool, side, minute, shard) DO UPDATE SET
            calls = r.calls + EXCLUDED.calls,
            errors = r.errors + EXCLUDED.errors,
            cancellations = r.cancellations + EXCLUDED.cancellations,
            with_result = r.with_result + EXCLUDED.with_result,
            empty_results = r.empty_results + EXCLUDED.empty_results,
            result_bytes = r.result_bytes + EXCLUDED.result_bytes,
            result_items = r.result_items + EXCLUDED.result_items,
            sized_results = r.sized_results + EXCLUDED.sized_results,
            counted_results = r.counted_results + EXCLUDED.counted_results,
            overhead_calls = r.overhead_calls + EXCLUDED.overhead_calls,
            overhead_us_sum = r.overhead_us_sum + EXCLUDED.overhead_us_sum,
            duration_us_sum = r.duration_us_sum + EXCLUDED.duration_us_sum,
            latency_hist = toolsight_hist_add(r.latency_hist, EXCLUDED.latency_hist);",
        ),
        merge(
            "stage_method_rollup",
            "mcp_method_rollup_1m",
            &columns::METHOD_ROLLUP,
            "ORDER BY service, method, side, minute
         ON CONFLICT (service, method, side, minute, shard) DO UPDATE SET
            calls = r.calls + EXCLUDED.calls,
            errors = r.errors + EXCLUDED.errors,
            orphans = r.orphans + EXCLUDED.orphans,
            latency_hist = toolsight_hist_add(r.latency_hist, EXCLUDED.latency_hist);",
        ),
        merge(
            "stage_llm_rollup",
            "llm_rollup_1m",
            &columns::LLM_ROLLUP,
            "ORDER BY service, model, minute
         ON CONFLICT (service, model, minute, shard) DO UPDATE SET
            calls = r.calls + EXCLUDED.calls,
            errors = r.errors + EXCLUDED.errors,
            input_tokens = r.input_tokens + EXCLUDED.input_tokens,
            output_tokens = r.output_tokens + EXCLUDED.output_tokens,
            latency_hist = toolsight_hist_add(r.latency_hist, EXCLUDED.latency_hist);",
        ),
        merge(
            "stage_upstream_rollup",
            "upstream_rollup_1m",
            &columns::UPSTREAM_ROLLUP,
            "ORDER BY service, server_address, minute
         ON CONFLICT (service, server_address, minute, shard) DO UPDATE SET
            calls = r.calls + EXCLUDED.calls,
            rate_limited = r.rate_limited + EXCLUDED.rate_limited,
            server_errors = r.server_errors + EXCLUDED.server_errors,
            min_remaining_ratio = least(r.min_remaining_ratio, EXCLUDED.min_remaining_ratio),
            latency_hist = toolsight_hist_add(r.latency_hist, EXCLUDED.latency_hist);",
        ),
        merge(
            "stage_loop_calls",
            "loop_calls_1m",
            &columns::LOOP_CALLS,
            "ORDER BY minute, service, tool, session_key, args_hash
         ON CONFLICT (minute, service, tool, session_key, args_hash, shard) DO UPDATE SET
            calls = r.calls + EXCLUDED.calls,
            failed = r.failed + EXCLUDED.failed,
            stuck = r.stuck + EXCLUDED.stuck;",
        ),
        merge(
            "stage_session_tokens",
            "session_tokens_1m",
            &columns::SESSION_TOKENS,
            "ORDER BY minute, service, session_key
         ON CONFLICT (minute, service, session_key, shard) DO UPDATE SET tokens = r.tokens + EXCLUDED.tokens;",
        ),
    ]
});

/// `COPY` into `stage` and `INSERT INTO table (columns) SELECT columns FROM stage {tail}`.
fn merge(stage: &str, table: &str, columns: &[&str], tail: &str) -> (String, String) {
    let list = columns.join(", ");
    (
        format!("COPY {stage} ({list}) FROM STDIN (FORMAT binary)"),
        format!("INSERT INTO {table} AS r ({list}) SELECT {list} FROM {stage} {tail}"),
    )
}

impl Writer {
    /// Starts the writer tasks on their own pool (`config.writers` connections).
    /// Returns the handle and one task that ends when every writer has drained the queue and
    /// stopped (then the writers' pool is closed). The queue ends when every handle is dropped,
    /// or when `close` is cancelled: from then on submits fail as `Closed` and what is already
    /// queued is written.
    pub fn spawn(
        opts: &PgConnectOptions,
        config: &Ingest,
        partition: Duration,
        metrics: Arc<Metrics>,
        close: tokio_util::sync::CancellationToken,
    ) -> (Writer, JoinHandle<()>) {
        let pool = PgPoolOptions::new()
            .max_connections(config.writers as u32)
            .acquire_timeout(Duration::from_secs(2))
            .after_connect(|conn, _| {
                Box::pin(async move { conn.execute(STAGING).await.map(|_| ()) })
            })
            .connect_lazy_with(opts.clone());
        let queue_rows = config.queue_rows.max(1);
        let (tx, rx) = mpsc::channel::<Job>(queue_rows.min(65_536));
        let rx = Arc::new(Mutex::new(rx));
        metrics.queue_capacity_rows.set(queue_rows as i64);
        let handles: Vec<JoinHandle<()>> = (0..config.writers.max(1))
            .map(|w| {
                let (rx, pool, metrics) = (rx.clone(), pool.clone(), metrics.clone());
                let close = close.clone();
                let shard = w as i16;
                let batch_rows = config.batch_rows.max(1);
                let policy = config.raw_policy();
                tokio::spawn(async move {
                    let target = Target {
                        pool,
                        shard,
                        partition,
                        policy,
                    };
                    run_writer(rx, target, batch_rows, metrics, close).await
                })
            })
            .collect();
        // The pool is shared: closed once, after the last writer is done with it.
        let all = tokio::spawn(async move {
            for h in handles {
                if let Err(e) = h.await {
                    tracing::error!(error = %e, "writer task failed");
                }
            }
            pool.close().await;
        });
        let writer = Writer {
            tx,
            permits: Arc::new(Semaphore::new(queue_rows)),
            queue_rows,
            metrics,
        };
        (writer, all)
    }

    /// True when the queue has no room left: new exports can be refused before decoding.
    pub fn is_saturated(&self) -> bool {
        self.permits.available_permits() == 0
    }

    /// Queues an export's records and waits until they are committed. Fails at once, without
    /// waiting, when the queue is full.
    pub async fn submit(&self, records: Normalized) -> Result<(), SubmitError> {
        let rows = records.records().clamp(1, self.queue_rows);
        let permit = self
            .permits
            .clone()
            .try_acquire_many_owned(rows as u32)
            .map_err(|_| SubmitError::QueueFull)?;
        let (ack, done) = oneshot::channel();
        let job = Job {
            records,
            rows,
            ack,
            _permit: permit,
        };
        self.tx.try_send(job).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SubmitError::QueueFull,
            mpsc::error::TrySendError::Closed(_) => SubmitError::Closed,
        })?;
        self.metrics.queue_depth_rows.inc_by(rows as i64);
        done.await.unwrap_or(Err(SubmitError::Closed))
    }
}

/// Where a writer task writes: its pool, its shard of the rollups, and the span of the raw
/// partitions it creates when a row needs one that does not exist yet.
struct Target {
    pool: PgPool,
    shard: i16,
    partition: Duration,
    policy: RawPolicy,
}

async fn run_writer(
    rx: Arc<Mutex<mpsc::Receiver<Job>>>,
    target: Target,
    batch_rows: usize,
    metrics: Arc<Metrics>,
    close: tokio_util::sync::CancellationToken,
) {
    let Target { pool, shard, .. } = &target;
    let shard = *shard;
    loop {
        let mut jobs = Vec::new();
        {
            let mut rx = rx.lock().await;
            let next = tokio::select! {
                biased;
                job = rx.recv() => job,
                _ = close.cancelled() => {
                    // No new exports; what is queued is still written.
                    rx.close();
                    rx.recv().await
                }
            };
            let Some(first) = next else {
                break;
            };
            let mut rows = first.rows;
            jobs.push(first);
            while rows < batch_rows {
                match rx.try_recv() {
                    Ok(j) => {
                        rows += j.rows;
                        jobs.push(j);
                    }
                    Err(_) => break,
                }
            }
        }
        let rows: usize = jobs.iter().map(|j| j.rows).sum();
        let started = Instant::now();
        // Sides of a call that arrive in one batch are written joined.
        let complete = correlate::prejoin(jobs.iter_mut().map(|j| &mut j.records));
        let result = write_with_retry(&target, &jobs).await;
        metrics
            .write_seconds
            .observe(started.elapsed().as_secs_f64());
        metrics.batch_rows.observe(rows as f64);
        // A batch stored whole, every row new: its complete traces need no join.
        let all_new = result.as_ref().is_ok_and(|w| *w == kind_counts(&jobs));
        let complete = if all_new {
            complete
        } else {
            Default::default()
        };
        let acks: Vec<Result<(), SubmitError>> = match result {
            Ok(written) => {
                count_written(&metrics, written);
                jobs.iter().map(|_| Ok(())).collect()
            }
            Err(e) if !e.is_retryable() && jobs.len() > 1 => {
                // One export's content can fail a whole batch of several clients' exports:
                // each is written alone, so only the export at fault fails.
                count_db_error(&metrics, &e);
                tracing::warn!(error = %e, exports = jobs.len(), rows, "batch write failed; writing its exports one by one");
                let mut acks = Vec::with_capacity(jobs.len());
                for job in &jobs {
                    let alone = std::slice::from_ref(job);
                    acks.push(match write_with_retry(&target, alone).await {
                        Ok(written) => {
                            count_written(&metrics, written);
                            Ok(())
                        }
                        Err(e) => Err(failed(&metrics, e, job.rows)),
                    });
                }
                acks
            }
            Err(e) => {
                let err = failed(&metrics, e, rows);
                jobs.iter().map(|_| Err(err.clone())).collect()
            }
        };
        // Join the stored exports' calls with what was stored before them (the other side of a
        // call, a nested client span) before answering, so an answered export is joined.
        let stored = jobs
            .iter()
            .zip(&acks)
            .filter(|(_, a)| a.is_ok())
            .map(|(j, _)| &j.records);
        join_stored(pool, stored, &complete, all_new, shard, &metrics).await;
        metrics.queue_depth_rows.dec_by(rows as i64);
        for (job, ack) in jobs.into_iter().zip(acks) {
            // The exporter may have gone away; its records are committed all the same.
            let _ = job.ack.send(ack);
        }
    }
}

/// Joins the calls of stored exports with the stored rows of their traces. A failure leaves
/// the rows stored and unjoined (counted); it is not the exporters' to retry.
async fn join_stored<'a>(
    pool: &PgPool,
    stored: impl IntoIterator<Item = &'a Normalized>,
    complete: &HashSet<[u8; 16]>,
    all_new: bool,
    shard: i16,
    metrics: &Metrics,
) {
    let stored: Vec<&Normalized> = stored.into_iter().collect();
    let (tools, methods) = correlate::traces_of(stored.iter().copied(), complete);
    // Rows per trace this batch wrote, when all of them were new (see `correlate::join`).
    let batch_rows = all_new.then(|| {
        let mut rows: std::collections::HashMap<Vec<u8>, i64> = Default::default();
        for c in stored.iter().flat_map(|n| &n.tool_calls) {
            *rows.entry(c.span.trace_id.to_vec()).or_default() += 1;
        }
        rows
    });
    if tools.is_empty() && methods.is_empty() {
        return;
    }
    let result = retry_conflicts(|| async {
        let mut conn = pool.acquire().await?;
        let mut tx = conn.begin().await?;
        let joined = correlate::join(&mut tx, &tools, &methods, batch_rows.as_ref(), shard).await?;
        tx.commit().await?;
        Ok::<_, StoreError>(joined)
    })
    .await;
    match result {
        Ok(joined) => {
            for (kind, n) in [("pair", joined.pairs), ("nested", joined.nested)] {
                if n > 0 {
                    metrics
                        .correlated
                        .get_or_create(&KindLabel { kind })
                        .inc_by(n);
                }
            }
        }
        Err(e) => {
            metrics.correlation_failures.inc();
            tracing::warn!(error = %e, traces = tools.len(), "joining stored calls failed; their rows stay unjoined");
        }
    }
}

const KINDS: [&str; 4] = ["tool_call", "mcp_request", "llm_call", "upstream_call"];

fn count_written(metrics: &Metrics, written: Written) {
    for (kind, n) in KINDS.into_iter().zip(written) {
        metrics
            .records_written
            .get_or_create(&KindLabel { kind })
            .inc_by(n as u64);
    }
}

fn count_db_error(metrics: &Metrics, e: &StoreError) {
    let retryable = e.is_retryable();
    metrics
        .db_errors
        .get_or_create(&RetryableLabel {
            retryable: if retryable { "true" } else { "false" },
        })
        .inc();
    if retryable {
        metrics.db_up.set(0);
    }
}

/// The answer to the exports of a failed write. Only a data error of an export written alone is
/// the export's fault; anything else (the database down, a schema another replica is migrating)
/// is answered as retryable, so no exporter drops its data for a fault that is not its own.
fn failed(metrics: &Metrics, e: StoreError, rows: usize) -> SubmitError {
    count_db_error(metrics, &e);
    if e.is_retryable() {
        tracing::warn!(error = %e, rows, "batch write failed; the exporters will retry");
        return SubmitError::Unavailable(e.to_string());
    }
    if e.is_data_error() {
        tracing::warn!(error = %e, rows, "an export's content was refused by the database");
        SubmitError::Rejected(e.to_string())
    } else {
        tracing::error!(error = %e, rows, "batch write failed; answering retryable");
        SubmitError::Unavailable(e.to_string())
    }
}

fn kind_counts(jobs: &[Job]) -> Written {
    let sum = |f: fn(&Normalized) -> usize| jobs.iter().map(|j| f(&j.records)).sum();
    [
        sum(|r| r.tool_calls.len()),
        sum(|r| r.mcp_requests.len()),
        sum(|r| r.llm_calls.len()),
        sum(|r| r.upstream_calls.len()),
    ]
}

/// Records written per kind (tool call, MCP request, LLM call, upstream call): the rows a
/// batch added, not counting spans a retried export had already stored.
type Written = [usize; 4];

/// Writes a batch; a lost deadlock or serialization conflict is retried twice.
async fn write_with_retry(target: &Target, jobs: &[Job]) -> Result<Written, StoreError> {
    retry_conflicts(|| write_batch(target, jobs)).await
}

/// The hours a batch's records start in, as ranges of one hour (partitions span whole hours).
fn hours_of(jobs: &[Job]) -> Vec<(chrono::DateTime<chrono::Utc>, chrono::DateTime<chrono::Utc>)> {
    const HOUR: i64 = 3_600_000_000_000;
    let mut hours = std::collections::BTreeSet::new();
    for r in jobs.iter().map(|j| &j.records) {
        let starts = r.tool_calls.iter().map(|c| &c.span);
        let starts = starts
            .chain(r.mcp_requests.iter().map(|c| &c.span))
            .chain(r.llm_calls.iter().map(|c| &c.span))
            .chain(r.upstream_calls.iter().map(|c| &c.span));
        hours.extend(starts.map(|s| s.start_unix_nanos.div_euclid(HOUR)));
    }
    let at = chrono::DateTime::from_timestamp_nanos;
    hours
        .into_iter()
        .map(|h| (at(h * HOUR), at((h + 1) * HOUR)))
        .collect()
}

/// Runs `f`; a lost deadlock or serialization conflict runs it again, twice at most.
async fn retry_conflicts<T, F: std::future::Future<Output = Result<T, StoreError>>>(
    mut f: impl FnMut() -> F,
) -> Result<T, StoreError> {
    let mut attempt = 0;
    loop {
        match f().await {
            Err(StoreError::Unavailable(sqlx::Error::Database(db)))
                if attempt < 2 && matches!(db.code().as_deref(), Some("40P01" | "40001")) =>
            {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(20 * attempt)).await;
            }
            other => return other,
        }
    }
}

fn encode_records(jobs: &[Job], policy: &RawPolicy) -> [CopyBuf; 4] {
    super::copy::encode_records(jobs.iter().map(|j| &j.records), policy)
}

async fn copy_in(
    conn: &mut sqlx::PgConnection,
    statement: &str,
    buf: CopyBuf,
) -> Result<(), StoreError> {
    let mut sink = conn.copy_in_raw(statement).await?;
    sink.send(buf.finish()).await?;
    sink.finish().await?;
    Ok(())
}

/// Writes a batch in one transaction. The fast path COPYs records straight into the raw tables;
/// when a batch holds a span already stored (a retried export), the unique key refuses the COPY
/// and the batch is written again through staging tables with `ON CONFLICT DO NOTHING`, counting
/// in the rollups only the rows that were new.
///
/// A row for a time no partition covers yet (a late span older than every partition, or one
/// further ahead than they were created) has its partitions created, and the batch is written
/// again.
async fn write_batch(target: &Target, jobs: &[Job]) -> Result<Written, StoreError> {
    if jobs.iter().all(|j| j.records.records() == 0) {
        return Ok([0; 4]);
    }
    let mut conn = target.pool.acquire().await?;
    match write_once(&mut conn, jobs, target).await {
        Err(e) if super::partitions::is_missing_partition(&e) => {
            super::partitions::ensure_each(&mut conn, target.partition, &hours_of(jobs)).await?;
            write_once(&mut conn, jobs, target).await
        }
        other => other,
    }
}

async fn write_once(
    conn: &mut sqlx::PgConnection,
    jobs: &[Job],
    target: &Target,
) -> Result<Written, StoreError> {
    match write_fast(conn, jobs, target).await {
        Err(StoreError::Query(sqlx::Error::Database(e)))
            if e.code().as_deref() == Some("23505") =>
        {
            write_dedup(conn, jobs, target).await
        }
        other => other,
    }
}

async fn write_fast(
    conn: &mut sqlx::PgConnection,
    jobs: &[Job],
    target: &Target,
) -> Result<Written, StoreError> {
    let mut tx = conn.begin().await?;
    for (buf, w) in encode_records(jobs, &target.policy)
        .into_iter()
        .zip(RAW_WRITES.iter())
    {
        if buf.rows() > 0 {
            copy_in(&mut tx, &w.copy, buf).await?;
        }
    }
    merge_rollups(&mut tx, jobs, &mut Inserted::default(), target.shard).await?;
    tx.commit().await?;
    Ok(kind_counts(jobs))
}

async fn write_dedup(
    conn: &mut sqlx::PgConnection,
    jobs: &[Job],
    target: &Target,
) -> Result<Written, StoreError> {
    let mut tx = conn.begin().await?;
    let mut sets: [Option<HashSet<Key>>; 4] = Default::default();
    for ((buf, w), set) in encode_records(jobs, &target.policy)
        .into_iter()
        .zip(RAW_WRITES.iter())
        .zip(sets.iter_mut())
    {
        if buf.rows() == 0 {
            continue;
        }
        copy_in(&mut tx, &w.copy_stage, buf).await?;
        let keys: Vec<(Vec<u8>, Vec<u8>)> =
            sqlx::query_as(&w.insert_new).fetch_all(&mut *tx).await?;
        *set = Some(
            keys.into_iter()
                .filter_map(|(t, s)| Some((t.try_into().ok()?, s.try_into().ok()?)))
                .collect(),
        );
    }
    let written = sets
        .each_ref()
        .map(|set| set.as_ref().map_or(0, HashSet::len));
    let [tool_calls, mcp_requests, llm_calls, upstream_calls] = sets;
    let mut inserted = Inserted {
        tool_calls,
        mcp_requests,
        llm_calls,
        upstream_calls,
    };
    merge_rollups(&mut tx, jobs, &mut inserted, target.shard).await?;
    tx.commit().await?;
    Ok(written)
}

async fn merge_rollups(
    conn: &mut sqlx::PgConnection,
    jobs: &[Job],
    inserted: &mut Inserted,
    shard: i16,
) -> Result<(), StoreError> {
    let mut rollups = Rollups::default();
    for j in jobs {
        rollups.add(&j.records, inserted);
    }
    merge_rollup_deltas(conn, rollups, shard).await
}

/// Merges rollup deltas into this writer's shard, in the caller's transaction.
pub(super) async fn merge_rollup_deltas(
    conn: &mut sqlx::PgConnection,
    rollups: Rollups<'_>,
    shard: i16,
) -> Result<(), StoreError> {
    let mut merges = String::new();
    for (buf, (copy, merge)) in rollups.encode(shard).into_iter().zip(MERGE_ROLLUPS.iter()) {
        if buf.rows() > 0 {
            copy_in(conn, copy, buf).await?;
            merges.push_str(merge);
        }
    }
    if !merges.is_empty() {
        // All merges in one round trip (simple query protocol).
        conn.execute(merges.as_str()).await?;
    }
    Ok(())
}
