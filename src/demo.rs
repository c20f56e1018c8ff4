//! The incidents scenario, shared by `toolsight demo` and `toolsight-loadgen --scenario
//! incidents`: healthy traffic, then every failure the default rules catch at once, then healthy
//! traffic again, so each alert kind fires and resolves.
//!
//! Timeline (scaled to the run's length): first third healthy, second third incidents, last third
//! healthy. Incidents: `query_database` slows from 200 ms to 2 s, `list_items` returns empty
//! results, `search` fails a third of its calls, one conversation calls `echo` with the same
//! arguments again and again, one conversation burns 100k tokens, and `api.github.com` runs down
//! to 3% of its rate limit.

use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{
    AnyValue, InstrumentationScope, KeyValue, any_value::Value,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    ResourceSpans, ScopeSpans, Span, Status, span::SpanKind,
};

/// The default rules' kinds with short windows (`alerts/demo.yaml`), so the scenario shows every
/// alert fire and resolve within minutes. Not for production: windows this short page on noise.
pub const DEMO_RULES: &str = include_str!("../alerts/demo.yaml");

/// A small, fast, deterministic PRNG (SplitMix64): traffic is reproducible from its seed.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
    /// A latency around `median_ms`, with a long tail (log-uniform spread of ×0.3 … ×6).
    pub fn latency_ms(&mut self, median_ms: f64) -> f64 {
        let u = (self.below(10_000) as f64) / 10_000.0;
        median_ms * 0.3 * 20f64.powf(u * u)
    }
}

/// An OTLP attribute.
pub fn kv(key: &str, v: Value) -> KeyValue {
    KeyValue {
        key: key.into(),
        value: Some(AnyValue { value: Some(v) }),
        key_strindex: 0,
    }
}
pub fn s(v: impl Into<String>) -> Value {
    Value::StringValue(v.into())
}
/// The scenario's exports, one per second.
#[derive(Debug, Clone)]
pub struct Incidents {
    run: u16,
    seq: u64,
    rng: Rng,
}

/// Where a run of the scenario is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Healthy,
    Incidents,
    HealthyAgain,
}

impl Phase {
    /// The phase `elapsed` into a run of `total` (at least 3 s): thirds.
    pub fn at(elapsed: Duration, total: Duration) -> Phase {
        let third = total.max(Duration::from_secs(3)) / 3;
        if elapsed < third {
            Phase::Healthy
        } else if elapsed < third * 2 {
            Phase::Incidents
        } else {
            Phase::HealthyAgain
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Phase::Healthy => "healthy",
            Phase::Incidents => "incidents",
            Phase::HealthyAgain => "healthy again",
        }
    }
}

impl Incidents {
    /// `run` sets the first bytes of every trace id, so two runs never share a trace.
    pub fn new(run: u16) -> Incidents {
        Incidents {
            run,
            seq: 0,
            rng: Rng::new(7),
        }
    }

    /// The export of the second ending at `now_nanos` (Unix time) in `phase`.
    pub fn second(&mut self, phase: Phase, now_nanos: u64) -> ExportTraceServiceRequest {
        second(
            self.run,
            &mut self.seq,
            &mut self.rng,
            phase == Phase::Incidents,
            now_nanos,
        )
    }
}

struct Builder {
    rng: Rng,
    spans: Vec<Span>,
    now: u64,
    seq: u64,
    run: u16,
}

impl Builder {
    fn span(&mut self, name: String, kind: SpanKind, ms: f64, error: bool, attrs: Vec<KeyValue>) {
        self.seq += 1;
        let mut trace_id = vec![0u8; 16];
        trace_id[..2].copy_from_slice(&self.run.to_be_bytes());
        trace_id[8..].copy_from_slice(&self.seq.to_be_bytes());
        let start = self.now - 500_000_000 - self.rng.below(400_000_000);
        self.spans.push(Span {
            trace_id,
            span_id: (self.rng.next_u64() | 1).to_be_bytes().to_vec(),
            name,
            kind: kind as i32,
            start_time_unix_nano: start,
            end_time_unix_nano: start + (ms * 1e6) as u64,
            attributes: attrs,
            status: error.then(|| Status {
                code: 2,
                message: "tool failed".into(),
            }),
            ..Default::default()
        });
    }

    fn tool(&mut self, tool: &str, ms: f64, error: bool, mut extra: Vec<KeyValue>) {
        extra.push(kv("mcp.method.name", s("tools/call")));
        extra.push(kv("gen_ai.tool.name", s(tool)));
        if error {
            extra.push(kv("error.type", s("tool_error")));
        }
        self.span(
            format!("tools/call {tool}"),
            SpanKind::Server,
            ms,
            error,
            extra,
        );
    }
}

/// One second of traffic ending at `now` (Unix nanoseconds); `incident` switches every
/// failure on.
fn second(
    run: u16,
    seq: &mut u64,
    rng: &mut Rng,
    incident: bool,
    now: u64,
) -> ExportTraceServiceRequest {
    let mut b = Builder {
        rng: rng.clone(),
        spans: Vec::new(),
        now,
        seq: *seq,
        run,
    };
    for _ in 0..5 {
        let slow = if incident { 2000.0 } else { 200.0 };
        let jitter = b.rng.latency_ms(1.0);
        b.tool(
            "query_database",
            slow * (0.8 + 0.2 * jitter.min(2.0)),
            false,
            vec![],
        );
        let result = if incident {
            r#"{"content":[]}"#
        } else {
            r#"{"content":[{"type":"text","text":"[{\"id\":1},{\"id\":2},{\"id\":3}]"}]}"#
        };
        b.tool(
            "list_items",
            40.0,
            false,
            vec![kv("gen_ai.tool.call.result", s(result))],
        );
        let failing = incident && b.rng.chance(33);
        b.tool("search", 80.0, failing, vec![]);
        let conv = format!("conv-{}", b.rng.below(40));
        let args = format!("{{\"q\":\"{}\"}}", b.rng.below(1000));
        b.tool(
            "echo",
            5.0,
            false,
            vec![
                kv("gen_ai.conversation.id", s(conv.clone())),
                kv("gen_ai.tool.call.arguments", s(args)),
            ],
        );
        b.span(
            "chat gpt-4o".into(),
            SpanKind::Client,
            800.0,
            false,
            vec![
                kv("gen_ai.request.model", s("gpt-4o")),
                kv("gen_ai.usage.input_tokens", Value::IntValue(900)),
                kv("gen_ai.usage.output_tokens", Value::IntValue(100)),
                kv("gen_ai.conversation.id", s(conv)),
            ],
        );
        let remaining = if incident { 3 } else { 60 + b.rng.below(40) };
        b.span(
            "GET".into(),
            SpanKind::Client,
            30.0,
            false,
            vec![
                kv("http.request.method", s("GET")),
                kv("server.address", s("api.github.com")),
                kv("http.response.status_code", Value::IntValue(200)),
                kv(
                    "http.response.header.x-ratelimit-remaining",
                    s(remaining.to_string()),
                ),
                kv("http.response.header.x-ratelimit-limit", s("100")),
            ],
        );
    }
    if incident {
        for _ in 0..3 {
            b.tool(
                "echo",
                5.0,
                false,
                vec![
                    kv("gen_ai.conversation.id", s("conv-stuck")),
                    kv("gen_ai.tool.call.arguments", s(r#"{"q":"same again"}"#)),
                ],
            );
        }
        b.span(
            "chat gpt-4o".into(),
            SpanKind::Client,
            3000.0,
            false,
            vec![
                kv("gen_ai.request.model", s("gpt-4o")),
                kv("gen_ai.usage.input_tokens", Value::IntValue(30_000)),
                kv("gen_ai.usage.output_tokens", Value::IntValue(2_000)),
                kv("gen_ai.conversation.id", s("conv-burn")),
            ],
        );
    }
    *seq = b.seq;
    *rng = b.rng;
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![kv("service.name", s("demo-mcp"))],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "toolsight-incidents".into(),
                    ..Default::default()
                }),
                spans: b.spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}
