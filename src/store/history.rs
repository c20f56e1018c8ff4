//! Stored history for rule backtests: the per-minute rollups and rule state (summed over writer
//! shards), as columns ordered by time, for the analytics layer. Never raw rows: a backtest
//! reads what the live rules read.

use chrono::{DateTime, Utc};
use futures_util::TryStreamExt;
use sqlx::PgPool;

use super::StoreError;
use crate::normalize::cardinality::OVERFLOW;

/// Per (minute, service, tool, side): call counts from `tool_rollup_1m`.
#[derive(Debug, Default)]
pub(crate) struct ToolMinutes {
    pub t_ms: Vec<i64>,
    pub service: Vec<String>,
    pub tool: Vec<String>,
    pub side: Vec<String>,
    pub calls: Vec<i64>,
    pub errors: Vec<i64>,
    pub with_result: Vec<i64>,
    pub empty_results: Vec<i64>,
}

/// Per (minute, service, tool, side, bucket): latency histogram counts, non-zero buckets only.
#[derive(Debug, Default)]
pub(crate) struct HistMinutes {
    pub t_ms: Vec<i64>,
    pub service: Vec<String>,
    pub tool: Vec<String>,
    pub side: Vec<String>,
    pub bucket: Vec<i32>,
    pub count: Vec<i64>,
}

/// Per (minute, service, upstream): calls, 429s and the lowest remaining / limit.
#[derive(Debug, Default)]
pub(crate) struct UpstreamMinutes {
    pub t_ms: Vec<i64>,
    pub service: Vec<String>,
    pub upstream: Vec<String>,
    pub calls: Vec<i64>,
    pub rate_limited: Vec<i64>,
    pub min_ratio: Vec<Option<f64>>,
}

/// Per (minute, service, tool, session, arguments hash): identical calls and failed ones.
#[derive(Debug, Default)]
pub(crate) struct CallMinutes {
    pub t_ms: Vec<i64>,
    pub service: Vec<String>,
    pub tool: Vec<String>,
    pub session: Vec<String>,
    pub args: Vec<String>,
    pub calls: Vec<i64>,
    pub failed: Vec<i64>,
    /// Failed or empty.
    pub stuck: Vec<i64>,
}

/// Per (minute, service, session): LLM tokens.
#[derive(Debug, Default)]
pub(crate) struct TokenMinutes {
    pub t_ms: Vec<i64>,
    pub service: Vec<String>,
    pub session: Vec<String>,
    pub tokens: Vec<i64>,
}

/// `tool_rollup_1m` minutes in [from, to).
pub(crate) async fn tool_minutes(
    pool: &PgPool,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<ToolMinutes, StoreError> {
    let mut out = ToolMinutes::default();
    let mut rows = sqlx::query_as::<_, (i64, String, String, String, i64, i64, i64, i64)>(
        "SELECT (extract(epoch FROM minute) * 1000)::bigint, service, tool, side,
                sum(calls)::bigint, sum(errors)::bigint, sum(with_result)::bigint, sum(empty_results)::bigint
         FROM tool_rollup_1m WHERE minute >= $1 AND minute < $2
         GROUP BY minute, service, tool, side ORDER BY minute",
    )
    .bind(from)
    .bind(to)
    .fetch(pool);
    while let Some((t, service, tool, side, calls, errors, with_result, empty)) =
        rows.try_next().await?
    {
        out.t_ms.push(t);
        out.service.push(service);
        out.tool.push(tool);
        out.side.push(side);
        out.calls.push(calls);
        out.errors.push(errors);
        out.with_result.push(with_result);
        out.empty_results.push(empty);
    }
    Ok(out)
}

/// The latency histograms of `tool_rollup_1m` in [from, to), one row per non-empty bucket.
pub(crate) async fn hist_minutes(
    pool: &PgPool,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<HistMinutes, StoreError> {
    let mut out = HistMinutes::default();
    let mut rows = sqlx::query_as::<_, (i64, String, String, String, i32, i64)>(
        "SELECT (extract(epoch FROM r.minute) * 1000)::bigint, r.service, r.tool, r.side,
                (b.i - 1)::int, sum(b.c)::bigint
         FROM tool_rollup_1m r, unnest(r.latency_hist) WITH ORDINALITY AS b(c, i)
         WHERE r.minute >= $1 AND r.minute < $2 AND b.c > 0
         GROUP BY r.minute, r.service, r.tool, r.side, b.i ORDER BY r.minute",
    )
    .bind(from)
    .bind(to)
    .fetch(pool);
    while let Some((t, service, tool, side, bucket, count)) = rows.try_next().await? {
        out.t_ms.push(t);
        out.service.push(service);
        out.tool.push(tool);
        out.side.push(side);
        out.bucket.push(bucket);
        out.count.push(count);
    }
    Ok(out)
}

/// `upstream_rollup_1m` minutes in [from, to).
pub(crate) async fn upstream_minutes(
    pool: &PgPool,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<UpstreamMinutes, StoreError> {
    let mut out = UpstreamMinutes::default();
    let mut rows = sqlx::query_as::<_, (i64, String, String, i64, i64, Option<f64>)>(
        "SELECT (extract(epoch FROM minute) * 1000)::bigint, service, server_address,
                sum(calls)::bigint, sum(rate_limited)::bigint, min(min_remaining_ratio)
         FROM upstream_rollup_1m WHERE minute >= $1 AND minute < $2
         GROUP BY minute, service, server_address ORDER BY minute",
    )
    .bind(from)
    .bind(to)
    .fetch(pool);
    while let Some((t, service, upstream, calls, rate_limited, min_ratio)) = rows.try_next().await?
    {
        out.t_ms.push(t);
        out.service.push(service);
        out.upstream.push(upstream);
        out.calls.push(calls);
        out.rate_limited.push(rate_limited);
        out.min_ratio.push(min_ratio);
    }
    Ok(out)
}

/// `loop_calls_1m` minutes in [from, to), summed over writer shards: what the live retry-loop
/// rule reads.
pub(crate) async fn loop_minutes(
    pool: &PgPool,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<CallMinutes, StoreError> {
    let mut out = CallMinutes::default();
    type Row = (i64, String, String, String, String, i64, i64, i64);
    let mut rows = sqlx::query_as::<_, Row>(
        "SELECT (extract(epoch FROM minute) * 1000)::bigint, service, tool, session_key,
                encode(args_hash, 'hex'), sum(calls)::bigint, sum(failed)::bigint, sum(stuck)::bigint
         FROM loop_calls_1m WHERE minute >= $1 AND minute < $2 AND session_key <> $3
         GROUP BY minute, service, tool, session_key, args_hash HAVING sum(calls) > 0
         ORDER BY 1",
    )
    .bind(from)
    .bind(to)
    .bind(OVERFLOW)
    .fetch(pool);
    while let Some((t, service, tool, session, args, calls, failed, stuck)) =
        rows.try_next().await?
    {
        out.t_ms.push(t);
        out.service.push(service);
        out.tool.push(tool);
        out.session.push(session);
        out.args.push(args);
        out.calls.push(calls);
        out.failed.push(failed);
        out.stuck.push(stuck);
    }
    Ok(out)
}

/// `session_tokens_1m` minutes in [from, to), summed over writer shards (token burn).
pub(crate) async fn token_minutes(
    pool: &PgPool,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<TokenMinutes, StoreError> {
    let mut out = TokenMinutes::default();
    let mut rows = sqlx::query_as::<_, (i64, String, String, i64)>(
        "SELECT (extract(epoch FROM minute) * 1000)::bigint, service, session_key, sum(tokens)::bigint
         FROM session_tokens_1m WHERE minute >= $1 AND minute < $2 AND session_key <> $3
         GROUP BY minute, service, session_key ORDER BY 1",
    )
    .bind(from)
    .bind(to)
    .bind(OVERFLOW)
    .fetch(pool);
    while let Some((t, service, session, tokens)) = rows.try_next().await? {
        out.t_ms.push(t);
        out.service.push(service);
        out.session.push(session);
        out.tokens.push(tokens);
    }
    Ok(out)
}
