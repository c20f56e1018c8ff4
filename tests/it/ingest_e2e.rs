//! End to end: the real `opentelemetry-otlp` exporter (gRPC, HTTP/protobuf, HTTP/JSON) sends to
//! the running service; the rows and rollups are read back from PostgreSQL.

use crate::common;
use std::time::{Duration, SystemTime};

use common::Service;
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter as _, SpanLinks};

pub(crate) struct SpanSpec {
    pub(crate) name: &'static str,
    pub(crate) kind: SpanKind,
    pub(crate) ms: u64,
    pub(crate) status: Status,
    pub(crate) attrs: Vec<KeyValue>,
}

pub(crate) fn span_data(trace: u128, span: u64, start: SystemTime, s: SpanSpec) -> SpanData {
    SpanData {
        span_context: SpanContext::new(
            TraceId::from(trace),
            SpanId::from(span),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        ),
        parent_span_id: SpanId::INVALID,
        parent_span_is_remote: false,
        span_kind: s.kind,
        name: s.name.into(),
        start_time: start,
        end_time: start + Duration::from_millis(s.ms),
        attributes: s.attrs,
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: s.status,
        instrumentation_scope: InstrumentationScope::builder("test-instrumentation").build(),
    }
}

fn tool(
    name: &'static str,
    tool: &'static str,
    ms: u64,
    status: Status,
    mut extra: Vec<KeyValue>,
) -> SpanSpec {
    extra.push(KeyValue::new("mcp.method.name", "tools/call"));
    extra.push(KeyValue::new("gen_ai.tool.name", tool));
    SpanSpec {
        name,
        kind: SpanKind::Client,
        ms,
        status,
        attrs: extra,
    }
}

/// Captured headers are string arrays in the HTTP semantic conventions.
fn header_value(v: &'static str) -> opentelemetry::Value {
    opentelemetry::Value::Array(opentelemetry::Array::String(vec![v.into()]))
}

/// The spans one "agent" sends: 10 `search` calls (100..1000 ms, one failing), 2 `fetch` calls
/// with captured results (one empty), a `tools/list`, an LLM call, a rate-limited upstream call
/// and a database span that toolsight does not model.
pub(crate) fn workload(seed: u128) -> Vec<SpanData> {
    let start = SystemTime::now() - Duration::from_secs(30);
    let mut specs = Vec::new();
    for i in 0..10u64 {
        let failing = i == 9;
        let status = if failing {
            Status::error("upstream refused")
        } else {
            Status::Ok
        };
        let extra = if failing {
            vec![KeyValue::new("error.type", "rate_limited")]
        } else {
            vec![]
        };
        specs.push(tool(
            "tools/call search",
            "search",
            100 * (i + 1),
            status,
            extra,
        ));
    }
    specs.push(tool(
        "tools/call fetch",
        "fetch",
        50,
        Status::Unset,
        vec![
            KeyValue::new("gen_ai.tool.call.arguments", r#"{"url":"a"}"#),
            KeyValue::new(
                "gen_ai.tool.call.result",
                r#"{"content":[],"isError":false}"#,
            ),
        ],
    ));
    specs.push(tool(
        "tools/call fetch",
        "fetch",
        70,
        Status::Unset,
        vec![
            KeyValue::new("gen_ai.tool.call.arguments", r#"{"url":"b"}"#),
            KeyValue::new(
                "gen_ai.tool.call.result",
                r#"{"content":[{"type":"text","text":"[1,2,3]"}]}"#,
            ),
        ],
    ));
    specs.push(SpanSpec {
        name: "tools/list",
        kind: SpanKind::Client,
        ms: 5,
        status: Status::Unset,
        attrs: vec![KeyValue::new("mcp.method.name", "tools/list")],
    });
    specs.push(SpanSpec {
        name: "chat gpt-4o",
        kind: SpanKind::Client,
        ms: 900,
        status: Status::Unset,
        attrs: vec![
            KeyValue::new("gen_ai.operation.name", "chat"),
            KeyValue::new("gen_ai.request.model", "gpt-4o"),
            KeyValue::new("gen_ai.usage.input_tokens", 1000),
            KeyValue::new("gen_ai.usage.output_tokens", 50),
        ],
    });
    specs.push(SpanSpec {
        name: "GET",
        kind: SpanKind::Client,
        ms: 30,
        status: Status::Unset,
        attrs: vec![
            KeyValue::new("http.request.method", "GET"),
            KeyValue::new("server.address", "api.example.com"),
            KeyValue::new("http.response.status_code", 429),
            KeyValue::new(
                "http.response.header.x-ratelimit-remaining",
                header_value("0"),
            ),
            KeyValue::new(
                "http.response.header.x-ratelimit-limit",
                header_value("100"),
            ),
        ],
    });
    specs.push(SpanSpec {
        name: "SELECT",
        kind: SpanKind::Client,
        ms: 3,
        status: Status::Unset,
        attrs: vec![KeyValue::new("db.system.name", "postgresql")],
    });
    specs
        .into_iter()
        .enumerate()
        .map(|(i, s)| {
            span_data(
                seed + i as u128,
                1 + i as u64,
                start + Duration::from_millis(i as u64),
                s,
            )
        })
        .collect()
}

pub(crate) async fn export(
    protocol: &str,
    svc: &Service,
    service_name: &str,
    spans: Vec<SpanData>,
) {
    let mut exporter = match protocol {
        "grpc" => opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_compression(opentelemetry_otlp::Compression::Gzip)
            .with_endpoint(format!("http://{}", svc.grpc))
            .build()
            .unwrap(),
        "http-protobuf" => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(svc.http_url())
            .build()
            .unwrap(),
        "http-json" => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpJson)
            .with_endpoint(svc.http_url())
            .build()
            .unwrap(),
        other => panic!("{other}"),
    };
    exporter.set_resource(
        &Resource::builder_empty()
            .with_service_name(service_name.to_owned())
            .build(),
    );
    exporter
        .export(spans)
        .await
        .unwrap_or_else(|e| panic!("{protocol} export failed: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_exporter_over_grpc_http_protobuf_and_http_json() {
    let svc = Service::start("exporters").await;
    for (i, protocol) in ["grpc", "http-protobuf", "http-json"]
        .into_iter()
        .enumerate()
    {
        let service = format!("agent-{protocol}");
        export(protocol, &svc, &service, workload(1_000 * (i as u128 + 1))).await;

        let q = |sql: &str| sql.replace("$S", &format!("'{service}'"));
        assert_eq!(
            svc.count(&q("SELECT count(*) FROM tool_calls WHERE service = $S"))
                .await,
            12,
            "{protocol}"
        );
        assert_eq!(svc.count(&q("SELECT count(*) FROM tool_calls WHERE service = $S AND tool = 'search' AND side = 'client'")).await, 10);
        assert_eq!(svc.count(&q("SELECT count(*) FROM tool_calls WHERE service = $S AND outcome = 'error' AND error_type = 'rate_limited'")).await, 1);
        assert_eq!(svc.count(&q("SELECT count(*) FROM tool_calls WHERE service = $S AND tool = 'fetch' AND result_empty AND result_items = 0")).await, 1);
        assert_eq!(svc.count(&q("SELECT count(*) FROM tool_calls WHERE service = $S AND tool = 'fetch' AND NOT result_empty AND result_items = 3")).await, 1);
        assert_eq!(svc.count(&q("SELECT count(DISTINCT args_hash) FROM tool_calls WHERE service = $S AND tool = 'fetch'")).await, 2);
        assert_eq!(svc.count(&q("SELECT count(*) FROM tool_calls WHERE service = $S AND (args_redacted IS NOT NULL OR result_redacted IS NOT NULL)")).await, 0);
        assert_eq!(svc.count(&q("SELECT sum(duration_us)::bigint FROM tool_calls WHERE service = $S AND tool = 'search'")).await, 5_500_000);

        // Rollups agree with the raw rows.
        let (calls, errors, with_result, empties): (i64, i64, i64, i64) = sqlx::query_as(&q(
            "SELECT sum(calls)::bigint, sum(errors)::bigint, sum(with_result)::bigint, sum(empty_results)::bigint FROM tool_rollup_1m WHERE service = $S",
        ))
        .fetch_one(&svc.pool)
        .await
        .unwrap();
        assert_eq!(
            (calls, errors, with_result, empties),
            (12, 1, 2, 1),
            "{protocol}"
        );
        let p95: f64 = sqlx::query_scalar(&q(
            "SELECT toolsight_hist_quantile(toolsight_hist_merge(latency_hist), 0.95) FROM tool_rollup_1m WHERE service = $S AND tool = 'search'",
        ))
        .fetch_one(&svc.pool)
        .await
        .unwrap();
        // The true p95 of 100..1000 ms lies in the last sample's bucket (±9.5%).
        assert!((850.0..=1100.0).contains(&p95), "p95 {p95}");

        assert_eq!(
            svc.count(&q(
                "SELECT count(*) FROM mcp_requests WHERE service = $S AND method = 'tools/list'"
            ))
            .await,
            1
        );
        let (inp, out): (i64, i64) = sqlx::query_as(&q("SELECT input_tokens, output_tokens FROM llm_calls WHERE service = $S AND model = 'gpt-4o'"))
            .fetch_one(&svc.pool)
            .await
            .unwrap();
        assert_eq!((inp, out), (1000, 50));
        assert_eq!(
            svc.count(&q(
                "SELECT sum(input_tokens)::bigint FROM llm_rollup_1m WHERE service = $S"
            ))
            .await,
            1000
        );
        let (status, remaining, ratio): (i32, f64, f64) = sqlx::query_as(&q(
            "SELECT u.status_code, u.ratelimit_remaining, r.min_remaining_ratio FROM upstream_calls u
             JOIN upstream_rollup_1m r USING (service, server_address) WHERE service = $S AND server_address = 'api.example.com'",
        ))
        .fetch_one(&svc.pool)
        .await
        .unwrap();
        assert_eq!((status, remaining, ratio), (429, 0.0, 0.0));
    }
    let transports = [("grpc", 16.0), ("http_protobuf", 16.0), ("http_json", 16.0)];
    for (t, n) in transports {
        assert_eq!(
            svc.metric(&format!(
                "toolsight_spans_received_total{{transport=\"{t}\"}}"
            ))
            .await,
            n,
            "{t}"
        );
    }
    assert_eq!(svc.metric("toolsight_spans_accepted_total").await, 48.0);
    assert_eq!(
        svc.metric("toolsight_spans_dropped_total{reason=\"not_modelled\"}")
            .await,
        3.0
    );
    assert_eq!(
        svc.metric("toolsight_records_written_total{kind=\"tool_call\"}")
            .await,
        36.0
    );

    // The API and the CLI report the same p95 as the SQL function over the rollups.
    let api: serde_json::Value =
        reqwest::get(format!("http://{}/api/v1/tools?since=15m", svc.admin))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
    let row = api["tools"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["service"] == "agent-grpc" && r["tool"] == "search")
        .unwrap()
        .clone();
    assert_eq!(row["calls"], 10);
    assert_eq!(row["errors"], 1);
    let sql_p95: f64 = sqlx::query_scalar(
        "SELECT toolsight_hist_quantile(toolsight_hist_merge(latency_hist), 0.95) FROM tool_rollup_1m WHERE service = 'agent-grpc' AND tool = 'search'",
    )
    .fetch_one(&svc.pool)
    .await
    .unwrap();
    // Same number; JSON parsing without serde_json's float_roundtrip may move the last ULP.
    let api_p95 = row["p95Ms"].as_f64().unwrap();
    assert!(
        (api_p95 - sql_p95).abs() < 1e-9 * sql_p95,
        "api {api_p95} vs sql {sql_p95}"
    );
    let bad = reqwest::get(format!("http://{}/api/v1/tools?since=forever", svc.admin))
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    let bad: serde_json::Value = bad.json().await.unwrap();
    assert_eq!(
        (&bad["status"], &bad["errorType"]),
        (&"error".into(), &"bad_data".into())
    );

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_toolsight"))
        .args(["tools", "--since", "1h"])
        .env("DATABASE_URL", &svc.database_url)
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        table.contains("agent-http-json") && table.contains("search") && table.contains("1/2"),
        "{table}"
    );
    svc.stop().await.unwrap();
}

/// The service's connections run without JIT: the join after each write would otherwise be
/// compiled on every batch once the partitions' statistics make it look expensive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_service_connections_run_without_jit() {
    let opts =
        toolsight::store::connect_options(&format!("{}/postgres", common::server_url())).unwrap();
    let pool = toolsight::store::query_pool(&opts, 1).await.unwrap();
    let jit: String = sqlx::query_scalar("SHOW jit")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(jit, "off");
}
