//! Retention: `toolsight prune` drops the partitions of raw rows and rollups past their
//! retention whole, keeps the rest, and ingest goes on meanwhile; databases of the previous,
//! unpartitioned schema migrate without losing a row.

use crate::common;
use chrono::{Duration, Utc};
use common::Service;
use common::spans::{Spans, send};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_drops_whole_expired_partitions_and_keeps_the_rest() {
    let svc = Service::start_with("retention", |c| {
        c.ingest.max_span_age = std::time::Duration::from_secs(100 * 86_400);
    })
    .await;
    // Spans of 10 and 4 days ago, and of now: partitions of those days are created for them
    // when they arrive (none existed that far back).
    let mut s = Spans::new();
    for (days, n) in [(10, 7), (4, 3), (0, 2)] {
        for _ in 0..n {
            s.tool(
                "lookup",
                Utc::now() - Duration::days(days),
                20,
                false,
                vec![],
            );
        }
    }
    send(&svc, s).await;
    assert_eq!(svc.count("SELECT count(*) FROM tool_calls").await, 12);
    let partitions = "SELECT count(*) FROM toolsight_partitions WHERE parent = 'tool_calls_kept'";
    let before = svc.count(partitions).await;
    // Yesterday, today, tomorrow (ahead), and the two old days.
    assert!(before >= 5, "{before}");
    assert_eq!(
        svc.count("SELECT count(DISTINCT minute) FROM tool_rollup_1m")
            .await,
        3
    );

    let url = svc.database_url.clone();
    let prune = move |dry_run: bool| {
        let mut cmd = common::toolsight();
        cmd.arg("prune")
            .env("DATABASE_URL", &url)
            .env("TOOLSIGHT_INGEST__MAX_SPAN_AGE", "3d")
            .env("TOOLSIGHT_RETENTION__RAW", "3d")
            .env("TOOLSIGHT_RETENTION__ROLLUPS", "7d");
        if dry_run {
            cmd.arg("--dry-run");
        }
        common::output(&mut cmd)
    };
    let day = |days: i64| {
        (Utc::now() - Duration::days(days))
            .format("%Y%m%d")
            .to_string()
    };
    let dry = prune.clone()(true);
    for d in [10, 4] {
        let name = format!("tool_calls_kept_p{}_0000", day(d));
        assert!(dry.contains(&format!("{name:<34} would drop")), "{dry}");
    }
    assert!(
        dry.contains(&format!("tool_rollup_1m_p{}_0000", day(10))),
        "{dry}"
    );
    assert!(
        !dry.contains(&format!("tool_rollup_1m_p{}_0000", day(4))),
        "{dry}"
    );
    assert_eq!(svc.count(partitions).await, before, "dry run");

    // Ingest goes on while partitions are detached and dropped.
    let mut during = Spans::new();
    for _ in 0..5 {
        during.tool("lookup", Utc::now(), 20, false, vec![]);
    }
    let (out, ()) = tokio::join!(
        tokio::task::spawn_blocking(move || prune(false)),
        send(&svc, during)
    );
    let out = out.unwrap();
    assert!(
        out.contains(&format!(
            "{:<34} dropped          7 rows",
            format!("tool_calls_kept_p{}_0000", day(10))
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "{:<34} dropped          3 rows",
            format!("tool_calls_kept_p{}_0000", day(4))
        )),
        "{out}"
    );
    // Raw: only the last 3 days (2 + 5 new); rollups: the 4-day-old minute stays (7 days).
    assert_eq!(svc.count("SELECT count(*) FROM tool_calls").await, 7);
    assert_eq!(svc.count(partitions).await, before - 2);
    assert_eq!(
        svc.count(
            "SELECT count(*) FROM pg_class WHERE relname LIKE 'tool_calls_kept_p%' AND relkind = 'r'"
        )
        .await,
        before - 2,
        "the dropped partitions' tables are gone"
    );
    assert_eq!(
        svc.count("SELECT count(DISTINCT minute) FROM tool_rollup_1m WHERE minute < now() - interval '3 days'")
            .await,
        1
    );
    assert_eq!(
        svc.count("SELECT count(*) FROM tool_rollup_1m WHERE minute < now() - interval '7 days'")
            .await,
        0
    );
    // A late span for a dropped day gets its partition again (accepted: within max_span_age).
    let mut late = Spans::new();
    late.tool("lookup", Utc::now() - Duration::days(10), 20, false, vec![]);
    send(&svc, late).await;
    assert_eq!(svc.count("SELECT count(*) FROM tool_calls").await, 8);
    svc.stop().await.unwrap();
}

/// A database written by the previous schema (unpartitioned tables) migrates without losing a
/// row: each table becomes the first partition of its new parent, the rules' state is built
/// from its rows, ingest goes on into new partitions, and retention later drops the old table
/// whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpartitioned_database_migrates_without_losing_rows() {
    let url = common::fresh_database("migrate_partitions").await;
    let admin = common::admin_pool().await;
    sqlx::query("CREATE DATABASE toolsight_it_migrate_partitions")
        .execute(&admin)
        .await
        .unwrap();
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let before = sqlx::migrate::Migrator {
        migrations: std::borrow::Cow::Owned(
            toolsight::store::MIGRATOR
                .migrations
                .iter()
                .filter(|m| m.version <= 8)
                .cloned()
                .collect(),
        ),
        ..sqlx::migrate::Migrator::DEFAULT
    };
    before.run(&pool).await.unwrap();
    // Rows as the previous version stored them, 3 and 2 days ago: a loop of failing calls, and
    // LLM tokens.
    sqlx::query(
        "INSERT INTO tool_calls (trace_id, span_id, start_time, duration_us, service, tool, side,
                                 source, outcome, session_key, session_source)
         SELECT decode(lpad(to_hex(i), 32, '0'), 'hex'), decode(lpad(to_hex(i), 16, '0'), 'hex'),
                now() - CASE WHEN i <= 6 THEN interval '3 days' ELSE interval '2 days' END
                      + i * interval '1 second',
                1000, 'svc', 'search', 'client', 'otel', CASE WHEN i % 2 = 0 THEN 'error' ELSE 'ok' END,
                's1', 'trace'
         FROM generate_series(1, 10) AS i",
    )
    .execute(&pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO llm_calls (trace_id, span_id, start_time, duration_us, service, model,
                                operation, input_tokens, output_tokens, error, session_key, session_source)
         VALUES ('\\x01', '\\x01', now() - interval '2 days', 10, 'svc', 'm', 'chat', 100, 5, false, 's1', 'trace')",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;

    let svc = Service::replica("migrate_partitions", |_| {}).await;
    assert_eq!(svc.count("SELECT count(*) FROM tool_calls").await, 10);
    assert_eq!(svc.count("SELECT count(*) FROM llm_calls").await, 1);
    assert_eq!(
        svc.count("SELECT count(*) FROM toolsight_partitions WHERE name = 'tool_calls_legacy' AND lower_bound = '1900-01-01 00:00:00+00'")
            .await,
        1
    );
    assert_eq!(
        svc.count(
            "SELECT count(*) FROM pg_partitioned_table p JOIN pg_class c ON c.oid = p.partrelid
                   WHERE c.relname IN ('tool_calls', 'mcp_requests', 'llm_calls', 'upstream_calls',
                                       'tool_rollup_1m', 'loop_calls_1m', 'session_tokens_1m')"
        )
        .await,
        7
    );
    // The failing calls are in the loop state, the tokens in the session state.
    assert_eq!(
        svc.count("SELECT count(*) FROM tool_calls WHERE loop_counted")
            .await,
        5
    );
    let mut conn = svc.pool.acquire().await.unwrap();
    assert_eq!(common::rule_state_mismatches(&mut conn).await, vec![]);
    drop(conn);
    // A stored span sent again is still stored once, and new spans go to new partitions.
    let mut s = Spans::new();
    s.tool("search", Utc::now(), 20, true, vec![]);
    send(&svc, s).await;
    assert_eq!(svc.count("SELECT count(*) FROM tool_calls").await, 11);
    assert_eq!(
        svc.count("SELECT count(*) FROM ONLY tool_calls_legacy")
            .await,
        10
    );
    let mut conn = svc.pool.acquire().await.unwrap();
    assert_eq!(common::rule_state_mismatches(&mut conn).await, vec![]);
    drop(conn);

    // The old table goes whole once its last day has expired.
    let prune = |raw: &str| {
        let mut cmd = common::toolsight();
        cmd.arg("prune")
            .env("DATABASE_URL", &svc.database_url)
            .env("TOOLSIGHT_INGEST__MAX_SPAN_AGE", raw)
            .env("TOOLSIGHT_RETENTION__RAW", raw);
        common::output(&mut cmd)
    };
    let kept = prune("7d");
    assert!(
        !kept.contains("tool_calls_legacy"),
        "not expired yet: {kept}"
    );
    let dropped = prune("1d");
    assert!(
        dropped.contains(&format!(
            "{:<34} dropped         10 rows",
            "tool_calls_legacy"
        )),
        "{dropped}"
    );
    assert!(dropped.contains("loop_calls_1m_legacy"), "{dropped}");
    assert_eq!(svc.count("SELECT count(*) FROM tool_calls").await, 1);
    assert_eq!(
        svc.count("SELECT count(*) FROM pg_class WHERE relname = 'tool_calls_legacy'")
            .await,
        0
    );
    svc.stop().await.unwrap();
}

/// The partition maintainer gathers statistics of a partition once it has filled (and again
/// when it has doubled), instead of waiting for autovacuum: a plan made for a large partition
/// without them assumes 0.5% of its rows per trace id, which collapsed ingest in the sustained
/// benchmark the minute a partition drop made the writers plan again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filled_partitions_get_statistics_without_waiting_for_autovacuum() {
    use chrono::DurationRound;
    use toolsight::store::partitions;
    let pool = common::migrated_db("partition_stats").await;
    let now = Utc::now();
    let mut conn = pool.acquire().await.unwrap();
    partitions::ensure(
        &mut conn,
        std::time::Duration::from_secs(86_400),
        now - Duration::days(1),
        now + Duration::days(2),
    )
    .await
    .unwrap();
    drop(conn);
    let today = partitions::name(
        "session_tokens_1m",
        now.duration_trunc(Duration::days(1)).unwrap(),
    );
    let tomorrow = partitions::name(
        "session_tokens_1m",
        (now + Duration::days(1))
            .duration_trunc(Duration::days(1))
            .unwrap(),
    );
    // Autovacuum must not do it for us here.
    for t in [&today, &tomorrow] {
        sqlx::query(&format!("ALTER TABLE {t} SET (autovacuum_enabled = false)"))
            .execute(&pool)
            .await
            .unwrap();
    }
    let insert = |minute: chrono::DateTime<Utc>, from: i64, to: i64| {
        let pool = pool.clone();
        async move {
            sqlx::query(
                "INSERT INTO session_tokens_1m (minute, service, session_key, shard, tokens)
                 SELECT $1, 'svc', 's' || g, 0, g FROM generate_series($2::int8, $3::int8) g",
            )
            .bind(minute)
            .bind(from)
            .bind(to)
            .execute(&pool)
            .await
            .unwrap();
        }
    };
    let minute = now.duration_trunc(Duration::days(1)).unwrap() + Duration::hours(1);
    insert(minute, 1, 20_000).await;
    // Too few changed rows to matter.
    insert(minute + Duration::days(1), 1, 500).await;

    // The activity statistics reach the server's counters within a second or so.
    let reltuples = |name: String| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, f32>(
                "SELECT reltuples FROM pg_class WHERE oid = to_regclass($1)",
            )
            .bind(name)
            .fetch_one(&pool)
            .await
            .unwrap()
        }
    };
    assert!(reltuples(today.clone()).await < 0.0, "never analyzed yet");
    // Runs the maintainer's step until it analyzes something.
    let analyze = |what: &'static str| {
        let pool = pool.clone();
        async move {
            common::eventually(what, || {
                let pool = pool.clone();
                async move {
                    let done = partitions::analyze_stale(&pool, partitions::ANALYZE_AFTER_ROWS)
                        .await
                        .unwrap();
                    (!done.is_empty()).then_some(done)
                }
            })
            .await
        }
    };
    let analyzed = analyze("the filled partition analyzed").await;
    assert_eq!(analyzed, vec![today.clone()]);
    assert_eq!(reltuples(today.clone()).await, 20_000.0);
    assert!(
        reltuples(tomorrow.clone()).await < 0.0,
        "500 rows are left to autovacuum"
    );
    // The planner now knows a session key is one row, not 0.5% of the partition.
    let plan: serde_json::Value = sqlx::query_scalar(&format!(
        "EXPLAIN (FORMAT JSON) SELECT * FROM {today} WHERE session_key = 's42'"
    ))
    .fetch_one(&pool)
    .await
    .unwrap();
    let estimate = plan[0]["Plan"]["Plan Rows"].as_f64().unwrap();
    assert!(estimate < 10.0, "estimated {estimate} rows per session key");

    // Nothing changed since: nothing to do. Doubled: analyzed again.
    assert!(
        partitions::analyze_stale(&pool, partitions::ANALYZE_AFTER_ROWS)
            .await
            .unwrap()
            .is_empty()
    );
    insert(minute + Duration::minutes(1), 1, 25_000).await;
    let again = analyze("the doubled partition analyzed again").await;
    assert_eq!(again, vec![today.clone()]);
    assert_eq!(reltuples(today).await, 45_000.0);
}
