//! End to end with a real MCP server: FastMCP 4.x with its native OpenTelemetry tracing, called
//! by a FastMCP client, exporting to the running service with the official Python exporter of
//! each protocol (gRPC, HTTP/protobuf, HTTP/JSON), set up as the README shows.
//!
//! The Python environment is created on first use under the cargo target directory (or taken
//! from `TOOLSIGHT_TEST_PYTHON`): `python3 -m venv` and pip, from PyPI.

use crate::common;
use std::path::PathBuf;
use std::process::Command;

use common::Service;
use common::python::run;

const REQUIREMENTS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fastmcp/requirements.txt"
);
const DEMO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fastmcp/mcp_demo.py");
const AGENT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fastmcp/agent_demo.py");
const HTTP_CLIENTS: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fastmcp/http_clients_demo.py"
);
const TWO_PROCESSES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fastmcp/two_process_demo.py"
);

const SDK1: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mcp1/sdk1_demo.py");
const SDK1_REQUIREMENTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/mcp1/requirements.txt");

/// A Python interpreter with the MCP SDK 1.x, Logfire and OpenLLMetry's MCP instrumentation.
fn python_sdk1() -> PathBuf {
    common::python::venv(
        "mcp1-venv",
        "import mcp, logfire, opentelemetry.instrumentation.mcp, \
         opentelemetry.exporter.otlp.proto.http",
        |pip| run(pip().args(["-r", SDK1_REQUIREMENTS])),
    )
}

/// A Python interpreter with FastMCP 4.1.6 and the OTLP exporter.
fn python() -> PathBuf {
    if let Ok(p) = std::env::var("TOOLSIGHT_TEST_PYTHON") {
        return PathBuf::from(p);
    }
    common::python::venv(
        "fastmcp-venv",
        "import fastmcp, opentelemetry.exporter.otlp.proto.http, \
         opentelemetry.exporter.otlp.proto.grpc, opentelemetry.exporter.otlp.json.http, \
         openai, opentelemetry.instrumentation.openai_v2, \
         opentelemetry.instrumentation.requests, opentelemetry.instrumentation.httpx, logfire",
        |pip| {
            run(pip().args(["-r", REQUIREMENTS]));
            run(pip().args(["--no-deps", "fastmcp==4.1.6", "fastmcp-slim==4.1.6"]));
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fastmcp_server_and_client_traced_into_postgres() {
    let python = tokio::task::spawn_blocking(python).await.unwrap();
    for protocol in ["grpc", "http/protobuf", "http/json"] {
        let svc = Service::start("fastmcp").await;
        // The README's environment: a base endpoint, the exporter picked by the protocol.
        let endpoint = match protocol {
            "grpc" => format!("http://{}", svc.grpc),
            _ => format!("http://{}", svc.http),
        };
        run_script(
            &python,
            &[DEMO, "fastmcp-e2e"],
            vec![
                ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol.to_owned()),
            ],
        )
        .await;
        // Each exporter speaks its own encoding (the JSON one must not send protobuf).
        let transport = match protocol {
            "grpc" => "grpc",
            "http/json" => "http_json",
            _ => "http_protobuf",
        };
        assert!(
            svc.metric(&format!(
                "toolsight_spans_received_total{{transport=\"{transport}\"}}"
            ))
            .await
                > 0.0,
            "{protocol}: spans arrive over {transport}"
        );
        check_demo_rows(&svc, protocol).await;
        svc.stop().await.unwrap();
    }
}

/// A FastMCP server and client in two processes, over streamable HTTP and over stdio, with the
/// current protocol and (over HTTP) the legacy one, each exporting every span
/// on its own (SimpleSpanProcessor): the sides of a call arrive in different exports from
/// different services, the server's often first, and the MCP SDK's `MCP send` span before
/// FastMCP's client span around it. Each call is stored once per side, with the outcome either
/// side saw, the tool name the client knew, and its transport overhead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_and_server_processes_are_joined_per_call() {
    let python = tokio::task::spawn_blocking(python).await.unwrap();
    for (transport, mode) in [("http", "auto"), ("stdio", "auto"), ("http", "legacy")] {
        let svc = Service::start(&format!("two_processes_{transport}_{mode}")).await;
        let endpoint = format!("http://{}", svc.http);
        // Over HTTP the server runs on its own; over stdio the client starts it.
        let mut server = None;
        let target = if transport == "http" {
            let port = common::free_port();
            let log = std::env::temp_dir().join(format!("toolsight-two-processes-{port}.log"));
            let out = std::fs::File::create(&log).unwrap();
            server = Some(common::Process(
                Command::new(&python)
                    .args([TWO_PROCESSES, "server", &port.to_string()])
                    .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
                    .stdout(out.try_clone().unwrap())
                    .stderr(out)
                    .spawn()
                    .unwrap(),
            ));
            common::eventually("the MCP server listening", || async {
                tokio::net::TcpStream::connect(("127.0.0.1", port))
                    .await
                    .ok()
            })
            .await;
            format!("http://127.0.0.1:{port}/mcp")
        } else {
            "stdio".to_owned()
        };
        run_script(
            &python,
            &[TWO_PROCESSES, "client", &target, mode],
            vec![("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)],
        )
        .await;
        common::eventually("all 14 server calls stored", || async {
            (svc.count("SELECT count(*) FROM tool_calls WHERE service = 'demo-server'")
                .await
                == 14)
                .then_some(())
        })
        .await;
        drop(server);
        check_two_processes(&svc, &format!("{transport} ({mode} protocol)")).await;
        // The legacy protocol has stable sessions; under the current one the client's process
        // is its session.
        let source = if mode == "legacy" {
            "mcp.session.id"
        } else {
            "service.instance.id"
        };
        assert_eq!(
            svc.count(&format!(
                "SELECT count(*) FROM tool_calls
                 WHERE side = 'client' AND counted AND session_source <> '{source}'"
            ))
            .await,
            0,
            "{transport} ({mode})"
        );
        svc.stop().await.unwrap();
    }
}

async fn check_two_processes(svc: &Service, transport: &str) {
    type Row = (String, String, String, String, String, i64);
    let table: Vec<Row> = sqlx::query_as(
        "SELECT tool, side, outcome, coalesce(own_outcome, ''),
                CASE WHEN error_type = 'rate_limited' THEN 'rate_limited' ELSE '' END, count(*)
         FROM tool_calls WHERE counted GROUP BY 1, 2, 3, 4, 5 ORDER BY 1, 2, 3, 4, 5",
    )
    .fetch_all(&svc.pool)
    .await
    .unwrap();
    let want: Vec<Row> = [
        ("fail_tool", "client", "error", "", "", 6),
        ("fail_tool", "server", "error", "", "", 6),
        ("limited", "client", "error", "", "rate_limited", 2),
        ("limited", "client", "ok", "", "", 2),
        // Refused before the tool was resolved: named by the client side.
        ("limited", "server", "error", "", "rate_limited", 2),
        ("limited", "server", "ok", "", "", 2),
        ("list_items", "client", "ok", "", "", 1),
        ("list_items", "server", "ok", "", "", 1),
        ("rows", "client", "ok", "", "", 1),
        ("rows", "server", "ok", "", "", 1),
        // The client gave up after 0.5 s; the server finished "ok" 3 s later.
        ("slow", "client", "cancelled", "", "", 1),
        ("slow", "server", "cancelled", "ok", "", 1),
        // FastMCP's server span stays UNSET for an isError result it did not raise.
        ("soft_fail", "client", "error", "", "", 1),
        ("soft_fail", "server", "error", "ok", "", 1),
    ]
    .into_iter()
    .map(|(t, s, o, own, e, n)| (t.into(), s.into(), o.into(), own.into(), e.into(), n))
    .collect();
    assert_eq!(table, want, "{transport}: per call and side");
    // Every call joined once; each `MCP send` span (exported before FastMCP's) counted with it.
    assert_eq!(
        svc.count(
            "SELECT count(*) FROM tool_calls WHERE side = 'client' AND peer_span_id IS NOT NULL"
        )
        .await,
        14
    );
    assert_eq!(
        svc.count("SELECT count(*) FROM tool_calls WHERE NOT counted")
            .await,
        14
    );
    assert_eq!(
        svc.count("SELECT count(*) FROM tool_calls WHERE overhead_us >= 0")
            .await,
        13,
        "every joined client call but the cancelled one has an overhead"
    );
    assert_eq!(common::rollup_mismatches(&svc.pool).await, vec![]);
    // FastMCP captures no result content: sizes and emptiness are unknown, never 0 or false.
    assert_eq!(
        svc.count(
            "SELECT count(*) FROM tool_calls
             WHERE result_empty IS NOT NULL OR result_bytes IS NOT NULL OR result_items IS NOT NULL"
        )
        .await,
        0,
        "{transport}"
    );
    let tools = toolsight::store::queries::tool_summary(&svc.pool, 3600)
        .await
        .unwrap();
    let rows_client = tools
        .iter()
        .find(|t| t.tool == "rows" && t.side == "client")
        .unwrap();
    assert_eq!((rows_client.calls, rows_client.joined_calls), (1, 1));
    assert!(rows_client.mean_overhead_ms.is_some_and(|m| m >= 0.0));
    assert!(
        tools.iter().all(|t| t.tool != "(unknown)"),
        "no call left unnamed: {tools:?}"
    );
    // The stuck agent is one retry loop of 6 calls, the client's process its session: a call
    // traced in two processes counts once.
    let fired = retry_loops(svc).await;
    assert_eq!(fired.len(), 1, "{transport}: {fired:?}");
    assert_eq!(fired[0].labels["tool"], "fail_tool");
    assert_eq!(fired[0].labels["service"], "demo-client");
    assert_eq!(fired[0].value, Some(6.0), "{transport}: a call is one call");
}

/// Logfire and OpenLLMetry on an MCP SDK 1.x server and client over stdio and over streamable HTTP
/// (and the SDK 2.x's own tracing, alone and under Logfire, on the same workload), each process
/// exporting span by span: OpenLLMetry's server side is only its `ResponseStreamWriter` spans (named by the
/// client side once joined), Logfire leaves both spans OK for a tool error (its `response` says
/// it) and exports every span twice (stored once). Per call and side: one row, the outcome either
/// side saw, the result the server captured.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_sdk_1x_and_2x_instrumentations_are_joined_per_call() {
    let sdk1 = tokio::task::spawn_blocking(python_sdk1).await.unwrap();
    // The same workload on mcp 2.3 with the SDK's own tracing, alone and under Logfire (its client
    // span stays UNSET for a tool error: the server side says it).
    let sdk2 = tokio::task::spawn_blocking(python).await.unwrap();
    // Logfire on mcp 2.x hands the tracing to the SDK's own spans.
    let runs = [
        (&sdk1, "logfire", false),
        (&sdk1, "openllmetry", false),
        (&sdk2, "sdk", true),
        (&sdk2, "logfire", true),
    ]
    .into_iter()
    // Over stdio with OTLP/HTTP protobuf, over streamable HTTP with OTLP/HTTP JSON.
    .flat_map(|run| [(run, "stdio", "http/protobuf"), (run, "http", "http/json")]);
    for ((python, instrumentation, mcp2), transport, protocol) in runs {
        let case = format!(
            "{instrumentation}{} over {transport}",
            if mcp2 { " on mcp 2.x" } else { "" }
        );
        let svc = Service::start(&format!(
            "sdk_{instrumentation}_{}_{transport}",
            u8::from(mcp2)
        ))
        .await;
        run_script(
            python,
            &[SDK1, instrumentation, transport],
            vec![
                (
                    "OTEL_EXPORTER_OTLP_ENDPOINT",
                    format!("http://{}", svc.http),
                ),
                ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol.to_owned()),
            ],
        )
        .await;
        let server = format!("mcp1-{instrumentation}-server");
        common::eventually("the server side of all 15 calls", || async {
            (svc.count(&format!(
                "SELECT count(*) FROM tool_calls WHERE service = '{server}' AND counted"
            ))
            .await
                == 15)
                .then_some(())
        })
        .await;
        type Row = (String, String, String, String, i64);
        let table: Vec<Row> = sqlx::query_as(
            "SELECT tool, side, outcome, coalesce(own_outcome, ''), count(*) FROM tool_calls
             WHERE counted GROUP BY 1, 2, 3, 4 ORDER BY 1, 2, 3, 4",
        )
        .fetch_all(&svc.pool)
        .await
        .unwrap();
        let want: Vec<Row> = [
            ("echo", "client", "ok", "", 2),
            ("echo", "server", "ok", "", 2),
            // The SDK's client span reported the tool error as "ok".
            (
                "fail_tool",
                "client",
                "error",
                if mcp2 { "ok" } else { "" },
                6,
            ),
            ("fail_tool", "server", "error", "", 6),
            (
                "limited",
                "client",
                "error",
                if mcp2 { "ok" } else { "" },
                1,
            ),
            ("limited", "client", "ok", "", 2),
            ("limited", "server", "error", "", 1),
            ("limited", "server", "ok", "", 2),
            ("list_items", "client", "ok", "", 1),
            ("list_items", "server", "ok", "", 1),
            ("rows", "client", "ok", "", 1),
            ("rows", "server", "ok", "", 1),
            ("slow", "client", "cancelled", "", 1),
            // The server finished "ok" after the client had given up.
            ("slow", "server", "cancelled", "ok", 1),
            // An isError result the tool returned without raising.
            (
                "soft_fail",
                "client",
                "error",
                if mcp2 { "ok" } else { "" },
                1,
            ),
            ("soft_fail", "server", "error", "", 1),
        ]
        .into_iter()
        .map(|(t, s, o, own, n)| (t.into(), s.into(), o.into(), own.into(), n))
        .collect();
        assert_eq!(table, want, "{case}: per call and side");
        assert_eq!(
            svc.count(common::JOINED_PAIRS).await,
            15,
            "{case}: every call joined once"
        );
        // The server captured whole results: 3 rows, an empty list.
        let (items, empty): (Option<i32>, Option<bool>) = sqlx::query_as(
            "SELECT (SELECT result_items FROM tool_calls WHERE side = 'server' AND tool = 'rows'),
                    (SELECT result_empty FROM tool_calls WHERE side = 'server' AND tool = 'list_items')",
        )
        .fetch_one(&svc.pool)
        .await
        .unwrap();
        // The SDK's own tracing captures no content: unknown, not empty.
        let captured = if mcp2 {
            (None, None)
        } else {
            (Some(3), Some(true))
        };
        assert_eq!((items, empty), captured, "{case}");
        assert_eq!(common::rollup_mismatches(&svc.pool).await, vec![], "{case}");
        // The agent's task is one trace and none of these instrumentations sets a session id
        // or an instance id: both sides of every call are one session, keyed on the trace.
        let sessions: Vec<(String, i64)> = sqlx::query_as(
            "SELECT session_source, count(DISTINCT session_key) FROM tool_calls
             WHERE counted GROUP BY 1",
        )
        .fetch_all(&svc.pool)
        .await
        .unwrap();
        assert_eq!(sessions, [("trace_id".to_owned(), 1)], "{case}: sessions");
        assert_eq!(
            svc.count(
                "SELECT count(*) FROM tool_calls
                 WHERE tool = 'limited' AND counted AND error_type = 'rate_limited'"
            )
            .await,
            // The SDK 2.x's spans of a refused call carry no message and no content: an error,
            // not recognisable as a rate limit.
            if mcp2 { 0 } else { 2 },
            "{case}: the refusal is a rate limit on both sides"
        );
        let fired = retry_loops(&svc).await;
        assert_eq!(fired.len(), 1, "{case}: {fired:?}");
        assert_eq!(fired[0].labels["tool"], "fail_tool");
        assert_eq!(fired[0].value, Some(6.0), "{case}: a call is one call");
        svc.stop().await.unwrap();
    }
}

/// The `requests` and `httpx` instrumentations write captured response headers with
/// underscores (`http.response.header.x_ratelimit_remaining`), as string arrays: remaining,
/// limit, reset and Retry-After are all read, live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_client_instrumentations_report_rate_limit_headers() {
    let python = tokio::task::spawn_blocking(python).await.unwrap();
    let svc = Service::start("http_clients").await;
    run_script(
        &python,
        &[HTTP_CLIENTS],
        vec![
            (
                "OTEL_EXPORTER_OTLP_ENDPOINT",
                format!("http://{}", svc.http),
            ),
            (
                "OTEL_INSTRUMENTATION_HTTP_CAPTURE_HEADERS_CLIENT_RESPONSE",
                "x-ratelimit-remaining,x-ratelimit-limit,x-ratelimit-reset,retry-after".into(),
            ),
        ],
    )
    .await;
    type Row = (
        Option<i32>,
        Option<f64>,
        Option<f64>,
        Option<f64>,
        Option<f64>,
    );
    let rows: Vec<Row> = sqlx::query_as(
        "SELECT status_code, ratelimit_remaining, ratelimit_limit,
                extract(epoch FROM ratelimit_reset_at - start_time)::float8, retry_after_s
         FROM upstream_calls WHERE server_address = '127.0.0.1' ORDER BY start_time",
    )
    .fetch_all(&svc.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 5, "{rows:?}");
    let remaining: Vec<Option<f64>> = rows.iter().map(|r| r.1).collect();
    assert_eq!(
        remaining,
        [Some(40.0), Some(20.0), Some(10.0), Some(9.0), Some(0.0)],
        "requests, then httpx"
    );
    assert!(rows.iter().all(|r| r.2 == Some(100.0)), "{rows:?}");
    assert!(
        rows.iter()
            .all(|r| r.3.is_some_and(|s| (55.0..=62.0).contains(&s))),
        "reset 60 s ahead (an epoch): {rows:?}"
    );
    assert_eq!((rows[4].0, rows[4].4), (Some(429), Some(30.0)));
    assert!(rows[..4].iter().all(|r| r.4.is_none()));
    let (limited, lowest): (i64, Option<f64>) = sqlx::query_as(
        "SELECT sum(rate_limited)::int8, min(min_remaining_ratio) FROM upstream_rollup_1m
         WHERE server_address = '127.0.0.1'",
    )
    .fetch_one(&svc.pool)
    .await
    .unwrap();
    assert_eq!((limited, lowest), (1, Some(0.0)));
    svc.stop().await.unwrap();
}

/// The demo's calls, each counted once per side with its outcome.
async fn check_demo_rows(svc: &Service, protocol: &str) {
    let rows: Vec<(String, String, i64, i64)> = sqlx::query_as(
        "SELECT tool, side, count(*), count(*) FILTER (WHERE outcome = 'error')
         FROM tool_calls WHERE service = 'fastmcp-e2e' AND counted GROUP BY 1, 2 ORDER BY 1, 2",
    )
    .fetch_all(&svc.pool)
    .await
    .unwrap();
    let expected: Vec<(String, String, i64, i64)> = [
        ("echo", "client", 2, 0),
        ("echo", "server", 2, 0),
        ("fail_tool", "client", 6, 6),
        ("fail_tool", "server", 6, 6),
        ("list_items", "client", 1, 0),
        ("list_items", "server", 1, 0),
    ]
    .into_iter()
    .map(|(t, s, n, e)| (t.to_owned(), s.to_owned(), n, e))
    .collect();
    // One call counted once per side, although FastMCP emits three spans per call (an SDK span
    // the exporter sent apart from FastMCP's is stored as a link, `counted = false`).
    assert_eq!(rows, expected, "{protocol}");
    assert_eq!(
        svc.count(
            "SELECT count(*) FROM tool_calls WHERE tool = 'fail_tool' AND error_type = 'tool_error' AND counted"
        )
        .await,
        12
    );
    // FastMCP captures no result content: nothing may be marked empty (or non-empty).
    assert_eq!(
        svc.count("SELECT count(*) FROM tool_calls WHERE result_empty IS NOT NULL")
            .await,
        0
    );
    assert_eq!(
        svc.count("SELECT count(*) FROM tool_calls WHERE source = 'fastmcp'")
            .await,
        18
    );
    // The default (2026-07-28) protocol has no sessions. The server's session is the trace;
    // the client opens no span around its calls, so its process (the SDK's
    // service.instance.id) is one session for all of them.
    assert_eq!(
        svc.count(
            "SELECT count(*) FROM tool_calls WHERE side = 'server' AND session_source <> 'trace_id'"
        )
        .await,
        0
    );
    assert_eq!(
        svc.count(
            "SELECT count(DISTINCT session_key) FROM tool_calls
             WHERE side = 'client' AND counted AND session_source = 'service.instance.id'
               AND session_key LIKE 'instance:%'"
        )
        .await,
        1,
        "{protocol}"
    );
    assert_eq!(
        svc.count("SELECT count(*) FROM tool_calls WHERE side = 'client' AND counted AND session_source <> 'service.instance.id'")
            .await,
        0
    );
    assert_eq!(
        svc.count("SELECT sum(calls)::bigint FROM tool_rollup_1m WHERE service = 'fastmcp-e2e'")
            .await,
        18
    );
    assert!(
        svc.count("SELECT count(*) FROM mcp_requests WHERE method = 'tools/list'")
            .await
            >= 1
    );
    assert!(
        svc.metric("toolsight_spans_dropped_total{reason=\"nested_client_span\"}")
            .await
            >= 4.0
    );
    // Client and server of one process: each call's two sides joined.
    assert_eq!(
        svc.count(
            "SELECT count(*) FROM tool_calls
             WHERE service = 'fastmcp-e2e' AND side = 'client' AND peer_span_id IS NOT NULL"
        )
        .await,
        9,
        "{protocol}"
    );
    // The stuck agent is one retry loop of 6 calls: client and server in one service count a
    // call once, FastMCP captures no arguments so the repeats are the failures, and the
    // client's process is the session.
    let fired = retry_loops(svc).await;
    assert_eq!(fired.len(), 1, "{protocol}: {fired:?}");
    assert_eq!(fired[0].labels["tool"], "fail_tool");
    assert!(fired[0].labels["session"].starts_with("instance:"));
    assert_eq!(fired[0].value, Some(6.0), "{protocol}: a call is one call");
    assert_eq!(
        fired[0].annotations["summary"],
        "got 6 failed or empty results from fail_tool (its arguments are not captured)"
    );
}

/// The firings of a retry-loop rule (5 repeats in 10 minutes) evaluated now.
async fn retry_loops(svc: &Service) -> Vec<toolsight::evaluate::engine::Notice> {
    let rules = toolsight::evaluate::rules::parse(
        "loop.yaml",
        "groups:
  - name: loop
    interval: 1m
    rules:
      - alert: Loop
        kind: retry_loop
        window: 10m
        min_repeats: 5
        min_samples: 5
        annotations: {summary: '{{ $reason }}'}
",
    )
    .unwrap();
    let mut ev = toolsight::evaluate::run::Evaluator::new(
        svc.pool.clone(),
        vec![("loop.yaml".to_owned(), rules)],
    );
    ev.evaluate_all_at(chrono::Utc::now() + chrono::Duration::seconds(1))
        .await
        .unwrap()
}

/// An OpenAI-compatible chat endpoint: the k-th completion reports 100·k prompt tokens and
/// 10·k completion tokens, as model `gpt-test-2026`.
async fn model_server() -> std::net::SocketAddr {
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move || {
            let k = calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            async move {
                axum::Json(serde_json::json!({
                    "id": format!("chatcmpl-{k}"), "object": "chat.completion", "created": 0,
                    "model": "gpt-test-2026",
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": "ok"}}],
                    "usage": {"prompt_tokens": 100 * k, "completion_tokens": 10 * k,
                              "total_tokens": 110 * k}
                }))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// A GenAI instrumentation live: an agent (one span per run) calls a model through the OpenAI
/// client, traced by opentelemetry-instrumentation-openai-v2, and tools through FastMCP. Tokens
/// per session and per model are exact, and the token session is the tool calls' session.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_with_model_and_tool_calls_keys_tokens_on_its_tool_session() {
    let python = tokio::task::spawn_blocking(python).await.unwrap();
    let svc = Service::start("genai_agent").await;
    let model = model_server().await;
    let endpoint = format!("http://{}", svc.http);
    run_script(
        &python,
        &[AGENT, "agent-e2e", "2", "2"],
        vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf".to_owned()),
            ("OPENAI_BASE_URL", format!("http://{model}/v1")),
        ],
    )
    .await;
    // Two runs of two steps: completions 1-2 in the first run, 3-4 in the second.
    let per_session: Vec<(String, String, i64, i64)> = sqlx::query_as(
        "SELECT session_key, model, sum(input_tokens)::bigint, sum(output_tokens)::bigint
         FROM llm_calls WHERE service = 'agent-e2e' GROUP BY 1, 2 ORDER BY 3",
    )
    .fetch_all(&svc.pool)
    .await
    .unwrap();
    let totals: Vec<(&str, i64, i64)> = per_session
        .iter()
        .map(|(_, m, i, o)| (m.as_str(), *i, *o))
        .collect();
    assert_eq!(
        totals,
        [("gpt-test-2026", 300, 30), ("gpt-test-2026", 700, 70)],
        "{per_session:?}"
    );
    // Each run's tokens key on the session of that run's tool calls (client side).
    for (session, ..) in &per_session {
        assert_eq!(
            svc.count(&format!(
                "SELECT count(*) FROM tool_calls WHERE service = 'agent-e2e' AND side = 'client'
                 AND tool = 'lookup' AND session_key = '{session}'"
            ))
            .await,
            2,
            "session {session}"
        );
    }
    assert_eq!(
        svc.count(
            "SELECT sum(input_tokens)::bigint FROM llm_rollup_1m WHERE service = 'agent-e2e'"
        )
        .await,
        1000
    );
    assert_eq!(
        svc.count(
            "SELECT sum(output_tokens)::bigint FROM llm_rollup_1m WHERE service = 'agent-e2e'"
        )
        .await,
        100
    );
    svc.stop().await.unwrap();
}

/// Runs a Python script of `tests/fastmcp` with `args` and `env`; fails the test with its output
/// when it fails.
async fn run_script(python: &std::path::Path, args: &[&str], env: Vec<(&'static str, String)>) {
    let mut cmd = Command::new(python);
    cmd.args(args).envs(env);
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
