//! Retention: raw rows, the rules' per-minute state and rollups go a whole partition at a time
//! (`store::partitions`: no DELETE, no vacuum debt); alert events, delivered notifications and
//! the service's own metric samples are deleted in bounded batches (each its own short
//! statement), so pruning never holds long locks or blocks ingest.

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::StoreError;

/// The tables pruned row by row: which table, by which time column, and which class of
/// retention applies. Partitioned tables are in [`super::partitions::PARTITIONED`].
pub const TABLES: &[(&str, &str, Class)] = &[
    ("alert_events", "at", Class::Rollup),
    ("toolsight_changed_minutes", "minute", Class::Rollup),
    ("notify_outbox", "created_at", Class::Delivered),
    ("collector_metrics", "at", Class::OwnMetrics),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    Raw,
    /// Raw rows the raw-row policy does not keep (`store::policy`).
    SampledOut,
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
    /// Raw rows the raw-row policy (`ingest.raw_keep_ok`) samples out: kept this long so the
    /// two sides of a call can still be joined, in hourly partitions (so up to an hour more).
    #[serde(with = "humantime_serde")]
    pub sampled_out: std::time::Duration,
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
    /// The time each partition of the raw tables (and the rules' per-minute state) spans: whole
    /// hours dividing a day. Retention drops a partition once all of it is older than `raw`, so
    /// up to one span more than `raw` is kept. Rollups are partitioned by day.
    #[serde(with = "humantime_serde")]
    pub partition: std::time::Duration,
}

impl Default for Retention {
    fn default() -> Self {
        let days = |d: u64| std::time::Duration::from_secs(d * 86_400);
        Retention {
            raw: days(7),
            sampled_out: std::time::Duration::from_secs(2 * 3600),
            rollups: days(90),
            notifications: days(30),
            own_metrics: days(30),
            every: std::time::Duration::from_secs(3600),
            batch_rows: 10_000,
            partition: days(1),
        }
    }
}

impl Retention {
    fn keep(&self, class: Class) -> std::time::Duration {
        match class {
            Class::Raw => self.raw,
            Class::SampledOut => self.sampled_out,
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

/// What one step of pruning did (or, in a dry run, would do).
#[derive(Debug, Clone, Copy)]
pub struct Pruned<'a> {
    /// A partition dropped whole, or a table whose old rows were deleted.
    pub table: &'a str,
    pub before: DateTime<Utc>,
    /// Rows deleted, or held by the dropped partition (as the planner counts them once the
    /// table has been analyzed).
    pub rows: u64,
    pub partition: bool,
}

/// Prunes every table by its policy: expired partitions are dropped whole, other tables pruned
/// batch after batch; `on_table` hears each table's total (rows of a dropped partition as the
/// planner estimates them). With `dry_run`, counts instead of deleting.
pub async fn prune(
    pool: &PgPool,
    policy: &Retention,
    now: DateTime<Utc>,
    dry_run: bool,
    mut on_table: impl FnMut(Pruned<'_>),
) -> Result<u64, StoreError> {
    let mut total = 0;
    for class in [Class::Raw, Class::SampledOut, Class::Rollup] {
        let before = policy.before(class, now);
        for p in super::partitions::expired(pool, class, before).await? {
            let rows = super::partitions::estimated_rows(pool, &p.name)
                .await?
                .max(0) as u64;
            if !dry_run {
                super::partitions::drop(pool, &p).await?;
            }
            on_table(Pruned {
                table: &p.name,
                before,
                rows,
                partition: true,
            });
            total += rows;
        }
    }
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
        on_table(Pruned {
            table,
            before,
            rows: deleted,
            partition: false,
        });
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
            sampled_out: year,
            rollups: year * 300_000,
            notifications: std::time::Duration::MAX,
            own_metrics: year,
            every: year,
            batch_rows: 1,
            partition: year,
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
