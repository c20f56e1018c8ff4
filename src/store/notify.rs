//! Notification persistence: routing alert events, aggregation groups, the outbox, silences.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool};

use super::StoreError;

/// An alert event waiting to be routed.
#[derive(Debug, Clone, sqlx::FromRow)]
pub(crate) struct EventRow {
    pub id: i64,
    pub labels: Json<BTreeMap<String, String>>,
    pub annotations: Json<BTreeMap<String, String>>,
    pub status: String,
    pub value: Option<f64>,
    pub threshold: Option<f64>,
    pub since: DateTime<Utc>,
    pub at: DateTime<Utc>,
}

/// The oldest events not yet routed, locked for this transaction.
pub(crate) async fn undispatched_events(
    conn: &mut PgConnection,
    limit: i64,
) -> Result<Vec<EventRow>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT id, labels, annotations, status, value, threshold, since, at
         FROM alert_events WHERE NOT dispatched ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED",
    )
    .bind(limit)
    .fetch_all(conn)
    .await?)
}

pub(crate) async fn mark_dispatched(
    conn: &mut PgConnection,
    ids: &[i64],
) -> Result<(), StoreError> {
    sqlx::query("UPDATE alert_events SET dispatched = true WHERE id = ANY($1)")
        .bind(ids)
        .execute(conn)
        .await?;
    Ok(())
}

/// Every aggregation group: (receiver, group key, state).
pub(crate) async fn load_groups(
    pool: &PgPool,
) -> Result<Vec<(String, String, Json<serde_json::Value>)>, StoreError> {
    Ok(
        sqlx::query_as("SELECT receiver, group_key, state FROM notify_groups")
            .fetch_all(pool)
            .await?,
    )
}

pub(crate) async fn save_group(
    conn: &mut PgConnection,
    receiver: &str,
    group_key: &str,
    state: &serde_json::Value,
    flush_at: Option<DateTime<Utc>>,
) -> Result<(), StoreError> {
    sqlx::query(
        "INSERT INTO notify_groups (receiver, group_key, state, flush_at, updated_at) VALUES ($1, $2, $3, $4, now())
         ON CONFLICT (receiver, group_key) DO UPDATE SET state = EXCLUDED.state, flush_at = EXCLUDED.flush_at, updated_at = now()",
    )
    .bind(receiver)
    .bind(group_key)
    .bind(Json(state))
    .bind(flush_at)
    .execute(conn)
    .await?;
    Ok(())
}

pub(crate) async fn delete_group(
    conn: &mut PgConnection,
    receiver: &str,
    group_key: &str,
) -> Result<(), StoreError> {
    sqlx::query("DELETE FROM notify_groups WHERE receiver = $1 AND group_key = $2")
        .bind(receiver)
        .bind(group_key)
        .execute(conn)
        .await?;
    Ok(())
}

pub(crate) async fn insert_outbox(
    conn: &mut PgConnection,
    receiver: &str,
    target: &str,
    group_key: &str,
    payload: &serde_json::Value,
) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar(
        "INSERT INTO notify_outbox (receiver, target, group_key, payload) VALUES ($1, $2, $3, $4) RETURNING id",
    )
    .bind(receiver)
    .bind(target)
    .bind(group_key)
    .bind(Json(payload))
    .fetch_one(conn)
    .await?)
}

/// A notification waiting for delivery.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct OutboxRow {
    pub id: i64,
    pub receiver: String,
    pub target: String,
    pub group_key: String,
    pub payload: Json<serde_json::Value>,
    pub created_at: DateTime<Utc>,
    pub next_attempt_at: DateTime<Utc>,
    pub attempts: i32,
}

/// A receiver's pending notifications in order (the due ones first in line per target).
pub(crate) async fn pending_outbox(
    pool: &PgPool,
    receiver: &str,
    limit: i64,
) -> Result<Vec<OutboxRow>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT id, receiver, target, group_key, payload, created_at, next_attempt_at, attempts
         FROM notify_outbox WHERE receiver = $1 AND status = 'pending' ORDER BY id LIMIT $2",
    )
    .bind(receiver)
    .bind(limit)
    .fetch_all(pool)
    .await?)
}

pub(crate) async fn mark_delivered(pool: &PgPool, id: i64) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE notify_outbox SET status = 'delivered', attempts = attempts + 1, delivered_at = now(), last_error = NULL WHERE id = $1",
    )
    .bind(id)
    .execute(pool)
    .await?;
    Ok(())
}

pub(crate) async fn mark_retry(
    pool: &PgPool,
    id: i64,
    next_attempt_at: DateTime<Utc>,
    error: &str,
) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE notify_outbox SET attempts = attempts + 1, next_attempt_at = $2, last_error = $3 WHERE id = $1",
    )
    .bind(id)
    .bind(next_attempt_at)
    .bind(error)
    .execute(pool)
    .await?;
    Ok(())
}

pub(crate) async fn mark_failed(pool: &PgPool, id: i64, error: &str) -> Result<(), StoreError> {
    sqlx::query(
        "UPDATE notify_outbox SET status = 'failed', attempts = attempts + 1, last_error = $2 WHERE id = $1",
    )
    .bind(id)
    .bind(error)
    .execute(pool)
    .await?;
    Ok(())
}

/// Pending notifications (for `/metrics`).
pub(crate) async fn outbox_pending(pool: &PgPool) -> Result<i64, StoreError> {
    Ok(
        sqlx::query_scalar("SELECT count(*) FROM notify_outbox WHERE status = 'pending'")
            .fetch_one(pool)
            .await?,
    )
}

/// A silence.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Silence {
    pub id: i64,
    pub matchers: Json<Vec<String>>,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
    pub created_by: String,
    pub comment: String,
    pub created_at: DateTime<Utc>,
}

pub(crate) async fn create_silence(
    pool: &PgPool,
    matchers: &[String],
    starts_at: DateTime<Utc>,
    ends_at: DateTime<Utc>,
    created_by: &str,
    comment: &str,
) -> Result<Silence, StoreError> {
    Ok(sqlx::query_as(
        "INSERT INTO silences (matchers, starts_at, ends_at, created_by, comment) VALUES ($1, $2, $3, $4, $5)
         RETURNING id, matchers, starts_at, ends_at, created_by, comment, created_at",
    )
    .bind(Json(matchers))
    .bind(starts_at)
    .bind(ends_at)
    .bind(created_by)
    .bind(comment)
    .fetch_one(pool)
    .await?)
}

/// Silences that end after `since` (active and pending ones, and recently expired ones).
pub(crate) async fn silences(
    pool: &PgPool,
    since: DateTime<Utc>,
) -> Result<Vec<Silence>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT id, matchers, starts_at, ends_at, created_by, comment, created_at
         FROM silences WHERE ends_at > $1 ORDER BY id",
    )
    .bind(since)
    .fetch_all(pool)
    .await?)
}

/// One silence, whatever its state.
pub(crate) async fn silence(pool: &PgPool, id: i64) -> Result<Option<Silence>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT id, matchers, starts_at, ends_at, created_by, comment, created_at
         FROM silences WHERE id = $1",
    )
    .bind(id)
    .fetch_optional(pool)
    .await?)
}

/// Ends a silence now; false when it does not exist or already ended.
pub(crate) async fn expire_silence(pool: &PgPool, id: i64) -> Result<bool, StoreError> {
    let r = sqlx::query("UPDATE silences SET ends_at = now() WHERE id = $1 AND ends_at > now()")
        .bind(id)
        .execute(pool)
        .await?;
    Ok(r.rows_affected() == 1)
}

/// Up to `n` example trace ids (hex) of the calls behind an alert with these labels, between
/// `from` and `to`, one per trace: calls that failed (or came back empty, or an upstream's 429s
/// and 5xx, or an LLM call that failed) first, then any. A key with a `tool` is one of
/// `tool_calls` (its `side` and `session` when the key has them), with a `server_address` one of
/// `upstream_calls`, with only a `session` one of `llm_calls`. Neither query sorts: each stops at
/// its first `4 n` matching rows, so its cost is bounded by the range, never by a sort of it.
pub(crate) async fn example_traces(
    pool: &PgPool,
    labels: &BTreeMap<String, String>,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    n: usize,
) -> Result<Vec<String>, StoreError> {
    let label = |k: &str| labels.get(k).cloned();
    let (Some(service), true) = (label("service"), n > 0) else {
        return Ok(Vec::new());
    };
    let (table, key, value, problem) = if let Some(tool) = label("tool") {
        (
            "tool_calls",
            "tool",
            tool,
            "(coalesce(own_outcome, outcome) <> 'ok' OR result_empty IS TRUE)",
        )
    } else if let Some(address) = label("server_address") {
        (
            "upstream_calls",
            "server_address",
            address,
            "(status_code IS NULL OR status_code = 429 OR status_code >= 500)",
        )
    } else if let Some(session) = label("session") {
        ("llm_calls", "session_key", session, "error")
    } else {
        return Ok(Vec::new());
    };
    // Side and session narrow a tool's calls when the key has them.
    let narrow = if table == "tool_calls" {
        "AND ($5::text IS NULL OR side = $5) AND ($6::text IS NULL OR session_key = $6)"
    } else {
        "AND $5::text IS NULL AND $6::text IS NULL"
    };
    let (side, session) = if table == "tool_calls" {
        (label("side"), label("session"))
    } else {
        (None, None)
    };
    let mut ids: Vec<String> = Vec::new();
    for only_problems in [true, false] {
        let filter = if only_problems { problem } else { "true" };
        let sql = format!(
            "SELECT encode(trace_id, 'hex') FROM {table}
             WHERE start_time BETWEEN $1 AND $2 AND service = $3 AND {key} = $4 {narrow}
               AND {filter}
             LIMIT $7"
        );
        let rows: Vec<String> = sqlx::query_scalar(&sql)
            .bind(from)
            .bind(to)
            .bind(&service)
            .bind(&value)
            .bind(&side)
            .bind(&session)
            // Both sides of a call share its trace: ask for more rows than ids.
            .bind((n * 4) as i64)
            .fetch_all(pool)
            .await?;
        for id in rows {
            if ids.len() < n && !ids.contains(&id) {
                ids.push(id);
            }
        }
        if ids.len() >= n {
            break;
        }
    }
    Ok(ids)
}
