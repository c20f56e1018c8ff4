//! `toolsight loadgen --scenario incidents`: healthy traffic, then every failure the default
//! rules catch at once, then healthy traffic again, so each alert fires and resolves.
//!
//! Timeline (scaled by `--duration`, default 6 minutes): first third healthy, second third
//! incidents, last third healthy. Incidents: `query_database` slows from 200 ms to 2 s,
//! `list_items` returns empty results, `search` fails a third of its calls, one conversation calls
//! `echo` with the same arguments again and again, one conversation burns 100k tokens, and
//! `api.github.com` runs down to 3% of its rate limit.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{InstrumentationScope, KeyValue, any_value::Value};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    ResourceSpans, ScopeSpans, Span, Status, span::SpanKind,
};

use super::client::{Client, Outcome};
use super::traffic::{Rng, kv, s};
use super::{LoadConfig, Report};

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

/// One second of traffic; `incident` switches every failure on.
fn second(run: u16, seq: &mut u64, rng: &mut Rng, incident: bool) -> ExportTraceServiceRequest {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
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

/// Runs the scenario for `cfg.duration` (at least 3 s), one export per second.
pub async fn run(cfg: &LoadConfig) -> anyhow::Result<Report> {
    let mut client = Client::connect(cfg.protocol, &cfg.endpoint, cfg.gzip, cfg.timeout).await?;
    let started = Instant::now();
    let third = cfg.duration.max(Duration::from_secs(3)) / 3;
    let (mut rng, mut seq) = (Rng::new(7), 0u64);
    let mut report = Report::empty(cfg);
    let mut phase = "";
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while started.elapsed() < third * 3 {
        tick.tick().await;
        let incident = started.elapsed() >= third && started.elapsed() < third * 2;
        let now_phase = if incident {
            "incidents"
        } else if started.elapsed() < third {
            "healthy"
        } else {
            "healthy again"
        };
        if now_phase != phase {
            phase = now_phase;
            eprintln!("[{:>4.0}s] {phase}", started.elapsed().as_secs_f64());
        }
        let req = second(cfg.run_id, &mut seq, &mut rng, incident);
        let spans = req
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len() as u64)
            .sum::<u64>();
        let t = Instant::now();
        let outcome = client
            .send(client.finish_body(client.encode_raw(&req)))
            .await;
        report.requests_sent += 1;
        report.spans_sent += spans;
        match outcome {
            Outcome::Accepted { rejected } => {
                report.spans_accepted += spans - rejected.max(0) as u64
            }
            Outcome::Retryable(_) => report.spans_refused += spans,
            Outcome::Failed(why) => {
                report.spans_failed += spans;
                report.last_failure = Some(why);
            }
        }
        report.latency_max_ms = report
            .latency_max_ms
            .max(t.elapsed().as_secs_f64() * 1000.0);
    }
    report.elapsed_secs = started.elapsed().as_secs_f64();
    report.accepted_spans_per_sec = report.spans_accepted as f64 / report.elapsed_secs.max(1e-9);
    Ok(report)
}
