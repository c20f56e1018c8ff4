//! Retention: old raw rows, rollups, alert events and delivered notifications are deleted in
//! bounded batches (each its own short statement), so pruning never holds long locks or blocks
//! ingest.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::StoreError;

/// Which table, by which time column, and which class of retention applies.
pub const TABLES: &[(&str, &str, Class)] = &[
    ("tool_calls", "start_time", Class::Raw),
    ("mcp_requests", "start_time", Class::Raw),
    ("llm_calls", "start_time", Class::Raw),
    ("upstream_calls", "start_time", Class::Raw),
    ("tool_rollup_1m", "minute", Class::Rollup),
    ("mcp_method_rollup_1m", "minute", Class::Rollup),
    ("llm_rollup_1m", "minute", Class::Rollup),
    ("upstream_rollup_1m", "minute", Class::Rollup),
    ("alert_events", "at", Class::Rollup),
    ("notify_outbox", "created_at", Class::Delivered),
    ("collector_metrics", "at", Class::OwnMetrics),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Raw,
    Rollup,
    /// Notifications no longer pending (delivered or failed).
    Delivered,
    /// The service's own metric samples.
    OwnMetrics,
}

/// Deletes up to `batch` rows of `table` older than `before`; returns how many went.
pub async fn prune_batch(
    pool: &PgPool,
    table: &str,
    column: &str,
    before: DateTime<Utc>,
    batch: i64,
    class: Class,
) -> Result<u64, StoreError> {
    let extra = if class == Class::Delivered {
        " AND status <> 'pending'"
    } else {
        ""
    };
    // Table and column names come from TABLES, never from input.
    let sql = format!(
        "DELETE FROM {table} WHERE ctid = ANY(ARRAY(SELECT ctid FROM {table} WHERE {column} < $1{extra} LIMIT $2))"
    );
    Ok(sqlx::query(&sql)
        .bind(before)
        .bind(batch)
        .execute(pool)
        .await?
        .rows_affected())
}

/// Rows of `table` older than `before` (for `toolsight prune --dry-run`).
pub async fn count_older(
    pool: &PgPool,
    table: &str,
    column: &str,
    before: DateTime<Utc>,
    class: Class,
) -> Result<i64, StoreError> {
    let extra = if class == Class::Delivered {
        " AND status <> 'pending'"
    } else {
        ""
    };
    Ok(sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {table} WHERE {column} < $1{extra}"
    ))
    .bind(before)
    .fetch_one(pool)
    .await?)
}

/// The `[retention]` settings: how long each class of rows is kept, and how pruning runs.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Retention {
    /// Raw rows (tool calls, MCP requests, LLM and upstream calls).
    #[serde(with = "humantime_serde")]
    pub raw: std::time::Duration,
    /// Per-minute rollups and alert events.
    #[serde(with = "humantime_serde")]
    pub rollups: std::time::Duration,
    /// Delivered and failed notifications.
    #[serde(with = "humantime_serde")]
    pub notifications: std::time::Duration,
    /// The service's own metric samples (`collector_metrics`).
    #[serde(with = "humantime_serde")]
    pub own_metrics: std::time::Duration,
    /// How often the service prunes (0: never; `toolsight prune` still works).
    #[serde(with = "humantime_serde")]
    pub every: std::time::Duration,
    /// Rows per DELETE statement.
    pub batch_rows: i64,
}

impl Default for Retention {
    fn default() -> Self {
        let days = |d: u64| std::time::Duration::from_secs(d * 86_400);
        Retention {
            raw: days(7),
            rollups: days(90),
            notifications: days(30),
            own_metrics: days(30),
            every: std::time::Duration::from_secs(3600),
            batch_rows: 10_000,
        }
    }
}

impl Retention {
    fn keep(&self, class: Class) -> std::time::Duration {
        match class {
            Class::Raw => self.raw,
            Class::Rollup => self.rollups,
            Class::Delivered => self.notifications,
            Class::OwnMetrics => self.own_metrics,
        }
    }

    /// The cut-off of a table at `now`.
    /// Saturates at the earliest representable time: a retention longer than the calendar
    /// keeps everything rather than failing.
    pub fn before(&self, class: Class, now: DateTime<Utc>) -> DateTime<Utc> {
        chrono::Duration::from_std(self.keep(class))
            .ok()
            .and_then(|d| now.checked_sub_signed(d))
            .unwrap_or(DateTime::<Utc>::MIN_UTC)
    }
}

/// Prunes every table by its policy, batch after batch; `on_table` hears each table's total.
/// With `dry_run`, counts instead of deleting.
pub async fn prune(
    pool: &PgPool,
    policy: &Retention,
    now: DateTime<Utc>,
    dry_run: bool,
    mut on_table: impl FnMut(&str, DateTime<Utc>, u64),
) -> Result<u64, StoreError> {
    let mut total = 0;
    for (table, column, class) in TABLES {
        let before = policy.before(*class, now);
        let mut deleted = 0u64;
        if dry_run {
            deleted = count_older(pool, table, column, before, *class)
                .await?
                .max(0) as u64;
        } else {
            loop {
                let n = prune_batch(pool, table, column, before, policy.batch_rows, *class).await?;
                deleted += n;
                if n < policy.batch_rows as u64 {
                    break;
                }
                // Let ingest and queries in between batches.
                tokio::task::yield_now().await;
            }
        }
        on_table(table, before, deleted);
        total += deleted;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retention_longer_than_the_calendar_keeps_everything() {
        let year = std::time::Duration::from_secs(365 * 86_400);
        let policy = Retention {
            raw: year,
            rollups: year * 300_000,
            notifications: std::time::Duration::MAX,
            own_metrics: year,
            every: year,
            batch_rows: 1,
        };
        let now = Utc::now();
        assert_eq!(policy.before(Class::Rollup, now), DateTime::<Utc>::MIN_UTC);
        assert_eq!(
            policy.before(Class::Delivered, now),
            DateTime::<Utc>::MIN_UTC
        );
        assert!(policy.before(Class::Raw, now) < now);
    }
}
