//! Window queries for alert rules, and alert state persistence.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::{PgConnection, PgPool};

use super::StoreError;
use crate::evaluate::engine::{Observation, labels};
use crate::normalize::cardinality::OVERFLOW;

/// Rows of (service, tool, side, value, samples, baseline) as observations.
fn per_tool(rows: Vec<(String, String, String, f64, i64, Option<f64>)>) -> Vec<Observation> {
    rows.into_iter()
        .map(|(service, tool, side, v, n, b)| Observation {
            labels: labels(&[("service", service), ("tool", tool), ("side", side)]),
            value: v,
            samples: n,
            baseline: b,
            extra: None,
        })
        .collect()
}

/// Rollup minutes in [to - window, to): whole minutes, the one containing `to - window` included.
const RANGE: &str = "minute >= date_trunc('minute', $1::timestamptz - make_interval(secs => $2)) AND minute < $1::timestamptz";

/// A latency quantile (ms) per (service, tool, side), with the same quantile over the baseline
/// window ending at `baseline_to`.
pub async fn latency(
    pool: &PgPool,
    to: DateTime<Utc>,
    window_secs: f64,
    quantile: f64,
    z: f64,
    baseline_to: Option<DateTime<Utc>>,
) -> Result<Vec<Observation>, StoreError> {
    let sql = format!(
        "WITH cur AS (
            SELECT service, tool, side, toolsight_hist_quantile(toolsight_hist_merge(latency_hist), $3) AS v, sum(calls)::bigint AS n,
                   toolsight_hist_quantile(toolsight_hist_merge(latency_hist),
                       greatest(0, $3 - $5 * sqrt($3 * (1 - $3) / greatest(sum(calls), 1)::float8))) AS lo
            FROM tool_rollup_1m WHERE {RANGE} GROUP BY 1, 2, 3),
         base AS (
            SELECT service, tool, side, toolsight_hist_quantile(toolsight_hist_merge(latency_hist),
                       least(1, $3 + $5 * sqrt($3 * (1 - $3) / greatest(sum(calls), 1)::float8))) AS v
            FROM tool_rollup_1m
            WHERE $4::timestamptz IS NOT NULL
              AND minute >= date_trunc('minute', $4::timestamptz - make_interval(secs => $2)) AND minute < $4::timestamptz
            GROUP BY 1, 2, 3)
         SELECT cur.service, cur.tool, cur.side, cur.v, cur.n, base.v, cur.lo FROM cur LEFT JOIN base USING (service, tool, side)
         WHERE cur.v IS NOT NULL"
    );
    /// service, tool, side, quantile, calls, baseline quantile, lower bound.
    type Row = (String, String, String, f64, i64, Option<f64>, Option<f64>);
    let rows: Vec<Row> = sqlx::query_as(&sql)
        .bind(to)
        .bind(window_secs)
        .bind(quantile)
        .bind(baseline_to)
        .bind(z)
        .fetch_all(pool)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(service, tool, side, v, n, b, lo)| Observation {
            labels: labels(&[("service", service), ("tool", tool), ("side", side)]),
            value: v,
            samples: n,
            baseline: b,
            extra: lo,
        })
        .collect())
}

/// errors / calls per (service, tool, side).
pub async fn error_rate(
    pool: &PgPool,
    to: DateTime<Utc>,
    window_secs: f64,
) -> Result<Vec<Observation>, StoreError> {
    let sql = format!(
        "SELECT service, tool, side, sum(errors)::float8 / sum(calls), sum(calls)::bigint, NULL::float8
         FROM tool_rollup_1m WHERE {RANGE} GROUP BY 1, 2, 3 HAVING sum(calls) > 0"
    );
    let rows = sqlx::query_as(&sql)
        .bind(to)
        .bind(window_secs)
        .fetch_all(pool)
        .await?;
    Ok(per_tool(rows))
}

/// The share of empty results (of calls whose content was captured) per (service, tool, side),
/// with the share over the baseline window.
pub async fn empty_results(
    pool: &PgPool,
    to: DateTime<Utc>,
    window_secs: f64,
    baseline_to: DateTime<Utc>,
) -> Result<Vec<Observation>, StoreError> {
    let sql = format!(
        "WITH cur AS (
            SELECT service, tool, side, sum(empty_results)::float8 / sum(with_result) AS v, sum(with_result)::bigint AS n
            FROM tool_rollup_1m WHERE {RANGE} GROUP BY 1, 2, 3 HAVING sum(with_result) > 0),
         base AS (
            SELECT service, tool, side, sum(empty_results)::float8 / sum(with_result) AS v
            FROM tool_rollup_1m
            WHERE minute >= date_trunc('minute', $3::timestamptz - make_interval(secs => $2)) AND minute < $3::timestamptz
            GROUP BY 1, 2, 3 HAVING sum(with_result) > 0)
         SELECT cur.service, cur.tool, cur.side, cur.v, cur.n, base.v FROM cur LEFT JOIN base USING (service, tool, side)"
    );
    let rows: Vec<(String, String, String, f64, i64, Option<f64>)> = sqlx::query_as(&sql)
        .bind(to)
        .bind(window_secs)
        .bind(baseline_to)
        .fetch_all(pool)
        .await?;
    Ok(per_tool(rows))
}

/// Per (service, upstream): the lowest remaining / limit, and the share of 429 responses.
pub async fn rate_limit_headroom(
    pool: &PgPool,
    to: DateTime<Utc>,
    window_secs: f64,
) -> Result<Vec<Observation>, StoreError> {
    let sql = format!(
        "SELECT service, server_address, coalesce(min(min_remaining_ratio), 'NaN'::float8), sum(calls)::bigint,
                sum(rate_limited)::float8 / sum(calls)
         FROM upstream_rollup_1m WHERE {RANGE} GROUP BY 1, 2 HAVING sum(calls) > 0"
    );
    let rows: Vec<(String, String, f64, i64, f64)> = sqlx::query_as(&sql)
        .bind(to)
        .bind(window_secs)
        .fetch_all(pool)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(service, upstream, v, n, share)| Observation {
            labels: labels(&[("service", service), ("upstream", upstream)]),
            value: v,
            samples: n,
            baseline: None,
            extra: Some(share),
        })
        .collect())
}

/// The tool calls (rows of `tool_calls t`) a retry loop counts, as a condition on raw rows: the
/// definition [`crate::store::correlate::loop_counted`] implements, and the one the migration
/// used for rows stored before the rule read `loop_calls_1m`. A call is one call: a nested
/// client span is not counted, and a server row counts only where it has no client side (no
/// joined peer, and no client row of the same tool in its trace: a client and server both
/// traced, in one service or two, would count it twice). Where the arguments are not
/// captured, "the same call again" cannot be told from "another call", so only calls that
/// failed or came back empty count: the same tool failing or empty, again and again.
pub const LOOP_CALLS: &str = "t.counted AND (t.side = 'client' OR (t.peer_span_id IS NULL
        AND NOT EXISTS (SELECT 1 FROM tool_calls c
                        WHERE c.trace_id = t.trace_id AND c.side = 'client' AND c.tool = t.tool)))
    AND (t.args_hash IS NOT NULL OR t.outcome <> 'ok' OR t.result_empty IS TRUE)";

/// The calls per minute a repeated call may make and still be polling, for a polling interval:
/// 60 s / interval, at least one.
pub fn polling_calls_per_minute(polling_secs: f64) -> i64 {
    if polling_secs <= 0.0 {
        return i64::MAX;
    }
    ((60.0 / polling_secs).floor() as i64).max(1)
}

/// The most repeated call per (service, tool, session) in the rollup minutes of the window
/// (as every rule: whole minutes, the one containing `to - window` included), read from
/// `loop_calls_1m`: same session key, tool and arguments hash, or, where arguments are not
/// captured, failed or empty calls of the tool (see [`LOOP_CALLS`]). `extra` is 1 when the
/// repeats had the same arguments, 0 when they were failures / empty results without
/// arguments (ties go to the same arguments). Sessions folded by the cardinality guard are not
/// one session and are left out. `after_errors_only` counts repeats of calls that failed at
/// least once in the window. Repeats that all succeeded with content and never came faster
/// than [`polling_calls_per_minute`] in any minute are polling and left out.
///
/// The cost follows the distinct (minute, session, tool, arguments) keys of the window, never
/// the calls: a loop of a thousand identical calls is one row a minute.
pub async fn retry_loops(
    pool: &PgPool,
    to: DateTime<Utc>,
    window_secs: f64,
    min_repeats: i64,
    after_errors_only: bool,
    polling_secs: f64,
) -> Result<Vec<Observation>, StoreError> {
    let sql = format!(
        "WITH m AS (
            SELECT minute, service, tool, session_key, args_hash,
                   sum(calls) AS c, sum(failed) AS f, sum(stuck) AS s
            FROM loop_calls_1m WHERE {RANGE} AND session_key <> $5
            GROUP BY 1, 2, 3, 4, 5 HAVING sum(calls) > 0)
         SELECT service, tool, session_key, max(n * 2 + (args_hash <> '\\x'::bytea)::int)::bigint FROM (
            SELECT service, tool, session_key, args_hash, sum(c) AS n, sum(f) AS failed,
                   sum(s) AS stuck, max(c) AS busiest
            FROM m GROUP BY 1, 2, 3, 4) k
         WHERE n >= $3 AND (NOT $4 OR failed > 0) AND (stuck > 0 OR busiest > $6)
         GROUP BY 1, 2, 3"
    );
    let rows: Vec<(String, String, String, i64)> = sqlx::query_as(&sql)
        .bind(to)
        .bind(window_secs)
        .bind(min_repeats)
        .bind(after_errors_only)
        .bind(OVERFLOW)
        .bind(polling_calls_per_minute(polling_secs))
        .fetch_all(pool)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(service, tool, session, v)| Observation {
            labels: labels(&[("service", service), ("tool", tool), ("session", session)]),
            value: (v / 2) as f64,
            samples: v / 2,
            baseline: None,
            extra: Some((v % 2) as f64),
        })
        .collect())
}

/// Tokens per (service, session) in the rollup minutes of the window, from
/// `session_tokens_1m`, with the median session of the service in `extra` and the number of
/// sessions of the service in `samples`.
pub async fn token_burn(
    pool: &PgPool,
    to: DateTime<Utc>,
    window_secs: f64,
) -> Result<Vec<Observation>, StoreError> {
    let sql = format!(
        "WITH s AS (
            SELECT service, session_key, sum(tokens)::bigint AS tokens
            FROM session_tokens_1m WHERE {RANGE} AND session_key <> $3
            GROUP BY 1, 2),
         m AS (
            SELECT service, percentile_cont(0.5) WITHIN GROUP (ORDER BY tokens) AS median, count(*) AS sessions
            FROM s GROUP BY 1)
         SELECT s.service, s.session_key, s.tokens, m.median, m.sessions FROM s JOIN m USING (service)"
    );
    let rows: Vec<(String, String, i64, f64, i64)> = sqlx::query_as(&sql)
        .bind(to)
        .bind(window_secs)
        .bind(OVERFLOW)
        .fetch_all(pool)
        .await?;
    Ok(rows
        .into_iter()
        .map(|(service, session, tokens, median, sessions)| Observation {
            labels: labels(&[("service", service), ("session", session)]),
            value: tokens as f64,
            samples: sessions,
            baseline: None,
            extra: Some(median),
        })
        .collect())
}

/// One persisted alert.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct StoredAlert {
    pub alert: String,
    pub key: String,
    pub group_name: String,
    pub labels: sqlx::types::Json<BTreeMap<String, String>>,
    pub phase: String,
    pub active_since: Option<DateTime<Utc>>,
    pub fired_at: Option<DateTime<Utc>>,
    pub last_held: Option<DateTime<Utc>>,
    pub resolved_at: Option<DateTime<Utc>>,
    pub value: Option<f64>,
}

impl StoredAlert {
    /// The row that deletes a forgotten alert (saved with phase `inactive`).
    pub fn forgotten(alert: &str, key: &str, group: &str) -> StoredAlert {
        StoredAlert {
            alert: alert.to_owned(),
            key: key.to_owned(),
            group_name: group.to_owned(),
            labels: sqlx::types::Json(Default::default()),
            phase: "inactive".into(),
            active_since: None,
            fired_at: None,
            last_held: None,
            resolved_at: None,
            value: None,
        }
    }
}

pub async fn load_alerts(pool: &PgPool) -> Result<Vec<StoredAlert>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT alert, key, group_name, labels, phase, active_since, fired_at, last_held, resolved_at, value
         FROM alert_state ORDER BY alert, key",
    )
    .fetch_all(pool)
    .await?)
}

/// The annotations the latest firing event of each firing alert carried: (alert, key,
/// annotations). What its notifications said, for the APIs.
pub async fn firing_annotations(
    pool: &PgPool,
) -> Result<Vec<(String, String, sqlx::types::Json<BTreeMap<String, String>>)>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT DISTINCT ON (e.alert, e.key) e.alert, e.key, e.annotations
         FROM alert_events e
         JOIN alert_state s ON s.alert = e.alert AND s.key = e.key AND s.phase = 'firing'
         WHERE e.status = 'firing'
         ORDER BY e.alert, e.key, e.id DESC",
    )
    .fetch_all(pool)
    .await?)
}

/// A firing or resolved notification to record.
#[derive(Debug, Clone, PartialEq)]
pub struct NewEvent {
    pub alert: String,
    pub key: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub status: &'static str,
    pub value: Option<f64>,
    pub threshold: Option<f64>,
    pub since: DateTime<Utc>,
    pub at: DateTime<Utc>,
}

/// One rule's evaluation outcome: (group, alert, error if it failed, evaluated at, milliseconds).
pub type HealthUpdate = (String, String, Option<String>, DateTime<Utc>, f64);

/// Saves a group's evaluation in one transaction: changed alert states (inactive ones deleted),
/// the events, and every rule's health.
pub async fn save_evaluation(
    conn: &mut PgConnection,
    states: &[StoredAlert],
    events: &[NewEvent],
    health: &[HealthUpdate],
) -> Result<(), StoreError> {
    use sqlx::Connection;
    let mut tx = conn.begin().await?;
    for s in states {
        if s.phase == "inactive" {
            sqlx::query("DELETE FROM alert_state WHERE alert = $1 AND key = $2")
                .bind(&s.alert)
                .bind(&s.key)
                .execute(&mut *tx)
                .await?;
            continue;
        }
        sqlx::query(
            "INSERT INTO alert_state (alert, key, group_name, labels, phase, active_since, fired_at, last_held, resolved_at, value, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, now())
             ON CONFLICT (alert, key) DO UPDATE SET group_name = EXCLUDED.group_name, labels = EXCLUDED.labels,
                phase = EXCLUDED.phase, active_since = EXCLUDED.active_since, fired_at = EXCLUDED.fired_at,
                last_held = EXCLUDED.last_held, resolved_at = EXCLUDED.resolved_at, value = EXCLUDED.value, updated_at = now()",
        )
        .bind(&s.alert)
        .bind(&s.key)
        .bind(&s.group_name)
        .bind(&s.labels)
        .bind(&s.phase)
        .bind(s.active_since)
        .bind(s.fired_at)
        .bind(s.last_held)
        .bind(s.resolved_at)
        .bind(s.value)
        .execute(&mut *tx)
        .await?;
    }
    for e in events {
        sqlx::query(
            "INSERT INTO alert_events (alert, key, labels, annotations, status, value, threshold, since, at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(&e.alert)
        .bind(&e.key)
        .bind(sqlx::types::Json(&e.labels))
        .bind(sqlx::types::Json(&e.annotations))
        .bind(e.status)
        .bind(e.value)
        .bind(e.threshold)
        .bind(e.since)
        .bind(e.at)
        .execute(&mut *tx)
        .await?;
    }
    for (group, alert, error, at, ms) in health {
        sqlx::query(
            "INSERT INTO rule_health (group_name, alert, health, last_error, last_evaluation, evaluation_ms)
             VALUES ($1, $2, $3, $4, $5, $6)
             ON CONFLICT (group_name, alert) DO UPDATE SET health = EXCLUDED.health, last_error = EXCLUDED.last_error,
                last_evaluation = EXCLUDED.last_evaluation, evaluation_ms = EXCLUDED.evaluation_ms",
        )
        .bind(group)
        .bind(alert)
        .bind(if error.is_some() { "err" } else { "ok" })
        .bind(error)
        .bind(at)
        .bind(ms)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// Rule health rows: (group, alert, health, last_error, last_evaluation, evaluation_ms).
pub type HealthRow = (String, String, String, Option<String>, DateTime<Utc>, f64);

pub async fn rule_health(pool: &PgPool) -> Result<Vec<HealthRow>, StoreError> {
    Ok(sqlx::query_as("SELECT group_name, alert, health, last_error, last_evaluation, evaluation_ms FROM rule_health")
        .fetch_all(pool)
        .await?)
}

/// Events, oldest first.
pub async fn events(
    pool: &PgPool,
) -> Result<Vec<(String, String, String, DateTime<Utc>, DateTime<Utc>)>, StoreError> {
    Ok(
        sqlx::query_as("SELECT alert, key, status, since, at FROM alert_events ORDER BY id")
            .fetch_all(pool)
            .await?,
    )
}

/// Tries to become the one evaluator: a session-level advisory lock held on `conn` for as long
/// as that connection lives. Another replica takes over when this one's connection dies.
/// `role` names the lock: `toolsight-evaluator`, `toolsight-notifier`.
pub async fn try_lead(conn: &mut PgConnection, role: &str) -> Result<bool, StoreError> {
    Ok(
        sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtext($1))")
            .bind(role)
            .fetch_one(conn)
            .await?,
    )
}

/// A dedicated connection holding the `role` lock, or none when another replica leads (or the
/// database is unreachable). Leadership lasts as long as the connection.
pub async fn become_leader(
    opts: &sqlx::postgres::PgConnectOptions,
    role: &str,
) -> Option<PgConnection> {
    use sqlx::ConnectOptions;
    let mut conn = opts.connect().await.ok()?;
    try_lead(&mut conn, role)
        .await
        .unwrap_or(false)
        .then_some(conn)
}

/// Whether the leader's lock connection still answers (the lock dies with it).
pub async fn connection_alive(conn: &mut PgConnection) -> bool {
    sqlx::query("SELECT 1").execute(conn).await.is_ok()
}
