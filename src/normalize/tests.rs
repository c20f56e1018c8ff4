//! The normalizer on real captured payloads of every supported source.

use std::collections::BTreeMap;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use prost::Message;

use super::*;

fn json_fixture(path: &str) -> ExportTraceServiceRequest {
    let full = format!("{}/tests/fixtures/{path}", env!("CARGO_MANIFEST_DIR"));
    let body = std::fs::read(&full).unwrap_or_else(|e| panic!("{full}: {e}"));
    serde_json::from_slice(&body).unwrap_or_else(|e| panic!("{full}: {e}"))
}

fn pb_fixture(path: &str) -> ExportTraceServiceRequest {
    let full = format!("{}/tests/fixtures/{path}", env!("CARGO_MANIFEST_DIR"));
    ExportTraceServiceRequest::decode(std::fs::read(full).unwrap().as_slice()).unwrap()
}

/// `now` = the first span's start, so the fixtures' fixed timestamps are in range.
fn run(req: &ExportTraceServiceRequest) -> Normalized {
    run_with(req, &Options::default())
}

fn run_with(req: &ExportTraceServiceRequest, opts: &Options) -> Normalized {
    let now = req.resource_spans[0].scope_spans[0].spans[0].start_time_unix_nano as i64;
    normalize(req, now, opts)
}

fn calls(n: &Normalized, side: Side) -> Vec<&ToolCall> {
    n.tool_calls.iter().filter(|c| c.side == side).collect()
}

fn by_tool<'a>(calls: &[&'a ToolCall]) -> BTreeMap<&'a str, Vec<&'a ToolCall>> {
    let mut m: BTreeMap<&str, Vec<&ToolCall>> = BTreeMap::new();
    for c in calls {
        m.entry(c.tool.as_str()).or_default().push(c);
    }
    m
}

fn dropped(n: &Normalized, r: DropReason) -> u64 {
    n.dropped
        .iter()
        .find(|(k, _)| *k == r)
        .map_or(0, |(_, v)| *v)
}

const TOOLS: [&str; 7] = [
    "big_text",
    "crash_tool",
    "echo",
    "fail_tool",
    "list_items",
    "no_such_tool",
    "slow",
];

#[test]
fn fastmcp_counts_each_call_once_per_side() {
    let n = run(&json_fixture("fastmcp/inproc-auto.json"));
    assert_eq!(n.spans, 32);
    assert_eq!(n.rejected_total(), 0);
    let client = calls(&n, Side::Client);
    let server = calls(&n, Side::Server);
    // 9 calls: one FastMCP client span each; the 9 nested `MCP send` spans are dropped, and
    // so is the one nested in FastMCP's `tools/list` client span.
    assert_eq!(client.len(), 9);
    assert_eq!(server.len(), 9);
    assert_eq!(dropped(&n, DropReason::NestedClientSpan), 10);
    assert_eq!(
        n.mcp_requests
            .iter()
            .filter(|m| m.side == Side::Client)
            .count(),
        2,
        "tools/list and server/discover"
    );
    assert!(n.tool_calls.iter().all(|c| c.source == Source::Fastmcp));
    let c = by_tool(&client);
    assert_eq!(c.keys().copied().collect::<Vec<_>>(), TOOLS);
    assert_eq!(c["echo"].len(), 3);
    assert_eq!(c["fail_tool"][0].outcome, Outcome::Error);
    assert_eq!(c["fail_tool"][0].error_type.as_deref(), Some("tool_error"));
    assert_eq!(c["list_items"][0].outcome, Outcome::Ok);
    // The 0.5 s client timeout: cancelled on the client, UNSET (ok) on the server.
    assert_eq!(c["slow"][0].outcome, Outcome::Cancelled);
    let s = by_tool(&server);
    assert_eq!(s["slow"][0].outcome, Outcome::Ok);
    assert_eq!(
        s["no_such_tool"][0].error_type.as_deref(),
        Some("NotFoundError")
    );
    assert_eq!(
        s["echo"]
            .iter()
            .filter(|c| c.outcome == Outcome::Error)
            .count(),
        1
    );
    assert_eq!(
        s["echo"]
            .iter()
            .find(|c| c.outcome == Outcome::Error)
            .unwrap()
            .error_type
            .as_deref(),
        Some("ValidationError")
    );
    // FastMCP captures no content: no result shape, no argument hash.
    assert!(
        n.tool_calls
            .iter()
            .all(|c| c.result.is_none() && c.args_hash.is_none())
    );
    // 2026-07-28: `mcp.session.id` is random per request. The server side's session is then
    // the trace; the client's calls (root spans: the client opened no span of its own) belong
    // to its process, so repeated calls of one client are one session.
    assert!(
        server
            .iter()
            .all(|c| c.session_source == SessionSource::TraceId)
    );
    assert_eq!(
        s["echo"][0].session_key,
        hex::encode(s["echo"][0].span.trace_id)
    );
    let instance = client[0].span.service_instance.clone().unwrap();
    assert!(
        client
            .iter()
            .all(|c| c.session_source == SessionSource::Instance
                && c.session_key == format!("instance:{instance}"))
    );
    // Other methods are counted per method.
    let methods: Vec<(&str, Side)> = n
        .mcp_requests
        .iter()
        .map(|m| (m.method.as_str(), m.side))
        .collect();
    assert!(methods.contains(&("tools/list", Side::Client)));
    assert!(methods.contains(&("server/discover", Side::Server)));
    assert_eq!(c["big_text"][0].span.service, "demo-fastmcp-client");
}

#[test]
fn protobuf_and_json_bodies_normalize_identically() {
    let pb = run(&pb_fixture("fastmcp/inproc-auto.pb"));
    let js = run(&json_fixture("fastmcp/inproc-auto.json"));
    assert_eq!(pb.tool_calls, js.tool_calls);
    assert_eq!(pb.mcp_requests, js.mcp_requests);
}

#[test]
fn nested_sdk_span_in_the_same_export_is_kept_as_the_outer_calls_link() {
    let req = json_fixture("fastmcp/stdio-auto-client.json");
    let n = run(&req);
    let client = calls(&n, Side::Client);
    assert_eq!(client.len(), 9);
    // Every FastMCP client call carries the id and request id of the SDK span nested in it:
    // the server span's parent is that span.
    for c in &client {
        let inner = c.inner_span_id.expect("nested span id kept");
        let nested = req
            .resource_spans
            .iter()
            .flat_map(|rs| &rs.scope_spans)
            .flat_map(|ss| &ss.spans)
            .find(|s| s.span_id.as_slice() == inner.as_slice())
            .expect("the nested span is in the export");
        assert_eq!(nested.parent_span_id.as_slice(), c.span.span_id.as_slice());
        assert!(
            nested.name.starts_with("MCP send tools/call"),
            "{}",
            nested.name
        );
        assert!(
            c.request_id.is_some(),
            "request id taken from the nested span"
        );
    }
    // The SDK's spans alone (the outer spans travel in another export): nothing here says a
    // FastMCP span wraps them, so they are calls; the store joins them with their outer span.
    let mut only_sdk = req.clone();
    for rs in &mut only_sdk.resource_spans {
        rs.scope_spans.retain(|ss| {
            ss.scope
                .as_ref()
                .is_some_and(|s| s.name == "mcp-python-sdk")
        });
    }
    let alone = run(&only_sdk);
    assert_eq!(alone.tool_calls.len(), 9);
    assert!(alone.tool_calls.iter().all(|c| c.inner_span_id.is_none()));
}

#[test]
fn fastmcp_parentless_tools_list_noise_is_not_a_tool_call() {
    let n = run(&json_fixture("fastmcp/http-auto-server.json"));
    assert_eq!(n.tool_calls.len(), 9);
    let lists: Vec<&McpRequest> = n
        .mcp_requests
        .iter()
        .filter(|m| m.method == "tools/list")
        .collect();
    assert_eq!(lists.len(), 8);
    assert_eq!(
        lists.iter().filter(|m| m.orphan).count(),
        7,
        "7 parent-less validation spans"
    );
}

#[test]
fn fastmcp_legacy_sessions_are_stable() {
    let server = run(&json_fixture("fastmcp/http-legacy-server.json"));
    assert_eq!(server.tool_calls.len(), 9);
    assert!(
        server
            .tool_calls
            .iter()
            .all(|c| c.session_source == SessionSource::McpSessionId)
    );
    let sessions: std::collections::HashSet<&str> = server
        .tool_calls
        .iter()
        .map(|c| c.session_key.as_str())
        .collect();
    assert_eq!(sessions.len(), 1, "one HTTP session for the whole client");
    let client = run(&json_fixture("fastmcp/http-legacy-client.json"));
    assert_eq!(calls(&client, Side::Client).len(), 9);
    assert!(
        client
            .tool_calls
            .iter()
            .all(|c| c.session_key == *sessions.iter().next().unwrap())
    );
}

#[test]
fn mcp_sdk_client_and_server_spans() {
    let client = run(&json_fixture("mcp-sdk/stdio-auto-client.json"));
    let c = calls(&client, Side::Client);
    assert_eq!(
        c.len(),
        9,
        "no FastMCP client here: the `MCP send` spans are the calls"
    );
    assert!(c.iter().all(|c| c.source == Source::McpSdk));
    let c = by_tool(&c);
    assert_eq!(c.keys().copied().collect::<Vec<_>>(), TOOLS);
    // isError results leave the SDK client span UNSET: nothing to see client-side.
    assert_eq!(c["fail_tool"][0].outcome, Outcome::Ok);
    assert_eq!(c["slow"][0].outcome, Outcome::Cancelled);
    assert!(c["echo"][0].request_id.is_some());

    let server = run(&json_fixture("mcp-sdk/stdio-auto-server.json"));
    let s = by_tool(&calls(&server, Side::Server));
    assert_eq!(s.values().map(Vec::len).sum::<usize>(), 9);
    assert_eq!(s["fail_tool"][0].outcome, Outcome::Error);
    assert_eq!(s["fail_tool"][0].error_type.as_deref(), Some("tool_error"));
    assert!(
        server
            .mcp_requests
            .iter()
            .any(|m| m.method == "notifications/cancelled" && m.orphan)
    );
}

#[test]
fn traceloop_client_spans_carry_arguments_and_results() {
    let n = run(&json_fixture("traceloop/sdk1-stdio-client.json"));
    let c = calls(&n, Side::Client);
    assert_eq!(c.len(), 9);
    assert!(c.iter().all(|c| c.source == Source::Traceloop));
    let c = by_tool(&c);
    assert_eq!(c.keys().copied().collect::<Vec<_>>(), TOOLS);
    // list_items returned `[]`: OpenLLMetry omits the output, the input shows capture is on.
    let li = c["list_items"][0].result.unwrap();
    assert!(li.empty);
    assert_eq!(li.items, Some(0));
    let fail = c["fail_tool"][0];
    assert_eq!(
        (fail.outcome, fail.error_type.as_deref()),
        (Outcome::Error, Some("tool_error"))
    );
    assert_eq!(fail.result.unwrap().is_error, Some(true));
    // The client keeps only the first content part: not empty, but size and items unknown
    // (a 5-row result would otherwise count the first row's keys).
    let big = c["big_text"][0].result.unwrap();
    assert!(!big.empty);
    assert_eq!((big.bytes, big.items), (None, None));
    for (tool, calls) in &c {
        for call in calls
            .iter()
            .filter(|c| *tool != "list_items" && c.result.is_some())
        {
            let r = call.result.unwrap();
            assert_eq!((r.bytes, r.items), (None, None), "{tool}: partial content");
        }
    }
    // Same arguments, same hash; different arguments, different hash.
    let echo = &c["echo"];
    assert_eq!(echo[0].args_hash, echo[1].args_hash);
    assert!(echo[0].args_hash.is_some());
    assert_ne!(echo[0].args_hash, echo[2].args_hash);
    assert_eq!(c["slow"][0].outcome, Outcome::Cancelled);
    // Nothing stored whole by default.
    assert!(
        n.tool_calls
            .iter()
            .all(|c| c.args_redacted.is_none() && c.result_redacted.is_none())
    );
    assert!(n.mcp_requests.iter().any(|m| m.method == "tools/list"));
    assert!(
        dropped(&n, DropReason::TransportSpan) >= 9,
        "ResponseStreamWriter spans"
    );
}

#[test]
fn traceloop_fastmcp2_server_tool_spans() {
    let n = run(&json_fixture("traceloop/fastmcp2-stdio-server.json"));
    let s = by_tool(&calls(&n, Side::Server));
    assert!(calls(&n, Side::Client).is_empty());
    let li = s["list_items"][0].result.unwrap();
    assert!(li.empty, "output `[]`");
    assert_eq!(s["fail_tool"][0].error_type.as_deref(), Some("ToolError"));
    assert_eq!(s["echo"][0].result.unwrap().items, Some(1));
}

#[test]
fn a_client_writer_span_without_its_tool_span_is_kept_as_a_link() {
    // Span by span (SimpleSpanProcessor): the client writer span ends, and is exported, before
    // the tool span around it.
    let req = json_fixture("traceloop/sdk1-stdio-client.json");
    let mut alone = req.clone();
    for rs in &mut alone.resource_spans {
        for ss in &mut rs.scope_spans {
            ss.spans.retain(|s| s.name == "ResponseStreamWriter");
        }
    }
    let n = run(&alone);
    let links: Vec<&ToolCall> = n.tool_calls.iter().filter(|c| !c.counted).collect();
    assert_eq!(
        n.tool_calls.len(),
        links.len(),
        "links only, nothing counted"
    );
    assert!(links.len() >= 9, "{}", links.len());
    assert!(
        links
            .iter()
            .all(|c| c.request_id.is_some() && c.side == Side::Client)
    );
    // With the tool spans in the same export they are not stored at all.
    assert!(run(&req).tool_calls.iter().all(|c| c.counted));
}

#[test]
fn traceloop_mcp1_server_calls_are_their_response_writers() {
    // The mcp-1.x server side is only `ResponseStreamWriter` spans: the 8 `tools/call`
    // responses are server calls (the tool's name comes from the client when both are stored),
    // `initialize` and `tools/list` responses are transport.
    let n = run(&json_fixture("traceloop/sdk1-stdio-server.json"));
    let server = calls(&n, Side::Server);
    assert_eq!(server.len(), 8);
    assert_eq!(dropped(&n, DropReason::TransportSpan), 2);
    assert!(
        server
            .iter()
            .all(|c| c.tool == "(unknown)" && c.source == Source::Traceloop)
    );
    let by_id: BTreeMap<&str, &ToolCall> = server
        .iter()
        .map(|c| (c.request_id.as_deref().unwrap(), *c))
        .collect();
    // Request ids 2..9: list_items, fail_tool, crash_tool, big_text, echo, echo, no_such_tool, echo {}.
    assert!(by_id["2"].result.unwrap().empty);
    assert_eq!(by_id["3"].outcome, Outcome::Error);
    assert_eq!(by_id["4"].outcome, Outcome::Error);
    assert_eq!(by_id["5"].outcome, Outcome::Ok);
    assert!(
        by_id["5"].result.unwrap().bytes.unwrap() > 64 * 1024,
        "the full result"
    );
    assert_eq!(by_id["8"].outcome, Outcome::Error);
    // The client's tool spans carry the request id and span id of their nested writer span,
    // whose child is the server's writer span.
    let client = run(&json_fixture("traceloop/sdk1-stdio-client.json"));
    let echo_client: Vec<&ToolCall> = client
        .tool_calls
        .iter()
        .filter(|c| c.tool == "echo")
        .collect();
    assert_eq!(echo_client[0].request_id.as_deref(), Some("6"));
    let server_echo = by_id["6"];
    assert_eq!(
        server_echo.span.parent_span_id,
        echo_client[0].inner_span_id
    );
}

#[test]
fn logfire_client_and_server_spans() {
    let client = run(&json_fixture("logfire/sdk1-stdio-client.json"));
    let c = by_tool(&calls(&client, Side::Client));
    assert_eq!(c.keys().copied().collect::<Vec<_>>(), TOOLS);
    assert!(
        client
            .tool_calls
            .iter()
            .all(|c| c.source == Source::Logfire)
    );
    let li = c["list_items"][0].result.unwrap();
    assert!(li.empty && li.items == Some(0));
    // Logfire leaves the span OK for isError results; the response says it.
    assert_eq!(c["fail_tool"][0].outcome, Outcome::Error);
    assert_eq!(c["fail_tool"][0].error_type.as_deref(), Some("tool_error"));
    assert_eq!(c["echo"][0].args_hash, c["echo"][1].args_hash);
    assert!(c["big_text"][0].result.unwrap().bytes > Some(64 * 1024));
    assert!(
        client
            .mcp_requests
            .iter()
            .any(|m| m.method == "initialize" && m.side == Side::Client)
    );

    let server = run(&json_fixture("logfire/sdk1-stdio-server.json"));
    let s = by_tool(&calls(&server, Side::Server));
    assert_eq!(s["fail_tool"][0].outcome, Outcome::Error);
    assert!(s["list_items"][0].result.unwrap().empty);
    assert_eq!(
        s["slow"][0].outcome,
        Outcome::Cancelled,
        "CancelledError on the server"
    );
}

#[test]
fn redacted_copies_are_opt_in() {
    let opts = Options {
        redactor: Some(Redactor {
            keys: vec!["reason".into()],
            patterns: vec![],
            max_bytes: 256,
        }),
        ..Options::default()
    };
    let n = run_with(&json_fixture("traceloop/sdk1-stdio-client.json"), &opts);
    let fail = n.tool_calls.iter().find(|c| c.tool == "fail_tool").unwrap();
    assert_eq!(
        fail.args_redacted.as_deref(),
        Some(r#"{"reason":"[REDACTED]"}"#)
    );
    let big = n.tool_calls.iter().find(|c| c.tool == "big_text").unwrap();
    assert!(big.result_redacted.as_ref().unwrap().len() <= 260);
}

mod synthetic {
    use super::*;
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value::Value};
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};

    const NOW: i64 = 1_800_000_000_000_000_000;

    fn kv(k: &str, v: Value) -> KeyValue {
        KeyValue {
            key_strindex: 0,
            key: k.into(),
            value: Some(AnyValue { value: Some(v) }),
        }
    }
    fn s(v: &str) -> Value {
        Value::StringValue(v.into())
    }

    fn span(name: &str, kind: SpanKind, attributes: Vec<KeyValue>) -> Span {
        Span {
            trace_id: vec![1; 16],
            span_id: vec![2; 8],
            name: name.into(),
            kind: kind as i32,
            start_time_unix_nano: NOW as u64,
            end_time_unix_nano: NOW as u64 + 250_000_000,
            attributes,
            ..Default::default()
        }
    }

    fn request(spans: Vec<Span>) -> ExportTraceServiceRequest {
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![kv("service.name", s("agent"))],
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

    fn norm(spans: Vec<Span>) -> Normalized {
        normalize(&request(spans), NOW, &Options::default())
    }

    #[test]
    fn semconv_tool_call_with_content_and_conversation() {
        let n = norm(vec![span(
            "tools/call search",
            SpanKind::Client,
            vec![
                kv("mcp.method.name", s("tools/call")),
                kv("gen_ai.tool.name", s("search")),
                kv("gen_ai.conversation.id", s("conv-1")),
                kv("gen_ai.tool.call.arguments", s(r#"{"q":"x"}"#)),
                kv(
                    "gen_ai.tool.call.result",
                    s(r#"{"content":[{"type":"text","text":"[1,2]"}]}"#),
                ),
            ],
        )]);
        let c = &n.tool_calls[0];
        assert_eq!(
            (c.tool.as_str(), c.side, c.source),
            ("search", Side::Client, Source::Semconv)
        );
        assert_eq!(
            (c.session_key.as_str(), c.session_source),
            ("conv-1", SessionSource::ConversationId)
        );
        assert_eq!(c.result.unwrap().items, Some(2));
        assert_eq!(c.span.duration_us, 250_000);
        assert!(c.args_hash.is_some());
    }

    #[test]
    fn llm_usage_current_and_older_names() {
        let n = norm(vec![
            span(
                "chat gpt-4o",
                SpanKind::Client,
                vec![
                    kv("gen_ai.operation.name", s("chat")),
                    kv("gen_ai.request.model", s("gpt-4o")),
                    kv("gen_ai.usage.input_tokens", Value::IntValue(1200)),
                    kv("gen_ai.usage.output_tokens", Value::IntValue(80)),
                    kv("session.id", s("sess-9")),
                ],
            ),
            span(
                "openai.chat",
                SpanKind::Client,
                vec![
                    kv("llm.request.model", s("gpt-3.5")),
                    kv(
                        "gen_ai.usage.prompt_tokens",
                        Value::StringValue("300".into()),
                    ),
                    kv("gen_ai.usage.completion_tokens", Value::IntValue(20)),
                ],
            ),
        ]);
        assert_eq!(n.llm_calls.len(), 2);
        let a = &n.llm_calls[0];
        assert_eq!(
            (a.model.as_str(), a.input_tokens, a.output_tokens),
            ("gpt-4o", 1200, 80)
        );
        assert_eq!(
            (a.session_key.as_str(), a.session_source),
            ("sess-9", SessionSource::SessionId)
        );
        let b = &n.llm_calls[1];
        assert_eq!(
            (
                b.model.as_str(),
                b.input_tokens,
                b.output_tokens,
                b.operation.as_str()
            ),
            ("gpt-3.5", 300, 20, "chat")
        );
    }

    #[test]
    fn upstream_http_call_with_rate_limit() {
        let n = norm(vec![span(
            "GET",
            SpanKind::Client,
            vec![
                kv("http.request.method", s("GET")),
                kv("url.full", s("https://api.github.com/search")),
                kv("http.response.status_code", Value::IntValue(429)),
                kv("http.response.header.x-ratelimit-remaining", s("0")),
                kv("http.response.header.x-ratelimit-limit", s("30")),
                kv("http.response.header.retry-after", s("20")),
            ],
        )]);
        let u = &n.upstream_calls[0];
        assert_eq!(u.server_address, "api.github.com");
        assert_eq!(u.status_code, Some(429));
        assert_eq!(
            (u.rate_limit.remaining, u.rate_limit.limit),
            (Some(0.0), Some(30.0))
        );
        assert_eq!(
            u.rate_limit.reset_at_unix_nanos,
            Some(NOW + 250_000_000 + 20_000_000_000)
        );
    }

    #[test]
    fn other_spans_are_counted_and_dropped() {
        let n = norm(vec![
            span(
                "SELECT",
                SpanKind::Client,
                vec![kv("db.system", s("postgresql"))],
            ),
            span(
                "GET /",
                SpanKind::Server,
                vec![kv("http.request.method", s("GET"))],
            ),
        ]);
        assert_eq!(n.records(), 0);
        assert_eq!(dropped(&n, DropReason::NotModelled), 2);
    }

    #[test]
    fn malformed_spans_are_rejected_with_a_reason() {
        let mut bad_trace = span("a", SpanKind::Client, vec![]);
        bad_trace.trace_id = vec![1; 3];
        let mut bad_span = span("b", SpanKind::Client, vec![]);
        bad_span.span_id = vec![];
        let mut backwards = span("c", SpanKind::Client, vec![]);
        backwards.end_time_unix_nano = 5;
        let mut ancient = span("d", SpanKind::Client, vec![]);
        ancient.start_time_unix_nano = 1_000_000_000;
        ancient.end_time_unix_nano = 2_000_000_000;
        let n = norm(vec![
            bad_trace,
            bad_span,
            backwards,
            ancient,
            span("ok", SpanKind::Client, vec![]),
        ]);
        assert_eq!(n.rejected_total(), 4);
        assert_eq!(n.spans, 5);
        for r in RejectReason::ALL {
            assert!(n.rejected.iter().any(|(k, v)| *k == r && *v == 1), "{r:?}");
        }
        assert!(n.first_rejection.unwrap().starts_with("invalid_trace_id"));
    }

    /// Logfire writes `[Scrubbed due to '<word>']` for values it judges sensitive. Such a value
    /// never becomes a tool name, a session key or an arguments hash; each skip is counted.
    #[test]
    fn scrubbed_values_are_not_data() {
        let n = norm(vec![
            span(
                "MCP request: tools/call auth_lookup",
                SpanKind::Internal,
                vec![
                    kv(
                        "request",
                        s(
                            r#"{"method":"tools/call","params":{"name":"[Scrubbed due to 'auth']","arguments":{"user":"[Scrubbed due to 'auth']"}}}"#,
                        ),
                    ),
                    kv("gen_ai.conversation.id", s("[Scrubbed due to 'session']")),
                ],
            ),
            span(
                "tools/call lookup",
                SpanKind::Server,
                vec![
                    kv("mcp.method.name", s("tools/call")),
                    kv("gen_ai.tool.name", s("lookup")),
                    kv("mcp.session.id", s("[Scrubbed due to 'session']")),
                    kv("session.id", s("user-7")),
                    kv(
                        "gen_ai.tool.call.arguments",
                        s(r#"{"q":"[Scrubbed due to 'password']"}"#),
                    ),
                ],
            ),
            span(
                "tools/call lookup",
                SpanKind::Server,
                vec![
                    kv("mcp.method.name", s("tools/call")),
                    kv("gen_ai.tool.name", s("lookup")),
                    kv("gen_ai.tool.call.arguments", s(r#"{"q":"plain"}"#)),
                ],
            ),
            span(
                "chat m",
                SpanKind::Client,
                vec![
                    kv("gen_ai.request.model", s("m")),
                    kv("gen_ai.usage.input_tokens", Value::IntValue(10)),
                    kv("session.id", s("[Scrubbed due to 'session']")),
                ],
            ),
        ]);
        let trace = hex::encode([1u8; 16]);
        let [logfire, fastmcp, plain] = &n.tool_calls[..] else {
            panic!("three tool calls: {:?}", n.tool_calls)
        };
        assert_eq!(logfire.tool, "auth_lookup", "the span name has the tool");
        assert_eq!(logfire.args_hash, None, "scrubbed arguments are not hashed");
        assert_eq!(
            (logfire.session_key.as_str(), logfire.session_source),
            (trace.as_str(), SessionSource::TraceId)
        );
        assert_eq!(
            (fastmcp.session_key.as_str(), fastmcp.session_source),
            ("user-7", SessionSource::SessionId),
            "the next link of the chain, not a key every user shares"
        );
        assert_eq!(fastmcp.args_hash, None);
        assert!(plain.args_hash.is_some(), "unscrubbed arguments still hash");
        let llm = &n.llm_calls[0];
        assert_eq!(
            (llm.session_key.as_str(), llm.session_source),
            (trace.as_str(), SessionSource::TraceId)
        );
        // tool name, arguments, conversation id; session id, arguments; llm session id.
        assert_eq!(n.scrubbed, 6);
    }

    #[test]
    fn error_status_without_error_type_uses_exception_event() {
        let mut sp = span(
            "tools/call t",
            SpanKind::Server,
            vec![kv("mcp.method.name", s("tools/call"))],
        );
        sp.status = Some(Status {
            code: 2,
            message: "boom".into(),
        });
        sp.events
            .push(opentelemetry_proto::tonic::trace::v1::span::Event {
                name: "exception".into(),
                attributes: vec![kv("exception.type", s("ValueError"))],
                ..Default::default()
            });
        let n = norm(vec![sp]);
        assert_eq!(n.tool_calls[0].outcome, Outcome::Error);
        assert_eq!(n.tool_calls[0].error_type.as_deref(), Some("ValueError"));
        assert_eq!(n.tool_calls[0].tool, "t");
    }
}

/// Keys enter bounded: a 256 KiB tool name, service name and session id cost their bound, not
/// their size, in the cardinality guard, the rollups and the database.
#[test]
fn huge_keys_are_bounded_where_they_enter() {
    use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans};
    let kv = |k: &str, v: String| KeyValue {
        key: k.into(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(v)),
        }),
        ..Default::default()
    };
    let big = |c: &str| c.repeat(256 << 10);
    let span = Span {
        trace_id: vec![1; 16],
        span_id: vec![2; 8],
        name: "tools/call x".into(),
        kind: SpanKind::Server as i32,
        start_time_unix_nano: 1_700_000_000_000_000_000,
        end_time_unix_nano: 1_700_000_000_005_000_000,
        attributes: vec![
            kv("mcp.method.name", "tools/call".into()),
            kv("gen_ai.tool.name", big("t")),
            kv("gen_ai.conversation.id", big("s")),
        ],
        ..Default::default()
    };
    let req = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![kv("service.name", big("v"))],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans: vec![span],
                ..Default::default()
            }],
            ..Default::default()
        }],
    };
    let n = run(&req);
    let call = &n.tool_calls[0];
    assert!(call.tool.len() <= keys::MAX_NAME_BYTES && call.tool.starts_with("ttt"));
    assert!(call.span.service.len() <= keys::MAX_NAME_BYTES);
    assert!(call.session_key.len() <= keys::MAX_SESSION_BYTES);
    assert_eq!(call.session_source, SessionSource::ConversationId);
    assert_eq!(n.keys_cut, 3);
}
