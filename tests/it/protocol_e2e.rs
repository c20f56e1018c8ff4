//! OTLP protocol behaviour of the running service: idempotent retries, errors with the right
//! status (and counted), partial success, backpressure, and flushing on shutdown.

use crate::common;
use std::io::Write;
use std::time::Duration;

use common::Service;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use serde_json::json;

const FIXTURE_PB: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/fastmcp/inproc-auto.pb"
);

/// Accepts the fixtures' fixed timestamps whatever day the tests run.
fn any_age(c: &mut toolsight::config::Config) {
    c.ingest.max_span_age = Duration::from_secs(100 * 365 * 86_400);
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// An OTLP/JSON body with `n` semconv tool-call spans (`trace_id` prefix varies per call).
fn json_body(tag: u8, n: usize, bad_trace_ids: usize) -> serde_json::Value {
    // One start per test process: a body built again is the same export sent again (a span's
    // start time is part of its stored identity, as an exporter's retry repeats it).
    static START: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let start = *START.get_or_init(|| now_nanos() - 10_000_000_000);
    let spans: Vec<_> = (0..n)
        .map(|i| {
            let trace = if i < bad_trace_ids {
                "aabbcc".to_string()
            } else {
                format!("{tag:02x}{:030x}", i + 1)
            };
            json!({
                "traceId": trace,
                "spanId": format!("{:016x}", i + 1),
                "name": "tools/call lookup",
                "kind": 3,
                // 64-bit integers as strings and as numbers are both valid OTLP/JSON.
                "startTimeUnixNano": (start + i as u64).to_string(),
                "endTimeUnixNano": start + i as u64 + 20_000_000,
                "attributes": [
                    {"key": "mcp.method.name", "value": {"stringValue": "tools/call"}},
                    {"key": "gen_ai.tool.name", "value": {"stringValue": "lookup"}},
                    {"key": "attempt", "value": {"intValue": "3"}}
                ],
                "status": {"code": 1},
                "someFutureField": {"ignored": true}
            })
        })
        .collect();
    json!({"resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "proto-test"}}]},
        "scopeSpans": [{"scope": {"name": "t"}, "spans": spans}]
    }]})
}

async fn post(
    svc: &Service,
    content_type: &str,
    encoding: Option<&str>,
    body: Vec<u8>,
) -> reqwest::Response {
    let mut req = reqwest::Client::new()
        .post(svc.http_url())
        .header("content-type", content_type)
        .body(body);
    if let Some(e) = encoding {
        req = req.header("content-encoding", e);
    }
    req.send().await.unwrap()
}

/// POSTs an OTLP/JSON export, uncompressed.
async fn post_json(svc: &Service, body: serde_json::Value) -> reqwest::Response {
    post(
        svc,
        "application/json",
        None,
        serde_json::to_vec(&body).unwrap(),
    )
    .await
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(data).unwrap();
    gz.finish().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_exports_are_stored_once() {
    let svc = Service::start_with("retries", any_age).await;
    let body = std::fs::read(FIXTURE_PB).unwrap();
    for attempt in 0..3 {
        let r = post(
            &svc,
            "application/x-protobuf",
            if attempt == 1 { Some("gzip") } else { None },
            if attempt == 1 {
                gzip(&body)
            } else {
                body.clone()
            },
        )
        .await;
        assert_eq!(r.status(), 200, "attempt {attempt}");
        assert_eq!(r.headers()["content-type"], "application/x-protobuf");
    }
    // The same spans again over gRPC, zstd-compressed.
    let req: ExportTraceServiceRequest = prost::Message::decode(body.as_slice()).unwrap();
    let mut client = TraceServiceClient::connect(format!("http://{}", svc.grpc))
        .await
        .unwrap()
        .send_compressed(tonic::codec::CompressionEncoding::Zstd);
    let resp = client.export(req).await.unwrap().into_inner();
    assert_eq!(resp.partial_success, None);

    // 9 calls, counted once per side, stored once whatever the retries.
    assert_eq!(svc.count("SELECT count(*) FROM tool_calls").await, 18);
    assert_eq!(
        svc.metric("toolsight_records_written_total{kind=\"tool_call\"}")
            .await,
        18.0,
        "what was stored, not what was sent four times"
    );
    assert_eq!(
        svc.count("SELECT sum(calls)::bigint FROM tool_rollup_1m")
            .await,
        18
    );
    assert_eq!(
        svc.count(
            "SELECT sum(calls)::bigint FROM tool_rollup_1m WHERE tool = 'echo' AND side = 'server'"
        )
        .await,
        3
    );
    // server/discover and tools/list, on each side.
    assert_eq!(svc.count("SELECT count(*) FROM mcp_requests").await, 4);
    assert_eq!(
        svc.count("SELECT sum(calls)::bigint FROM mcp_method_rollup_1m")
            .await,
        4
    );
    assert_eq!(
        svc.metric("toolsight_spans_received_total{transport=\"http_protobuf\"}")
            .await,
        96.0
    );
    svc.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_the_right_status_are_counted_and_harm_nothing() {
    let svc = Service::start_with("bad_input", |c| {
        c.otlp.max_request_bytes = 256 * 1024;
        c.otlp.max_decompressed_bytes = 1024 * 1024;
    })
    .await;
    let good = serde_json::to_vec(&json_body(1, 5, 0)).unwrap();

    let r = post(
        &svc,
        "application/x-protobuf",
        None,
        b"\xff\xff\xff\xff garbage".to_vec(),
    )
    .await;
    assert_eq!(r.status(), 400);
    let r = post(
        &svc,
        "application/json",
        None,
        b"{\"resourceSpans\": [{".to_vec(),
    )
    .await;
    assert_eq!(r.status(), 400);
    let err: serde_json::Value = r.json().await.unwrap();
    assert_eq!(
        err["code"], 3,
        "google.rpc.Status INVALID_ARGUMENT in the request's type"
    );
    assert!(err["message"].as_str().unwrap().contains("json"));
    let r = post(&svc, "text/plain", None, good.clone()).await;
    assert_eq!(r.status(), 415);
    let r = post(&svc, "application/json", Some("br"), good.clone()).await;
    assert_eq!(r.status(), 415);
    let r = reqwest::get(svc.http_url()).await.unwrap();
    assert_eq!(r.status(), 405);
    let r = post(&svc, "application/json", None, vec![b' '; 300 * 1024]).await;
    assert_eq!(r.status(), 413, "compressed size limit");
    let bomb = gzip(&vec![b' '; 8 * 1024 * 1024]);
    assert!(bomb.len() < 256 * 1024);
    let r = post(&svc, "application/json", Some("gzip"), bomb).await;
    assert_eq!(r.status(), 413, "decompressed size limit");
    let r = post(&svc, "application/json", Some("gzip"), b"not gzip".to_vec()).await;
    assert_eq!(r.status(), 400);

    assert_eq!(
        svc.metric("toolsight_exports_total{result=\"malformed\",transport=\"http_protobuf\"}")
            .await,
        1.0
    );
    assert_eq!(
        svc.metric("toolsight_exports_total{result=\"malformed\",transport=\"http_json\"}")
            .await,
        2.0
    );
    assert_eq!(
        svc.metric("toolsight_exports_total{result=\"too_large\",transport=\"http_json\"}")
            .await,
        2.0
    );
    assert_eq!(
        svc.metric(
            "toolsight_exports_total{result=\"unsupported_encoding\",transport=\"http_json\"}"
        )
        .await,
        1.0
    );

    // The service keeps going: a good export after all that is stored.
    let r = post(&svc, "application/json", Some("gzip"), gzip(&good)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<serde_json::Value>().await.unwrap(), json!({}));
    assert_eq!(
        svc.count("SELECT count(*) FROM tool_calls WHERE tool = 'lookup'")
            .await,
        5
    );
    svc.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_spans_are_reported_in_partial_success() {
    let svc = Service::start("partial").await;
    let r = post_json(&svc, json_body(2, 4, 1)).await;
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["partialSuccess"]["rejectedSpans"], 1);
    assert!(
        body["partialSuccess"]["errorMessage"]
            .as_str()
            .unwrap()
            .starts_with("invalid_trace_id")
    );
    assert_eq!(svc.count("SELECT count(*) FROM tool_calls").await, 3);

    let mut req: ExportTraceServiceRequest = serde_json::from_value(json_body(3, 2, 0)).unwrap();
    req.resource_spans[0].scope_spans[0].spans[1].span_id = vec![1, 2, 3];
    let mut client = TraceServiceClient::connect(format!("http://{}", svc.grpc))
        .await
        .unwrap();
    let resp = client.export(req).await.unwrap().into_inner();
    let partial = resp.partial_success.expect("partial success");
    assert_eq!(partial.rejected_spans, 1);
    assert!(
        partial.error_message.contains("invalid_span_id"),
        "{}",
        partial.error_message
    );
    assert_eq!(svc.count("SELECT count(*) FROM tool_calls").await, 4);
    assert_eq!(
        svc.metric("toolsight_spans_rejected_total{reason=\"invalid_trace_id\"}")
            .await,
        1.0
    );
    assert_eq!(
        svc.metric("toolsight_spans_rejected_total{reason=\"invalid_span_id\"}")
            .await,
        1.0
    );
    svc.stop().await.unwrap();
}

/// Holds an exclusive lock on `tool_calls` so the writer blocks inside its transaction.
async fn stall_writer(svc: &Service) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let pool = sqlx::PgPool::connect(&svc.database_url).await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE tool_calls IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx
}

/// Posts an OTLP/JSON export in the background; resolves to its HTTP status.
fn spawn_export(
    svc: &Service,
    body: serde_json::Value,
) -> tokio::task::JoinHandle<reqwest::StatusCode> {
    let url = svc.http_url();
    tokio::spawn(async move {
        reqwest::Client::new()
            .post(url)
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&body).unwrap())
            .send()
            .await
            .unwrap()
            .status()
    })
}

/// A new export is refused as overloaded over HTTP (503, Retry-After 1) and gRPC (UNAVAILABLE).
async fn assert_refused_as_overloaded(svc: &Service, tag: u8) {
    let r = post_json(svc, json_body(tag, 3, 0)).await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    let mut client = TraceServiceClient::connect(format!("http://{}", svc.grpc))
        .await
        .unwrap();
    let err = client
        .export(serde_json::from_value::<ExportTraceServiceRequest>(json_body(tag, 3, 0)).unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
}

async fn wait_for_metric(svc: &Service, series: &str, value: f64) {
    common::eventually(&format!("{series} to reach {value}"), || async {
        (svc.metric(series).await == value).then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_answers_503_and_unavailable_then_recovers() {
    let svc = Service::start_with("backpressure", |c| {
        c.ingest.writers = 1;
        c.ingest.batch_rows = 10;
        c.ingest.queue_rows = 10;
    })
    .await;
    let lock = stall_writer(&svc).await;
    let first = spawn_export(&svc, json_body(4, 10, 0));
    wait_for_metric(&svc, "toolsight_queue_depth_rows", 10.0).await;

    assert_refused_as_overloaded(&svc, 5).await;
    assert_eq!(
        svc.metric("toolsight_exports_total{result=\"overloaded\",transport=\"http_json\"}")
            .await,
        1.0
    );
    assert_eq!(
        svc.metric("toolsight_exports_total{result=\"overloaded\",transport=\"grpc\"}")
            .await,
        1.0
    );

    // Not acknowledged while uncommitted.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!first.is_finished());
    lock.rollback().await.unwrap();
    assert_eq!(first.await.unwrap(), 200);
    let r = post_json(&svc, json_body(5, 3, 0)).await;
    assert_eq!(r.status(), 200, "the retry succeeds once there is room");
    assert_eq!(svc.count("SELECT count(*) FROM tool_calls").await, 13);
    svc.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_flushes_accepted_exports() {
    let svc = Service::start("shutdown").await;
    let lock = stall_writer(&svc).await;
    let inflight = spawn_export(&svc, json_body(7, 25, 0));
    wait_for_metric(&svc, "toolsight_queue_depth_rows", 25.0).await;
    let pool = svc.pool.clone();
    let stopping = tokio::spawn(svc.stop());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!stopping.is_finished(), "waits for the accepted export");
    lock.rollback().await.unwrap();
    assert_eq!(inflight.await.unwrap(), 200);
    stopping.await.unwrap().unwrap();
    let n: i64 = sqlx::query_scalar("SELECT count(*) FROM tool_calls")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(n, 25);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn database_outage_gives_retryable_errors_and_ingest_resumes() {
    let svc = Service::start("outage").await;
    let ok = post_json(&svc, json_body(8, 4, 0)).await;
    assert_eq!(ok.status(), 200);

    // The database goes away for toolsight: no new connections, existing ones killed.
    common::database_outage("outage", true).await;
    svc.wait_readyz(503).await;
    assert_eq!(svc.metric("toolsight_db_up").await, 0.0);

    let r = post_json(&svc, json_body(9, 4, 0)).await;
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "5");
    let mut client = TraceServiceClient::connect(format!("http://{}", svc.grpc))
        .await
        .unwrap();
    let err = client
        .export(serde_json::from_value::<ExportTraceServiceRequest>(json_body(9, 4, 0)).unwrap())
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    assert_eq!(
        svc.metric("toolsight_exports_total{result=\"unavailable\",transport=\"http_json\"}")
            .await,
        1.0
    );

    // It comes back: readiness follows and the client's retry is stored, once.
    common::database_outage("outage", false).await;
    svc.wait_readyz(200).await;
    for _ in 0..2 {
        let r = post_json(&svc, json_body(9, 4, 0)).await;
        assert_eq!(r.status(), 200);
    }
    assert_eq!(svc.count("SELECT count(*) FROM tool_calls").await, 8);
    assert_eq!(
        svc.count("SELECT sum(calls)::bigint FROM tool_rollup_1m")
            .await,
        8
    );
    svc.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_exports_count_only_new_spans() {
    let svc = Service::start("overlap").await;
    // Same tag: the first 3 spans of the second export are the 3 spans of the first.
    for n in [3, 5, 5] {
        let r = post_json(&svc, json_body(11, n, 0)).await;
        assert_eq!(r.status(), 200);
    }
    assert_eq!(svc.count("SELECT count(*) FROM tool_calls").await, 5);
    assert_eq!(
        svc.count("SELECT sum(calls)::bigint FROM tool_rollup_1m")
            .await,
        5
    );
    let hist_total: i64 =
        sqlx::query_scalar("SELECT sum(x)::bigint FROM tool_rollup_1m, unnest(latency_hist) AS x")
            .fetch_one(&svc.pool)
            .await
            .unwrap();
    assert_eq!(hist_total, 5, "the histogram counts each span once too");
    svc.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exports_beyond_the_concurrency_bound_are_refused() {
    let svc = Service::start_with("inflight", |c| c.otlp.max_concurrent_exports = 1).await;
    let lock = stall_writer(&svc).await;
    let first = spawn_export(&svc, json_body(12, 2, 0));
    wait_for_metric(&svc, "toolsight_queue_depth_rows", 2.0).await;
    // The queue has room, but one export is already in progress.
    assert_refused_as_overloaded(&svc, 13).await;
    lock.rollback().await.unwrap();
    assert_eq!(first.await.unwrap(), 200);
    // The permit is released with the answer: the next export goes through.
    let r = post_json(&svc, json_body(13, 2, 0)).await;
    assert_eq!(r.status(), 200);
    svc.stop().await.unwrap();
}

/// Every committed capture, through the running service: the rollups the rules and dashboards
/// read equal the raw rows, per tool and side, and a result of which only a part was captured
/// (OpenLLMetry's client keeps the first content part) has an unknown size and item count that
/// no mean divides by.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollups_equal_the_raw_rows_of_every_capture() {
    let svc = Service::start_with("rollups_equal_raw", any_age).await;
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
    let mut posted = 0;
    for source in std::fs::read_dir(dir).unwrap() {
        let source = source.unwrap().path();
        if !source.is_dir() {
            continue;
        }
        for f in std::fs::read_dir(&source).unwrap() {
            let f = f.unwrap().path();
            if f.extension().is_none_or(|e| e != "json") || f.ends_with("versions.json") {
                continue;
            }
            let body = std::fs::read(&f).unwrap();
            let r = post(&svc, "application/json", None, body).await;
            assert_eq!(r.status(), 200, "{}", f.display());
            posted += 1;
        }
    }
    assert!(posted >= 10, "{posted} captures");
    assert!(svc.count("SELECT count(*) FROM tool_calls").await > 40);

    let mismatches = common::rollup_mismatches(&svc.pool).await;
    assert_eq!(mismatches, vec![], "rollups differ from the raw rows");

    // OpenLLMetry's client: content captured, size and items unknown, emptiness known.
    assert_eq!(
        svc.count(
            "SELECT count(*) FROM tool_calls WHERE source = 'traceloop' AND side = 'client'
             AND NOT result_empty AND (result_bytes IS NOT NULL OR result_items IS NOT NULL)"
        )
        .await,
        0
    );
    assert!(
        svc.count(
            "SELECT count(*) FROM tool_calls WHERE source = 'traceloop' AND side = 'client'
             AND result_empty = false AND result_bytes IS NULL"
        )
        .await
            >= 5
    );
    // The mean result size divides by the results whose size was known.
    let summary = toolsight::store::queries::tool_summary(&svc.pool, 100 * 365 * 86_400)
        .await
        .unwrap();
    assert!(!summary.is_empty());
    for t in &summary {
        let (raw_mean,): (Option<f64>,) = sqlx::query_as(
            "SELECT avg(result_bytes)::float8 FROM tool_calls
             WHERE service = $1 AND tool = $2 AND side = $3 AND counted",
        )
        .bind(&t.service)
        .bind(&t.tool)
        .bind(&t.side)
        .fetch_one(&svc.pool)
        .await
        .unwrap();
        let same = match (raw_mean, t.mean_result_bytes) {
            (Some(a), Some(b)) => (a - b).abs() < 1e-6 * a.max(1.0),
            (a, b) => a == b,
        };
        assert!(
            same,
            "{}/{}/{}: mean {:?}, raw {raw_mean:?}",
            t.service, t.tool, t.side, t.mean_result_bytes
        );
    }
    svc.stop().await.unwrap();
}

/// The real captured client and server exports of one instrumentation, as the two processes
/// sent them.
const PAIRS: [(&str, &str, usize); 4] = [
    (
        "fastmcp/http-legacy-client.json",
        "fastmcp/http-legacy-server.json",
        9,
    ),
    (
        "mcp-sdk/stdio-auto-client.json",
        "mcp-sdk/stdio-auto-server.json",
        9,
    ),
    (
        "logfire/sdk1-stdio-client.json",
        "logfire/sdk1-stdio-server.json",
        9,
    ),
    (
        "traceloop/sdk1-stdio-client.json",
        "traceloop/sdk1-stdio-server.json",
        8,
    ),
];

fn fixture(path: &str) -> Vec<u8> {
    std::fs::read(format!(
        "{}/tests/fixtures/{path}",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap()
}

/// Every stored tool call, as the join left it: the table both orders must agree on.
async fn call_table(
    pool: &sqlx::PgPool,
) -> Vec<(String, String, String, String, bool, bool, bool)> {
    sqlx::query_as(
        "SELECT source, tool, side, outcome, counted, peer_span_id IS NOT NULL,
                overhead_us IS NOT NULL
         FROM tool_calls ORDER BY trace_id, span_id",
    )
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Sends the client and server exports of each capture seconds apart, with a restart of
/// toolsight in between, in one order or the other.
async fn sides_apart(name: &str, server_first: bool) -> Service {
    let svc = Service::start_with(name, any_age).await;
    for (client, server, _) in PAIRS {
        let first = if server_first { server } else { client };
        let r = post(&svc, "application/json", None, fixture(first)).await;
        assert_eq!(r.status(), 200, "{first}");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    svc.stop().await.unwrap();
    let svc = Service::replica(name, any_age).await;
    for (client, server, _) in PAIRS {
        let second = if server_first { client } else { server };
        let r = post(&svc, "application/json", None, fixture(second)).await;
        assert_eq!(r.status(), 200, "{second}");
    }
    svc
}

/// The two sides of each call arrive in separate exports, from two "processes", in either
/// order, with a restart between them: each call is joined exactly once per side, the outcome
/// either side saw reaches both rows and their rollups, and the per-call table is the same
/// whatever the order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_two_sides_of_a_call_are_joined_in_any_order_across_a_restart() {
    let mut tables = Vec::new();
    for (name, server_first) in [("join_server_first", true), ("join_client_first", false)] {
        let svc = sides_apart(name, server_first).await;
        let pool = &svc.pool;
        let expected: usize = PAIRS.iter().map(|p| p.2).sum();
        // Exactly one joined pair per call, each side pointing at the other.
        let pairs = svc.count(common::JOINED_PAIRS).await;
        assert_eq!(pairs as usize, expected, "{name}: joined pairs");
        assert_eq!(
            svc.count("SELECT count(*) FROM tool_calls WHERE peer_span_id IS NOT NULL")
                .await as usize,
            2 * expected,
            "{name}: no row joined twice or one-sided"
        );
        // Both sides of a call end with the same outcome and tool name.
        assert_eq!(
            svc.count(
                "SELECT count(*) FROM tool_calls c JOIN tool_calls s
                   ON s.trace_id = c.trace_id AND s.span_id = c.peer_span_id
                 WHERE c.side = 'client' AND (c.outcome <> s.outcome OR c.tool <> s.tool)"
            )
            .await,
            0,
            "{name}: sides disagree"
        );
        // What one side alone did not report: the MCP SDK client span stays UNSET for a tool
        // error; the server side of the call the client gave up on finished "ok".
        let sdk_fail: (String, Option<String>) = sqlx::query_as(
            "SELECT outcome, own_outcome FROM tool_calls
             WHERE source = 'mcp_sdk' AND side = 'client' AND tool = 'fail_tool'",
        )
        .fetch_one(pool)
        .await
        .unwrap();
        assert_eq!(sdk_fail, ("error".into(), Some("ok".into())), "{name}");
        assert_eq!(
            svc.count(
                "SELECT count(*) FROM tool_calls WHERE side = 'server' AND tool = 'slow'
                 AND outcome = 'cancelled' AND own_outcome = 'ok'"
            )
            .await,
            2,
            "{name}: FastMCP's and the SDK's server side of the cancelled call"
        );
        // OpenLLMetry's mcp-1.x server calls are named by their client side.
        assert_eq!(
            svc.count(
                "SELECT count(*) FROM tool_calls WHERE source = 'traceloop' AND side = 'server'
                 AND tool = '(unknown)'"
            )
            .await,
            0,
            "{name}"
        );
        // Transport overhead on the joined client rows of completed calls, never negative.
        assert_eq!(
            svc.count("SELECT count(*) FROM tool_calls WHERE side = 'client' AND overhead_us >= 0")
                .await,
            svc.count(
                "SELECT count(*) FROM tool_calls c JOIN tool_calls s
                   ON s.trace_id = c.trace_id AND s.span_id = c.peer_span_id
                 WHERE c.side = 'client' AND c.own_outcome IS DISTINCT FROM 'cancelled'
                   AND c.outcome <> 'cancelled'"
            )
            .await,
            "{name}"
        );
        assert_eq!(
            common::rollup_mismatches(pool).await,
            vec![],
            "{name}: rollups differ from the rows"
        );
        assert!(
            svc.metric("toolsight_calls_correlated_total{kind=\"pair\"}")
                .await
                >= expected as f64,
            "{name}: the join after the restart joined every pair"
        );
        // A retried export joins nothing twice.
        let before = call_table(pool).await;
        for (client, server, _) in PAIRS {
            for f in [client, server] {
                let r = post(&svc, "application/json", None, fixture(f)).await;
                assert_eq!(r.status(), 200);
            }
        }
        assert_eq!(
            call_table(pool).await,
            before,
            "{name}: a retried export changed the join"
        );
        assert_eq!(common::rollup_mismatches(pool).await, vec![], "{name}");
        tables.push(before);
        svc.stop().await.unwrap();
    }
    assert_eq!(
        tables[0], tables[1],
        "the order the sides arrived in changed the result"
    );
}

/// With a SimpleSpanProcessor every span is its own export: the MCP SDK's `MCP send` span ends
/// (and is exported) before FastMCP's client span around it. The call is counted once, the same
/// as when both arrive together, also when toolsight restarts between the two.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nested_send_span_exported_first_is_counted_once() {
    let whole: serde_json::Value =
        serde_json::from_slice(&fixture("fastmcp/stdio-auto-client.json")).unwrap();
    let scope_only = |scope: &str| {
        let mut r = whole.clone();
        for rs in r["resourceSpans"].as_array_mut().unwrap() {
            rs["scopeSpans"]
                .as_array_mut()
                .unwrap()
                .retain(|ss| ss["scope"]["name"] == scope);
        }
        serde_json::to_vec(&r).unwrap()
    };
    let together = Service::start_with("nested_together", any_age).await;
    let r = post(
        &together,
        "application/json",
        None,
        serde_json::to_vec(&whole).unwrap(),
    )
    .await;
    assert_eq!(r.status(), 200);

    let apart = Service::start_with("nested_apart", any_age).await;
    let r = post(
        &apart,
        "application/json",
        None,
        scope_only("mcp-python-sdk"),
    )
    .await;
    assert_eq!(r.status(), 200);
    apart.stop().await.unwrap();
    let apart = Service::replica("nested_apart", any_age).await;
    let r = post(&apart, "application/json", None, scope_only("fastmcp")).await;
    assert_eq!(r.status(), 200);

    const ROLLED: &str =
        "SELECT 'tool' AS kind, tool AS name, side, sum(calls)::int8, sum(errors)::int8,
                sum(cancellations)::int8 FROM tool_rollup_1m GROUP BY 1, 2, 3 HAVING sum(calls) <> 0
         UNION ALL
         SELECT 'method', method, side, sum(calls)::int8, sum(errors)::int8, sum(orphans)::int8
         FROM mcp_method_rollup_1m GROUP BY 1, 2, 3 HAVING sum(calls) <> 0
         ORDER BY 1, 2, 3";
    type Rolled = Vec<(String, String, String, i64, i64, i64)>;
    let want: Rolled = sqlx::query_as(ROLLED)
        .fetch_all(&together.pool)
        .await
        .unwrap();
    let got: Rolled = sqlx::query_as(ROLLED).fetch_all(&apart.pool).await.unwrap();
    assert_eq!(
        want.iter()
            .filter(|r| r.0 == "tool")
            .map(|r| r.3)
            .sum::<i64>(),
        9,
        "9 client calls in the capture"
    );
    assert_eq!(got, want, "counted as if the spans had arrived together");
    assert_eq!(
        apart
            .count("SELECT count(*) FROM tool_calls WHERE NOT counted")
            .await,
        9,
        "the 9 `MCP send tools/call` spans stored first are nested"
    );
    assert!(
        apart
            .metric("toolsight_calls_correlated_total{kind=\"nested\"}")
            .await
            >= 9.0
    );
    assert_eq!(common::rollup_mismatches(&apart.pool).await, vec![]);
    together.stop().await.unwrap();
    apart.stop().await.unwrap();
}
