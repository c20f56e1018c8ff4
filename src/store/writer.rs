//! The batch writer: a bounded queue of normalized exports, drained by a few writer tasks that
//! COPY them into staging tables and move them into the raw tables and rollups in one
//! transaction. Each export is acknowledged only after that transaction commits.

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Executor, PgPool};
use tokio::sync::{Mutex, OwnedSemaphorePermit, Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;

use super::StoreError;
use super::copy::CopyBuf;
use crate::metrics::{KindLabel, Metrics, RetryableLabel};
use crate::normalize::Normalized;

/// Writer settings.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// Writer tasks, one database connection each.
    pub writers: usize,
    /// A writer takes queued exports until it holds about this many records.
    pub batch_rows: usize,
    /// Records the queue holds at most; a full queue answers exports with a retryable error.
    pub queue_rows: usize,
}

impl Default for WriterConfig {
    fn default() -> Self {
        WriterConfig {
            writers: 2,
            batch_rows: 10_000,
            queue_rows: 200_000,
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
    #[error("storing failed: {message}")]
    Store { retryable: bool, message: String },
}

impl SubmitError {
    pub fn is_retryable(&self) -> bool {
        match self {
            SubmitError::QueueFull | SubmitError::Closed => true,
            SubmitError::Store { retryable, .. } => *retryable,
        }
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

/// Staging tables: one per record kind and connection, emptied at every commit.
const STAGING: &str = "
CREATE TEMP TABLE IF NOT EXISTS stage_tool_calls (LIKE tool_calls) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS stage_mcp_requests (LIKE mcp_requests) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS stage_llm_calls (LIKE llm_calls) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS stage_upstream_calls (LIKE upstream_calls) ON COMMIT DELETE ROWS;
";

const MOVE_TOOL_CALLS: &str = "
WITH ins AS (
    INSERT INTO tool_calls SELECT * FROM stage_tool_calls ON CONFLICT DO NOTHING
    RETURNING start_time, duration_us, service, tool, side, outcome, result_bytes, result_items, result_empty
), b AS (
    SELECT date_trunc('minute', start_time) AS minute, service, tool, side,
           toolsight_latency_bucket(duration_us) AS bucket,
           count(*) AS n,
           count(*) FILTER (WHERE outcome = 'error') AS errors,
           count(*) FILTER (WHERE outcome = 'cancelled') AS cancels,
           count(*) FILTER (WHERE result_empty IS NOT NULL) AS with_result,
           count(*) FILTER (WHERE result_empty) AS empties,
           coalesce(sum(result_bytes), 0) AS bytes,
           coalesce(sum(result_items), 0) AS items,
           sum(duration_us) AS dur
    FROM ins GROUP BY 1, 2, 3, 4, 5
)
INSERT INTO tool_rollup_1m AS r (minute, service, tool, side, calls, errors, cancellations,
    with_result, empty_results, result_bytes, result_items, duration_us_sum, latency_hist)
SELECT minute, service, tool, side, sum(n)::bigint, sum(errors)::bigint, sum(cancels)::bigint,
       sum(with_result)::bigint, sum(empties)::bigint, sum(bytes)::bigint, sum(items)::bigint,
       sum(dur)::bigint, toolsight_hist_build(array_agg(bucket), array_agg(n))
FROM b GROUP BY 1, 2, 3, 4 ORDER BY 2, 3, 4, 1
ON CONFLICT (service, tool, side, minute) DO UPDATE SET
    calls = r.calls + EXCLUDED.calls,
    errors = r.errors + EXCLUDED.errors,
    cancellations = r.cancellations + EXCLUDED.cancellations,
    with_result = r.with_result + EXCLUDED.with_result,
    empty_results = r.empty_results + EXCLUDED.empty_results,
    result_bytes = r.result_bytes + EXCLUDED.result_bytes,
    result_items = r.result_items + EXCLUDED.result_items,
    duration_us_sum = r.duration_us_sum + EXCLUDED.duration_us_sum,
    latency_hist = toolsight_hist_add(r.latency_hist, EXCLUDED.latency_hist);
";

const MOVE_MCP_REQUESTS: &str = "
WITH ins AS (
    INSERT INTO mcp_requests SELECT * FROM stage_mcp_requests ON CONFLICT DO NOTHING
    RETURNING start_time, duration_us, service, method, side, outcome, orphan
), b AS (
    SELECT date_trunc('minute', start_time) AS minute, service, method, side,
           toolsight_latency_bucket(duration_us) AS bucket, count(*) AS n,
           count(*) FILTER (WHERE outcome <> 'ok') AS errors,
           count(*) FILTER (WHERE orphan) AS orphans
    FROM ins GROUP BY 1, 2, 3, 4, 5
)
INSERT INTO mcp_method_rollup_1m AS r (minute, service, method, side, calls, errors, orphans, latency_hist)
SELECT minute, service, method, side, sum(n)::bigint, sum(errors)::bigint, sum(orphans)::bigint,
       toolsight_hist_build(array_agg(bucket), array_agg(n))
FROM b GROUP BY 1, 2, 3, 4 ORDER BY 2, 3, 4, 1
ON CONFLICT (service, method, side, minute) DO UPDATE SET
    calls = r.calls + EXCLUDED.calls,
    errors = r.errors + EXCLUDED.errors,
    orphans = r.orphans + EXCLUDED.orphans,
    latency_hist = toolsight_hist_add(r.latency_hist, EXCLUDED.latency_hist);
";

const MOVE_LLM_CALLS: &str = "
WITH ins AS (
    INSERT INTO llm_calls SELECT * FROM stage_llm_calls ON CONFLICT DO NOTHING
    RETURNING start_time, duration_us, service, model, input_tokens, output_tokens, error
), b AS (
    SELECT date_trunc('minute', start_time) AS minute, service, model,
           toolsight_latency_bucket(duration_us) AS bucket, count(*) AS n,
           count(*) FILTER (WHERE error) AS errors,
           sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens
    FROM ins GROUP BY 1, 2, 3, 4
)
INSERT INTO llm_rollup_1m AS r (minute, service, model, calls, errors, input_tokens, output_tokens, latency_hist)
SELECT minute, service, model, sum(n)::bigint, sum(errors)::bigint, sum(input_tokens)::bigint,
       sum(output_tokens)::bigint, toolsight_hist_build(array_agg(bucket), array_agg(n))
FROM b GROUP BY 1, 2, 3 ORDER BY 2, 3, 1
ON CONFLICT (service, model, minute) DO UPDATE SET
    calls = r.calls + EXCLUDED.calls,
    errors = r.errors + EXCLUDED.errors,
    input_tokens = r.input_tokens + EXCLUDED.input_tokens,
    output_tokens = r.output_tokens + EXCLUDED.output_tokens,
    latency_hist = toolsight_hist_add(r.latency_hist, EXCLUDED.latency_hist);
";

const MOVE_UPSTREAM_CALLS: &str = "
WITH ins AS (
    INSERT INTO upstream_calls SELECT * FROM stage_upstream_calls ON CONFLICT DO NOTHING
    RETURNING start_time, duration_us, service, server_address, status_code,
              ratelimit_remaining, ratelimit_limit
), b AS (
    SELECT date_trunc('minute', start_time) AS minute, service, server_address,
           toolsight_latency_bucket(duration_us) AS bucket, count(*) AS n,
           count(*) FILTER (WHERE status_code = 429) AS rate_limited,
           count(*) FILTER (WHERE status_code >= 500) AS server_errors,
           min(ratelimit_remaining / nullif(ratelimit_limit, 0)) AS min_ratio
    FROM ins GROUP BY 1, 2, 3, 4
)
INSERT INTO upstream_rollup_1m AS r (minute, service, server_address, calls, rate_limited,
    server_errors, min_remaining_ratio, latency_hist)
SELECT minute, service, server_address, sum(n)::bigint, sum(rate_limited)::bigint,
       sum(server_errors)::bigint, min(min_ratio), toolsight_hist_build(array_agg(bucket), array_agg(n))
FROM b GROUP BY 1, 2, 3 ORDER BY 2, 3, 1
ON CONFLICT (service, server_address, minute) DO UPDATE SET
    calls = r.calls + EXCLUDED.calls,
    rate_limited = r.rate_limited + EXCLUDED.rate_limited,
    server_errors = r.server_errors + EXCLUDED.server_errors,
    min_remaining_ratio = least(r.min_remaining_ratio, EXCLUDED.min_remaining_ratio),
    latency_hist = toolsight_hist_add(r.latency_hist, EXCLUDED.latency_hist);
";

impl Writer {
    /// Starts the writer tasks on their own pool (`config.writers` connections).
    pub fn spawn(
        opts: &PgConnectOptions,
        config: &WriterConfig,
        metrics: Arc<Metrics>,
    ) -> (Writer, Vec<JoinHandle<()>>) {
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
        let handles = (0..config.writers.max(1))
            .map(|_| {
                let (rx, pool, metrics) = (rx.clone(), pool.clone(), metrics.clone());
                let batch_rows = config.batch_rows.max(1);
                tokio::spawn(async move { run_writer(rx, pool, batch_rows, metrics).await })
            })
            .collect();
        let writer = Writer {
            tx,
            permits: Arc::new(Semaphore::new(queue_rows)),
            queue_rows,
            metrics,
        };
        (writer, handles)
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

async fn run_writer(
    rx: Arc<Mutex<mpsc::Receiver<Job>>>,
    pool: PgPool,
    batch_rows: usize,
    metrics: Arc<Metrics>,
) {
    loop {
        let mut jobs = Vec::new();
        {
            let mut rx = rx.lock().await;
            let Some(first) = rx.recv().await else {
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
        let result = write_with_retry(&pool, &jobs).await;
        metrics
            .write_seconds
            .observe(started.elapsed().as_secs_f64());
        metrics.batch_rows.observe(rows as f64);
        metrics.queue_depth_rows.dec_by(rows as i64);
        let ack = match result {
            Ok(()) => {
                for (kind, n) in kind_counts(&jobs) {
                    metrics
                        .records_written
                        .get_or_create(&KindLabel { kind })
                        .inc_by(n as u64);
                }
                Ok(())
            }
            Err(e) => {
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
                tracing::warn!(error = %e, retryable, rows, "batch write failed");
                Err(SubmitError::Store {
                    retryable,
                    message: e.to_string(),
                })
            }
        };
        for job in jobs {
            // The exporter may have gone away; its records are committed all the same.
            let _ = job.ack.send(ack.clone());
        }
    }
    pool.close().await;
}

fn kind_counts(jobs: &[Job]) -> [(&'static str, usize); 4] {
    let sum = |f: fn(&Normalized) -> usize| jobs.iter().map(|j| f(&j.records)).sum();
    [
        ("tool_call", sum(|r| r.tool_calls.len())),
        ("mcp_request", sum(|r| r.mcp_requests.len())),
        ("llm_call", sum(|r| r.llm_calls.len())),
        ("upstream_call", sum(|r| r.upstream_calls.len())),
    ]
}

/// Writes a batch; a lost deadlock or serialization conflict is retried twice.
async fn write_with_retry(pool: &PgPool, jobs: &[Job]) -> Result<(), StoreError> {
    let mut attempt = 0;
    loop {
        match write_batch(pool, jobs).await {
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

async fn write_batch(pool: &PgPool, jobs: &[Job]) -> Result<(), StoreError> {
    let mut bufs = [
        CopyBuf::new(),
        CopyBuf::new(),
        CopyBuf::new(),
        CopyBuf::new(),
    ];
    for j in jobs {
        let r = &j.records;
        r.tool_calls.iter().for_each(|c| bufs[0].tool_call(c));
        r.mcp_requests.iter().for_each(|c| bufs[1].mcp_request(c));
        r.llm_calls.iter().for_each(|c| bufs[2].llm_call(c));
        r.upstream_calls
            .iter()
            .for_each(|c| bufs[3].upstream_call(c));
    }
    const TARGETS: [(&str, &str); 4] = [
        (
            "COPY stage_tool_calls FROM STDIN (FORMAT binary)",
            MOVE_TOOL_CALLS,
        ),
        (
            "COPY stage_mcp_requests FROM STDIN (FORMAT binary)",
            MOVE_MCP_REQUESTS,
        ),
        (
            "COPY stage_llm_calls FROM STDIN (FORMAT binary)",
            MOVE_LLM_CALLS,
        ),
        (
            "COPY stage_upstream_calls FROM STDIN (FORMAT binary)",
            MOVE_UPSTREAM_CALLS,
        ),
    ];
    if bufs.iter().all(|b| b.rows() == 0) {
        return Ok(());
    }
    let mut tx = pool.begin().await?;
    let mut moves = String::new();
    for (buf, (copy, mv)) in bufs.into_iter().zip(TARGETS) {
        if buf.rows() == 0 {
            continue;
        }
        let mut sink = tx.copy_in_raw(copy).await?;
        sink.send(buf.finish()).await?;
        sink.finish().await?;
        moves.push_str(mv);
    }
    // All moves in one round trip (simple query protocol).
    let conn: &mut sqlx::PgConnection = &mut tx;
    conn.execute(moves.as_str()).await?;
    tx.commit().await?;
    Ok(())
}
