//! OTLP forwarding: a toolsight with `[forward]` targets passes every accepted export on to
//! other real OTLP receivers (here, two more toolsight services: one over gRPC with TLS and a
//! bearer token, one over HTTP taking MCP exports only), and a dead or hanging upstream
//! neither slows nor fails ingest.

use crate::common;
use crate::ingest_e2e::{SpanSpec, export, span_data, workload};
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use common::{Service, eventually};
use opentelemetry::KeyValue;
use opentelemetry::trace::{SpanKind, Status};
use toolsight::forward::{Compression, Protocol, Target};
use toolsight::receive::auth::TokenConfig;
use toolsight::secret::Secret;

fn target(name: &str, protocol: Protocol, endpoint: String) -> Target {
    let mut t: Target =
        toml::from_str(&format!("name = \"{name}\"\nendpoint = \"{endpoint}\"\n")).unwrap();
    t.protocol = protocol;
    t
}

/// An export no MCP tool call or request is in: an LLM call and a database query.
fn not_mcp() -> Vec<opentelemetry_sdk::trace::SpanData> {
    let start = SystemTime::now() - Duration::from_secs(10);
    vec![
        span_data(
            77,
            1,
            start,
            SpanSpec {
                name: "chat gpt-4o",
                kind: SpanKind::Client,
                ms: 500,
                status: Status::Unset,
                attrs: vec![
                    KeyValue::new("gen_ai.operation.name", "chat"),
                    KeyValue::new("gen_ai.request.model", "gpt-4o"),
                    KeyValue::new("gen_ai.usage.input_tokens", 100),
                ],
            },
        ),
        span_data(
            77,
            2,
            start,
            SpanSpec {
                name: "SELECT",
                kind: SpanKind::Client,
                ms: 3,
                status: Status::Unset,
                attrs: vec![KeyValue::new("db.system.name", "postgresql")],
            },
        ),
    ]
}

/// The tool calls of a database, in a comparable form.
async fn calls(svc: &Service) -> Vec<(String, String, String, String, i64, String)> {
    sqlx::query_as(
        "SELECT service, tool, side, outcome, duration_us, encode(trace_id, 'hex') FROM tool_calls
         ORDER BY service, tool, side, duration_us, trace_id",
    )
    .fetch_all(&svc.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_exports_reach_other_otlp_receivers_as_they_came() {
    let pki = crate::tls_e2e::pki("forward");
    // b: OTLP/gRPC over TLS (a private CA), a bearer token required.
    let b = Service::start_with("forward_b", |c| {
        c.tls.cert_file = Some(pki.dir.join("server.pem"));
        c.tls.key_file = Some(pki.dir.join("server.key"));
        c.tls.plain_admin = true;
        c.auth.tokens = vec![TokenConfig {
            name: "upstream".into(),
            token: Secret::new("forward-secret"),
            services: vec!["*".into()],
        }];
    })
    .await;
    // c: OTLP/HTTP, plain.
    let c = Service::start("forward_c").await;
    let (b_grpc, c_http) = (b.grpc.port(), c.http);
    let a = Service::start_with("forward_a", move |cfg| {
        let mut to_b = target("b", Protocol::Grpc, format!("https://localhost:{b_grpc}"));
        to_b.ca_file = Some(pki.dir.join("ca.pem"));
        to_b.compression = Compression::Gzip;
        to_b.headers = BTreeMap::from([(
            "Authorization".to_string(),
            Secret::new("Bearer forward-secret"),
        )]);
        // No path: `/v1/traces` is added.
        let mut to_c = target("c", Protocol::Http, format!("http://{c_http}"));
        to_c.mcp_only = true;
        cfg.forward.targets = vec![to_b, to_c];
    })
    .await;

    let per_export = workload(1).len() as f64;
    export("grpc", &a, "agent-grpc", workload(1_000)).await;
    export("http-json", &a, "agent-json", workload(2_000)).await;
    export("http-protobuf", &a, "agent-proto", workload(3_000)).await;
    export("http-protobuf", &a, "agent-llm", not_mcp()).await;

    let sent = |target: &'static str| {
        let a = a.admin;
        move || async move {
            let m = common::scrape(a).await;
            let n = |result: &str| {
                common::sample(
                    &m,
                    &format!(
                        "toolsight_forward_exports_total{{target=\"{target}\",result=\"{result}\"}}"
                    ),
                )
                .unwrap_or(0.0)
            };
            let lost = ["failed", "rejected", "queue_full"]
                .map(n)
                .iter()
                .sum::<f64>();
            (n("sent") + n("filtered") + lost >= 4.0).then(|| (n("sent"), n("filtered"), lost))
        }
    };
    assert_eq!(
        eventually("b's forwarding", sent("b")).await,
        (4.0, 0.0, 0.0)
    );
    assert_eq!(
        eventually("c's forwarding", sent("c")).await,
        (3.0, 1.0, 0.0)
    );

    // b received every span of every export over gRPC, JSON included (as protobuf), and
    // stored the same tool calls as a.
    assert_eq!(
        b.metric("toolsight_spans_received_total{transport=\"grpc\"}")
            .await,
        3.0 * per_export + 2.0
    );
    let from_a = calls(&a).await;
    assert_eq!(from_a.len(), 36, "12 tool calls per MCP export");
    assert_eq!(calls(&b).await, from_a);
    // c received the MCP exports in their own formats (the JSON one as JSON, the gRPC and
    // protobuf ones as protobuf), not the other.
    assert_eq!(
        c.metric("toolsight_spans_received_total{transport=\"http_json\"}")
            .await,
        per_export
    );
    assert_eq!(
        c.metric("toolsight_spans_received_total{transport=\"http_protobuf\"}")
            .await,
        2.0 * per_export
    );
    assert_eq!(
        c.metric("toolsight_spans_received_total{transport=\"grpc\"}")
            .await,
        0.0
    );
    assert_eq!(calls(&c).await, calls(&b).await);
    assert_eq!(
        c.count("SELECT count(*) FROM llm_calls WHERE service = 'agent-llm'")
            .await,
        0
    );
    assert_eq!(
        b.count("SELECT count(*) FROM llm_calls WHERE service = 'agent-llm'")
            .await,
        1
    );
    a.stop().await.unwrap();
}

/// Accepts connections and never answers.
async fn black_hole() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_or_hanging_upstream_neither_slows_nor_fails_ingest() {
    let hole = black_hole().await;
    let closed = common::free_port();
    let live = Service::start("forward_live").await;
    let live_http = live.http;
    let a = Service::start_with("forward_hurt", move |cfg| {
        let mut hang = target("hang", Protocol::Http, format!("http://{hole}/v1/traces"));
        hang.timeout = Duration::from_secs(3);
        hang.queue_exports = 2;
        hang.concurrency = 1;
        hang.max_retries = 1;
        hang.retry_initial = Duration::from_millis(100);
        let mut dead = target("dead", Protocol::Grpc, format!("http://127.0.0.1:{closed}"));
        dead.max_retries = 2;
        dead.retry_initial = Duration::from_millis(50);
        dead.retry_max = Duration::from_millis(100);
        let live = target(
            "live",
            Protocol::Http,
            format!("http://{live_http}/v1/traces"),
        );
        cfg.forward.targets = vec![hang, dead, live];
    })
    .await;

    for i in 0..10u128 {
        export("http-protobuf", &a, "agent", workload(10_000 * (i + 1))).await;
    }
    // Every export was accepted and stored while one upstream hung and one refused.
    assert_eq!(a.count("SELECT count(*) FROM tool_calls").await, 120);

    let results = |target: &'static str| {
        let admin = a.admin;
        move || async move {
            let m = common::scrape(admin).await;
            let n = |result: &str| {
                common::sample(
                    &m,
                    &format!(
                        "toolsight_forward_exports_total{{target=\"{target}\",result=\"{result}\"}}"
                    ),
                )
                .unwrap_or(0.0)
            };
            let all = ["sent", "queue_full", "failed", "rejected"].map(n);
            (all.iter().sum::<f64>() >= 10.0).then_some(all)
        }
    };
    // The live target got all ten, not held back by the others.
    assert_eq!(
        eventually("live", results("live")).await,
        [10.0, 0.0, 0.0, 0.0]
    );
    assert_eq!(
        live.metric("toolsight_spans_received_total{transport=\"http_protobuf\"}")
            .await,
        10.0 * workload(1).len() as f64
    );
    // The refusing one: each export tried three times, then dropped and counted.
    assert_eq!(
        eventually("dead", results("dead")).await,
        [0.0, 0.0, 10.0, 0.0]
    );
    assert_eq!(
        a.metric("toolsight_forward_retries_total{target=\"dead\"}")
            .await,
        20.0
    );
    // The hanging one: one send in flight, one waiting for it and two queued at most (each
    // holding its place for two 3 s timeouts); the rest dropped at once.
    let [sent, queue_full, failed, rejected] = eventually("hang", results("hang")).await;
    assert_eq!((sent, rejected), (0.0, 0.0));
    assert!(queue_full >= 6.0, "queue_full {queue_full}");
    assert_eq!(queue_full + failed, 10.0);
    assert_eq!(
        a.metric("toolsight_forward_queue_bytes{target=\"hang\"}")
            .await,
        0.0
    );
    a.stop().await.unwrap();
}

/// An OTLP/HTTP receiver that keeps every body it gets, with its content type and encoding.
async fn capture() -> (
    std::net::SocketAddr,
    std::sync::Arc<std::sync::Mutex<Vec<(String, String, Vec<u8>)>>>,
) {
    let got = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let kept = got.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let kept = kept.clone();
                async move {
                    let h = |k: &str| {
                        headers
                            .get(k)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_owned()
                    };
                    kept.lock().unwrap().push((
                        h("content-type"),
                        h("content-encoding"),
                        body.to_vec(),
                    ));
                    (
                        [("content-type", "application/x-protobuf")],
                        Vec::<u8>::new(),
                    )
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, got)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_bytes_are_the_bytes_received() {
    use prost::Message;
    let (addr, got) = capture().await;
    let a = Service::start_with("forward_bytes", move |cfg| {
        cfg.forward.targets = vec![target("capture", Protocol::Http, format!("http://{addr}"))];
    })
    .await;
    let mut spans = common::spans::Spans::new();
    spans.tool("lookup", chrono::Utc::now(), 20, false, vec![]);
    let json = spans.body();
    // The same export as protobuf, sent gzip-compressed.
    let req: opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest =
        serde_json::from_slice(&spans.body_for("svc-proto")).unwrap();
    let proto = req.encode_to_vec();
    let gz = {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(&proto).unwrap();
        e.finish().unwrap()
    };
    common::spans::send_body(&a, json.clone()).await;
    let r = reqwest::Client::new()
        .post(a.http_url())
        .header("content-type", "application/x-protobuf")
        .header("content-encoding", "gzip")
        .body(gz)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let got = eventually("both forwarded", || {
        let got = got.clone();
        async move {
            let g = got.lock().unwrap().clone();
            (g.len() >= 2).then_some(g)
        }
    })
    .await;
    assert_eq!(
        got,
        vec![
            ("application/json".to_string(), String::new(), json),
            ("application/x-protobuf".to_string(), String::new(), proto),
        ],
        "byte for byte, as received (decompressed)"
    );
    a.stop().await.unwrap();
}
