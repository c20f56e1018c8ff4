//! Rolling upgrades: a newer replica's migration adds columns (with their defaults) to every
//! table the writers fill, while replicas of the previous release keep writing. Their COPYs
//! and merges name every column, so they go on storing exactly what they stored before.

use chrono::{Duration, Utc};
use serde_json::json;

use crate::common;
use common::Service;
use common::spans::{Spans, attr, send_body};

/// Every table a writer COPYs into or merges into.
const WRITTEN: [&str; 10] = [
    "tool_calls",
    "mcp_requests",
    "llm_calls",
    "upstream_calls",
    "tool_rollup_1m",
    "mcp_method_rollup_1m",
    "llm_rollup_1m",
    "upstream_rollup_1m",
    "loop_calls_1m",
    "session_tokens_1m",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_keeps_writing_after_the_next_migration_adds_columns() {
    let pool = common::migrated_db("rolling_upgrade").await;
    // The next release's migration: a column at the end of every written table, some with a
    // default that is not NULL, as `ADD COLUMN` always appends.
    for table in WRITTEN {
        sqlx::query(&format!(
            "ALTER TABLE {table} ADD COLUMN added_later text NOT NULL DEFAULT 'next',
                                 ADD COLUMN added_later_n bigint"
        ))
        .execute(&pool)
        .await
        .unwrap();
    }
    let svc = Service::replica("rolling_upgrade", |_| {}).await;
    let minute = Utc::now() - Duration::minutes(1);
    let mut s = Spans::new();
    s.tool("search", minute, 20, false, vec![]);
    s.tool("search", minute, 30, true, vec![]);
    s.both_sides("search", minute, 40, false, vec![]);
    s.push(
        "initialize",
        2,
        minute,
        5,
        false,
        vec![attr("mcp.method.name", json!("initialize"))],
    );
    s.push(
        "chat m",
        3,
        minute,
        400,
        false,
        vec![
            attr("gen_ai.operation.name", json!("chat")),
            attr("gen_ai.request.model", json!("m")),
            attr("gen_ai.usage.input_tokens", json!(900)),
            attr("gen_ai.usage.output_tokens", json!(100)),
            attr("gen_ai.conversation.id", json!("conv-1")),
        ],
    );
    s.push(
        "GET",
        3,
        minute,
        40,
        false,
        vec![
            attr("http.request.method", json!("GET")),
            attr("server.address", json!("api.github.com")),
            attr("http.response.status_code", json!(429)),
        ],
    );
    let body = s.body();
    send_body(&svc, body.clone()).await;
    // Sent again, as an exporter retries: the writer takes its other path (staging tables and
    // `ON CONFLICT DO NOTHING`), which names every column too.
    send_body(&svc, body).await;

    for (table, rows) in [
        ("tool_calls", 4),
        ("mcp_requests", 1),
        ("llm_calls", 1),
        ("upstream_calls", 1),
    ] {
        assert_eq!(
            svc.count(&format!("SELECT count(*) FROM {table}")).await,
            rows,
            "{table}"
        );
    }
    for table in WRITTEN {
        assert_eq!(
            svc.count(&format!(
                "SELECT count(*) FROM {table} WHERE added_later <> 'next' OR added_later_n IS NOT NULL"
            ))
            .await,
            0,
            "{table}: the new columns hold their defaults"
        );
    }
    assert_eq!(
        svc.count("SELECT sum(calls)::int8 * 1000 + sum(errors)::int8 FROM tool_rollup_1m")
            .await,
        4_001,
        "each call counted once, the failed one as an error"
    );
    assert_eq!(
        svc.count("SELECT sum(input_tokens + output_tokens)::int8 FROM llm_rollup_1m")
            .await,
        1_000
    );
    assert_eq!(
        svc.count("SELECT sum(tokens)::int8 FROM session_tokens_1m")
            .await,
        1_000
    );
    assert_eq!(
        svc.count("SELECT sum(rate_limited)::int8 FROM upstream_rollup_1m")
            .await,
        1
    );
    assert_eq!(
        svc.count("SELECT sum(calls)::int8 FROM mcp_method_rollup_1m")
            .await,
        1
    );
    let mismatches = common::rollup_mismatches(&svc.pool).await;
    assert!(mismatches.is_empty(), "{mismatches:?}");
    svc.stop().await.unwrap();
}
