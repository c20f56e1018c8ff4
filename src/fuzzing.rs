//! The bodies of the fuzz targets, shared by the `cargo fuzz` targets in `fuzz/` and by the
//! corpus replay test (`tests/it/fuzz_corpus.rs`), so every input the fuzzer ever kept is also
//! checked by `cargo test` on the stable toolchain.
//!
//! Each function takes arbitrary bytes, drives one layer that faces untrusted input the way the
//! receivers do, and panics when the layer crashes or an invariant of its output does not hold:
//! bad input must come back as a client error (400 / `INVALID_ARGUMENT`), every span must be
//! accounted for exactly once, no stored copy may contain a configured secret pattern, and the
//! cardinality guard must hold its bounds.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::sync::LazyLock;

use arbitrary::{Arbitrary, Unstructured};
use bytes::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{
    AnyValue, ArrayValue, InstrumentationScope, KeyValue, KeyValueList, any_value::Value,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::span::Event;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span, Status};
use prost::Message;
use regex::Regex;

use crate::config::Config;
use crate::normalize::{self, Normalized, cardinality};
use crate::receive::ReceiveError;
use crate::receive::http::{Format, decode, decompress};

/// The decompression limit the targets use (the service's default is larger; the behaviour at
/// the limit is what matters, and a small one keeps each run fast).
pub const DECODED_LIMIT: usize = 1 << 20;

/// The guard's bounds in the targets: small, so that inputs reach them.
const LIMITS: cardinality::Limits = cardinality::Limits {
    max_services: 3,
    max_keys_per_service: 4,
    max_sessions_per_hour: 5,
    max_trace_sessions_per_hour: 5,
};

/// Now, when a request carries no usable timestamp: 2026-11-01T00:00:00Z.
const DEFAULT_NOW: i64 = 1_793_491_200_000_000_000;

/// An OTLP/HTTP protobuf body (or a gRPC message: the same bytes).
pub fn otlp_protobuf(data: &[u8]) {
    // The decoded-size estimate never panics; refusing is the client's error.
    let estimate = crate::receive::budget::estimate_protobuf(data);
    if let Err(e) = &estimate {
        assert_client_error(e);
    }
    let req = match decode(Format::Protobuf, data) {
        Ok(r) => r,
        Err(e) => return assert_client_error(&e),
    };
    if let Ok(estimate) = estimate {
        assert_bounds_spans(estimate, &req);
    }
    // What decodes re-encodes to bytes that decode to the same message.
    let bytes = req.encode_to_vec();
    let again =
        ExportTraceServiceRequest::decode(bytes.as_slice()).expect("a re-encoded request decodes");
    assert_eq!(
        again.encode_to_vec(),
        bytes,
        "protobuf round trip changed the request"
    );
    check_normalize(&req);
}

/// An OTLP/HTTP JSON body.
pub fn otlp_json(data: &[u8]) {
    let req = match decode(Format::Json, data) {
        Ok(r) => r,
        Err(e) => return assert_client_error(&e),
    };
    assert_bounds_spans(crate::receive::budget::estimate_json(data), &req);
    check_normalize(&req);
}

/// The decoded-size estimate covers at least the span structs the decoder allocated.
fn assert_bounds_spans(estimate: usize, req: &ExportTraceServiceRequest) {
    let spans: usize = req
        .resource_spans
        .iter()
        .flat_map(|rs| &rs.scope_spans)
        .map(|ss| ss.spans.len())
        .sum();
    let structs = spans * std::mem::size_of::<opentelemetry_proto::tonic::trace::v1::Span>();
    assert!(
        estimate >= structs,
        "estimate {estimate} below the {structs} bytes of {spans} spans"
    );
}

/// A compressed body: the first byte picks the `Content-Encoding`, the rest is the body.
pub fn decompression(data: &[u8]) {
    const ENCODINGS: [&str; 7] = ["", "identity", "gzip", "x-gzip", "deflate", "zstd", "br"];
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let encoding = ENCODINGS[pick as usize % ENCODINGS.len()];
    match decompress(encoding, &Bytes::copy_from_slice(body), DECODED_LIMIT) {
        Ok(out) => {
            assert!(out.len() <= DECODED_LIMIT, "output beyond the limit");
            if matches!(encoding, "" | "identity") {
                assert_eq!(out.as_ref(), body);
            }
        }
        Err(e) => {
            assert_client_error(&e);
            if matches!(encoding, "" | "identity") {
                assert!(body.len() > DECODED_LIMIT, "identity body refused: {e}");
            }
        }
    }
    // The same bytes compressed by each encoder come back unchanged.
    if body.len() <= DECODED_LIMIT {
        for encoding in ["gzip", "deflate", "zstd"] {
            let compressed = compress(encoding, body);
            let out = decompress(encoding, &Bytes::from(compressed), DECODED_LIMIT)
                .unwrap_or_else(|e| panic!("{encoding} of our own encoder refused: {e}"));
            assert_eq!(out.as_ref(), body, "{encoding} round trip");
        }
    }
}

/// Spans built from the input out of the attribute keys, span names, scopes and values the
/// instrumentations send (so every recognition path of the normalizer is reached), then
/// normalized.
pub fn normalizer(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(req) = request(&mut u) else {
        return;
    };
    check_normalize(&req);
}

fn compress(encoding: &str, body: &[u8]) -> Vec<u8> {
    match encoding {
        "gzip" => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(body).expect("in memory");
            e.finish().expect("in memory")
        }
        "deflate" => {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(body).expect("in memory");
            e.finish().expect("in memory")
        }
        _ => zstd::encode_all(body, 1).expect("in memory"),
    }
}

fn assert_client_error(e: &ReceiveError) {
    assert!(
        matches!(
            e,
            ReceiveError::Malformed(_)
                | ReceiveError::TooLarge { .. }
                | ReceiveError::UnsupportedEncoding(_)
        ),
        "bad input answered as {e:?}"
    );
    assert!(
        (400..500).contains(&e.http_status()),
        "bad input answered {}: {e}",
        e.http_status()
    );
    assert!(!e.is_retryable(), "bad input called retryable: {e}");
}

/// The service's defaults with redacted copies on; built once (compiling the patterns would
/// dominate every run).
static CONFIG: LazyLock<(Config, normalize::Options)> = LazyLock::new(|| {
    let mut config = Config::default();
    config.privacy.store_redacted_content = true;
    let opts = config.normalize_options();
    (config, opts)
});

/// The secret-shaped patterns every stored copy is checked against: the defaults.
static SECRET_PATTERNS: LazyLock<Vec<Regex>> = LazyLock::new(|| {
    crate::normalize::DEFAULT_REDACT_PATTERNS
        .iter()
        .map(|p| Regex::new(p).expect("default patterns compile"))
        .collect()
});

/// Normalizes `req` as the service does (redacted copies on, default patterns) with `now` at
/// the request's latest span start, then applies a small cardinality guard; checks the
/// invariants of the output.
pub fn check_normalize(req: &ExportTraceServiceRequest) {
    let (config, opts) = &*CONFIG;
    let now = req
        .resource_spans
        .iter()
        .flat_map(|rs| &rs.scope_spans)
        .flat_map(|ss| &ss.spans)
        .map(|s| s.start_time_unix_nano)
        .filter(|&t| t > 0 && t <= i64::MAX as u64)
        .max()
        .map_or(DEFAULT_NOW, |t| t as i64);
    let mut n = normalize::normalize(req, now, opts);

    // Every span is accounted for exactly once.
    let spans: usize = req
        .resource_spans
        .iter()
        .flat_map(|rs| &rs.scope_spans)
        .map(|ss| ss.spans.len())
        .sum();
    assert_eq!(n.spans, spans as u64, "spans counted");
    let dropped: u64 = n.dropped.iter().map(|(_, c)| c).sum();
    assert_eq!(
        n.records() as u64 + n.rejected_total() + dropped,
        n.spans,
        "records + rejected + dropped != spans"
    );
    assert_eq!(n.first_rejection.is_some(), n.rejected_total() > 0);

    for s in spans_of(&n) {
        assert!(s.duration_us >= 0, "negative duration");
        assert!(
            s.start_unix_nanos >= now.saturating_sub(opts.max_age_nanos)
                && s.start_unix_nanos <= now.saturating_add(opts.max_future_nanos),
            "start outside the accepted window"
        );
    }

    let patterns = &*SECRET_PATTERNS;
    let max_bytes = config.privacy.max_redacted_bytes;
    for c in &n.tool_calls {
        assert!(!c.tool.is_empty(), "empty tool name");
        assert!(!c.session_key.is_empty(), "empty session key");
        if let Some(r) = &c.result {
            assert!(r.bytes.is_none_or(|b| b >= 0));
            // Items may be unknown (cut, or only part captured); where known they agree.
            if let Some(items) = r.items {
                assert_eq!(r.empty, items == 0, "empty vs items: {r:?}");
            }
        }
        for stored in [&c.args_redacted, &c.result_redacted].into_iter().flatten() {
            assert!(
                stored.len() <= max_bytes + '…'.len_utf8(),
                "stored copy of {} bytes",
                stored.len()
            );
            for p in patterns {
                assert!(
                    !p.is_match(stored),
                    "stored copy {stored:?} matches the secret pattern {p}"
                );
            }
        }
    }
    for l in &n.llm_calls {
        assert!(
            l.input_tokens >= 0 && l.output_tokens >= 0,
            "negative tokens"
        );
    }

    check_guard(&mut n, now);
}

fn spans_of(n: &Normalized) -> impl Iterator<Item = &normalize::SpanRef> {
    n.tool_calls
        .iter()
        .map(|c| &c.span)
        .chain(n.mcp_requests.iter().map(|c| &c.span))
        .chain(n.llm_calls.iter().map(|c| &c.span))
        .chain(n.upstream_calls.iter().map(|c| &c.span))
}

fn check_guard(n: &mut Normalized, now: i64) {
    let guard = cardinality::Guard::new(LIMITS);
    let before = n.records();
    guard.apply(n, now, "anyone");
    assert_eq!(n.records(), before, "the guard removed records");

    let services: HashSet<&str> = spans_of(n).map(|s| s.service.as_str()).collect();
    assert!(
        services.len() <= LIMITS.max_services + 1,
        "{} services kept",
        services.len()
    );
    let mut tools: HashMap<&str, HashSet<&str>> = HashMap::new();
    for c in &n.tool_calls {
        tools
            .entry(c.span.service.as_str())
            .or_default()
            .insert(c.tool.as_str());
    }
    for (service, t) in &tools {
        assert!(
            t.len() <= LIMITS.max_keys_per_service + 1,
            "{} tools kept for {service}",
            t.len()
        );
    }
    let sessions: HashSet<&str> = n
        .tool_calls
        .iter()
        .filter(|c| c.session_source != normalize::SessionSource::TraceId)
        .map(|c| c.session_key.as_str())
        .chain(
            n.llm_calls
                .iter()
                .filter(|c| c.session_source != normalize::SessionSource::TraceId)
                .map(|c| c.session_key.as_str()),
        )
        .collect();
    assert!(
        sessions.len() <= LIMITS.max_sessions_per_hour + 1,
        "{} sessions kept",
        sessions.len()
    );
    let bound = LIMITS.max_services
        + 1
        + (LIMITS.max_services + 1) * 4 * LIMITS.max_keys_per_service
        + 2 * LIMITS.max_sessions_per_hour
        + 2 * LIMITS.max_trace_sessions_per_hour;
    assert!(guard.tracked() <= bound, "{} keys tracked", guard.tracked());
}

// ---- structured requests for the normalizer target ----

const SERVICES: &[&str] = &["weather-mcp", "agent", "", "search-mcp", "db-mcp", "svc"];
const SCOPES: &[&str] = &[
    "fastmcp",
    "mcp-python-sdk",
    "opentelemetry.instrumentation.mcp",
    "logfire",
    "",
    "opentelemetry.instrumentation.openai",
];
const NAMES: &[&str] = &[
    "tools/call get-weather",
    "tools/call",
    "MCP send tools/call echo",
    "MCP send tools/list",
    "MCP request: tools/call echo",
    "MCP server handle request: tools/call",
    "tools/list",
    "initialize",
    "echo.tool",
    "tools/call.mcp",
    "ResponseStreamWriter",
    "chat gpt-4o",
    "GET",
    "POST",
    "",
];
const KEYS: &[&str] = &[
    "mcp.method.name",
    "gen_ai.tool.name",
    "gen_ai.tool.call.arguments",
    "gen_ai.tool.call.result",
    "mcp.session.id",
    "mcp.protocol.version",
    "mcp.request.id",
    "jsonrpc.request.id",
    "gen_ai.conversation.id",
    "session.id",
    "error.type",
    "exception.type",
    "gen_ai.operation.name",
    "gen_ai.provider.name",
    "gen_ai.system",
    "gen_ai.request.model",
    "gen_ai.response.model",
    "gen_ai.usage.input_tokens",
    "gen_ai.usage.output_tokens",
    "gen_ai.usage.prompt_tokens",
    "gen_ai.usage.completion_tokens",
    "llm.request.model",
    "llm.request.type",
    "llm.usage.prompt_tokens",
    "llm.usage.completion_tokens",
    "llm.usage.total_tokens",
    "llm.token_count.prompt",
    "llm.token_count.completion",
    "traceloop.span.kind",
    "traceloop.entity.name",
    "traceloop.entity.input",
    "traceloop.entity.output",
    "traceloop.workflow.name",
    "request",
    "response",
    "http.request.method",
    "http.method",
    "http.response.status_code",
    "http.status_code",
    "rpc.response.status_code",
    "server.address",
    "url.full",
    "http.url",
    "http.host",
    "net.peer.name",
    "http.response.header.x-ratelimit-remaining",
    "http.response.header.x-ratelimit-limit",
    "http.response.header.x-ratelimit-reset",
    "http.response.header.ratelimit",
    "http.response.header.ratelimit-policy",
    "http.response.header.retry-after",
    "http.response.header.anthropic-ratelimit-requests-reset",
];
const VALUES: &[&str] = &[
    "tools/call",
    "tools/list",
    "echo",
    "get-weather",
    "2025-06-18",
    "2026-07-28",
    "tool",
    "task",
    "workflow",
    "chat",
    "openai",
    "gpt-4o",
    "api.github.com",
    "https://api.github.com/repos?q=1",
    "/relative",
    "asyncio.CancelledError",
    "TimeoutError",
    "tool_error",
    "0",
    "-1",
    "60",
    "1.5",
    "30s",
    "Wed, 21 Oct 2026 07:28:00 GMT",
    "\"default\";r=50;t=30",
    "\"default\";q=100;w=60",
    "{\"city\":\"Paris\",\"api_key\":\"sk-abcdefghijklmnop\"}",
    "{\"password\":\"hunter2\",\"to\":\"alice@example.com\"}",
    "{\"card\":\"4111 1111 1111 1111\"}",
    "{\"content\":[{\"type\":\"text\",\"text\":\"Bearer abc.def-ghi\"}],\"isError\":false}",
    "{\"content\":[],\"isError\":true}",
    "{\"content\":[{\"type\":\"text\",\"text\":\"[]\"}]}",
    "{\"result\":{\"content\":[{\"type\":\"text\",\"text\":\"{\\\"rows\\\":[1,2]}\"}]}}",
    "{\"method\":\"tools/call\",\"params\":{\"name\":\"echo\",\"arguments\":{\"x\":1}}}",
    "{\"arguments\":{\"q\":\"ghp_0123456789abcdef\"},\"name\":\"search\"}",
    "[]",
    "{}",
    "null",
    "[1,2,3",
    "{\"a\":",
    "plain text result",
];

fn pick<'a>(u: &mut Unstructured<'_>, from: &[&'a str]) -> arbitrary::Result<&'a str> {
    u.choose(from).copied()
}

fn text(u: &mut Unstructured<'_>, from: &[&str]) -> arbitrary::Result<String> {
    Ok(if u.ratio(1, 4)? {
        String::arbitrary(u)?
    } else {
        pick(u, from)?.to_owned()
    })
}

fn value(u: &mut Unstructured<'_>, depth: u8) -> arbitrary::Result<Value> {
    Ok(match u.int_in_range(0..=9)? {
        0..=4 => Value::StringValue(text(u, VALUES)?),
        5 => Value::IntValue(i64::arbitrary(u)?),
        6 => Value::DoubleValue(f64::arbitrary(u)?),
        7 => Value::BoolValue(bool::arbitrary(u)?),
        8 if depth < 3 => Value::ArrayValue(ArrayValue {
            values: (0..u.int_in_range(0..=3)?)
                .map(|_| any(u, depth + 1))
                .collect::<arbitrary::Result<_>>()?,
        }),
        9 if depth < 3 => Value::KvlistValue(KeyValueList {
            values: attributes(u, depth + 1, 3)?,
        }),
        _ => Value::BytesValue(Vec::arbitrary(u)?),
    })
}

fn any(u: &mut Unstructured<'_>, depth: u8) -> arbitrary::Result<AnyValue> {
    Ok(AnyValue {
        value: if u.ratio(1, 16)? {
            None
        } else {
            Some(value(u, depth)?)
        },
    })
}

fn attributes(u: &mut Unstructured<'_>, depth: u8, max: u32) -> arbitrary::Result<Vec<KeyValue>> {
    (0..u.int_in_range(0..=max)?)
        .map(|_| {
            Ok(KeyValue {
                key: text(u, KEYS)?,
                value: Some(any(u, depth)?),
                ..Default::default()
            })
        })
        .collect()
}

fn id(u: &mut Unstructured<'_>, len: usize, pool: u8) -> arbitrary::Result<Vec<u8>> {
    Ok(match u.int_in_range(0..=15)? {
        0 => Vec::new(),
        1 => Vec::arbitrary(u)?,
        2 => vec![0; len],
        _ => {
            // Few distinct ids, so that parents and nesting are found.
            let n = u.int_in_range(1..=pool)?;
            let mut v = vec![0; len];
            v[len - 1] = n;
            v
        }
    })
}

fn request(u: &mut Unstructured<'_>) -> arbitrary::Result<ExportTraceServiceRequest> {
    let base = DEFAULT_NOW - 3_600_000_000_000;
    let mut resource_spans = Vec::new();
    for _ in 0..u.int_in_range(1..=3)? {
        let mut resource = vec![KeyValue {
            key: "service.name".into(),
            value: Some(AnyValue {
                value: Some(Value::StringValue(text(u, SERVICES)?)),
            }),
            ..Default::default()
        }];
        if u.ratio(1, 3)? {
            resource.push(KeyValue {
                key: "service.instance.id".into(),
                value: Some(AnyValue {
                    value: Some(Value::StringValue(text(u, &["i-1", "i-2"])?)),
                }),
                ..Default::default()
            });
        }
        let mut scope_spans = Vec::new();
        for _ in 0..u.int_in_range(1..=2)? {
            let mut spans = Vec::new();
            for _ in 0..u.int_in_range(0..=8)? {
                let start = if u.ratio(1, 16)? {
                    u64::arbitrary(u)?
                } else {
                    (base + i64::from(u.int_in_range(0..=7_200_000u32)?) * 1_000_000) as u64
                };
                let end = if u.ratio(1, 16)? {
                    u64::arbitrary(u)?
                } else {
                    start.saturating_add(u64::from(u.int_in_range(0..=10_000_000u32)?) * 1000)
                };
                spans.push(Span {
                    trace_id: id(u, 16, 3)?,
                    span_id: id(u, 8, 6)?,
                    parent_span_id: if u.ratio(1, 2)? {
                        Vec::new()
                    } else {
                        id(u, 8, 6)?
                    },
                    name: text(u, NAMES)?,
                    kind: u.int_in_range(0..=5)?,
                    start_time_unix_nano: start,
                    end_time_unix_nano: end,
                    attributes: attributes(u, 0, 10)?,
                    status: if u.ratio(1, 2)? {
                        Some(Status {
                            code: u.int_in_range(0..=3)?,
                            message: text(u, VALUES)?,
                        })
                    } else {
                        None
                    },
                    events: if u.ratio(1, 4)? {
                        vec![Event {
                            name: text(u, &["exception", "error"])?,
                            attributes: attributes(u, 0, 3)?,
                            ..Default::default()
                        }]
                    } else {
                        Vec::new()
                    },
                    ..Default::default()
                });
            }
            scope_spans.push(ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: text(u, SCOPES)?,
                    ..Default::default()
                }),
                spans,
                schema_url: String::new(),
            });
        }
        resource_spans.push(ResourceSpans {
            resource: Some(Resource {
                attributes: resource,
                ..Default::default()
            }),
            scope_spans,
            schema_url: String::new(),
        });
    }
    Ok(ExportTraceServiceRequest { resource_spans })
}
