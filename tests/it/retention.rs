//! Retention: `toolsight prune` deletes raw rows and rollups past their retention, in bounded
//! batches, keeps the rest, and ingest goes on meanwhile.

use crate::common;
use chrono::{Duration, Utc};
use common::Service;
use common::spans::{Spans, send};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_deletes_what_is_past_retention_and_keeps_the_rest() {
    let svc = Service::start_with("retention", |c| {
        c.ingest.max_span_age = std::time::Duration::from_secs(100 * 86_400);
    })
    .await;
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
            .env("TOOLSIGHT_RETENTION__ROLLUPS", "7d")
            .env("TOOLSIGHT_RETENTION__BATCH_ROWS", "2");
        if dry_run {
            cmd.arg("--dry-run");
        }
        common::output(&mut cmd)
    };
    let dry = prune.clone()(true);
    assert!(
        dry.contains("tool_calls             would delete         10 rows"),
        "{dry}"
    );
    assert_eq!(
        svc.count("SELECT count(*) FROM tool_calls").await,
        12,
        "dry run"
    );

    // Ingest goes on while the batches run.
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
        out.contains("tool_calls             deleted         10 rows"),
        "{out}"
    );
    assert!(
        out.contains("tool_rollup_1m         deleted          1 rows"),
        "{out}"
    );
    // Raw: only the last 3 days (2 + 5 new); rollups: the 4-day-old minute stays (7 days).
    assert_eq!(svc.count("SELECT count(*) FROM tool_calls").await, 7);
    assert_eq!(
        svc.count("SELECT count(*) FROM tool_calls WHERE start_time < now() - interval '3 days'")
            .await,
        0
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
    svc.stop().await.unwrap();
}
