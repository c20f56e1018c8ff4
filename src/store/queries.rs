//! Read queries over the rollups, for the API and the CLI.

use sqlx::PgPool;

use super::StoreError;

/// Per (service, tool, side) totals over a time range, computed from the per-minute rollups.
#[derive(Debug, Clone, sqlx::FromRow, PartialEq)]
pub struct ToolSummary {
    pub service: String,
    pub tool: String,
    pub side: String,
    pub calls: i64,
    pub errors: i64,
    pub cancellations: i64,
    /// Calls whose result content was captured (the denominator of `empty_results`).
    pub with_result: i64,
    pub empty_results: i64,
    pub p50_ms: Option<f64>,
    pub p95_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    /// Over the results whose size was known.
    pub mean_result_bytes: Option<f64>,
    /// Client calls whose server side is stored too.
    pub joined_calls: i64,
    /// Transport overhead (client duration minus server duration), mean over the joined calls.
    pub mean_overhead_ms: Option<f64>,
}

/// Tool summaries for the minutes starting at or after `now - since_secs` (the current,
/// partial minute included).
pub async fn tool_summary(pool: &PgPool, since_secs: i64) -> Result<Vec<ToolSummary>, StoreError> {
    let rows = sqlx::query_as::<_, ToolSummary>(
        "SELECT service, tool, side,
                sum(calls)::bigint AS calls, sum(errors)::bigint AS errors,
                sum(cancellations)::bigint AS cancellations,
                sum(with_result)::bigint AS with_result, sum(empty_results)::bigint AS empty_results,
                toolsight_hist_quantile(toolsight_hist_merge(latency_hist), 0.50) AS p50_ms,
                toolsight_hist_quantile(toolsight_hist_merge(latency_hist), 0.95) AS p95_ms,
                toolsight_hist_quantile(toolsight_hist_merge(latency_hist), 0.99) AS p99_ms,
                (sum(result_bytes)::float8 / nullif(sum(sized_results), 0))::float8 AS mean_result_bytes,
                sum(overhead_calls)::bigint AS joined_calls,
                (sum(overhead_us_sum)::float8 / nullif(sum(overhead_calls), 0) / 1000.0)::float8 AS mean_overhead_ms
         FROM tool_rollup_1m
         WHERE minute >= date_trunc('minute', now() - make_interval(secs => $1))
         GROUP BY service, tool, side
         -- A row a join moved away (a nested span, a server call named later) sums to nothing.
         HAVING sum(calls) <> 0
         ORDER BY calls DESC, service, tool, side",
    )
    .bind(since_secs as f64)
    .fetch_all(pool)
    .await?;
    Ok(rows)
}
