//! OTLP export requests → typed records. Pure: no I/O, no clock (the caller passes `now`).
//!
//! Every span of a request ends up in exactly one of: a tool call, another MCP request, an LLM
//! call, an upstream HTTP call, a counted drop (not telemetry toolsight models) or a counted
//! rejection (malformed: reported back to the client in `partial_success`).

pub(crate) mod attrs;
pub mod cardinality;
pub(crate) mod content;
pub(crate) mod keys;
pub mod ratelimit;
mod sources;

use std::collections::HashMap;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::{Span, span::SpanKind};

pub use content::{Redactor, ResultShape};
pub use ratelimit::RateLimit;

/// The `[privacy]` settings: whether redacted copies of arguments and results are stored, and
/// what is redacted in them.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Privacy {
    pub store_redacted_content: bool,
    pub redact_keys: Vec<String>,
    pub redact_patterns: Vec<String>,
    pub max_redacted_bytes: usize,
}

impl Default for Privacy {
    fn default() -> Self {
        Privacy {
            store_redacted_content: false,
            redact_keys: DEFAULT_REDACT_KEYS.iter().map(|s| s.to_string()).collect(),
            redact_patterns: DEFAULT_REDACT_PATTERNS
                .iter()
                .map(|s| s.to_string())
                .collect(),
            max_redacted_bytes: 2048,
        }
    }
}

/// Key names whose values are replaced in stored copies (case-insensitive substrings).
pub const DEFAULT_REDACT_KEYS: &[&str] = &[
    "password",
    "passwd",
    "secret",
    "token",
    "api_key",
    "apikey",
    "authorization",
    "cookie",
    "credential",
    "private_key",
    "ssn",
];

/// Patterns replaced inside stored string values: email addresses, bearer tokens, common API
/// key shapes, card-like digit runs.
pub const DEFAULT_REDACT_PATTERNS: &[&str] = &[
    r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}",
    r"(?i)bearer\s+[A-Za-z0-9._~+/=-]+",
    r"\b(?:sk|pk|rk|ghp|gho|ghs|xox[abprs])[-_][A-Za-z0-9_-]{10,}",
    r"\b(?:\d[ -]?){13,19}\b",
];

/// Which side of an MCP exchange a span describes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    Client,
    Server,
}

impl Side {
    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Server => "server",
        }
    }
}

/// How a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    Ok,
    Error,
    Cancelled,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Cancelled => "cancelled",
        }
    }
}

/// The instrumentation a span came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// OpenTelemetry MCP semantic conventions (any conforming instrumentation).
    Semconv,
    /// FastMCP 3.x/4.x native tracing (scope `fastmcp`).
    Fastmcp,
    /// The MCP Python SDK 2.x built-in tracing (scope `mcp-python-sdk`).
    McpSdk,
    /// OpenLLMetry / Traceloop `opentelemetry-instrumentation-mcp`.
    Traceloop,
    /// Pydantic Logfire's MCP instrumentation.
    Logfire,
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Semconv => "semconv",
            Source::Fastmcp => "fastmcp",
            Source::McpSdk => "mcp_sdk",
            Source::Traceloop => "traceloop",
            Source::Logfire => "logfire",
        }
    }
}

/// Which attribute the session key was taken from (the fallback chain, in order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SessionSource {
    /// `mcp.session.id`, only where it is stable (protocol versions before 2026-07-28).
    McpSessionId,
    ConversationId,
    SessionId,
    /// A client span with no parent and no session attribute: the calls a client process
    /// starts on its own (a script or an agent that opens no span of its own) belong to that
    /// process, named by `service.instance.id`.
    Instance,
    TraceId,
}

impl SessionSource {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionSource::McpSessionId => "mcp.session.id",
            SessionSource::ConversationId => "gen_ai.conversation.id",
            SessionSource::SessionId => "session.id",
            SessionSource::Instance => "service.instance.id",
            SessionSource::TraceId => "trace_id",
        }
    }
}

/// Fields every record shares.
#[derive(Debug, Clone, PartialEq)]
pub struct SpanRef {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_span_id: Option<[u8; 8]>,
    pub service: String,
    pub service_instance: Option<String>,
    /// Unix nanoseconds.
    pub start_unix_nanos: i64,
    pub duration_us: i64,
}

/// One MCP `tools/call`, counted once per side.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    pub span: SpanRef,
    pub tool: String,
    pub side: Side,
    pub source: Source,
    pub outcome: Outcome,
    pub error_type: Option<String>,
    pub session_key: String,
    pub session_source: SessionSource,
    pub request_id: Option<String>,
    /// The client span nested in this one that arrived in the same export and was not stored
    /// (the server span's parent may be it).
    pub inner_span_id: Option<[u8; 8]>,
    /// False for a link: a span stored only so the two sides of a call can be joined (an
    /// OpenLLMetry client writer span that arrived without its tool span), never counted.
    pub counted: bool,
    /// Set when the other side of the call is known (`store::correlate`): its span id, what
    /// this side reported when the call's outcome differs, and (client side) the overhead.
    pub peer_span_id: Option<[u8; 8]>,
    pub own_outcome: Option<Outcome>,
    pub overhead_us: Option<i64>,
    /// Counted by the retry-loop rule's state (`store::correlate::loop_counted`); set by the
    /// writer before the row is stored.
    pub loop_counted: bool,
    pub result: Option<ResultShape>,
    pub args_hash: Option<[u8; 16]>,
    pub args_redacted: Option<String>,
    pub result_redacted: Option<String>,
}

/// Any other MCP request or notification (`tools/list`, `initialize`, `resources/read`, …).
#[derive(Debug, Clone, PartialEq)]
pub struct McpRequest {
    pub span: SpanRef,
    pub method: String,
    pub side: Side,
    pub source: Source,
    pub outcome: Outcome,
    /// A server span with no parent: not caused by a traced client request (FastMCP's
    /// header-validation `tools/list`, notifications).
    pub orphan: bool,
}

/// A model call with token usage.
#[derive(Debug, Clone, PartialEq)]
pub struct LlmCall {
    pub span: SpanRef,
    pub model: String,
    pub provider: Option<String>,
    pub operation: String,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub error: bool,
    pub session_key: String,
    pub session_source: SessionSource,
}

/// An outgoing HTTP call (an MCP server calling the APIs behind its tools).
#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamCall {
    pub span: SpanRef,
    pub server_address: String,
    pub method: Option<String>,
    pub status_code: Option<i32>,
    pub rate_limit: RateLimit,
}

/// Why a span was rejected as malformed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    InvalidTraceId,
    InvalidSpanId,
    InvalidTimestamps,
    TimestampOutOfRange,
}

impl RejectReason {
    pub const ALL: [RejectReason; 4] = [
        RejectReason::InvalidTraceId,
        RejectReason::InvalidSpanId,
        RejectReason::InvalidTimestamps,
        RejectReason::TimestampOutOfRange,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RejectReason::InvalidTraceId => "invalid_trace_id",
            RejectReason::InvalidSpanId => "invalid_span_id",
            RejectReason::InvalidTimestamps => "invalid_timestamps",
            RejectReason::TimestampOutOfRange => "timestamp_out_of_range",
        }
    }
}

/// Why a well-formed span was not turned into a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DropReason {
    /// Neither MCP, nor an LLM call with usage, nor an HTTP client call.
    NotModelled,
    /// A client MCP span nested in another one of the same export for the same request
    /// (FastMCP's client span wraps the MCP SDK's `MCP send` span): the request is counted
    /// once, from the outer span, which keeps the nested span's id (`inner_span_id`). Nested
    /// spans that arrive in an export of their own are stored and joined later (`store::correlate`).
    NestedClientSpan,
    /// An instrumentation's transport or wrapper span (Traceloop `ResponseStreamWriter`,
    /// `mcp.server`, `mcp.client.session`) that says nothing a sibling span does not.
    TransportSpan,
}

impl DropReason {
    pub const ALL: [DropReason; 3] = [
        DropReason::NotModelled,
        DropReason::NestedClientSpan,
        DropReason::TransportSpan,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::NotModelled => "not_modelled",
            DropReason::NestedClientSpan => "nested_client_span",
            DropReason::TransportSpan => "transport_span",
        }
    }
}

/// The records of one export request.
#[derive(Debug, Default)]
pub struct Normalized {
    pub tool_calls: Vec<ToolCall>,
    pub mcp_requests: Vec<McpRequest>,
    pub llm_calls: Vec<LlmCall>,
    pub upstream_calls: Vec<UpstreamCall>,
    pub spans: u64,
    pub rejected: Vec<(RejectReason, u64)>,
    pub dropped: Vec<(DropReason, u64)>,
    /// The first rejection, worded for `partial_success.error_message`.
    pub first_rejection: Option<String>,
    /// Keys cut to their bound (see [`keys`]).
    pub keys_cut: u64,
    /// Values an instrumentation scrubbed (Logfire's `[Scrubbed due to …]`) that were skipped
    /// where they would have become a tool name, a session key or an arguments hash.
    pub scrubbed: u64,
}

impl Normalized {
    pub fn records(&self) -> usize {
        self.tool_calls.len()
            + self.mcp_requests.len()
            + self.llm_calls.len()
            + self.upstream_calls.len()
    }

    pub fn rejected_total(&self) -> u64 {
        self.rejected.iter().map(|(_, n)| n).sum()
    }

    fn reject(&mut self, reason: RejectReason, detail: impl FnOnce() -> String) {
        bump(&mut self.rejected, reason);
        if self.first_rejection.is_none() {
            self.first_rejection = Some(format!("{}: {}", reason.as_str(), detail()));
        }
    }

    fn drop_span(&mut self, reason: DropReason) {
        bump(&mut self.dropped, reason);
    }
}

fn bump<K: PartialEq>(counts: &mut Vec<(K, u64)>, key: K) {
    match counts.iter_mut().find(|(k, _)| *k == key) {
        Some((_, n)) => *n += 1,
        None => counts.push((key, 1)),
    }
}

/// Settings the normalizer needs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Spans that started longer ago than this are rejected (they would land in dropped data).
    pub max_age_nanos: i64,
    /// Spans that start further in the future than this are rejected (clock skew).
    pub max_future_nanos: i64,
    /// When set, a redacted copy of arguments and results is kept.
    pub redactor: Option<Redactor>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_age_nanos: 7 * 24 * 3600 * 1_000_000_000,
            max_future_nanos: 3600 * 1_000_000_000,
            redactor: None,
        }
    }
}

/// Normalizes one export request. `now_unix_nanos` bounds the accepted timestamps.
pub fn normalize(
    req: &ExportTraceServiceRequest,
    now_unix_nanos: i64,
    opts: &Options,
) -> Normalized {
    let mut out = Normalized::default();
    for rs in &req.resource_spans {
        let resource_attrs: &[KeyValue] = rs
            .resource
            .as_ref()
            .map(|r| r.attributes.as_slice())
            .unwrap_or(&[]);
        let service = attrs::get_nonempty(resource_attrs, "service.name")
            .map(|s| s.into_owned())
            .unwrap_or_else(|| "unknown_service".to_owned());
        let instance =
            attrs::get_nonempty(resource_attrs, "service.instance.id").map(|s| s.into_owned());

        // Client MCP spans of this resource (span id → method), to find nested ones.
        let client_mcp_spans: HashMap<[u8; 8], &str> = rs
            .scope_spans
            .iter()
            .flat_map(|ss| &ss.spans)
            .filter(|s| s.kind == SpanKind::Client as i32)
            .filter_map(|s| Some((id8(&s.span_id)?, sources::mcp_method(s)?)))
            .collect();
        // The span nested in each client span of this export (span id → the nested span's id
        // and request id): the SDK's `MCP send` span inside FastMCP's, OpenLLMetry's client
        // `ResponseStreamWriter` inside its tool span. The nested span is not stored; the server
        // span's parent may be it, so the outer record keeps its id for the join.
        let inner: HashMap<[u8; 8], sources::Inner<'_>> = rs
            .scope_spans
            .iter()
            .flat_map(|ss| &ss.spans)
            .filter_map(|s| {
                let parent = id8(&s.parent_span_id)?;
                let nested = match client_mcp_spans.get(&parent) {
                    Some(m) => {
                        s.kind == SpanKind::Client as i32 && sources::mcp_method(s) == Some(*m)
                    }
                    None => sources::is_client_stream_writer(s),
                };
                nested.then(|| Some((parent, sources::Inner::of(s)?)))?
            })
            .collect();
        // Span ids of the resource, only where writer spans may need them (OpenLLMetry).
        let export_ids: Option<std::collections::HashSet<[u8; 8]>> = rs
            .scope_spans
            .iter()
            .flat_map(|ss| &ss.spans)
            .any(sources::is_client_stream_writer)
            .then(|| {
                rs.scope_spans
                    .iter()
                    .flat_map(|ss| &ss.spans)
                    .filter_map(|s| id8(&s.span_id))
                    .collect()
            });
        for ss in &rs.scope_spans {
            let scope = ss.scope.as_ref().map(|s| s.name.as_str()).unwrap_or("");
            for span in &ss.spans {
                out.spans += 1;
                let Some(span_ref) =
                    validate(span, &service, &instance, now_unix_nanos, opts, &mut out)
                else {
                    continue;
                };
                let ctx = sources::SpanCtx {
                    span,
                    scope,
                    span_ref,
                    opts,
                    parent_client_method: id8(&span.parent_span_id)
                        .and_then(|p| client_mcp_spans.get(&p).copied()),
                    inner: id8(&span.span_id).and_then(|id| inner.get(&id)),
                    export_ids: export_ids.as_ref(),
                };
                sources::classify(ctx, &mut out);
            }
        }
    }
    out.keys_cut = keys::canonicalize_records(&mut out);
    out
}

fn id8(b: &[u8]) -> Option<[u8; 8]> {
    b.try_into().ok().filter(|id: &[u8; 8]| id != &[0; 8])
}

fn id16(b: &[u8]) -> Option<[u8; 16]> {
    b.try_into().ok().filter(|id: &[u8; 16]| id != &[0; 16])
}

fn validate(
    span: &Span,
    service: &str,
    instance: &Option<String>,
    now: i64,
    opts: &Options,
    out: &mut Normalized,
) -> Option<SpanRef> {
    let Some(trace_id) = id16(&span.trace_id) else {
        out.reject(RejectReason::InvalidTraceId, || {
            format!(
                "span {:?} has a trace id of {} bytes",
                span.name,
                span.trace_id.len()
            )
        });
        return None;
    };
    let Some(span_id) = id8(&span.span_id) else {
        out.reject(RejectReason::InvalidSpanId, || {
            format!(
                "span {:?} has a span id of {} bytes",
                span.name,
                span.span_id.len()
            )
        });
        return None;
    };
    let parent_span_id = if span.parent_span_id.is_empty() {
        None
    } else {
        match id8(&span.parent_span_id) {
            Some(p) => Some(p),
            None => {
                out.reject(RejectReason::InvalidSpanId, || {
                    format!(
                        "span {:?} has a parent span id of {} bytes",
                        span.name,
                        span.parent_span_id.len()
                    )
                });
                return None;
            }
        }
    };
    let (start, end) = (span.start_time_unix_nano, span.end_time_unix_nano);
    if start == 0 || end < start || start > i64::MAX as u64 || end > i64::MAX as u64 {
        out.reject(RejectReason::InvalidTimestamps, || {
            format!("span {:?} starts at {start} and ends at {end}", span.name)
        });
        return None;
    }
    let start = start as i64;
    if start < now.saturating_sub(opts.max_age_nanos)
        || start > now.saturating_add(opts.max_future_nanos)
    {
        out.reject(RejectReason::TimestampOutOfRange, || {
            format!(
                "span {:?} starts at {start}, outside the accepted window around now",
                span.name
            )
        });
        return None;
    }
    Some(SpanRef {
        trace_id,
        span_id,
        parent_span_id,
        service: service.to_owned(),
        service_instance: instance.clone(),
        start_unix_nanos: start,
        duration_us: ((end as i64 - start) / 1000).max(0),
    })
}

#[cfg(test)]
mod tests;
