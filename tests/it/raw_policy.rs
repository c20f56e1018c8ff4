//! The raw-row policy (`ingest.raw_keep_ok`): errors, empty results and slow calls keep their
//! raw rows, ordinary calls of unsampled traces go to the short-lived `*_sampled_out`
//! partitions, and nothing the rollups, the rules' state or the joins say changes, before or
//! after retention drops the sampled-out rows.

use std::time::Duration as StdDuration;

use chrono::{Duration, Utc};
use serde_json::json;

use crate::common;
use common::Service;
use common::spans::{Spans, attr, send_body};

const ROLLUP_TOTALS: &str =
    "SELECT (sum(calls) * 1000000 + sum(errors) * 1000 + sum(empty_results))::int8
     FROM tool_rollup_1m";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampled_out_rows_leave_rollups_rules_and_joins_exact() {
    let svc = Service::start_with("raw_policy", |c| {
        c.ingest.raw_keep_ok = 0.0;
        c.ingest.raw_slow = StdDuration::from_millis(500);
        c.ingest
            .raw_slow_tools
            .insert("report".into(), StdDuration::from_secs(2).into());
    })
    .await;
    let minute = Utc::now() - Duration::minutes(1);
    let full = || {
        attr(
            "gen_ai.tool.call.result",
            json!(r#"{"content":[{"type":"text","text":"ok"}]}"#),
        )
    };
    let empty = || attr("gen_ai.tool.call.result", json!("[]"));
    let mut s = Spans::new();
    // Kept: an error, an empty result, a slow call, a call slow for its own threshold.
    s.tool("search", minute, 20, true, vec![full()]);
    s.tool("search", minute, 20, false, vec![empty()]);
    s.tool("search", minute, 700, false, vec![full()]);
    s.tool("report", minute, 2500, false, vec![full()]);
    // Sampled out: ordinary calls, one below the default threshold but not its tool's, and
    // calls traced on both sides (joined although neither row is kept).
    for _ in 0..4 {
        s.tool("search", minute, 30, false, vec![full()]);
    }
    s.tool("report", minute, 900, false, vec![full()]);
    for _ in 0..3 {
        s.both_sides("search", minute, 40, false, vec![full()]);
    }
    let body = s.body();
    send_body(&svc, body.clone()).await;

    let kept = |table: &str| format!("SELECT count(*) FROM {table}_kept");
    let out = |table: &str| format!("SELECT count(*) FROM {table}_sampled_out");
    assert_eq!(svc.count(&kept("tool_calls")).await, 4);
    assert_eq!(svc.count(&out("tool_calls")).await, 11);
    assert_eq!(
        svc.count(
            "SELECT count(*) FROM tool_calls_kept
             WHERE outcome <> 'ok' OR result_empty OR duration_us >= 500000"
        )
        .await,
        4
    );
    assert_eq!(
        svc.count(common::JOINED_PAIRS).await,
        3,
        "joined while sampled out"
    );
    let mismatches = common::rollup_mismatches(&svc.pool).await;
    assert!(mismatches.is_empty(), "{mismatches:?}");
    let totals = svc.count(ROLLUP_TOTALS).await;
    // 12 counted calls of the server side and 3 of the client side; 1 error, 1 empty.
    assert_eq!(totals, 15_001_001);

    // A retried export is stored once, sampled-out rows included.
    send_body(&svc, body).await;
    assert_eq!(svc.count("SELECT count(*) FROM tool_calls").await, 15);
    assert_eq!(svc.count(ROLLUP_TOTALS).await, totals);

    // Retention drops only whole expired sampled-out partitions (hourly, 2 h by default):
    // three hours on, this hour's go, the kept rows and the rollups stay.
    let pruned = toolsight::store::retention::prune(
        &svc.pool,
        &toolsight::store::retention::Retention::default(),
        Utc::now() + Duration::hours(3),
        false,
        |_| {},
    )
    .await
    .unwrap();
    assert!(pruned >= 11, "{pruned}");
    assert_eq!(svc.count(&out("tool_calls")).await, 0);
    assert_eq!(svc.count(&kept("tool_calls")).await, 4);
    assert_eq!(svc.count(ROLLUP_TOTALS).await, totals);
    assert_eq!(
        svc.count(
            "SELECT count(*) FROM toolsight_partitions WHERE parent = 'tool_calls_sampled_out'
             AND upper_bound <= now() + interval '1 hour'"
        )
        .await,
        0
    );
    svc.stop().await.unwrap();
}

#[test]
fn keep_all_by_default_and_a_bad_share_is_refused() {
    let config = toolsight::config::Config::default();
    assert_eq!(config.ingest.raw_keep_ok, 1.0);
    assert!(config.ingest.raw_policy().keeps_all());
    let load = |name: &str, text: &str| {
        let dir = std::env::temp_dir().join(format!("toolsight-raw-policy-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        toolsight::config::Config::load_from(Some(&path), Vec::new())
    };
    let err = load(
        "bad.toml",
        "[ingest]\nraw_keep_ok = 1.5\n[retention]\nsampled_out = \"30d\"\n",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("ingest.raw_keep_ok: 1.5 is outside 0..=1"),
        "{err}"
    );
    assert!(
        err.contains("retention.sampled_out: must be at most retention.raw"),
        "{err}"
    );
    let policy = load(
        "good.toml",
        "[ingest]\nraw_keep_ok = 0.1\nraw_slow = \"750ms\"\nraw_slow_tools = { report = \"3s\" }\n",
    )
    .unwrap()
    .ingest
    .raw_policy();
    assert_eq!(policy.keep_ok, 0.1);
    assert_eq!(policy.slow, StdDuration::from_millis(750));
    assert_eq!(policy.slow_tools["report"], StdDuration::from_secs(3));
}
