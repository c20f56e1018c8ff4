//! OTLP/JSON spans with the attributes the rule kinds read, sent to a running service.

use chrono::{DateTime, Utc};
use serde_json::{Value, json};

use super::Service;

/// Span builder: OTLP/JSON with the attributes each kind reads.
pub struct Spans {
    spans: Vec<Value>,
    /// `service.instance.id` of the resource, when set.
    pub instance: Option<String>,
    n: u64,
    /// Distinguishes the trace ids of separate batches.
    run: u64,
}

pub fn attr(k: &str, v: Value) -> Value {
    match v {
        Value::String(s) => json!({"key": k, "value": {"stringValue": s}}),
        Value::Number(n) => json!({"key": k, "value": {"intValue": n.to_string()}}),
        other => json!({"key": k, "value": {"stringValue": other.to_string()}}),
    }
}

impl Spans {
    pub fn new() -> Self {
        static RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Spans {
            spans: Vec::new(),
            instance: None,
            n: 0,
            run: nanos ^ (RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) << 48),
        }
    }

    pub fn push(
        &mut self,
        name: &str,
        kind: i32,
        minute: DateTime<Utc>,
        ms: u64,
        error: bool,
        attrs: Vec<Value>,
    ) {
        self.n += 1;
        let start = minute.timestamp_nanos_opt().unwrap() as u64 + self.n * 1_000_000;
        self.spans.push(json!({
            "traceId": format!("{:016x}{:016x}", self.run, self.n),
            "spanId": format!("{:016x}", self.n),
            "name": name, "kind": kind,
            "startTimeUnixNano": start.to_string(),
            "endTimeUnixNano": (start + ms * 1_000_000).to_string(),
            "attributes": attrs,
            "status": {"code": if error { 2 } else { 1 }},
        }));
    }

    pub fn tool(
        &mut self,
        tool: &str,
        minute: DateTime<Utc>,
        ms: u64,
        error: bool,
        extra: Vec<Value>,
    ) {
        let mut a = vec![
            attr("mcp.method.name", json!("tools/call")),
            attr("gen_ai.tool.name", json!(tool)),
        ];
        if error {
            a.push(attr("error.type", json!("tool_error")));
        }
        a.extend(extra);
        self.push(&format!("tools/call {tool}"), 2, minute, ms, error, a);
    }

    /// One call traced on both sides, in one trace: the client span (CLIENT) and the server
    /// span it caused (SERVER, its child), as an MCP client and server of one service emit.
    pub fn both_sides(
        &mut self,
        tool: &str,
        minute: DateTime<Utc>,
        ms: u64,
        error: bool,
        extra: Vec<Value>,
    ) {
        self.tool(tool, minute, ms, error, extra);
        let mut client = self.spans.last().cloned().unwrap();
        self.n += 1;
        client["kind"] = json!(3);
        client["spanId"] = json!(format!("{:016x}", self.n));
        if let Some(server) = self.spans.last_mut() {
            server["parentSpanId"] = client["spanId"].clone();
        }
        self.spans.push(client);
    }

    /// [`Spans::both_sides`] with the server span `overhead_ms` shorter than the client's, half
    /// of it on either end (the time the request and the response travel).
    pub fn both_sides_with_overhead(
        &mut self,
        tool: &str,
        minute: DateTime<Utc>,
        ms: u64,
        overhead_ms: u64,
    ) {
        self.both_sides(tool, minute, ms, false, vec![]);
        let n = self.spans.len();
        let server = &mut self.spans[n - 2];
        let shift = |v: &Value, by: i64| {
            json!((v.as_str().unwrap().parse::<i64>().unwrap() + by * 500_000).to_string())
        };
        server["startTimeUnixNano"] = shift(&server["startTimeUnixNano"], overhead_ms as i64);
        server["endTimeUnixNano"] = shift(&server["endTimeUnixNano"], -(overhead_ms as i64));
    }

    pub fn body(&self) -> Vec<u8> {
        self.body_for("svc")
    }

    /// The OTLP/JSON body with `service.name` = `service`.
    pub fn body_for(&self, service: &str) -> Vec<u8> {
        let mut resource = vec![attr("service.name", json!(service))];
        if let Some(i) = &self.instance {
            resource.push(attr("service.instance.id", json!(i)));
        }
        serde_json::to_vec(&json!({"resourceSpans": [{
            "resource": {"attributes": resource},
            "scopeSpans": [{"scope": {"name": "t"}, "spans": self.spans}]
        }]}))
        .unwrap()
    }
}

pub async fn send(svc: &Service, spans: Spans) {
    send_body(svc, spans.body()).await
}

/// Sends an OTLP/JSON body and expects every span accepted.
pub async fn send_body(svc: &Service, body: Vec<u8>) {
    let r = reqwest::Client::new()
        .post(svc.http_url())
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({}),
        "nothing rejected"
    );
}

impl Default for Spans {
    fn default() -> Self {
        Self::new()
    }
}
