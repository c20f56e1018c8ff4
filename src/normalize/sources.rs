//! Per-instrumentation recognition of spans. Each source names the same facts differently;
//! this module maps them onto the records of `normalize`.

use std::borrow::Cow;

use opentelemetry_proto::tonic::trace::v1::{Span, span::SpanKind, status::StatusCode};
use serde_json::Value;

use super::attrs::{self, first_i64, first_nonempty, get_nonempty};
use super::content::{self, ResultShape};
use super::{
    DropReason, LlmCall, McpRequest, Normalized, Options, Outcome, SessionSource, Side, Source,
    SpanRef, ToolCall, UpstreamCall, ratelimit,
};

pub(super) struct SpanCtx<'a> {
    pub span: &'a Span,
    pub scope: &'a str,
    pub span_ref: SpanRef,
    pub opts: &'a Options,
    /// The MCP method of the parent span, when the parent is a client MCP span of the same export.
    pub parent_client_method: Option<&'a str>,
    /// The client span nested in this one, when it is in the same export.
    pub inner: Option<&'a Inner<'a>>,
    /// The span ids of this resource's spans in the export, where it holds writer spans.
    pub export_ids: Option<&'a std::collections::HashSet<[u8; 8]>>,
}

/// A client span nested in another of the same call, in the same export: not stored, but its
/// id (a server span's parent may be it) and request id are kept on the outer record.
#[derive(Debug)]
pub(super) struct Inner<'a> {
    pub span_id: [u8; 8],
    pub request_id: Option<Cow<'a, str>>,
}

impl<'a> Inner<'a> {
    pub(super) fn of(s: &'a Span) -> Option<Self> {
        Some(Inner {
            span_id: s.span_id.as_slice().try_into().ok()?,
            request_id: request_id(&s.attributes),
        })
    }
}

fn request_id(a: &[opentelemetry_proto::tonic::common::v1::KeyValue]) -> Option<Cow<'_, str>> {
    first_nonempty(a, &["jsonrpc.request.id", "mcp.request.id"])
}

/// OpenLLMetry's span around writing one response (`ResponseStreamWriter`, INTERNAL). On the
/// client it wraps the request sent inside a tool span; on the server it carries the response
/// (`mcp.response.value`) and the outcome.
const STREAM_WRITER: &str = "ResponseStreamWriter";

pub(super) fn is_client_stream_writer(s: &Span) -> bool {
    s.name == STREAM_WRITER && attrs::get(&s.attributes, "mcp.response.value").is_none()
}

/// The MCP SDK's client span name prefix (`MCP send tools/call echo`).
const MCP_SEND: &str = "MCP send ";
/// Logfire's MCP span name prefixes: client `MCP request: tools/call echo`, server
/// `MCP server handle request: tools/call`. Both are INTERNAL spans.
const LOGFIRE_CLIENT: &str = "MCP request: ";
const LOGFIRE_SERVER: &str = "MCP server handle request: ";

/// `mcp.method.name`, when it is a plain string attribute.
pub(super) fn mcp_method(s: &Span) -> Option<&str> {
    match attrs::get(&s.attributes, "mcp.method.name")? {
        opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(m)
            if !m.is_empty() =>
        {
            Some(m)
        }
        _ => None,
    }
}

pub(super) fn classify(ctx: SpanCtx<'_>, out: &mut Normalized) {
    let a = &ctx.span.attributes;
    if let Some(method) = get_nonempty(a, "mcp.method.name") {
        return semconv(&ctx, &method, out);
    }
    if let Some(label) = ctx.span.name.strip_prefix(LOGFIRE_CLIENT) {
        return logfire(&ctx, label, Side::Client, out);
    }
    if let Some(label) = ctx.span.name.strip_prefix(LOGFIRE_SERVER) {
        return logfire(&ctx, label, Side::Server, out);
    }
    if let Some(kind) = get_nonempty(a, "traceloop.span.kind") {
        return traceloop(&ctx, &kind, out);
    }
    if ctx.span.name == STREAM_WRITER
        && let Some(response) = attrs::get_str(a, "mcp.response.value")
    {
        return stream_writer(&ctx, &response, out);
    }
    // A client writer span whose parent (the tool span) travels in another export: the server's
    // writer span is its child, so it is kept as a link (stored, never counted) for the join.
    if ctx.span.name == STREAM_WRITER
        && ctx.span_ref.parent_span_id.is_some()
        && ctx.export_ids.is_some_and(|ids| {
            !ctx.span_ref
                .parent_span_id
                .is_some_and(|p| ids.contains(&p))
        })
        && request_id(a).is_some()
    {
        let before = out.tool_calls.len();
        push_tool_call(
            &ctx,
            "(unknown)".to_owned(),
            Side::Client,
            Source::Traceloop,
            None,
            None,
            None,
            out,
        );
        if let Some(link) = out.tool_calls.get_mut(before) {
            link.counted = false;
        }
        return;
    }
    if ctx.span.name == STREAM_WRITER || attrs::get(a, "mcp.request.id").is_some() {
        return out.drop_span(DropReason::TransportSpan);
    }
    if let Some(method) = ctx.span.name.strip_suffix(".mcp")
        && (attrs::get(a, "traceloop.entity.input").is_some()
            || ctx.scope.contains("instrumentation.mcp"))
    {
        return out.mcp_requests.push(McpRequest {
            orphan: false,
            method: method.to_owned(),
            side: Side::Client,
            source: Source::Traceloop,
            outcome: outcome(ctx.span, None, None).0,
            span: ctx.span_ref,
        });
    }
    if let Some(llm) = llm_call(&ctx, &mut out.scrubbed) {
        return out.llm_calls.push(llm);
    }
    if let Some(up) = upstream_call(&ctx) {
        return out.upstream_calls.push(up);
    }
    out.drop_span(DropReason::NotModelled);
}

/// `v`, unless it is a scrubbed placeholder: then none, and the skip is counted.
fn data<S: AsRef<str>>(v: Option<S>, scrubbed: &mut u64) -> Option<S> {
    match v {
        Some(s) if attrs::is_scrubbed(s.as_ref()) => {
            *scrubbed += 1;
            None
        }
        other => other,
    }
}

fn side_of_kind(kind: i32) -> Side {
    if kind == SpanKind::Client as i32 || kind == SpanKind::Producer as i32 {
        Side::Client
    } else {
        Side::Server
    }
}

/// OpenTelemetry MCP semantic conventions, and the FastMCP / MCP SDK spans that follow them.
fn semconv(ctx: &SpanCtx<'_>, method: &str, out: &mut Normalized) {
    let span = ctx.span;
    let a = &span.attributes;
    let source = match ctx.scope {
        "fastmcp" => Source::Fastmcp,
        "mcp-python-sdk" => Source::McpSdk,
        _ => Source::Semconv,
    };
    let side = side_of_kind(span.kind);
    if side == Side::Client && ctx.parent_client_method == Some(method) {
        return out.drop_span(DropReason::NestedClientSpan);
    }
    if method != "tools/call" {
        return out.mcp_requests.push(McpRequest {
            orphan: side == Side::Server && ctx.span_ref.parent_span_id.is_none(),
            method: method.to_owned(),
            side,
            source,
            outcome: outcome(span, None, None).0,
            span: ctx.span_ref.clone(),
        });
    }
    let tool = data(get_nonempty(a, "gen_ai.tool.name"), &mut out.scrubbed)
        .map(Cow::into_owned)
        .or_else(|| data(tool_from_span_name(&span.name), &mut out.scrubbed))
        .unwrap_or_else(|| "(unknown)".to_owned());
    let result_raw = attrs::get(a, "gen_ai.tool.call.result").map(value_as_json_text);
    let result = result_raw.as_deref().map(content::measure_result);
    let args = attrs::get(a, "gen_ai.tool.call.arguments").map(|v| match v {
        opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s) => {
            content::parse_args(s)
        }
        other => attrs::to_json(other),
    });
    let result_json = result_raw.as_deref().map(content::parse_args);
    push_tool_call(ctx, tool, side, source, result, args, result_json, out);
}

fn value_as_json_text(v: &opentelemetry_proto::tonic::common::v1::any_value::Value) -> String {
    match v {
        opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(s) => s.clone(),
        other => attrs::to_json(other).to_string(),
    }
}

/// `tools/call echo`, `MCP send tools/call echo` → `echo`.
fn tool_from_span_name(name: &str) -> Option<String> {
    let rest = name.strip_prefix(MCP_SEND).unwrap_or(name);
    let tool = rest.strip_prefix("tools/call ")?.trim();
    (!tool.is_empty()).then(|| tool.to_owned())
}

/// OpenLLMetry (`opentelemetry-instrumentation-mcp`): INTERNAL `{tool}.tool` spans.
fn traceloop(ctx: &SpanCtx<'_>, kind: &str, out: &mut Normalized) {
    let a = &ctx.span.attributes;
    if kind != "tool" {
        // `mcp.server`, `mcp.client.session`: wrappers around the tool span.
        return out.drop_span(DropReason::TransportSpan);
    }
    let tool = data(get_nonempty(a, "traceloop.entity.name"), &mut out.scrubbed)
        .map(Cow::into_owned)
        .or_else(|| ctx.span.name.strip_suffix(".tool").map(str::to_owned))
        .unwrap_or_else(|| "(unknown)".to_owned());
    // Server-side tool spans (FastMCP 2.x servers) name the server's workflow.
    let side = if get_nonempty(a, "traceloop.workflow.name").is_some() {
        Side::Server
    } else {
        Side::Client
    };
    let input = get_nonempty(a, "traceloop.entity.input").map(|s| content::parse_args(&s));
    let args = input
        .as_ref()
        .map(|i| i.get("arguments").cloned().unwrap_or(Value::Null));
    let output = attrs::get_str(a, "traceloop.entity.output");
    let result = match &output {
        // The client side keeps only the first content part (`{"result": <its text>}`): whether
        // the result was empty or an error is known, its size and item count are not.
        Some(o) if side == Side::Client => Some(content::measure_result(o).partial()),
        Some(o) => Some(content::measure_result(o)),
        // Content capture is on (the input is there) but no output: OpenLLMetry leaves the
        // output out when the result has no content.
        None if input.is_some() && !status_is_error(ctx.span) => Some(ResultShape {
            bytes: Some(0),
            items: Some(0),
            empty: true,
            is_error: None,
        }),
        None => None,
    };
    let result_json = output.as_deref().map(content::parse_args);
    push_tool_call(
        ctx,
        tool,
        side,
        Source::Traceloop,
        result,
        args,
        result_json,
        out,
    );
}

/// OpenLLMetry on mcp 1.x servers: the server side of a call is only the span that writes its
/// response. A `tools/call` result (an object with a `content` array) is a server tool call; the
/// tool's name is not on the span and comes from the client side when both are stored
/// (`store::correlate`). Other responses (`initialize`, `tools/list`) are transport.
fn stream_writer(ctx: &SpanCtx<'_>, response: &str, out: &mut Normalized) {
    let json = content::parse_args(response);
    if !json.get("content").is_some_and(Value::is_array) {
        return out.drop_span(DropReason::TransportSpan);
    }
    let result = Some(content::measure_result(response));
    push_tool_call(
        ctx,
        "(unknown)".to_owned(),
        Side::Server,
        Source::Traceloop,
        result,
        None,
        Some(json),
        out,
    );
}

/// Pydantic Logfire: spans named by method (and tool, client side) with `request` / `response`
/// JSON attributes; the tool result's `isError` is only in `response`.
fn logfire(ctx: &SpanCtx<'_>, label: &str, side: Side, out: &mut Normalized) {
    let span = ctx.span;
    let a = &span.attributes;
    let request = get_nonempty(a, "request").map(|s| content::parse_args(&s));
    let method = request
        .as_ref()
        .and_then(|r| r.get("method").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| label.split_whitespace().next().unwrap_or("").to_owned());
    if method != "tools/call" {
        return out.mcp_requests.push(McpRequest {
            orphan: false,
            method,
            side,
            source: Source::Logfire,
            outcome: outcome(span, None, None).0,
            span: ctx.span_ref.clone(),
        });
    }
    let params = request.as_ref().and_then(|r| r.get("params"));
    // Logfire scrubs a tool name holding a word like `auth` or `secret`; its span name keeps it.
    let tool = data(
        params.and_then(|p| p.get("name").and_then(Value::as_str)),
        &mut out.scrubbed,
    )
    .map(str::to_owned)
    .or_else(|| {
        label
            .strip_prefix("tools/call ")
            .map(|t| t.trim().to_owned())
    })
    .filter(|t| !t.is_empty() && !attrs::is_scrubbed(t))
    .unwrap_or_else(|| "(unknown)".to_owned());
    let args = params.map(|p| p.get("arguments").cloned().unwrap_or(Value::Null));
    let response = get_nonempty(a, "response");
    let result = response.as_deref().map(content::measure_result);
    let result_json = response.as_deref().map(content::parse_args);
    push_tool_call(
        ctx,
        tool,
        side,
        Source::Logfire,
        result,
        args,
        result_json,
        out,
    );
}

#[allow(clippy::too_many_arguments)]
fn push_tool_call(
    ctx: &SpanCtx<'_>,
    tool: String,
    side: Side,
    source: Source,
    result: Option<ResultShape>,
    args: Option<Value>,
    result_json: Option<Value>,
    out: &mut Normalized,
) {
    let a = &ctx.span.attributes;
    let (outcome, mut error_type) = outcome(
        ctx.span,
        attrs::get_str(a, "error.type"),
        result.and_then(|r| r.is_error),
    );
    // A refusal reported as an `isError` result says so only in its text.
    if outcome == Outcome::Error
        && error_type.as_deref() != Some(RATE_LIMITED)
        && result_json
            .as_ref()
            .is_some_and(|v| mentions_rate_limit(&v.to_string()))
    {
        error_type = Some(RATE_LIMITED.to_owned());
    }
    let (session_key, session_source) = session(ctx, &mut out.scrubbed);
    // Scrubbed arguments would hash equal for distinct calls: such a call gets no hash.
    let args_hash = match &args {
        Some(v) if attrs::holds_scrubbed(v) => {
            out.scrubbed += 1;
            None
        }
        Some(v) => Some(content::args_hash(v)),
        None => None,
    };
    let redactor = ctx.opts.redactor.as_ref();
    out.tool_calls.push(ToolCall {
        tool,
        side,
        source,
        outcome,
        error_type,
        session_key,
        session_source,
        request_id: request_id(a)
            .or_else(|| ctx.inner.and_then(|i| i.request_id.clone()))
            .map(Cow::into_owned),
        inner_span_id: ctx.inner.map(|i| i.span_id),
        counted: true,
        peer_span_id: None,
        own_outcome: None,
        overhead_us: None,
        loop_counted: false,
        result,
        args_hash,
        args_redacted: redactor.zip(args.as_ref()).map(|(r, v)| r.redact(v)),
        result_redacted: redactor.zip(result_json.as_ref()).map(|(r, v)| r.redact(v)),
        span: ctx.span_ref.clone(),
    });
}

fn status_is_error(span: &Span) -> bool {
    span.status
        .as_ref()
        .is_some_and(|s| s.code == StatusCode::Error as i32)
}

/// Outcome and error type, from the span status, `error.type`, the result's `isError`, and
/// the timeout / cancellation wording instrumentations use.
fn outcome(
    span: &Span,
    error_type: Option<Cow<'_, str>>,
    result_is_error: Option<bool>,
) -> (Outcome, Option<String>) {
    let a = &span.attributes;
    let error_type = error_type
        .filter(|e| !e.trim().is_empty())
        .map(Cow::into_owned)
        .or_else(|| get_nonempty(a, "rpc.response.status_code").map(Cow::into_owned));
    let message = span
        .status
        .as_ref()
        .map(|s| s.message.as_str())
        .unwrap_or("");
    let is_error = status_is_error(span) || error_type.is_some() || result_is_error == Some(true);
    if is_error && is_cancellation(error_type.as_deref(), message) {
        return (
            Outcome::Cancelled,
            Some(error_type.unwrap_or_else(|| "timeout".to_owned())),
        );
    }
    if is_error && is_rate_limited(error_type.as_deref(), message, span) {
        return (Outcome::Error, Some(RATE_LIMITED.to_owned()));
    }
    if result_is_error == Some(true) {
        return (
            Outcome::Error,
            Some(error_type.unwrap_or_else(|| "tool_error".to_owned())),
        );
    }
    if is_error {
        let et = error_type
            .or_else(|| exception_type(span))
            .or_else(|| {
                message
                    .split(':')
                    .next()
                    .filter(|m| !m.is_empty() && !m.contains(' '))
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| "error".to_owned());
        return (Outcome::Error, Some(et));
    }
    (Outcome::Ok, None)
}

/// The error type of a call a rate limiter refused (FastMCP's `RateLimitingMiddleware` raises
/// `RateLimitError` before the tool is resolved; JSON-RPC servers answer "rate limit exceeded").
pub(super) const RATE_LIMITED: &str = "rate_limited";

fn mentions_rate_limit(s: &str) -> bool {
    let s = s.to_ascii_lowercase();
    s.contains("ratelimit")
        || s.contains("rate limit")
        || s.contains("rate_limit")
        || s.contains("too many requests")
}

fn is_rate_limited(error_type: Option<&str>, message: &str, span: &Span) -> bool {
    error_type.is_some_and(mentions_rate_limit)
        || mentions_rate_limit(message)
        || exception_type(span).is_some_and(|t| mentions_rate_limit(&t))
}

fn is_cancellation(error_type: Option<&str>, message: &str) -> bool {
    let et = error_type.unwrap_or("");
    if matches!(
        et,
        "TimeoutError" | "CancelledError" | "asyncio.CancelledError" | "timeout" | "cancelled"
    ) {
        return true;
    }
    let m = message.to_ascii_lowercase();
    m.contains("timed out")
        || m.starts_with("timeouterror")
        || m.contains("cancelled")
        || m.contains("canceled")
}

fn exception_type(span: &Span) -> Option<String> {
    span.events
        .iter()
        .filter(|e| e.name == "exception")
        .find_map(|e| get_nonempty(&e.attributes, "exception.type").map(Cow::into_owned))
}

/// The session key fallback chain: a stable `mcp.session.id`, `gen_ai.conversation.id`,
/// `session.id`, then the trace id. Under MCP 2026-07-28 and later `mcp.session.id` is a new
/// random value per request, so it is skipped there. A scrubbed link is skipped (and counted):
/// every user would share it.
fn session(ctx: &SpanCtx<'_>, scrubbed: &mut u64) -> (String, SessionSource) {
    let a = &ctx.span.attributes;
    if let Some(sid) = data(get_nonempty(a, "mcp.session.id"), scrubbed) {
        let sessionless =
            attrs::get_str(a, "mcp.protocol.version").is_some_and(|v| v.as_ref() >= "2026-07-28");
        if !sessionless {
            return (sid.into_owned(), SessionSource::McpSessionId);
        }
    }
    common_session(ctx, scrubbed)
}

fn common_session(ctx: &SpanCtx<'_>, scrubbed: &mut u64) -> (String, SessionSource) {
    let a = &ctx.span.attributes;
    if let Some(c) = data(get_nonempty(a, "gen_ai.conversation.id"), scrubbed) {
        return (c.into_owned(), SessionSource::ConversationId);
    }
    if let Some(s) = data(get_nonempty(a, "session.id"), scrubbed) {
        return (s.into_owned(), SessionSource::SessionId);
    }
    // A root client span: nothing above it in its process to tie calls together, so the
    // process itself is the session (each such call would otherwise be its own trace).
    if ctx.span_ref.parent_span_id.is_none()
        && side_of_kind(ctx.span.kind) == Side::Client
        && let Some(instance) = &ctx.span_ref.service_instance
    {
        return (format!("instance:{instance}"), SessionSource::Instance);
    }
    (hex::encode(ctx.span_ref.trace_id), SessionSource::TraceId)
}

const INPUT_TOKENS: &[&str] = &[
    "gen_ai.usage.input_tokens",
    "gen_ai.usage.prompt_tokens",
    "llm.usage.prompt_tokens",
    "llm.token_count.prompt",
];
const OUTPUT_TOKENS: &[&str] = &[
    "gen_ai.usage.output_tokens",
    "gen_ai.usage.completion_tokens",
    "llm.usage.completion_tokens",
    "llm.token_count.completion",
];

fn llm_call(ctx: &SpanCtx<'_>, scrubbed: &mut u64) -> Option<LlmCall> {
    let a = &ctx.span.attributes;
    let input = first_i64(a, INPUT_TOKENS);
    let output = first_i64(a, OUTPUT_TOKENS);
    let (input, output) = match (input, output) {
        (None, None) => (
            first_i64(a, &["llm.usage.total_tokens", "llm.token_count.total"])?,
            0,
        ),
        (i, o) => (i.unwrap_or(0), o.unwrap_or(0)),
    };
    let (session_key, session_source) = common_session(ctx, scrubbed);
    Some(LlmCall {
        model: first_nonempty(
            a,
            &[
                "gen_ai.response.model",
                "gen_ai.request.model",
                "llm.response.model",
                "llm.request.model",
            ],
        )
        .map_or_else(|| "unknown".to_owned(), Cow::into_owned),
        provider: first_nonempty(a, &["gen_ai.provider.name", "gen_ai.system"])
            .map(Cow::into_owned),
        operation: first_nonempty(a, &["gen_ai.operation.name", "llm.request.type"])
            .map_or_else(|| "chat".to_owned(), Cow::into_owned),
        input_tokens: input.max(0),
        output_tokens: output.max(0),
        error: status_is_error(ctx.span) || get_nonempty(a, "error.type").is_some(),
        session_key,
        session_source,
        span: ctx.span_ref.clone(),
    })
}

fn upstream_call(ctx: &SpanCtx<'_>) -> Option<UpstreamCall> {
    let span = ctx.span;
    if span.kind != SpanKind::Client as i32 {
        return None;
    }
    let a = &span.attributes;
    let method = first_nonempty(a, &["http.request.method", "http.method"]);
    let status = first_i64(a, &["http.response.status_code", "http.status_code"]);
    if method.is_none() && status.is_none() {
        return None;
    }
    let server_address = first_nonempty(a, &["server.address", "net.peer.name", "http.host"])
        .map(Cow::into_owned)
        .or_else(|| first_nonempty(a, &["url.full", "http.url"]).and_then(|u| host_of(&u)))
        .unwrap_or_else(|| "unknown".to_owned());
    let end = span.end_time_unix_nano.min(i64::MAX as u64) as i64;
    Some(UpstreamCall {
        server_address,
        method: method.map(Cow::into_owned),
        status_code: status.and_then(|s| i32::try_from(s).ok()),
        rate_limit: ratelimit::parse(a, end),
        span: ctx.span_ref.clone(),
    })
}

fn host_of(url: &str) -> Option<String> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split(['/', '?', '#']).next()?;
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = if host_port.starts_with('[') {
        host_port.split_inclusive(']').next()?
    } else {
        host_port.split(':').next()?
    };
    (!host.is_empty()).then(|| host.to_ascii_lowercase())
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn tool_names_come_from_span_names_when_attributes_lack_them() {
        assert_eq!(
            tool_from_span_name("MCP send tools/call echo").as_deref(),
            Some("echo")
        );
        assert_eq!(
            tool_from_span_name("tools/call get-weather").as_deref(),
            Some("get-weather")
        );
        assert_eq!(tool_from_span_name("tools/call"), None);
        assert_eq!(tool_from_span_name("tools/list"), None);
    }

    #[test]
    fn hosts_are_read_from_urls() {
        assert_eq!(
            host_of("https://API.github.com:443/repos?x=1").as_deref(),
            Some("api.github.com")
        );
        assert_eq!(
            host_of("http://user:pw@[::1]:8080/").as_deref(),
            Some("[::1]")
        );
        assert_eq!(host_of("/relative"), None);
    }
}
