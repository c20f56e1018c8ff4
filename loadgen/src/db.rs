//! Database side of `toolsight-bench`: fresh databases, row counts, and the bare-COPY reference
//! (the service's own COPY encoding, `toolsight::store::copy`, without its staging, conflict
//! handling and rollups).

use std::time::{Duration, Instant};

use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgPool};

use anyhow::Context;
use toolsight::normalize::Normalized;

/// Drops and recreates `name` on the server `opts` points at; returns its options.
pub async fn recreate_database(
    opts: &PgConnectOptions,
    name: &str,
) -> anyhow::Result<PgConnectOptions> {
    let opts = opts.clone().database(name);
    toolsight::store::recreate_database(&opts).await?;
    Ok(opts)
}

/// Records in the raw tables (every record kind).
pub async fn count_records(pool: &PgPool) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM tool_calls) + (SELECT count(*) FROM mcp_requests)
              + (SELECT count(*) FROM llm_calls) + (SELECT count(*) FROM upstream_calls)",
    )
    .fetch_one(pool)
    .await?)
}

/// The reference ceiling: the same records written by plain binary COPY straight into the raw
/// tables (same schema and indexes, no staging, no conflict handling, no rollups), over
/// `connections` connections in parallel. Returns (rows, time).
pub async fn copy_reference(
    pool: &PgPool,
    batches: Vec<Normalized>,
    connections: usize,
) -> anyhow::Result<(u64, Duration)> {
    let rows: u64 = batches.iter().map(|b| b.records() as u64).sum();
    let per = batches.len().div_ceil(connections.max(1)).max(1);
    let mut chunks: Vec<Vec<Normalized>> = Vec::new();
    let mut it = batches.into_iter().peekable();
    while it.peek().is_some() {
        chunks.push(it.by_ref().take(per).collect());
    }
    let started = Instant::now();
    let tasks: Vec<_> = chunks
        .into_iter()
        .map(|chunk| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let mut conn = pool.acquire().await?;
                // Batches of about 10k rows, as the writers use.
                for group in chunk.chunks(10) {
                    let bufs = toolsight::store::copy::encode_records(
                        group,
                        &toolsight::store::policy::RawPolicy::default(),
                    );
                    let mut tx = conn.begin().await?;
                    for (buf, table) in bufs.into_iter().zip([
                        "tool_calls",
                        "mcp_requests",
                        "llm_calls",
                        "upstream_calls",
                    ]) {
                        if buf.rows() == 0 {
                            continue;
                        }
                        let mut sink = tx
                            .copy_in_raw(&format!("COPY {table} FROM STDIN (FORMAT binary)"))
                            .await?;
                        sink.send(buf.finish()).await?;
                        sink.finish().await?;
                    }
                    tx.commit().await?;
                }
                Ok::<(), sqlx::Error>(())
            })
        })
        .collect();
    for t in tasks {
        t.await.context("copy task failed")?.context("copy")?;
    }
    Ok((rows, started.elapsed()))
}

/// Seeds what the default rules read, as the writers would have left it after `series` (service,
/// tool) series made 3 calls a minute for 70 minutes, and `sessions` agent sessions were each
/// active 5 minutes of the last 30 (three distinct calls a minute, LLM tokens every minute).
/// Returns the rows written.
pub async fn seed_rule_state(
    pool: &PgPool,
    now: chrono::DateTime<chrono::Utc>,
    series: usize,
    sessions: usize,
) -> anyhow::Result<u64> {
    let mut conn = pool.acquire().await?;
    toolsight::store::partitions::ensure(
        &mut conn,
        Duration::from_secs(86_400),
        now - chrono::Duration::hours(2),
        now + chrono::Duration::hours(1),
    )
    .await?;
    let mut rows = seed_rollups(&mut conn, now, series, 70, None).await?;
    rows += sqlx::query(
        "INSERT INTO loop_calls_1m
         SELECT date_trunc('minute', $1::timestamptz) - ((k % 26) + d) * interval '1 minute',
                'svc-' || (k % greatest($2 / 50, 1)), 'tool-' || (k % $2), 'session-' || k,
                decode(lpad(to_hex(a), 32, '0'), 'hex'), 0, 1, 0, 0
         FROM generate_series(0, $3 - 1) AS k, generate_series(0, 4) AS d, generate_series(1, 3) AS a",
    )
    .bind(now)
    .bind(series as i64)
    .bind(sessions as i64)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    rows += sqlx::query(
        "INSERT INTO session_tokens_1m
         SELECT date_trunc('minute', $1::timestamptz) - ((k % 26) + d) * interval '1 minute',
                'svc-' || (k % greatest($2 / 50, 1)), 'session-' || k, 0, 2000 + k % 1000
         FROM generate_series(0, $3 - 1) AS k, generate_series(0, 4) AS d",
    )
    .bind(now)
    .bind(series as i64)
    .bind(sessions as i64)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    sqlx::query("ANALYZE").execute(&mut *conn).await?;
    Ok(rows)
}

/// Writes minute `minute` of the seeded traffic (every series, the sessions active then), as
/// the writers would between two evaluations.
pub async fn seed_minute(
    pool: &PgPool,
    minute: chrono::DateTime<chrono::Utc>,
    series: usize,
    sessions: usize,
) -> anyhow::Result<u64> {
    let mut rows = sqlx::query(
        "INSERT INTO tool_rollup_1m (minute, service, tool, side, calls, errors, cancellations,
             with_result, empty_results, result_bytes, result_items, duration_us_sum, latency_hist,
             shard, sized_results, counted_results, overhead_calls, overhead_us_sum)
         SELECT $1, 'svc-' || (s / 50), 'tool-' || s, 'server', 3, 0, 0, 3, 0, 300, 3, 600000,
                array_fill(0::bigint, ARRAY[55]) || ARRAY[1, 1, 1]::bigint[], 0, 3, 3, 0, 0
         FROM generate_series(0, $2 - 1) AS s ON CONFLICT DO NOTHING",
    )
    .bind(minute)
    .bind(series as i64)
    .execute(pool)
    .await?
    .rows_affected();
    let slot = (minute.timestamp() / 60).rem_euclid(26);
    rows += sqlx::query(
        "INSERT INTO loop_calls_1m
         SELECT $1, 'svc-' || (k % greatest($2 / 50, 1)), 'tool-' || (k % $2), 'session-' || k,
                decode(lpad(to_hex(a), 32, '0'), 'hex'), 0, 1, 0, 0
         FROM generate_series(0, $3 - 1) AS k, generate_series(1, 3) AS a WHERE k % 26 = $4
         ON CONFLICT DO NOTHING",
    )
    .bind(minute)
    .bind(series as i64)
    .bind(sessions as i64)
    .bind(slot)
    .execute(pool)
    .await?
    .rows_affected();
    rows += sqlx::query(
        "INSERT INTO session_tokens_1m
         SELECT $1, 'svc-' || (k % greatest($2 / 50, 1)), 'session-' || k, 0, 2000 + k % 1000
         FROM generate_series(0, $3 - 1) AS k WHERE k % 26 = $4 ON CONFLICT DO NOTHING",
    )
    .bind(minute)
    .bind(series as i64)
    .bind(sessions as i64)
    .bind(slot)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(rows)
}

/// Tool rollups of `series` tools making 3 calls a minute around 200 ms (buckets 55-57), with an
/// error every `error_every` minutes, and one upstream per 50 tools, over the `minutes` minutes
/// up to `now`. Returns the rows written.
async fn seed_rollups(
    conn: &mut sqlx::PgConnection,
    now: chrono::DateTime<chrono::Utc>,
    series: usize,
    minutes: i64,
    error_every: Option<i64>,
) -> anyhow::Result<u64> {
    let mut rows = sqlx::query(
        "INSERT INTO tool_rollup_1m (minute, service, tool, side, calls, errors, cancellations,
             with_result, empty_results, result_bytes, result_items, duration_us_sum, latency_hist,
             shard, sized_results, counted_results, overhead_calls, overhead_us_sum)
         SELECT date_trunc('minute', $1::timestamptz) - m * interval '1 minute', 'svc-' || (s / 50),
                'tool-' || s, 'server', 3, coalesce(((m + s) % $4 = 0)::int, 0), 0, 3, 0, 300, 3,
                600000, array_fill(0::bigint, ARRAY[55]) || ARRAY[1, 1, 1]::bigint[], 0, 3, 3, 0, 0
         FROM generate_series(0, $3 - 1) AS m, generate_series(0, $2 - 1) AS s",
    )
    .bind(now)
    .bind(series as i64)
    .bind(minutes)
    .bind(error_every)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    rows += sqlx::query(
        "INSERT INTO upstream_rollup_1m (minute, service, server_address, calls, rate_limited,
             server_errors, min_remaining_ratio, latency_hist, shard)
         SELECT date_trunc('minute', $1::timestamptz) - m * interval '1 minute', 'svc-' || s,
                'api-' || s || '.example', 150, 0, 0, 0.5, array_fill(1::bigint, ARRAY[50]), 0
         FROM generate_series(0, $3 - 1) AS m, generate_series(0, greatest($2 / 50, 1) - 1) AS s",
    )
    .bind(now)
    .bind(series as i64)
    .bind(minutes)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    Ok(rows)
}

/// Seven days of history for `toolsight rules backtest`: `series` tools making 3 calls a minute
/// (an error every 50th minute), an upstream per 50 tools, and an agent session per tool every
/// 10 minutes (3 calls of one tool, tokens).
pub async fn seed_week(
    pool: &PgPool,
    now: chrono::DateTime<chrono::Utc>,
    series: usize,
) -> anyhow::Result<u64> {
    let mut conn = pool.acquire().await?;
    toolsight::store::partitions::ensure(
        &mut conn,
        Duration::from_secs(86_400),
        now - chrono::Duration::days(8),
        now + chrono::Duration::hours(1),
    )
    .await?;
    let week = 7 * 24 * 60 - 1;
    let mut rows = seed_rollups(&mut conn, now, series, week + 1, Some(50)).await?;
    rows += sqlx::query(
        "INSERT INTO loop_calls_1m
         SELECT date_trunc('minute', $1::timestamptz) - m * interval '1 minute', 'svc-' || (s / 50),
                'tool-' || s, 'session-' || s || '-' || m, decode(lpad(to_hex(s), 32, '0'), 'hex'), 0, 3, 0, 0
         FROM generate_series(0, $3) AS m, generate_series(0, $2 - 1) AS s WHERE m % 10 = s % 10",
    )
    .bind(now)
    .bind(series as i64)
    .bind(week)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    rows += sqlx::query(
        "INSERT INTO session_tokens_1m
         SELECT date_trunc('minute', $1::timestamptz) - m * interval '1 minute', 'svc-' || (s / 50),
                'session-' || s || '-' || m, 0, 2000 + s
         FROM generate_series(0, $3) AS m, generate_series(0, $2 - 1) AS s WHERE m % 10 = s % 10",
    )
    .bind(now)
    .bind(series as i64)
    .bind(week)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    sqlx::query("ANALYZE").execute(&mut *conn).await?;
    Ok(rows)
}

/// Copies up to `rows` stored rows of each raw table `age` into the past (their partitions
/// created), so the sustained benchmark has a whole partition for retention to drop under load.
pub async fn age_rows(pool: &PgPool, rows: i64, age: chrono::Duration) -> anyhow::Result<u64> {
    let mut conn = pool.acquire().await?;
    let now = chrono::Utc::now();
    // Every table's, the raw-row policy's sampled-out partitions included.
    toolsight::store::partitions::ensure_each(
        &mut conn,
        Duration::from_secs(86_400),
        &[(
            now - age - chrono::Duration::hours(1),
            now - age + chrono::Duration::hours(1),
        )],
    )
    .await?;
    let mut copied = 0;
    for table in ["tool_calls", "mcp_requests", "llm_calls", "upstream_calls"] {
        sqlx::query(&format!(
            "CREATE TEMP TABLE aged AS SELECT * FROM {table} LIMIT {rows}"
        ))
        .execute(&mut *conn)
        .await?;
        sqlx::query("UPDATE aged SET start_time = start_time - make_interval(secs => $1)")
            .bind(age.num_seconds() as f64)
            .execute(&mut *conn)
            .await?;
        copied += sqlx::query(&format!("INSERT INTO {table} SELECT * FROM aged"))
            .execute(&mut *conn)
            .await?
            .rows_affected();
        sqlx::query("DROP TABLE aged").execute(&mut *conn).await?;
    }
    Ok(copied)
}

/// Rows and bytes (heap, indexes, TOAST) of the raw tables the raw-row policy splits, kept and
/// sampled out: `("kept", rows, bytes)`, `("sampled out", rows, bytes)`.
pub async fn raw_policy_split(pool: &PgPool) -> anyhow::Result<Vec<(&'static str, i64, i64)>> {
    let mut out = Vec::new();
    for (what, suffix) in [("kept", "kept"), ("sampled out", "sampled_out")] {
        let (mut rows, mut bytes) = (0i64, 0i64);
        for table in ["tool_calls", "llm_calls", "upstream_calls"] {
            let t = format!("{table}_{suffix}");
            let (r, b): (i64, i64) = sqlx::query_as(&format!(
                "SELECT (SELECT count(*) FROM {t}),
                        (SELECT coalesce(sum(pg_total_relation_size(relid)), 0)::bigint
                         FROM pg_partition_tree('{t}') WHERE isleaf)"
            ))
            .fetch_one(pool)
            .await?;
            rows += r;
            bytes += b;
        }
        out.push((what, rows, bytes));
    }
    Ok(out)
}
