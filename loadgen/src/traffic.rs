//! Realistic MCP telemetry: export requests shaped like the instrumentations toolsight supports,
//! built once as a template and refreshed (new ids, current timestamps) for every send.

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{
    AnyValue, ArrayValue, InstrumentationScope, KeyValue, any_value::Value,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    ResourceSpans, ScopeSpans, Span, Status, span::SpanKind,
};

pub use toolsight::demo::{Rng, kv, s};

pub const TOOLS: &[(&str, f64)] = &[
    ("search_docs", 120.0),
    ("query_database", 200.0),
    ("get_weather", 80.0),
    ("create_ticket", 300.0),
    ("list_files", 15.0),
    ("fetch_url", 450.0),
    ("send_email", 250.0),
    ("summarize", 900.0),
];

pub const UPSTREAMS: &[&str] = &[
    "api.github.com",
    "api.openweathermap.org",
    "db.internal",
    "api.openai.com",
];

fn i(v: i64) -> Value {
    Value::IntValue(v)
}
fn header(v: impl Into<String>) -> Value {
    Value::ArrayValue(ArrayValue {
        values: vec![AnyValue { value: Some(s(v)) }],
    })
}

/// Offsets of a span relative to the request's reference time, kept to refresh timestamps.
#[derive(Debug, Clone, Copy)]
struct Timing {
    start_before_ns: u64,
    duration_ns: u64,
}

/// One resource (process) of the template and the scope spans it exports.
struct Proc {
    service: &'static str,
    scopes: Vec<(&'static str, Vec<Span>)>,
}

impl Proc {
    fn push(&mut self, scope: &'static str, span: Span) {
        match self.scopes.iter_mut().find(|(n, _)| *n == scope) {
            Some((_, spans)) => spans.push(span),
            None => self.scopes.push((scope, vec![span])),
        }
    }
}

/// A request template and the facts needed to refresh it cheaply.
pub struct Traffic {
    request: ExportTraceServiceRequest,
    timings: Vec<Timing>,
    spans: usize,
    worker: u16,
    seq: u64,
}

struct Builder {
    rng: Rng,
    call: u64,
    spans: usize,
    agent: Proc,
    fastmcp: Proc,
    semconv: Proc,
    traceloop: Proc,
    logfire: Proc,
}

impl Builder {
    fn span(
        &mut self,
        trace: u64,
        name: String,
        kind: SpanKind,
        parent: Option<u64>,
        ms: f64,
        attrs: Vec<KeyValue>,
    ) -> Span {
        let span_id = self.rng.next_u64() | 1;
        let mut trace_id = [0u8; 16];
        trace_id[8..].copy_from_slice(&trace.to_be_bytes());
        let duration_ns = (ms * 1e6) as u64;
        // Template times are relative: start = how long before "now" the span started.
        let start_before_ns = duration_ns + 1_000_000_000 + self.rng.below(4_000_000_000);
        self.spans += 1;
        Span {
            start_time_unix_nano: start_before_ns,
            end_time_unix_nano: start_before_ns + duration_ns,
            trace_id: trace_id.to_vec(),
            span_id: span_id.to_be_bytes().to_vec(),
            parent_span_id: parent.map(|p| p.to_be_bytes().to_vec()).unwrap_or_default(),
            name,
            kind: kind as i32,
            attributes: attrs,
            ..Default::default()
        }
    }

    fn next_trace(&mut self) -> u64 {
        self.call += 1;
        self.call
    }

    fn tool(&mut self) -> (&'static str, f64) {
        TOOLS[self.rng.below(TOOLS.len() as u64) as usize]
    }

    /// A result payload: usually rows, sometimes empty, sometimes an error.
    fn result(&mut self, rows: u64) -> (String, bool) {
        let is_error = self.rng.chance(3);
        if is_error {
            return (
                r#"{"content":[{"type":"text","text":"upstream timeout"}],"isError":true}"#.into(),
                true,
            );
        }
        let items: Vec<String> = (0..rows)
            .map(|k| format!("{{\"id\":{k},\"title\":\"row {k}\"}}"))
            .collect();
        let text = format!("[{}]", items.join(",")).replace('"', "\\\"");
        (
            format!(r#"{{"content":[{{"type":"text","text":"{text}"}}],"isError":false}}"#),
            false,
        )
    }

    fn rows(&mut self) -> u64 {
        if self.rng.chance(8) {
            0
        } else {
            1 + self.rng.below(40)
        }
    }

    /// FastMCP 4.x: client span → nested MCP SDK `MCP send` span → server span (3 spans).
    fn fastmcp_call(&mut self) {
        let trace = self.next_trace();
        let (tool, median) = self.tool();
        let ms = self.rng.latency_ms(median);
        let failed = self.rng.chance(3);
        let mut client_attrs = vec![
            kv("mcp.method.name", s("tools/call")),
            kv("fastmcp.component.key", s(tool)),
            kv("gen_ai.tool.name", s(tool)),
        ];
        let mut server_attrs = vec![
            kv("fastmcp.span.seam", Value::BoolValue(true)),
            kv("mcp.method.name", s("tools/call")),
            kv("fastmcp.server.name", s("search-mcp")),
            kv("mcp.protocol.version", s("2026-07-28")),
            kv("mcp.session.id", s(format!("{:032x}", self.rng.next_u64()))),
            kv("gen_ai.tool.name", s(tool)),
            kv("fastmcp.component.type", s("tool")),
        ];
        if failed {
            client_attrs.push(kv("error.type", s("tool_error")));
            server_attrs.push(kv("error.type", s("tool_error")));
        }
        let status = failed.then(|| Status {
            code: 2,
            message: "tool failed".into(),
        });
        let mut outer = self.span(
            trace,
            format!("tools/call {tool}"),
            SpanKind::Client,
            None,
            ms + 2.0,
            client_attrs,
        );
        outer.status = status.clone();
        let outer_id = u64::from_be_bytes(outer.span_id[..].try_into().expect("8 bytes"));
        let attrs = vec![
            kv("mcp.method.name", s("tools/call")),
            kv("jsonrpc.request.id", s((self.call % 1000).to_string())),
        ];
        let send = self.span(
            trace,
            format!("MCP send tools/call {tool}"),
            SpanKind::Client,
            Some(outer_id),
            ms + 1.0,
            attrs,
        );
        let send_id = u64::from_be_bytes(send.span_id[..].try_into().expect("8 bytes"));
        let mut server = self.span(
            trace,
            format!("tools/call {tool}"),
            SpanKind::Server,
            Some(send_id),
            ms,
            server_attrs,
        );
        server.status = status;
        self.agent.push("fastmcp", outer);
        self.agent.push("mcp-python-sdk", send);
        self.fastmcp.push("fastmcp", server);
    }

    /// OTel semantic conventions with opt-in content (arguments and result).
    fn semconv_call(&mut self) {
        let trace = self.next_trace();
        let (tool, median) = self.tool();
        let ms = self.rng.latency_ms(median);
        let rows = self.rows();
        let (result, is_error) = self.result(rows);
        let mut attrs = vec![
            kv("mcp.method.name", s("tools/call")),
            kv("gen_ai.tool.name", s(tool)),
            kv("gen_ai.operation.name", s("execute_tool")),
            kv("mcp.protocol.version", s("2025-06-18")),
            kv("mcp.session.id", s(format!("sess-{}", self.rng.below(50)))),
            kv("jsonrpc.request.id", s((self.call % 1000).to_string())),
            kv(
                "gen_ai.tool.call.arguments",
                s(format!(
                    r#"{{"query":"q{}","limit":{rows}}}"#,
                    self.rng.below(20)
                )),
            ),
            kv("gen_ai.tool.call.result", s(result)),
            kv("network.transport", s("tcp")),
        ];
        if is_error {
            attrs.push(kv("error.type", s("tool_error")));
        }
        let span = self.span(
            trace,
            format!("tools/call {tool}"),
            SpanKind::Server,
            None,
            ms,
            attrs,
        );
        self.semconv.push("mcp-server-instrumentation", span);
    }

    /// OpenLLMetry: an INTERNAL `{tool}.tool` span with entity input and output (server side).
    fn traceloop_call(&mut self) {
        let trace = self.next_trace();
        let (tool, median) = self.tool();
        let ms = self.rng.latency_ms(median);
        let rows = self.rows();
        let items: Vec<String> = (0..rows)
            .map(|k| format!(r#"{{"type": "text", "content": "item {k}"}}"#))
            .collect();
        let attrs = vec![
            kv("traceloop.span.kind", s("tool")),
            kv("traceloop.entity.name", s(tool)),
            kv("traceloop.workflow.name", s("docs-mcp.mcp")),
            kv(
                "traceloop.entity.input",
                s(format!(
                    r#"{{"tool_name": "{tool}", "arguments": {{"path": "/docs/{}"}}}}"#,
                    self.rng.below(100)
                )),
            ),
            kv(
                "traceloop.entity.output",
                s(format!("[{}]", items.join(", "))),
            ),
        ];
        let span = self.span(
            trace,
            format!("{tool}.tool"),
            SpanKind::Internal,
            None,
            ms,
            attrs,
        );
        self.traceloop
            .push("opentelemetry.instrumentation.mcp.instrumentation", span);
    }

    /// Logfire: `MCP server handle request: tools/call` with `request` / `response` JSON.
    fn logfire_call(&mut self) {
        let trace = self.next_trace();
        let (tool, median) = self.tool();
        let ms = self.rng.latency_ms(median);
        let rows = self.rows();
        let (result, _) = self.result(rows);
        let attrs = vec![
            kv(
                "request",
                s(format!(
                    r#"{{"method":"tools/call","params":{{"name":"{tool}","arguments":{{"id":{}}}}}}}"#,
                    self.rng.below(500)
                )),
            ),
            kv("response", s(result)),
            kv(
                "logfire.msg_template",
                s("MCP server handle request: tools/call"),
            ),
            kv("logfire.span_type", s("span")),
        ];
        let span = self.span(
            trace,
            "MCP server handle request: tools/call".into(),
            SpanKind::Internal,
            None,
            ms,
            attrs,
        );
        self.logfire.push("logfire.mcp", span);
    }

    /// A model call with token usage, on the agent.
    fn llm_call(&mut self) {
        let trace = self.next_trace();
        let model = ["gpt-4o", "claude-sonnet-4", "gpt-4o-mini"][self.rng.below(3) as usize];
        let ms = self.rng.latency_ms(1200.0);
        let attrs = vec![
            kv("gen_ai.operation.name", s("chat")),
            kv("gen_ai.provider.name", s("openai")),
            kv("gen_ai.request.model", s(model)),
            kv("gen_ai.response.model", s(model)),
            kv(
                "gen_ai.usage.input_tokens",
                i(500 + self.rng.below(8000) as i64),
            ),
            kv(
                "gen_ai.usage.output_tokens",
                i(20 + self.rng.below(800) as i64),
            ),
            kv(
                "gen_ai.conversation.id",
                s(format!("conv-{}", self.rng.below(200))),
            ),
        ];
        let span = self.span(
            trace,
            format!("chat {model}"),
            SpanKind::Client,
            None,
            ms,
            attrs,
        );
        self.agent.push("openai-instrumentation", span);
    }

    /// An MCP server's call to the API behind its tool, with rate-limit headers.
    fn upstream_call(&mut self) {
        let trace = self.next_trace();
        let host = UPSTREAMS[self.rng.below(UPSTREAMS.len() as u64) as usize];
        let limit = 5000;
        let remaining = self.rng.below(limit);
        let status = if remaining < 50 { 429 } else { 200 };
        let attrs = vec![
            kv("http.request.method", s("GET")),
            kv("server.address", s(host)),
            kv(
                "url.full",
                s(format!(
                    "https://{host}/v1/items?page={}",
                    self.rng.below(10)
                )),
            ),
            kv("http.response.status_code", i(status)),
            kv(
                "http.response.header.x-ratelimit-remaining",
                header(remaining.to_string()),
            ),
            kv(
                "http.response.header.x-ratelimit-limit",
                header(limit.to_string()),
            ),
            kv(
                "http.response.header.x-ratelimit-reset",
                header((1 + self.rng.below(60)).to_string()),
            ),
        ];
        let ms = self.rng.latency_ms(60.0);
        let span = self.span(trace, "GET".into(), SpanKind::Client, None, ms, attrs);
        self.fastmcp
            .push("opentelemetry.instrumentation.httpx", span);
    }

    fn tools_list(&mut self) {
        let trace = self.next_trace();
        let attrs = vec![
            kv("mcp.method.name", s("tools/list")),
            kv("mcp.protocol.version", s("2026-07-28")),
        ];
        let span = self.span(
            trace,
            "tools/list".into(),
            SpanKind::Server,
            None,
            1.5,
            attrs,
        );
        self.fastmcp.push("fastmcp", span);
    }

    /// A span toolsight does not model (counted and dropped).
    fn db_span(&mut self) {
        let trace = self.next_trace();
        let attrs = vec![
            kv("db.system.name", s("postgresql")),
            kv("db.query.summary", s("select items")),
        ];
        let span = self.span(
            trace,
            "select items".into(),
            SpanKind::Client,
            None,
            3.0,
            attrs,
        );
        self.semconv
            .push("opentelemetry.instrumentation.psycopg", span);
    }

    fn count(&self) -> usize {
        self.spans
    }
}

impl Traffic {
    /// A template of about `spans` spans (whole calls: FastMCP calls are 3 spans).
    pub fn new(spans: usize, worker: u16, seed: u64) -> Traffic {
        let proc = |service| Proc {
            service,
            scopes: Vec::new(),
        };
        let mut b = Builder {
            rng: Rng::new(seed),
            call: 0,
            spans: 0,
            agent: proc("agent"),
            fastmcp: proc("search-mcp"),
            semconv: proc("crm-mcp"),
            traceloop: proc("docs-mcp"),
            logfire: proc("billing-mcp"),
        };
        let steps: [fn(&mut Builder); 10] = [
            Builder::fastmcp_call,
            Builder::semconv_call,
            Builder::traceloop_call,
            Builder::logfire_call,
            Builder::llm_call,
            Builder::upstream_call,
            Builder::semconv_call,
            Builder::fastmcp_call,
            Builder::tools_list,
            Builder::db_span,
        ];
        let mut k = 0;
        while b.count() < spans.max(1) {
            steps[k % steps.len()](&mut b);
            k += 1;
        }
        let mut request = ExportTraceServiceRequest::default();
        for p in [b.agent, b.fastmcp, b.semconv, b.traceloop, b.logfire] {
            if p.scopes.is_empty() {
                continue;
            }
            let mut rs = ResourceSpans {
                resource: Some(Resource {
                    attributes: vec![
                        kv("service.name", s(p.service)),
                        kv("service.instance.id", s(format!("{}-{worker}", p.service))),
                        kv("telemetry.sdk.language", s("python")),
                    ],
                    ..Default::default()
                }),
                ..Default::default()
            };
            for (scope, spans) in p.scopes {
                rs.scope_spans.push(ScopeSpans {
                    scope: Some(InstrumentationScope {
                        name: scope.into(),
                        ..Default::default()
                    }),
                    spans,
                    ..Default::default()
                });
            }
            request.resource_spans.push(rs);
        }
        let timings: Vec<Timing> = request
            .resource_spans
            .iter()
            .flat_map(|rs| &rs.scope_spans)
            .flat_map(|ss| &ss.spans)
            .map(|sp| Timing {
                start_before_ns: sp.start_time_unix_nano,
                duration_ns: sp.end_time_unix_nano - sp.start_time_unix_nano,
            })
            .collect();
        let spans = timings.len();
        Traffic {
            request,
            timings,
            spans,
            worker,
            seq: 0,
        }
    }

    pub fn spans(&self) -> usize {
        self.spans
    }

    pub fn request(&self) -> &ExportTraceServiceRequest {
        &self.request
    }

    /// Refreshes the template into a new request: trace ids unique per (run, worker, sequence)
    /// and timestamps just before `now_unix_nanos`.
    pub fn next(&mut self, run: u16, now_unix_nanos: u64) -> &ExportTraceServiceRequest {
        let prefix = self.next_prefix(run);
        self.with_prefix(prefix, now_unix_nanos)
    }

    /// The next unique trace-id prefix of this generator: (run, worker, sequence), spread over
    /// the whole range one to one (the splitmix64 finalizer is a bijection), so prefixes look
    /// like the random trace ids of real exporters: a raw-row policy sampling by the id's
    /// leading bytes keeps the share it is set to, not every trace.
    pub fn next_prefix(&mut self, run: u16) -> [u8; 8] {
        loop {
            self.seq += 1;
            let id =
                (u64::from(run) << 48) | (u64::from(self.worker) << 32) | (self.seq & 0xFFFF_FFFF);
            let mut z = id;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            let prefix = (z ^ (z >> 31)).to_be_bytes();
            if prefix != crate::MARKER {
                return prefix;
            }
        }
    }

    /// The template with every trace id starting with `prefix` and current timestamps.
    pub fn with_prefix(
        &mut self,
        prefix: [u8; 8],
        now_unix_nanos: u64,
    ) -> &ExportTraceServiceRequest {
        let mut t = self.timings.iter();
        for rs in &mut self.request.resource_spans {
            for ss in &mut rs.scope_spans {
                for sp in &mut ss.spans {
                    let timing = t.next().expect("one timing per span");
                    sp.trace_id[..8].copy_from_slice(&prefix);
                    sp.start_time_unix_nano = now_unix_nanos - timing.start_before_ns;
                    sp.end_time_unix_nano = sp.start_time_unix_nano + timing.duration_ns;
                }
            }
        }
        &self.request
    }
}

#[cfg(test)]
mod tests {
    use super::Traffic;

    #[test]
    fn trace_id_prefixes_are_unique_and_spread_like_random_ids() {
        let mut t = Traffic::new(14, 3, 7);
        let prefixes: Vec<u64> = (0..20_000)
            .map(|_| u64::from_be_bytes(t.next_prefix(2)))
            .collect();
        let mut unique: std::collections::HashSet<u64> = prefixes.iter().copied().collect();
        assert_eq!(unique.len(), prefixes.len());
        // Another run of the same worker never repeats them.
        let mut again = Traffic::new(14, 3, 7);
        for _ in 0..20_000 {
            assert!(unique.insert(u64::from_be_bytes(again.next_prefix(3))));
        }
        // A policy keeping 10% of traces by the leading bytes keeps about 10% of them.
        let below = prefixes
            .iter()
            .filter(|&&p| (p as f64) < 0.1 * u64::MAX as f64)
            .count();
        assert!((1_700..2_300).contains(&below), "{below} of 20,000");
    }
}
