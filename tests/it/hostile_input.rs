//! Hostile input: truncated bodies, deep nesting, invalid UTF-8, huge values, 100k attributes,
//! ids of the wrong length, timestamps far away, messages over the gRPC limit. Each gets the
//! right status and is counted, and the service keeps serving.

use crate::common;
use common::Service;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use prost::Message;

fn kv(k: &str, v: &str) -> KeyValue {
    KeyValue {
        key: k.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(v.into())),
        }),
        ..Default::default()
    }
}

fn now_nanos() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// A tool-call span; `n` makes its ids unique.
fn span(n: u64, extra: Vec<KeyValue>) -> Span {
    let start = now_nanos() - 1_000_000_000;
    let mut attributes = vec![
        kv("mcp.method.name", "tools/call"),
        kv("gen_ai.tool.name", "lookup"),
    ];
    attributes.extend(extra);
    Span {
        trace_id: [&[0x7e_u8; 8][..], &n.to_be_bytes()].concat(),
        span_id: n.to_be_bytes().to_vec(),
        name: "tools/call lookup".into(),
        kind: 2,
        start_time_unix_nano: start,
        end_time_unix_nano: start + 5_000_000,
        attributes,
        ..Default::default()
    }
}

fn request(spans: Vec<Span>) -> ExportTraceServiceRequest {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![kv("service.name", "hostile")],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

async fn post(svc: &Service, content_type: &str, body: Vec<u8>) -> reqwest::Response {
    reqwest::Client::new()
        .post(svc.http_url())
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap()
}

async fn post_pb(svc: &Service, req: &ExportTraceServiceRequest) -> reqwest::Response {
    post(svc, "application/x-protobuf", req.encode_to_vec()).await
}

async fn still_serving(svc: &Service, n: u64) {
    let r = post_pb(svc, &request(vec![span(n, vec![])])).await;
    assert_eq!(r.status(), 200, "a valid export after the hostile one");
    let ready = reqwest::get(format!("http://{}/readyz", svc.admin))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_bodies_get_the_right_status_and_are_counted() {
    let svc = Service::start_with("hostile", |c| {
        c.otlp.max_request_bytes = 8 << 20;
        c.otlp.max_decompressed_bytes = 16 << 20;
    })
    .await;
    let malformed = |transport: &str| {
        format!("toolsight_exports_total{{result=\"malformed\",transport=\"{transport}\"}}")
    };

    // Truncated protobuf: cut in the middle of a span.
    let whole = request((1..=20).map(|n| span(n, vec![])).collect()).encode_to_vec();
    let r = post(
        &svc,
        "application/x-protobuf",
        whole[..whole.len() / 2].to_vec(),
    )
    .await;
    assert_eq!(r.status(), 400);
    assert_eq!(svc.metric(&malformed("http_protobuf")).await, 1.0);
    still_serving(&svc, 1000).await;

    // Truncated JSON.
    let json = serde_json::to_vec(&request(vec![span(1, vec![])])).unwrap();
    let r = post(&svc, "application/json", json[..json.len() - 10].to_vec()).await;
    assert_eq!(r.status(), 400);
    assert_eq!(svc.metric(&malformed("http_json")).await, 1.0);

    // JSON nested 100,000 levels deep (an attribute value of nested kvlists).
    let depth = 100_000;
    let mut nested = String::from(
        r#"{"resourceSpans":[{"scopeSpans":[{"spans":[{"traceId":"0102030405060708090a0b0c0d0e0f10","spanId":"0102030405060708","name":"x","attributes":[{"key":"deep","value":"#,
    );
    for _ in 0..depth {
        nested.push_str(r#"{"kvlistValue":{"values":[{"key":"k","value":"#);
    }
    nested.push_str(r#"{"stringValue":"bottom"}"#);
    for _ in 0..depth {
        nested.push_str("}]}}");
    }
    nested.push_str("}]}]}]}]}");
    let r = post(&svc, "application/json", nested.into_bytes()).await;
    assert_eq!(r.status(), 400, "refused, not a stack overflow");
    assert_eq!(svc.metric(&malformed("http_json")).await, 2.0);
    still_serving(&svc, 1001).await;

    // Invalid UTF-8 in a protobuf string field.
    let mut bytes = request(vec![span(2, vec![kv("note", "MARKER")])]).encode_to_vec();
    let at = bytes
        .windows(6)
        .position(|w| w == b"MARKER")
        .expect("marker in the encoding");
    bytes[at..at + 6].copy_from_slice(&[0xff, 0xfe, 0xc0, 0x80, 0xed, 0xa0]);
    let r = post(&svc, "application/x-protobuf", bytes).await;
    assert_eq!(r.status(), 400);
    assert_eq!(svc.metric(&malformed("http_protobuf")).await, 2.0);

    // A 4 MiB attribute value: stored as measured, not kept.
    let huge = "x".repeat(4 << 20);
    let r = post_pb(
        &svc,
        &request(vec![span(3, vec![kv("gen_ai.tool.call.result", &huge)])]),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        svc.count("SELECT result_bytes FROM tool_calls WHERE span_id = '\\x0000000000000003'")
            .await,
        4 << 20
    );

    // 100,000 attributes on one span.
    let many: Vec<KeyValue> = (0..100_000)
        .map(|i| kv(&format!("attr.{i}"), "v"))
        .collect();
    let r = post_pb(&svc, &request(vec![span(4, many)])).await;
    assert_eq!(r.status(), 200);
    assert_eq!(
        svc.count("SELECT count(*) FROM tool_calls WHERE span_id = '\\x0000000000000004'")
            .await,
        1
    );

    // Ids of the wrong length, and timestamps far in the past and the future: rejected per span
    // (partial success), counted by reason; the good span of the same export is stored.
    let mut short_trace = span(5, vec![]);
    short_trace.trace_id = vec![1, 2, 3];
    let mut long_span = span(6, vec![]);
    long_span.span_id = vec![9; 12];
    let mut ancient = span(7, vec![]);
    ancient.start_time_unix_nano = 1_000;
    ancient.end_time_unix_nano = 2_000;
    let mut future = span(8, vec![]);
    future.start_time_unix_nano = 4_102_444_800_000_000_000; // 2100-01-01
    future.end_time_unix_nano = future.start_time_unix_nano + 1_000;
    let r = post_pb(
        &svc,
        &request(vec![
            short_trace,
            long_span,
            ancient,
            future,
            span(9, vec![]),
        ]),
    )
    .await;
    assert_eq!(r.status(), 200);
    let resp =
        opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse::decode(
            r.bytes().await.unwrap(),
        )
        .unwrap();
    let partial = resp.partial_success.expect("partial success");
    assert_eq!(partial.rejected_spans, 4, "{}", partial.error_message);
    for (reason, n) in [
        ("invalid_trace_id", 1.0),
        ("invalid_span_id", 1.0),
        ("timestamp_out_of_range", 2.0),
    ] {
        assert_eq!(
            svc.metric(&format!(
                "toolsight_spans_rejected_total{{reason=\"{reason}\"}}"
            ))
            .await,
            n,
            "{reason}"
        );
    }
    assert_eq!(
        svc.count("SELECT count(*) FROM tool_calls WHERE span_id = '\\x0000000000000009'")
            .await,
        1
    );
    still_serving(&svc, 1002).await;
    svc.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_message_over_the_limit_is_a_permanent_error() {
    let svc = Service::start_with("hostile_grpc", |c| {
        c.otlp.max_request_bytes = 64 << 10;
        c.otlp.max_decompressed_bytes = 64 << 10;
    })
    .await;
    let big = request(vec![span(1, vec![kv("pad", &"p".repeat(200 << 10))])]);
    let mut client = TraceServiceClient::connect(format!("http://{}", svc.grpc))
        .await
        .unwrap();
    let err = client.export(big).await.unwrap_err();
    assert_eq!(
        err.code(),
        tonic::Code::InvalidArgument,
        "a permanent error (OUT_OF_RANGE would make OTLP exporters retry the same request): {err:?}"
    );
    client.export(request(vec![span(2, vec![])])).await.unwrap();
    svc.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_inventing_tool_names_folds_into_overflow() {
    let svc = Service::start_with("hostile_cardinality", |c| {
        c.ingest.max_keys_per_service = 3;
    })
    .await;
    // A tool name with a request id in it: a new "tool" per call.
    let spans: Vec<Span> = (1..=10)
        .map(|n| {
            let mut s = span(n, vec![]);
            s.attributes[1] = kv("gen_ai.tool.name", &format!("lookup-{n}"));
            s
        })
        .collect();
    assert_eq!(post_pb(&svc, &request(spans)).await.status(), 200);
    let tools: Vec<(String, i64)> = sqlx::query_as(
        "SELECT tool, sum(calls)::bigint FROM tool_rollup_1m GROUP BY tool ORDER BY tool",
    )
    .fetch_all(&svc.pool)
    .await
    .unwrap();
    assert_eq!(
        tools,
        [
            ("__overflow__".to_string(), 7),
            ("lookup-1".to_string(), 1),
            ("lookup-2".to_string(), 1),
            ("lookup-3".to_string(), 1)
        ],
        "nothing lost, the rollups stay bounded"
    );
    assert_eq!(
        svc.metric("toolsight_cardinality_folded_total{kind=\"key\"}")
            .await,
        7.0
    );
    svc.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_beyond_the_budget_count_in_rollups_and_write_no_rule_state() {
    let svc = Service::start_with("hostile_sessions", |c| {
        c.ingest.max_sessions_per_hour = 2;
    })
    .await;
    // A session per call: two are tracked, the other three fold into `__overflow__`.
    let spans: Vec<Span> = (1..=5)
        .map(|n| {
            span(
                n,
                vec![
                    kv("gen_ai.conversation.id", &format!("conv-{n}")),
                    kv("gen_ai.tool.call.arguments", r#"{"q":"same"}"#),
                ],
            )
        })
        .collect();
    assert_eq!(post_pb(&svc, &request(spans)).await.status(), 200);
    assert_eq!(
        svc.count("SELECT sum(calls)::bigint FROM tool_rollup_1m")
            .await,
        5,
        "every call counted"
    );
    // The rules skip folded sessions, so they have no state: no hot `__overflow__` row that
    // every batch would update.
    assert_eq!(
        svc.count("SELECT count(*) FROM loop_calls_1m WHERE session_key = '__overflow__'")
            .await,
        0
    );
    assert_eq!(
        svc.count("SELECT count(DISTINCT session_key) FROM loop_calls_1m")
            .await,
        2
    );
    assert_eq!(
        svc.metric("toolsight_cardinality_folded_total{kind=\"session\"}")
            .await,
        3.0
    );
    let mut conn = svc.pool.acquire().await.unwrap();
    let mismatches = common::rule_state_mismatches(&mut conn).await;
    assert!(mismatches.is_empty(), "{mismatches:?}");
    svc.stop().await.unwrap();
}

/// A tool span of service `service` named `tool`; `n` makes its ids unique.
fn tool_span(n: u64, tool: &str) -> Span {
    let mut s = span(n, vec![]);
    s.attributes[1] = kv("gen_ai.tool.name", tool);
    s
}

/// Posts a protobuf export in the background; resolves to its HTTP status.
fn spawn_pb(svc: &Service, req: ExportTraceServiceRequest) -> tokio::task::JoinHandle<u16> {
    let url = svc.http_url();
    tokio::spawn(async move {
        reqwest::Client::new()
            .post(url)
            .header("content-type", "application/x-protobuf")
            .body(req.encode_to_vec())
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    })
}

/// Holds the raw table locked against writes (reads go on: the evaluator and the readiness probe
/// keep working), so the writer stalls on its first batch and everything exported meanwhile
/// queues up into the next one. Released by dropping or rolling back.
async fn stall(svc: &Service) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let pool = sqlx::PgPool::connect(&svc.database_url).await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE tool_calls IN SHARE MODE")
        .execute(&mut *tx)
        .await
        .unwrap();
    tx
}

async fn queued(svc: &Service, rows: f64) {
    common::eventually(&format!("{rows} rows queued"), || async {
        (svc.metric("toolsight_queue_depth_rows").await == rows).then_some(())
    })
    .await
}

/// Bystanders' exports of 10 spans each, ids from `first`.
fn bystanders(svc: &Service, first: u64, n: u64) -> Vec<tokio::task::JoinHandle<u16>> {
    (0..n)
        .map(|i| {
            let spans = (0..10)
                .map(|k| tool_span(first + i * 10 + k, "lookup"))
                .collect();
            spawn_pb(svc, request(spans))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_that_store_alike_share_a_rollup_row_in_one_batch_of_many_clients() {
    let svc = Service::start_with("hostile_poison_keys", |c| c.ingest.writers = 1).await;
    let lock = stall(&svc).await;
    let blocker = spawn_pb(&svc, request(vec![tool_span(1, "lookup")]));
    queued(&svc, 1.0).await;
    // NUL is stored as U+FFFD, and two names sharing a long prefix are cut: before their stored
    // form was decided in one place, the rollup merge failed for the whole batch (every client).
    let long = "t".repeat(600);
    let poison = spawn_pb(
        &svc,
        request(vec![
            tool_span(2, "x\0"),
            tool_span(3, "x\u{FFFD}"),
            tool_span(4, &format!("{long}a")),
            tool_span(5, &format!("{long}b")),
        ]),
    );
    let others = bystanders(&svc, 100, 5);
    queued(&svc, 55.0).await;
    lock.rollback().await.unwrap();
    assert_eq!(blocker.await.unwrap(), 200);
    assert_eq!(poison.await.unwrap(), 200);
    for b in others {
        assert_eq!(b.await.unwrap(), 200, "a bystander's export");
    }
    assert_eq!(svc.count("SELECT count(*) FROM tool_calls").await, 55);
    assert_eq!(
        svc.count("SELECT sum(calls)::bigint FROM tool_rollup_1m")
            .await,
        55
    );
    assert_eq!(
        svc.count("SELECT sum(calls)::bigint FROM tool_rollup_1m WHERE tool = E'x\\uFFFD'")
            .await,
        2,
        "x\\0 and x\\uFFFD are one tool"
    );
    let long_tools: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT tool FROM tool_calls WHERE tool LIKE 'ttt%' ORDER BY 1",
    )
    .fetch_all(&svc.pool)
    .await
    .unwrap();
    assert_eq!(long_tools.len(), 2, "cut, but still two tools");
    assert!(long_tools.iter().all(|t| t.len() <= 256), "{long_tools:?}");
    assert_eq!(svc.metric("toolsight_keys_truncated_total").await, 2.0);
    svc.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_the_database_refuses_fails_alone() {
    let svc = Service::start_with("hostile_poison_batch", |c| c.ingest.writers = 1).await;
    // Content the database refuses (here a constraint standing for any data error): the batch it
    // lands in holds five other clients' exports.
    sqlx::query("ALTER TABLE tool_calls ADD CONSTRAINT no_poison CHECK (tool <> 'poison')")
        .execute(&svc.pool)
        .await
        .unwrap();
    let lock = stall(&svc).await;
    let blocker = spawn_pb(&svc, request(vec![tool_span(1, "lookup")]));
    queued(&svc, 1.0).await;
    let poison = spawn_pb(
        &svc,
        request(vec![tool_span(2, "poison"), tool_span(3, "ok")]),
    );
    let others = bystanders(&svc, 100, 5);
    queued(&svc, 53.0).await;
    lock.rollback().await.unwrap();
    assert_eq!(blocker.await.unwrap(), 200);
    assert_eq!(
        poison.await.unwrap(),
        400,
        "the export at fault: permanent, not retried"
    );
    for b in others {
        assert_eq!(b.await.unwrap(), 200, "a bystander's export is stored");
    }
    assert_eq!(svc.count("SELECT count(*) FROM tool_calls").await, 51);
    assert_eq!(
        svc.count("SELECT sum(calls)::bigint FROM tool_rollup_1m")
            .await,
        51
    );
    svc.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_garbage_and_bombs_are_invalid_argument_and_counted() {
    use std::io::Write;
    let svc = Service::start_with("hostile_grpc_bad", |c| {
        c.otlp.max_decompressed_bytes = 1 << 20;
    })
    .await;
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    // A gRPC frame: compressed flag, big-endian length, message.
    let frame = |compressed: bool, msg: &[u8]| {
        let mut f = vec![u8::from(compressed)];
        f.extend_from_slice(&(msg.len() as u32).to_be_bytes());
        f.extend_from_slice(msg);
        f
    };
    let call = |body: Vec<u8>, gzip: bool| {
        let mut r = client
            .post(format!(
                "http://{}/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                svc.grpc
            ))
            .header("content-type", "application/grpc")
            .header("te", "trailers");
        if gzip {
            r = r.header("grpc-encoding", "gzip");
        }
        r.body(body).send()
    };
    let status = |r: &reqwest::Response| {
        r.headers()
            .get("grpc-status")
            .map(|v| v.to_str().unwrap().to_owned())
    };
    // Garbage: not a protobuf message.
    let r = call(frame(false, &[0xff; 64]), false).await.unwrap();
    assert_eq!(
        status(&r).as_deref(),
        Some("3"),
        "INVALID_ARGUMENT, not INTERNAL"
    );
    // A gzip bomb: 64 MiB of zeros in a few KiB.
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&vec![0u8; 64 << 20]).unwrap();
    let bomb = gz.finish().unwrap();
    let r = call(frame(true, &bomb), true).await.unwrap();
    assert_eq!(
        status(&r).as_deref(),
        Some("3"),
        "INVALID_ARGUMENT, not RESOURCE_EXHAUSTED"
    );
    assert_eq!(
        svc.metric("toolsight_exports_total{result=\"malformed\",transport=\"grpc\"}")
            .await,
        1.0
    );
    assert_eq!(
        svc.metric("toolsight_exports_total{result=\"too_large\",transport=\"grpc\"}")
            .await,
        1.0
    );
    svc.stop().await.unwrap();
}

/// Sends raw bytes on a new connection to `addr`; returns the stream.
async fn raw(addr: std::net::SocketAddr, bytes: &[u8]) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    s
}

/// Reads what the server sends until it closes the connection.
async fn read_to_close(s: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut out = Vec::new();
    tokio::time::timeout(common::patience(), s.read_to_end(&mut out))
        .await
        .expect("the server closes the connection")
        .ok();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_bodies_lose_their_slot_and_their_connection() {
    let svc = Service::start_with("hostile_slow", |c| {
        c.otlp.max_concurrent_exports = 4;
        c.otlp.body_timeout = std::time::Duration::from_secs(2);
    })
    .await;
    // Four clients declare a 10 MB body and send one byte of it.
    let head = b"POST /v1/traces HTTP/1.1\r\nhost: t\r\ncontent-type: application/x-protobuf\r\ncontent-length: 10000000\r\n\r\nx";
    let mut slow = Vec::new();
    for _ in 0..4 {
        slow.push(raw(svc.http, head).await);
    }
    common::eventually("the slow exports to hold every slot", || async {
        (svc.metric("toolsight_exports_in_progress").await == 4.0).then_some(())
    })
    .await;
    // Each is cut at the body timeout: 408, connection closed, counted; the slots are free.
    for s in &mut slow {
        let answer = read_to_close(s).await;
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    }
    assert_eq!(
        svc.metric("toolsight_exports_total{result=\"body_timeout\",transport=\"http_protobuf\"}")
            .await,
        4.0
    );
    still_serving(&svc, 1).await;
    svc.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_http1_client_reads_the_status_not_a_broken_pipe() {
    let svc = Service::start_with("hostile_refused_body", |c| {
        c.auth.tokens = vec![toolsight::receive::auth::TokenConfig {
            name: "t".into(),
            token: toolsight::secret::Secret::new("a-token-0123456789"),
            services: vec![],
        }];
    })
    .await;
    // A 4 MiB body sent whole without a token: refused before it is read (401), yet the client
    // can send all of it and then read the answer.
    let body = vec![0u8; 4 << 20];
    let mut req = format!(
        "POST /v1/traces HTTP/1.1\r\nhost: t\r\ncontent-type: application/x-protobuf\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(&body);
    for _ in 0..5 {
        let mut s = raw(svc.http, &req).await;
        let answer = read_to_close(&mut s).await;
        assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    }
    svc.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_are_closed_on_every_port() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let svc = Service::start_with("hostile_idle", |c| {
        c.otlp.idle_timeout = std::time::Duration::from_secs(2);
    })
    .await;
    let mut conns = Vec::new();
    // Nothing sent, on each port.
    for addr in [svc.http, svc.grpc, svc.admin] {
        for _ in 0..20 {
            conns.push(tokio::net::TcpStream::connect(addr).await.unwrap());
        }
    }
    // The HTTP/2 preface and nothing more, on the gRPC port.
    for _ in 0..20 {
        conns.push(raw(svc.grpc, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await);
    }
    // A finished HTTP/1.1 request on a kept-alive connection.
    let mut kept = raw(svc.admin, b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n").await;
    let mut first = [0u8; 12];
    kept.read_exact(&mut first).await.unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    conns.push(kept);
    for c in &mut conns {
        let _ = read_to_close(c).await;
    }
    for (listener, n) in [("http", 20.0), ("grpc", 40.0), ("admin", 21.0)] {
        assert_eq!(
            svc.metric(&format!(
                "toolsight_connections_closed_total{{listener=\"{listener}\",reason=\"idle\"}}"
            ))
            .await,
            n,
            "{listener}"
        );
    }
    // An export in progress is not idle: a request whose answer takes longer than the idle
    // timeout (the writer is stalled) still gets it.
    let lock = stall(&svc).await;
    let slow = spawn_pb(&svc, request(vec![span(1, vec![])]));
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    lock.rollback().await.unwrap();
    assert_eq!(slow.await.unwrap(), 200);
    let mut s = raw(svc.http, b"").await;
    s.shutdown().await.ok();
    still_serving(&svc, 2).await;
    svc.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_bound_keeps_the_admin_port_and_recovers() {
    let svc = Service::start_with("hostile_conn_limit", |c| {
        c.otlp.max_connections = 10;
        c.otlp.idle_timeout = std::time::Duration::from_secs(3);
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..10 {
        held.push(tokio::net::TcpStream::connect(svc.http).await.unwrap());
    }
    common::eventually("10 open connections", || async {
        (svc.metric("toolsight_connections_open{listener=\"http\"}")
            .await
            == 10.0)
            .then_some(())
    })
    .await;
    // The 11th is closed at once and counted; the admin port answers all the same.
    let mut extra = tokio::net::TcpStream::connect(svc.http).await.unwrap();
    assert_eq!(read_to_close(&mut extra).await, "");
    assert_eq!(
        svc.metric("toolsight_connections_closed_total{listener=\"http\",reason=\"limit\"}")
            .await,
        1.0
    );
    let ready = reqwest::get(format!("http://{}/readyz", svc.admin))
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    // The held connections go idle and are closed; exports are served again.
    for c in &mut held {
        let _ = read_to_close(c).await;
    }
    still_serving(&svc, 3).await;
    svc.stop().await.unwrap();
}

/// The resident memory of this process (the service runs in it), in MiB.
fn rss_mib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kib / 1024
}

/// An export of `n` empty spans: 2 bytes each on the wire.
fn empty_spans(n: usize) -> Vec<u8> {
    let mut scope = Vec::with_capacity(n * 2);
    for _ in 0..n {
        scope.extend_from_slice(&[0x12, 0x00]); // ScopeSpans.spans: an empty Span
    }
    let nest = |tag: u8, inner: Vec<u8>| {
        let mut out = vec![tag];
        prost::encoding::encode_varint(inner.len() as u64, &mut out);
        out.extend(inner);
        out
    };
    // ExportTraceServiceRequest.resource_spans(1) → ResourceSpans.scope_spans(2) → spans.
    nest(0x0a, nest(0x12, scope))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_bodies_that_decode_huge_are_refused_before_decoding() {
    use std::io::Write;
    let svc = Service::start_with("hostile_amplification", |c| {
        c.otlp.max_request_bytes = 8 << 20;
        c.otlp.max_decompressed_bytes = 16 << 20;
        // One export may take 32 MiB decoded.
        c.otlp.decode_budget_bytes = 64 << 20;
    })
    .await;
    // 200,000 empty spans (400 KB on the wire) for gRPC: over the 32 MiB once decoded.
    let grpc_req = ExportTraceServiceRequest::decode(empty_spans(200_000).as_slice()).unwrap();
    let before = rss_mib();
    // 8 MiB of empty spans (4 million), gzipped to a few KiB: gigabytes once decoded.
    let body = empty_spans(4 << 20);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&body).unwrap();
    let gz = gz.finish().unwrap();
    assert!(gz.len() < 64 << 10, "{}", gz.len());
    let send = || {
        reqwest::Client::new()
            .post(svc.http_url())
            .header("content-type", "application/x-protobuf")
            .header("content-encoding", "gzip")
            .body(gz.clone())
            .send()
    };
    let (a, b) = tokio::join!(send(), send());
    for r in [a.unwrap(), b.unwrap()] {
        assert_eq!(r.status(), 413, "{:?}", r.text().await);
    }
    // The same over gRPC, gzip-compressed.
    let mut client = TraceServiceClient::connect(format!("http://{}", svc.grpc))
        .await
        .unwrap()
        .send_compressed(tonic::codec::CompressionEncoding::Gzip)
        .max_encoding_message_size(64 << 20);
    let err = client.export(grpc_req).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    let after = rss_mib();
    // Before the budget, one such export took the process past 800 MiB.
    assert!(
        after < before + 200,
        "RSS grew from {before} MiB to {after} MiB"
    );
    assert_eq!(
        svc.metric("toolsight_exports_total{result=\"too_large\",transport=\"http_protobuf\"}")
            .await,
        2.0
    );
    still_serving(&svc, 5).await;
    svc.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_with_slow_clients_connected_drains_within_the_bound() {
    let url = common::fresh_database("hostile_sigterm").await;
    let dir = std::env::temp_dir().join(format!("toolsight-sigterm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("toolsight.toml");
    std::fs::write(
        &config,
        format!(
            "[database]\nurl = \"{url}\"\n[otlp]\ndrain_timeout = \"2s\"\nbody_timeout = \"10m\"\n"
        ),
    )
    .unwrap();
    let mut child = common::serve_ready(&config, &[]).await;
    // Three clients in the middle of a slow body, and one export that completes.
    let head = b"POST /v1/traces HTTP/1.1\r\nhost: t\r\ncontent-type: application/x-protobuf\r\ncontent-length: 10000000\r\n\r\nx";
    let mut slow = Vec::new();
    for _ in 0..3 {
        slow.push(raw(child.http, head).await);
    }
    common::eventually("the slow exports in progress", || async {
        (common::metric_value(child.admin, "toolsight_exports_in_progress").await == 3.0)
            .then_some(())
    })
    .await;
    let r = reqwest::Client::new()
        .post(child.http_url())
        .header("content-type", "application/x-protobuf")
        .body(request(vec![span(1, vec![])]).encode_to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let pid = child.process.0.id().to_string();
    common::output(std::process::Command::new("kill").args(["-TERM", &pid]));
    let status = common::eventually("the service to exit", || {
        let exited = child.process.0.try_wait().unwrap();
        async move { exited }
    })
    .await;
    assert!(status.success(), "{status}");
    // The slow clients were cut at the drain bound, not answered at their 10-minute body timeout.
    for s in &mut slow {
        let answer = read_to_close(s).await;
        assert!(!answer.contains("408"), "{answer}");
    }
    let log = std::fs::read_to_string(&child.log).unwrap();
    assert!(log.contains("at the drain timeout"), "{log}");
    assert!(!log.contains("closed pool"), "{log}");
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM tool_calls")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(stored, 1, "the acknowledged export");
    pool.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_streams_sending_headers_only_give_their_slots_back() {
    let svc = Service::start_with("hostile_grpc_headers", |c| {
        c.otlp.max_concurrent_exports = 8;
        // gRPC exports get twice this from headers to answer.
        c.otlp.body_timeout = std::time::Duration::from_secs(1);
    })
    .await;
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    // Eight gRPC exports on one HTTP/2 connection whose bodies never come.
    let mut hanging = Vec::new();
    for _ in 0..8 {
        let never = futures_util::stream::pending::<Result<Vec<u8>, std::io::Error>>();
        let send = client
            .post(format!(
                "http://{}/opentelemetry.proto.collector.trace.v1.TraceService/Export",
                svc.grpc
            ))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(reqwest::Body::wrap_stream(never))
            .send();
        hanging.push(tokio::spawn(send));
    }
    common::eventually("the eight exports to hold every slot", || async {
        (svc.metric("toolsight_exports_in_progress").await == 8.0).then_some(())
    })
    .await;
    // Each is answered DEADLINE_EXCEEDED (retryable) at its deadline, counted, and the slots
    // come back.
    for h in hanging {
        let r = h.await.unwrap().unwrap();
        assert_eq!(
            r.headers()
                .get("grpc-status")
                .map(|v| v.to_str().unwrap().to_owned()),
            Some("4".to_string()),
            "DEADLINE_EXCEEDED"
        );
    }
    assert_eq!(
        svc.metric("toolsight_exports_total{result=\"timeout\",transport=\"grpc\"}")
            .await,
        8.0
    );
    assert_eq!(svc.metric("toolsight_exports_in_progress").await, 0.0);
    let mut grpc = TraceServiceClient::connect(format!("http://{}", svc.grpc))
        .await
        .unwrap();
    grpc.export(request(vec![span(1, vec![])])).await.unwrap();
    svc.stop().await.unwrap();
}
