//! The latency histogram SQL functions every p95 in toolsight comes from.

use crate::common;

#[tokio::test]
async fn buckets_merge_and_quantiles() {
    let pool = common::migrated_db("hist").await;
    let bucket = |us: i64| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i32>("SELECT toolsight_latency_bucket($1)")
                .bind(us)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert_eq!(bucket(0).await, 0);
    assert_eq!(bucket(10).await, 0);
    assert_eq!(bucket(11).await, 1);
    assert_eq!(bucket(20).await, 4, "20 µs is the upper edge of bucket 4");
    assert_eq!(bucket(21).await, 5);
    assert_eq!(bucket(1_000_000).await, 67);
    assert_eq!(bucket(i64::MAX).await, 111);

    let v: Vec<i64> =
        sqlx::query_scalar("SELECT toolsight_hist_add('{1,2}'::bigint[], '{0,0,3}'::bigint[])")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(v, [1, 2, 3]);
    let v: Vec<i64> = sqlx::query_scalar("SELECT toolsight_hist_add(NULL, '{4}'::bigint[])")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(v, [4]);
    let v: Vec<i64> =
        sqlx::query_scalar("SELECT toolsight_hist_build('{0,2,2}'::int[], '{1,5,1}'::bigint[])")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(v, [1, 0, 6]);
    let q: Option<f64> =
        sqlx::query_scalar("SELECT toolsight_hist_quantile('{0,0}'::bigint[], 0.5)")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(q, None);

    // 2000 durations spread over 1 ms .. 5 s: quantiles from merged per-row histograms are within
    // the bucket width (±9.5%) of the exact quantiles.
    let mut durations: Vec<i64> = (0..2000u64)
        .map(|i| 1_000 + ((i * 7919) % 2000) as i64 * 2_500)
        .collect();
    let hist_rows: Vec<Vec<i64>> = {
        let mut rows = Vec::new();
        for chunk in durations.chunks(100) {
            let h: Vec<i64> = sqlx::query_scalar(
                "SELECT toolsight_hist_build(array_agg(b), array_agg(n)) FROM (
                    SELECT toolsight_latency_bucket(d) AS b, count(*) AS n FROM unnest($1::bigint[]) AS d GROUP BY 1) x",
            )
            .bind(chunk)
            .fetch_one(&pool)
            .await
            .unwrap();
            rows.push(h);
        }
        rows
    };
    durations.sort();
    for q in [0.5, 0.95, 0.99] {
        let exact_ms = durations
            [((q * durations.len() as f64).ceil() as usize).min(durations.len()) - 1]
            as f64
            / 1000.0;
        let mut merged: Option<Vec<i64>> = None;
        for h in &hist_rows {
            merged = Some(match merged {
                None => h.clone(),
                Some(m) => sqlx::query_scalar("SELECT toolsight_hist_add($1, $2)")
                    .bind(&m)
                    .bind(h)
                    .fetch_one(&pool)
                    .await
                    .unwrap(),
            });
        }
        let via_add: f64 = sqlx::query_scalar("SELECT toolsight_hist_quantile($1, $2)")
            .bind(merged.unwrap())
            .bind(q)
            .fetch_one(&pool)
            .await
            .unwrap();
        let via_agg: f64 = sqlx::query_scalar(
            "SELECT toolsight_hist_quantile(toolsight_hist_merge(h), $2) FROM unnest($1::text[]) AS t, LATERAL (SELECT t::bigint[] AS h) x",
        )
        .bind(hist_rows.iter().map(|h| format!("{{{}}}", h.iter().map(i64::to_string).collect::<Vec<_>>().join(","))).collect::<Vec<_>>())
        .bind(q)
        .fetch_one(&pool)
        .await
        .unwrap();
        assert_eq!(via_add, via_agg, "the aggregate and pairwise merging agree");
        let err = (via_agg - exact_ms).abs() / exact_ms;
        assert!(
            err < 0.095,
            "p{q}: {via_agg} ms vs exact {exact_ms} ms ({:.1}%)",
            err * 100.0
        );
    }
}

/// The backtest computes quantiles in Rust: they must be the very numbers the SQL function
/// gives the live rules, bit for bit, or a replay could fire where the live loop did not.
#[tokio::test]
async fn the_rust_quantile_is_the_sql_quantile() {
    let pool = common::migrated_db("hist_rust").await;
    // Deterministic pseudo-random histograms: sparse and dense, short and full length.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut compared = 0;
    for _ in 0..300 {
        let len = (next() % 112) as usize + 1;
        let hist: Vec<i64> = (0..len)
            .map(|_| {
                if next() % 3 == 0 {
                    (next() % 1000) as i64
                } else {
                    0
                }
            })
            .collect();
        for q in [0.0, 0.5, 0.9, 0.95, 0.99, 1.0] {
            let sql: Option<f64> = sqlx::query_scalar("SELECT toolsight_hist_quantile($1, $2)")
                .bind(&hist)
                .bind(q)
                .fetch_one(&pool)
                .await
                .unwrap();
            let rust = toolsight::store::rollup::hist_quantile(&hist, q);
            assert_eq!(
                sql.map(f64::to_bits),
                rust.map(f64::to_bits),
                "q={q} hist={hist:?}: sql {sql:?} rust {rust:?}"
            );
            compared += 1;
        }
    }
    assert_eq!(compared, 1800);
}
