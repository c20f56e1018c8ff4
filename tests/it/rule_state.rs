//! The retry-loop and token-burn rules read per-minute state the writers keep beside the raw
//! rows (`loop_calls_1m`, `session_tokens_1m`), never the raw window. On generated histories,
//! with the two sides of calls arriving in separate exports, in any order, through several
//! writers, across minute boundaries and a restart of the service, the state equals what the
//! raw rows say by the rule's raw-row definition, and so do the rule results.

use chrono::{DateTime, Duration, DurationRound, Utc};
use serde_json::{Value, json};

use crate::common::{self, Service};
use common::spans::attr;

/// A small deterministic generator (xorshift): the history is the same on every run.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

#[allow(clippy::too_many_arguments)] // one argument per span field
fn span(
    trace: u64,
    id: u64,
    parent: Option<u64>,
    kind: i32,
    name: &str,
    start: DateTime<Utc>,
    error: bool,
    attrs: Vec<Value>,
) -> Value {
    let start = start.timestamp_nanos_opt().unwrap() as u64;
    let mut s = json!({
        "traceId": format!("{:032x}", trace),
        "spanId": format!("{:016x}", id),
        "name": name, "kind": kind,
        "startTimeUnixNano": start.to_string(),
        "endTimeUnixNano": (start + 40_000_000).to_string(),
        "attributes": attrs,
        "status": {"code": if error { 2 } else { 1 }},
    });
    if let Some(p) = parent {
        s["parentSpanId"] = json!(format!("{:016x}", p));
    }
    s
}

fn body(service: &str, spans: Vec<Value>) -> Vec<u8> {
    serde_json::to_vec(&json!({"resourceSpans": [{
        "resource": {"attributes": [attr("service.name", json!(service))]},
        "scopeSpans": [{"scope": {"name": "t"}, "spans": spans}]
    }]}))
    .unwrap()
}

/// Exports (service, spans) of a generated history starting at `t0`: agent sessions calling
/// tools, each call traced on the client side, the server side or both (the sides in separate
/// exports of two services), failing, empty or fine, with or without arguments, some repeated
/// quickly (loops, across minute boundaries), and LLM calls with tokens.
fn history(g: &mut Gen, t0: DateTime<Utc>, run: u64) -> Vec<(&'static str, Vec<Value>)> {
    let mut exports: Vec<(&'static str, Vec<Value>)> = Vec::new();
    let tools = ["search", "fetch", "list"];
    let mut id = run << 32;
    for session in 0..8u64 {
        let sid = format!("sess-{run}-{session}");
        let mut at = t0 + Duration::seconds(g.below(50) as i64);
        for task in 0..6u64 {
            let trace = (run << 40) | (session << 20) | task;
            let mut client_spans = Vec::new();
            let mut server_spans = Vec::new();
            let calls = 1 + g.below(7);
            let tool = tools[g.below(3) as usize];
            let args = (g.chance(60)).then(|| format!("{{\"q\":\"{}\"}}", g.below(2)));
            for _ in 0..calls {
                // Quick repeats: seconds apart, so loops cross minute boundaries.
                at += Duration::milliseconds(500 + g.below(9_000) as i64);
                let error = g.chance(30);
                let empty = !error && g.chance(25);
                let result = if empty {
                    r#"{"content":[]}"#
                } else {
                    r#"{"content":[{"type":"text","text":"ok"}]}"#
                };
                let mut a = vec![
                    attr("mcp.method.name", json!("tools/call")),
                    attr("gen_ai.tool.name", json!(tool)),
                    attr("gen_ai.conversation.id", json!(sid)),
                    attr("gen_ai.tool.call.result", json!(result)),
                ];
                if let Some(args) = &args {
                    a.push(attr("gen_ai.tool.call.arguments", json!(args)));
                }
                if error {
                    a.push(attr("error.type", json!("tool_error")));
                }
                let name = format!("tools/call {tool}");
                let sides = g.below(4); // 0 client, 1 server, 2-3 both
                id += 2;
                let client = id;
                if sides != 1 {
                    // The client does not always see the server's error.
                    let client_error = error && g.chance(50);
                    client_spans.push(span(
                        trace,
                        client,
                        None,
                        3,
                        &name,
                        at,
                        client_error,
                        a.clone(),
                    ));
                }
                if sides != 0 {
                    let parent = (sides != 1).then_some(client);
                    let server_at = at + Duration::milliseconds(2);
                    server_spans.push(span(trace, id + 1, parent, 2, &name, server_at, error, a));
                }
            }
            // LLM calls of the session, tokens per call.
            let mut llm = Vec::new();
            for _ in 0..g.below(3) {
                id += 2;
                llm.push(span(
                    trace,
                    id,
                    None,
                    3,
                    "chat m",
                    at + Duration::milliseconds(g.below(90_000) as i64),
                    false,
                    vec![
                        attr("gen_ai.operation.name", json!("chat")),
                        attr("gen_ai.request.model", json!("m")),
                        attr("gen_ai.usage.input_tokens", json!(100 + g.below(5_000))),
                        attr("gen_ai.usage.output_tokens", json!(g.below(900))),
                        attr("gen_ai.conversation.id", json!(sid)),
                    ],
                ));
            }
            // The sides travel separately, often split over several exports, in any order.
            let mut parts: Vec<(&'static str, Vec<Value>)> = Vec::new();
            for (service, spans) in [("agent", client_spans), ("server", server_spans)] {
                let mut rest = spans;
                while !rest.is_empty() {
                    let n = 1 + g.below(rest.len() as u64) as usize;
                    parts.push((service, rest.drain(..n).collect()));
                }
            }
            if !llm.is_empty() {
                parts.push(("agent", llm));
            }
            for i in (1..parts.len()).rev() {
                parts.swap(i, g.below(i as u64 + 1) as usize);
            }
            exports.extend(parts);
            at += Duration::seconds(g.below(40) as i64);
        }
    }
    exports
}

/// Sends the exports concurrently, 8 at a time, each one answered 200.
async fn send_all(svc: &Service, exports: Vec<(&'static str, Vec<Value>)>) {
    use futures_util::StreamExt;
    let client = reqwest::Client::new();
    let url = svc.http_url();
    futures_util::stream::iter(exports)
        .map(|(service, spans)| {
            let (client, url) = (client.clone(), url.clone());
            async move {
                let r = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body(service, spans))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 200);
            }
        })
        .buffer_unordered(8)
        .collect::<Vec<()>>()
        .await;
}

/// The rule's result over the raw rows by its raw-row definition, in the same whole-minute
/// window (the minute holding `to` counts whole, as every rule's window: live, `to` is now):
/// (service, tool, session, repeats × 2 + same arguments).
async fn loops_from_raw(
    pool: &sqlx::PgPool,
    to: DateTime<Utc>,
    window_secs: f64,
    min_repeats: i64,
    per_minute: i64,
) -> Vec<(String, String, String, i64)> {
    let loop_calls = toolsight::store::alerts::LOOP_CALLS;
    let mut rows: Vec<(String, String, String, i64)> = sqlx::query_as(&format!(
        "WITH m AS (
            SELECT date_trunc('minute', start_time) AS minute, service, tool, session_key,
                   coalesce(args_hash, '\\x'::bytea) AS args_hash, count(*) AS c,
                   count(*) FILTER (WHERE outcome <> 'ok') AS f,
                   count(*) FILTER (WHERE outcome <> 'ok' OR result_empty IS TRUE) AS s
            FROM tool_calls t
            WHERE start_time >= date_trunc('minute', $1::timestamptz - make_interval(secs => $2))
              AND date_trunc('minute', start_time) < $1::timestamptz AND {loop_calls}
            GROUP BY 1, 2, 3, 4, 5)
         SELECT service, tool, session_key, max(n * 2 + (args_hash <> '\\x'::bytea)::int)::bigint FROM (
            SELECT service, tool, session_key, args_hash, sum(c) AS n, sum(s) AS stuck, max(c) AS busiest
            FROM m GROUP BY 1, 2, 3, 4) k
         WHERE n >= $3 AND (stuck > 0 OR busiest > $4)
         GROUP BY 1, 2, 3"
    ))
    .bind(to)
    .bind(window_secs)
    .bind(min_repeats)
    .bind(per_minute)
    .fetch_all(pool)
    .await
    .unwrap();
    rows.sort();
    rows
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loop_and_token_state_equal_the_raw_rows_across_writers_and_a_restart() {
    let name = "rule_state";
    let writers = |c: &mut toolsight::config::Config| c.ingest.writers = 4;
    let svc = Service::start_with(name, writers).await;
    let t0 = (Utc::now() - Duration::minutes(40))
        .duration_trunc(Duration::minutes(1))
        .unwrap();
    let mut g = Gen(0x9e37_79b9_7f4a_7c15);
    send_all(&svc, history(&mut g, t0, 1)).await;
    // A restart: the state is in the database, and the other side of calls stored before it
    // arrives after it.
    svc.stop().await.unwrap();
    let svc = Service::replica(name, writers).await;
    send_all(&svc, history(&mut g, t0 + Duration::minutes(3), 2)).await;

    let loops: i64 = svc
        .count("SELECT count(*) FROM tool_calls WHERE loop_counted")
        .await;
    let joined = svc.count(common::JOINED_PAIRS).await;
    assert!(loops > 100 && joined > 50, "loops {loops}, joined {joined}");
    assert_eq!(common::rollup_mismatches(&svc.pool).await, vec![]);

    // The rule reads the state; the raw-row definition over the same minutes agrees, at every
    // minute of the history.
    for minute in (2..30).step_by(3) {
        let to = t0 + Duration::minutes(minute) + Duration::seconds(17);
        for (window, repeats) in [(600.0, 3), (120.0, 2), (1800.0, 5)] {
            let live =
                toolsight::store::alerts::retry_loops(&svc.pool, to, window, repeats, false, 30.0)
                    .await
                    .unwrap();
            let mut live: Vec<(String, String, String, i64)> = live
                .into_iter()
                .map(|o| {
                    let l = |k: &str| o.labels[k].clone();
                    (
                        l("service"),
                        l("tool"),
                        l("session"),
                        o.samples * 2 + o.extra.unwrap() as i64,
                    )
                })
                .collect();
            live.sort();
            let raw = loops_from_raw(&svc.pool, to, window, repeats, 2).await;
            assert_eq!(live, raw, "at {to}, window {window}");
            if minute == 29 && window == 1800.0 {
                assert!(live.len() > 5, "{live:?}");
            }
        }
    }
    let to = t0 + Duration::minutes(30);
    let burn = toolsight::store::alerts::token_burn(&svc.pool, to, 1800.0)
        .await
        .unwrap();
    let raw: Vec<(String, i64)> = sqlx::query_as(
        "SELECT session_key, sum(input_tokens + output_tokens)::bigint FROM llm_calls
         WHERE start_time >= date_trunc('minute', $1::timestamptz - interval '30 minutes')
           AND date_trunc('minute', start_time) < $1 GROUP BY 1 ORDER BY 1",
    )
    .bind(to)
    .fetch_all(&svc.pool)
    .await
    .unwrap();
    let mut from_state: Vec<(String, i64)> = burn
        .iter()
        .map(|o| (o.labels["session"].clone(), o.value as i64))
        .collect();
    from_state.sort();
    assert!(raw.len() > 5, "{raw:?}");
    assert_eq!(from_state, raw);
    svc.stop().await.unwrap();
}
