//! Time partitions: created ahead of time and on demand, dropped whole by retention.
//!
//! Every partitioned table is listed in [`PARTITIONED`] with its retention class and span. A
//! partition is created empty beside its parent and then attached, which takes only a SHARE
//! UPDATE EXCLUSIVE lock on the parent (inserts go on); it is dropped after a concurrent detach,
//! which waits for nobody either. `toolsight_partitions` lists every partition with its bounds,
//! so a change of span later never makes two partitions overlap: new ones fill the gaps.

use chrono::{DateTime, Duration, DurationRound, TimeDelta, Utc};
use sqlx::{Connection, Executor, PgConnection, PgPool};

use super::StoreError;
use super::retention::{Class, Retention};

/// How long each partition of a table spans.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Span {
    /// `retention.partition` (one day by default).
    Configured,
    Day,
    Hour,
}

/// A partitioned table.
#[derive(Debug, Clone, Copy)]
pub struct Partitioned {
    pub parent: &'static str,
    pub class: Class,
    pub span: Span,
    /// Partitions updated in place (rollups, state) leave room for HOT updates.
    pub fillfactor: Option<u8>,
}

/// How far ahead of now partitions of `near` tables are created.
pub const NEAR_AHEAD: TimeDelta = TimeDelta::hours(2);

/// Tool, LLM and upstream calls are partitioned first by whether the raw-row policy
/// (`store::policy`) keeps them (`kept`): `<table>_kept` by `retention.partition` for
/// `retention.raw`, `<table>_sampled_out` by hour for `retention.sampled_out`. MCP requests
/// other than tool calls are few and all kept.
pub const PARTITIONED: &[Partitioned] = &[
    raw("tool_calls_kept"),
    sampled_out("tool_calls_sampled_out"),
    raw("mcp_requests"),
    raw("llm_calls_kept"),
    sampled_out("llm_calls_sampled_out"),
    raw("upstream_calls_kept"),
    sampled_out("upstream_calls_sampled_out"),
    Partitioned {
        parent: "loop_calls_1m",
        class: Class::Raw,
        span: Span::Configured,
        fillfactor: Some(70),
    },
    Partitioned {
        parent: "session_tokens_1m",
        class: Class::Raw,
        span: Span::Configured,
        fillfactor: Some(70),
    },
    rollup("tool_rollup_1m"),
    rollup("mcp_method_rollup_1m"),
    rollup("llm_rollup_1m"),
    rollup("upstream_rollup_1m"),
];

const fn raw(parent: &'static str) -> Partitioned {
    Partitioned {
        parent,
        class: Class::Raw,
        span: Span::Configured,
        fillfactor: None,
    }
}

const fn sampled_out(parent: &'static str) -> Partitioned {
    Partitioned {
        parent,
        class: Class::SampledOut,
        span: Span::Hour,
        fillfactor: None,
    }
}

const fn rollup(parent: &'static str) -> Partitioned {
    Partitioned {
        parent,
        class: Class::Rollup,
        span: Span::Day,
        fillfactor: Some(70),
    }
}

/// The advisory lock every partition change of every replica takes (creation and drop).
const LOCK: &str = "toolsight-partitions";

impl Partitioned {
    /// Created only around now (an hour back, [`NEAR_AHEAD`] ahead) and on demand, never for a
    /// whole range ahead or behind: the short-lived rows the raw-row policy samples out.
    pub fn near(&self) -> bool {
        self.class == Class::SampledOut
    }

    /// The span of this table's partitions, given `retention.partition`.
    pub fn span(&self, configured: std::time::Duration) -> Duration {
        match self.span {
            Span::Configured => Duration::from_std(configured)
                .ok()
                .filter(|d| *d >= Duration::hours(1))
                .unwrap_or(Duration::days(1)),
            Span::Day => Duration::days(1),
            Span::Hour => Duration::hours(1),
        }
    }
}

/// One listed partition.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Partition {
    pub name: String,
    pub parent: String,
    pub lower_bound: DateTime<Utc>,
    pub upper_bound: DateTime<Utc>,
}

/// Every listed partition, by parent and time.
pub async fn list(pool: &PgPool) -> Result<Vec<Partition>, StoreError> {
    Ok(sqlx::query_as(
        "SELECT name, parent, lower_bound, upper_bound FROM toolsight_partitions
         ORDER BY parent, lower_bound",
    )
    .fetch_all(pool)
    .await?)
}

/// The slices of `[from, to)` no partition covers, each cut at multiples of `span` (since the
/// Unix epoch: whole UTC days and hours). Pure.
pub fn missing(
    existing: &[(DateTime<Utc>, DateTime<Utc>)],
    span: Duration,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Vec<(DateTime<Utc>, DateTime<Utc>)> {
    let mut out = Vec::new();
    let Ok(mut slot) = from.duration_trunc(span) else {
        return out;
    };
    while slot < to {
        let end = slot + span;
        // What of [slot, end) is left once every existing partition is taken out.
        let mut gaps = vec![(slot, end)];
        for &(lo, hi) in existing {
            gaps = gaps
                .into_iter()
                .flat_map(|(a, b)| {
                    if hi <= a || lo >= b {
                        vec![(a, b)]
                    } else {
                        [(a, lo.max(a)), (hi.min(b), b)]
                            .into_iter()
                            .filter(|(x, y)| x < y)
                            .collect()
                    }
                })
                .collect();
        }
        out.extend(gaps);
        slot = end;
    }
    out
}

/// The name of the partition of `parent` starting at `lower`: `<parent>_pYYYYMMDD_HHMM`.
pub fn name(parent: &str, lower: DateTime<Utc>) -> String {
    format!("{parent}_p{}", lower.format("%Y%m%d_%H%M"))
}

/// Creates the partitions that `[from, to)` lacks for every partitioned table but the `near`
/// ones (created around now and on demand). Idempotent, and safe with several replicas: they
/// take turns on an advisory lock and each reads what is listed after taking it. Returns the
/// partitions created.
pub async fn ensure(
    conn: &mut PgConnection,
    partition: std::time::Duration,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Result<Vec<String>, StoreError> {
    ensure_tables(conn, partition, |t| !t.near(), &[(from, to)]).await
}

/// Creates, for every partitioned table, the partitions holding the given ranges (the
/// instants a batch of records starts at): only those, not the ones in between.
pub async fn ensure_each(
    conn: &mut PgConnection,
    partition: std::time::Duration,
    ranges: &[(DateTime<Utc>, DateTime<Utc>)],
) -> Result<Vec<String>, StoreError> {
    ensure_tables(conn, partition, |_| true, ranges).await
}

async fn ensure_tables(
    conn: &mut PgConnection,
    partition: std::time::Duration,
    tables: impl Fn(&Partitioned) -> bool,
    ranges: &[(DateTime<Utc>, DateTime<Utc>)],
) -> Result<Vec<String>, StoreError> {
    let mut created = Vec::new();
    let mut tx = conn.begin().await?;
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
        .bind(LOCK)
        .execute(&mut *tx)
        .await?;
    for t in PARTITIONED.iter().filter(|t| tables(t)) {
        let mut existing: Vec<(DateTime<Utc>, DateTime<Utc>)> = sqlx::query_as(
            "SELECT lower_bound, upper_bound FROM toolsight_partitions WHERE parent = $1",
        )
        .bind(t.parent)
        .fetch_all(&mut *tx)
        .await?;
        let mut wanted = Vec::new();
        for &(from, to) in ranges {
            for gap in missing(&existing, t.span(partition), from, to) {
                existing.push(gap);
                wanted.push(gap);
            }
        }
        for (lo, hi) in wanted {
            let name = name(t.parent, lo);
            let with = t
                .fillfactor
                .map(|f| format!(" WITH (fillfactor = {f})"))
                .unwrap_or_default();
            // Names come from PARTITIONED and a formatted time, never from input; bounds are
            // formatted by PostgreSQL itself.
            let (lo_text, hi_text): (String, String) =
                sqlx::query_as("SELECT $1::timestamptz::text, $2::timestamptz::text")
                    .bind(lo)
                    .bind(hi)
                    .fetch_one(&mut *tx)
                    .await?;
            let create = format!(
                "CREATE TABLE {name} (LIKE {parent} INCLUDING DEFAULTS INCLUDING CONSTRAINTS){with};
                 ALTER TABLE {parent} ATTACH PARTITION {name} FOR VALUES FROM ('{lo_text}') TO ('{hi_text}');",
                parent = t.parent
            );
            tx.execute(create.as_str()).await?;
            sqlx::query("INSERT INTO toolsight_partitions (name, parent, lower_bound, upper_bound) VALUES ($1, $2, $3, $4)")
                .bind(&name)
                .bind(t.parent)
                .bind(lo)
                .bind(hi)
                .execute(&mut *tx)
                .await?;
            created.push(name);
        }
    }
    tx.commit().await?;
    if !created.is_empty() {
        tracing::info!(partitions = ?created, "created partitions");
    }
    Ok(created)
}

/// How far ahead of now partitions are created: past the clock skew ingest accepts, and a day
/// more, so ingest never waits for one.
pub fn ahead(max_clock_skew: std::time::Duration) -> Duration {
    Duration::from_std(max_clock_skew).unwrap_or(TimeDelta::hours(1)) + Duration::days(1)
}

/// Creates the partitions from a day ago to [`ahead`] of `now`, and those of the `near` tables
/// from an hour ago to [`NEAR_AHEAD`].
pub async fn prepare(
    pool: &PgPool,
    policy: &Retention,
    max_clock_skew: std::time::Duration,
    now: DateTime<Utc>,
) -> Result<Vec<String>, StoreError> {
    let mut conn = pool.acquire().await?;
    let mut created = ensure(
        &mut conn,
        policy.partition,
        now - Duration::days(1),
        now + ahead(max_clock_skew),
    )
    .await?;
    created.extend(
        ensure_tables(
            &mut conn,
            policy.partition,
            |t| t.near(),
            &[(now - Duration::hours(1), now + NEAR_AHEAD)],
        )
        .await?,
    );
    Ok(created)
}

/// The partitions of `class` whose every row is older than `before`.
pub async fn expired(
    pool: &PgPool,
    class: Class,
    before: DateTime<Utc>,
) -> Result<Vec<Partition>, StoreError> {
    let parents: Vec<&str> = PARTITIONED
        .iter()
        .filter(|t| t.class == class)
        .map(|t| t.parent)
        .collect();
    Ok(sqlx::query_as(
        "SELECT name, parent, lower_bound, upper_bound FROM toolsight_partitions
         WHERE parent = ANY($1) AND upper_bound <= $2 ORDER BY parent, lower_bound",
    )
    .bind(parents)
    .bind(before)
    .fetch_all(pool)
    .await?)
}

/// Rows changed in a partition before its first statistics are gathered.
pub const ANALYZE_AFTER_ROWS: i64 = 10_000;

/// Gathers statistics (`ANALYZE`) on every listed partition that has at least `min_changes`
/// changed rows and either none yet or as many changed rows as it had when they were last
/// gathered (it has doubled since). Returns the partitions analyzed.
///
/// Autovacuum does the same eventually, but under a sustained write load it may not reach the
/// day's partition for hours, and a plan made for a large partition without statistics assumes
/// the default selectivity (0.5% of the rows per trace id): the writers' join lookup then turns
/// from an index scan into a bitmap scan over much of the partition, and ingest collapses the
/// moment anything (a partition dropped or attached) makes them plan again. Gathering them as
/// soon as a partition fills keeps every plan on real statistics. The statistics scale with the
/// table's size between two runs (distinct counts are kept as a share of the rows), so
/// gathering them again when the rows doubled is enough.
pub async fn analyze_stale(pool: &PgPool, min_changes: i64) -> Result<Vec<String>, StoreError> {
    let stale: Vec<String> = sqlx::query_scalar(
        "SELECT p.name FROM toolsight_partitions p
         JOIN pg_stat_user_tables s ON s.relid = to_regclass(p.name)
         JOIN pg_class c ON c.oid = s.relid
         WHERE s.n_mod_since_analyze >= $1
           AND (coalesce(s.last_analyze, s.last_autoanalyze) IS NULL
                OR s.n_mod_since_analyze >= c.reltuples)
         ORDER BY s.n_mod_since_analyze DESC",
    )
    .bind(min_changes)
    .fetch_all(pool)
    .await?;
    let mut done = Vec::with_capacity(stale.len());
    for name in stale {
        // The name is a listed partition's, never input. A partition dropped meanwhile is
        // skipped.
        let sql = format!("ANALYZE {name}");
        match sqlx::query(&sql).execute(pool).await {
            Ok(_) => done.push(name),
            Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42P01") => {}
            Err(e) => return Err(e.into()),
        }
    }
    if !done.is_empty() {
        tracing::debug!(partitions = ?done, "gathered partition statistics");
    }
    Ok(done)
}

/// Rows of a partition as the planner estimates them once the table has been analyzed (a count
/// would read the whole partition); counted when it never was.
pub async fn estimated_rows(pool: &PgPool, name: &str) -> Result<i64, StoreError> {
    let estimate: Option<Option<i64>> = sqlx::query_scalar(
        "SELECT CASE WHEN reltuples >= 0 THEN reltuples::int8 END FROM pg_class WHERE oid = to_regclass($1)",
    )
    .bind(name)
    .fetch_optional(pool)
    .await?;
    match estimate {
        None => Ok(0),
        Some(Some(n)) => Ok(n),
        // The name is a listed partition's, never input.
        Some(None) => Ok(sqlx::query_scalar(&format!("SELECT count(*) FROM {name}"))
            .fetch_one(pool)
            .await?),
    }
}

/// Detaches a partition without blocking ingest, then drops it.
pub async fn drop(pool: &PgPool, p: &Partition) -> Result<(), StoreError> {
    let mut conn = pool.acquire().await?;
    // Only one replica drops at a time; others find it gone from the list.
    sqlx::query("SELECT pg_advisory_lock(hashtext($1))")
        .bind(LOCK)
        .execute(&mut *conn)
        .await?;
    let result = drop_locked(&mut conn, p).await;
    sqlx::query("SELECT pg_advisory_unlock(hashtext($1))")
        .bind(LOCK)
        .execute(&mut *conn)
        .await?;
    result
}

async fn drop_locked(conn: &mut PgConnection, p: &Partition) -> Result<(), StoreError> {
    // (parent, attached, detach pending)
    let state: Option<(Option<String>, bool)> = sqlx::query_as(
        "SELECT i.inhparent::regclass::text, coalesce(i.inhdetachpending, false)
         FROM pg_class c LEFT JOIN pg_inherits i ON i.inhrelid = c.oid
         WHERE c.oid = to_regclass($1)",
    )
    .bind(&p.name)
    .fetch_optional(&mut *conn)
    .await?;
    let parent = p.parent.as_str();
    let name = p.name.as_str();
    if !PARTITIONED.iter().any(|t| t.parent == parent) {
        return Ok(());
    }
    match state {
        Some((Some(_), true)) => {
            // A detach interrupted before: finish it.
            let sql = format!("ALTER TABLE {parent} DETACH PARTITION {name} FINALIZE");
            conn.execute(sql.as_str()).await?;
        }
        Some((Some(_), false)) => {
            let sql = format!("ALTER TABLE {parent} DETACH PARTITION {name} CONCURRENTLY");
            conn.execute(sql.as_str()).await?;
        }
        _ => {}
    }
    let mut tx = conn.begin().await?;
    let sql = format!("DROP TABLE IF EXISTS {name}");
    tx.execute(sql.as_str()).await?;
    sqlx::query("DELETE FROM toolsight_partitions WHERE name = $1")
        .bind(name)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(())
}

/// Whether an error is a row for a time no partition covers.
pub fn is_missing_partition(e: &StoreError) -> bool {
    match e {
        StoreError::Query(sqlx::Error::Database(db))
        | StoreError::Unavailable(sqlx::Error::Database(db)) => {
            db.code().as_deref() == Some("23514") && db.message().contains("no partition")
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        s.parse().unwrap()
    }

    #[test]
    fn missing_slots_are_whole_spans_around_what_exists() {
        let day = Duration::days(1);
        let got = missing(
            &[],
            day,
            t("2026-12-01T10:00:00Z"),
            t("2026-12-02T01:00:00Z"),
        );
        assert_eq!(
            got,
            [
                (t("2026-12-01T00:00:00Z"), t("2026-12-02T00:00:00Z")),
                (t("2026-12-02T00:00:00Z"), t("2026-12-03T00:00:00Z")),
            ]
        );
        // A legacy partition up to the 2nd, and one of the 3rd: only the 4th is missing.
        let existing = [
            (DateTime::<Utc>::MIN_UTC, t("2026-12-02T00:00:00Z")),
            (t("2026-12-03T00:00:00Z"), t("2026-12-04T00:00:00Z")),
        ];
        let got = missing(
            &existing,
            day,
            t("2026-12-01T00:00:00Z"),
            t("2026-12-04T12:00:00Z"),
        );
        assert_eq!(
            got,
            [
                (t("2026-12-02T00:00:00Z"), t("2026-12-03T00:00:00Z")),
                (t("2026-12-04T00:00:00Z"), t("2026-12-05T00:00:00Z")),
            ]
        );
    }

    #[test]
    fn a_span_changed_to_hours_fills_only_the_gaps() {
        let existing = [(t("2026-12-01T00:00:00Z"), t("2026-12-02T00:00:00Z"))];
        let got = missing(
            &existing,
            Duration::hours(6),
            t("2026-12-01T20:00:00Z"),
            t("2026-12-02T07:00:00Z"),
        );
        assert_eq!(
            got,
            [
                (t("2026-12-02T00:00:00Z"), t("2026-12-02T06:00:00Z")),
                (t("2026-12-02T06:00:00Z"), t("2026-12-02T12:00:00Z")),
            ]
        );
        // A partition cut short by an existing one is cut at its bound.
        let existing = [(t("2026-12-01T00:00:00Z"), t("2026-12-01T03:00:00Z"))];
        let got = missing(
            &existing,
            Duration::hours(6),
            t("2026-12-01T00:00:00Z"),
            t("2026-12-01T01:00:00Z"),
        );
        assert_eq!(
            got,
            [(t("2026-12-01T03:00:00Z"), t("2026-12-01T06:00:00Z"))]
        );
    }

    #[test]
    fn names_sort_by_time() {
        assert_eq!(
            name("tool_calls", t("2026-12-01T06:00:00Z")),
            "tool_calls_p20261201_0600"
        );
    }
}
