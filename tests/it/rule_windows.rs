//! A rule group keeps the per-minute state its rules read in memory between evaluations and
//! reads again only what changed (`store::window`). Over a generated history written between
//! evaluations (new minutes, late rows for old ones, upserts from several writer shards, signed
//! corrections, a transaction still open while the group reads and committed after), every
//! evaluation equals the rules' SQL definitions (`store::alerts`), value for value.

use chrono::{DateTime, Duration, DurationRound, Utc};
use sqlx::{PgConnection, PgPool};
use toolsight::evaluate::engine::Observation;
use toolsight::store::{alerts, partitions, window::Window};

use crate::common;

/// xorshift: the same history on every run.
struct Gen(u64);

impl Gen {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }

    fn pick<'a>(&mut self, of: &[&'a str]) -> &'a str {
        of[self.below(of.len() as u64) as usize]
    }
}

/// Upserts rows for minutes up to `back` minutes before `now`, as the writers and the join do:
/// deltas added to the row of (key, minute, shard), some of them negative. Shards `shards`
/// (each writer has its own, so concurrent writers never wait for each other's rows).
async fn write(
    conn: &mut PgConnection,
    g: &mut Gen,
    now: DateTime<Utc>,
    back: u64,
    rows: usize,
    shards: std::ops::Range<u64>,
) {
    let minute = |g: &mut Gen| {
        now.duration_trunc(Duration::minutes(1)).unwrap() - Duration::minutes(g.below(back) as i64)
    };
    for _ in 0..rows {
        let (m, shard) = (
            minute(g),
            (shards.start + g.below(shards.end - shards.start)) as i16,
        );
        let calls = g.below(6) as i64 + 1;
        let sign = if g.below(8) == 0 { -1 } else { 1 };
        // A histogram with leading zeros, of varying length, totalling `calls`.
        let first = 40 + g.below(20) as usize;
        let mut hist = vec![0i64; first + g.below(6) as usize + 1];
        for _ in 0..calls {
            let i = first + g.below((hist.len() - first) as u64) as usize;
            hist[i] += sign;
        }
        let errors = g.below(calls as u64 + 1) as i64;
        let with_result = g.below(calls as u64 + 1) as i64;
        let empty = g.below(with_result as u64 + 1) as i64;
        sqlx::query(
            "INSERT INTO tool_rollup_1m AS r (minute, service, tool, side, shard, calls, errors, cancellations,
                 with_result, empty_results, result_bytes, result_items, duration_us_sum, latency_hist)
             VALUES ($1, $2, $3, $4, $5, $6, $7, 0, $8, $9, 0, 0, 0, $10)
             ON CONFLICT (service, tool, side, minute, shard) DO UPDATE SET
                calls = r.calls + EXCLUDED.calls, errors = r.errors + EXCLUDED.errors,
                with_result = r.with_result + EXCLUDED.with_result,
                empty_results = r.empty_results + EXCLUDED.empty_results,
                latency_hist = toolsight_hist_add(r.latency_hist, EXCLUDED.latency_hist)",
        )
        .bind(m)
        .bind(g.pick(&["svc-a", "svc-b"]))
        .bind(g.pick(&["search", "fetch", "list", "write"]))
        .bind(g.pick(&["client", "server"]))
        .bind(shard)
        .bind(sign * calls)
        .bind(sign * errors)
        .bind(sign * with_result)
        .bind(sign * empty)
        .bind(&hist)
        .execute(&mut *conn)
        .await
        .unwrap();

        let args: Vec<u8> = match g.below(3) {
            0 => Vec::new(),
            n => vec![n as u8; 16],
        };
        let session = g.pick(&[
            "s1",
            "s2",
            "s3",
            "s4",
            "s5",
            toolsight::normalize::cardinality::OVERFLOW,
        ]);
        let loop_calls = g.below(4) as i64;
        sqlx::query(
            "INSERT INTO loop_calls_1m AS r VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
             ON CONFLICT (minute, service, tool, session_key, args_hash, shard) DO UPDATE SET
                calls = r.calls + EXCLUDED.calls, failed = r.failed + EXCLUDED.failed,
                stuck = r.stuck + EXCLUDED.stuck",
        )
        .bind(minute(g))
        .bind(g.pick(&["svc-a", "svc-b"]))
        .bind(g.pick(&["search", "fetch"]))
        .bind(session)
        .bind(args)
        .bind(shard)
        .bind(sign * loop_calls)
        .bind(sign * g.below(loop_calls as u64 + 1) as i64)
        .bind(sign * i64::from(g.below(5) == 0))
        .execute(&mut *conn)
        .await
        .unwrap();

        sqlx::query(
            "INSERT INTO session_tokens_1m AS r VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (minute, service, session_key, shard) DO UPDATE SET tokens = r.tokens + EXCLUDED.tokens",
        )
        .bind(minute(g))
        .bind(g.pick(&["svc-a", "svc-b"]))
        .bind(session)
        .bind(shard)
        .bind(g.below(5000) as i64 * sign)
        .execute(&mut *conn)
        .await
        .unwrap();
    }
}

fn sorted(mut v: Vec<Observation>) -> Vec<Observation> {
    v.sort_by(|a, b| a.labels.cmp(&b.labels));
    v
}

/// Every rule kind that reads the kept state, from memory and from SQL, at `now`.
async fn compare(pool: &PgPool, w: &mut Window, now: DateTime<Utc>) -> usize {
    let base = now - Duration::minutes(10);
    let mut compared = 0;
    let pairs = [
        (
            w.latency(pool, now, 600.0, 0.95, 2.58, Some(base)).await,
            alerts::latency(pool, now, 600.0, 0.95, 2.58, Some(base)).await,
        ),
        (
            w.latency(pool, now, 300.0, 0.5, 0.0, None).await,
            alerts::latency(pool, now, 300.0, 0.5, 0.0, None).await,
        ),
        (
            w.error_rate(pool, now, 300.0).await,
            alerts::error_rate(pool, now, 300.0).await,
        ),
        (
            w.empty_results(pool, now, 300.0, now - Duration::minutes(5))
                .await,
            alerts::empty_results(pool, now, 300.0, now - Duration::minutes(5)).await,
        ),
        (
            w.retry_loops(pool, now, 600.0, 3, false, 0.0).await,
            alerts::retry_loops(pool, now, 600.0, 3, false, 0.0).await,
        ),
        (
            w.retry_loops(pool, now, 600.0, 2, true, 30.0).await,
            alerts::retry_loops(pool, now, 600.0, 2, true, 30.0).await,
        ),
        (
            w.token_burn(pool, now, 1800.0).await,
            alerts::token_burn(pool, now, 1800.0).await,
        ),
    ];
    for (i, (kept, sql)) in pairs.into_iter().enumerate() {
        let (kept, sql) = (sorted(kept.unwrap()), sorted(sql.unwrap()));
        assert_eq!(kept, sql, "rule {i} at {now}: kept state != SQL definition");
        compared += sql.len();
    }
    compared
}

#[tokio::test]
async fn windows_kept_between_evaluations_equal_the_sql_definitions() {
    let pool = common::migrated_db("windows").await;
    let start = Utc::now().duration_trunc(Duration::minutes(1)).unwrap() - Duration::minutes(90);
    let mut conn = pool.acquire().await.unwrap();
    partitions::ensure(
        &mut conn,
        std::time::Duration::from_secs(86_400),
        start - Duration::hours(1),
        Utc::now() + Duration::hours(1),
    )
    .await
    .unwrap();
    let mut g = Gen(0x005e_ed0f_4a11);
    // History before the first evaluation.
    for m in 0..40 {
        write(&mut conn, &mut g, start + Duration::minutes(m), 2, 20, 0..3).await;
    }
    let mut w = Window::default();
    let (mut compared, mut reread, mut full) = (0, 0u64, 0u64);
    for step in 0..15i64 {
        // Evaluations on whole minutes and, sometimes, between them.
        let now = start
            + Duration::minutes(40 + step)
            + Duration::seconds(if step % 4 == 3 { 30 } else { 0 });
        // A writer's transaction still open while the group reads (not seen now, seen next
        // time), begun before other writes that commit before the read.
        let mut open = pool.begin().await.unwrap();
        write(&mut open, &mut g, now, 12, 10, 3..4).await;
        write(&mut conn, &mut g, now, 15, 25, 0..3).await;
        w.begin();
        compared += compare(&pool, &mut w, now).await;
        w.finish();
        // What reading the whole windows costs: a group evaluated for the first time.
        let mut first = Window::default();
        first.begin();
        compare(&pool, &mut first, now).await;
        if step > 0 {
            reread += w.rows_read;
            full += first.rows_read;
        }
        open.commit().await.unwrap();
    }
    assert!(compared > 300, "too little compared: {compared}");
    // After the first evaluation only what changed is read again.
    assert!(
        reread * 2 < full,
        "kept windows read {reread} rows in 14 evaluations, whole windows {full}"
    );
    // Kept: only the minutes the rules read (the longest window, 30 minutes, and a baseline).
    let total: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM tool_rollup_1m) + (SELECT count(*) FROM loop_calls_1m)
              + (SELECT count(*) FROM session_tokens_1m)",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert!(!w.is_empty() && w.len() < total as usize);
}
