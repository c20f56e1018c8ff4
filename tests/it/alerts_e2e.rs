//! Alert rules end to end: the failures of each rule kind are sent as spans over OTLP to the
//! running service; the evaluator (the live loop's code, driven at chosen instants) fires, does
//! not fire on low-traffic noise, survives a restart without re-firing, and resolves.

use crate::common;
use std::collections::BTreeSet;

use chrono::{DateTime, TimeZone, Utc};
use common::spans::{Spans, attr, send};
use common::{Service, eventually, serve_ready};
use serde_json::{Value, json};
use toolsight::evaluate::engine::Notice;
use toolsight::evaluate::rules::parse;
use toolsight::evaluate::run::Evaluator;
use toolsight::evaluate::state::Event;

const RULES: &str = "
groups:
  - name: t
    interval: 1m
    rules:
      - alert: Errors
        kind: error_rate
        window: 5m
        fire_above: 0.05
        clear_below: 0.03
        min_samples: 20
      - alert: Slow
        kind: latency
        window: 10m
        regression: {fire_ratio: 1.5, clear_ratio: 1.2, min_increase: 200ms}
        min_samples: 20
      - alert: Empty
        kind: empty_results
        window: 10m
        fire_above: 0.5
        clear_below: 0.3
        baseline_below: 0.2
        min_samples: 10
      - alert: Loop
        kind: retry_loop
        window: 10m
        min_repeats: 5
        min_samples: 5
        annotations: {summary: '{{ $labels.tool }} repeated {{ $value }} times'}
      - alert: Burn
        kind: token_burn
        window: 30m
        ratio_to_median: 10
        min_samples: 5
      - alert: Headroom
        kind: rate_limit_headroom
        window: 5m
        remaining_below: 0.1
        clear_at: 0.2
        min_samples: 5
";

fn summary(notices: &[Notice]) -> BTreeSet<String> {
    notices
        .iter()
        .map(|n| {
            let status = match n.event {
                Event::Firing { .. } => "firing",
                Event::Resolved { .. } => "resolved",
            };
            let who = ["tool", "session", "upstream"]
                .iter()
                .find_map(|k| n.labels.get(*k))
                .cloned()
                .unwrap_or_default();
            format!("{} {who} {status}", n.alert)
        })
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// Spans reproducing each kind's failure around minute 15 (rate limit: 17), healthy at 25-27.
fn incident_spans(m: &dyn Fn(i64) -> DateTime<Utc>) -> Spans {
    let mut s = Spans::new();
    // Latency: 200 ms in the baseline window, 2 s in the evaluated one, 200 ms again after.
    for _ in 0..30 {
        s.tool("query_database", m(5), 200, false, vec![]);
        s.tool("query_database", m(15), 2000, false, vec![]);
        s.tool("query_database", m(25), 200, false, vec![]);
    }
    // Errors: a third of 30 calls fail; later all succeed. A rare tool fails once in 2 calls.
    for i in 0..30 {
        s.tool("search", m(15), 50, i % 3 == 0, vec![]);
        s.tool("search", m(25), 50, false, vec![]);
    }
    s.tool("rare", m(15), 50, true, vec![]);
    s.tool("rare", m(15), 50, false, vec![]);
    // Empty results: rows in the baseline window, nothing in the evaluated one, rows again.
    let rows = json!(r#"{"content":[{"type":"text","text":"[1,2,3]"}]}"#);
    let none = json!(r#"{"content":[]}"#);
    for _ in 0..20 {
        s.tool(
            "list_items",
            m(5),
            30,
            false,
            vec![attr("gen_ai.tool.call.result", rows.clone())],
        );
        s.tool(
            "list_items",
            m(15),
            30,
            false,
            vec![attr("gen_ai.tool.call.result", none.clone())],
        );
        s.tool(
            "list_items",
            m(25),
            30,
            false,
            vec![attr("gen_ai.tool.call.result", rows.clone())],
        );
    }
    // A retry loop: the same call 6 times in one conversation; another conversation twice.
    for _ in 0..6 {
        s.tool(
            "echo",
            m(15),
            10,
            false,
            vec![
                attr("gen_ai.conversation.id", json!("sess-loop")),
                attr("gen_ai.tool.call.arguments", json!(r#"{"q":"same"}"#)),
            ],
        );
    }
    for _ in 0..2 {
        s.tool(
            "echo",
            m(15),
            10,
            false,
            vec![
                attr("gen_ai.conversation.id", json!("sess-ok")),
                attr("gen_ai.tool.call.arguments", json!(r#"{"q":"same"}"#)),
            ],
        );
    }
    // Not loops. A call traced on both sides is one call: three calls with the same arguments
    // are three, not six. Without captured arguments (FastMCP), successful calls are not "the
    // same call again": three traced on both sides, and eight with (uncaptured) different
    // arguments in one session, never fire.
    for _ in 0..3 {
        s.both_sides(
            "lookup",
            m(15),
            10,
            false,
            vec![
                attr("gen_ai.conversation.id", json!("sess-both-sides")),
                attr("gen_ai.tool.call.arguments", json!(r#"{"q":"same"}"#)),
            ],
        );
        s.both_sides(
            "fetch",
            m(15),
            10,
            false,
            vec![attr("gen_ai.conversation.id", json!("sess-no-args"))],
        );
    }
    for _ in 0..8 {
        s.tool(
            "fetch",
            m(15),
            10,
            false,
            vec![attr("gen_ai.conversation.id", json!("sess-polling"))],
        );
    }
    // Polling, not a loop: a job-status tool asked with the same job id every 45 s, answering
    // each time (13 calls in the 10-minute window).
    for i in 0..13 {
        s.tool(
            "job_status",
            m(10) + chrono::Duration::seconds(5 + 45 * i),
            10,
            false,
            vec![
                attr("gen_ai.conversation.id", json!("sess-job")),
                attr("gen_ai.tool.call.arguments", json!(r#"{"job":"42"}"#)),
            ],
        );
    }
    // Token burn: five sessions of 1,000 tokens, one of 50,000.
    for (i, tokens) in [1000, 1000, 1000, 1000, 1000, 50_000].iter().enumerate() {
        s.push(
            "chat gpt-4o",
            3,
            m(15),
            500,
            false,
            vec![
                attr("gen_ai.request.model", json!("gpt-4o")),
                attr("gen_ai.usage.input_tokens", json!(tokens - 100)),
                attr("gen_ai.usage.output_tokens", json!(100)),
                attr("gen_ai.conversation.id", json!(format!("conv-{i}"))),
            ],
        );
    }
    // Rate limit: 5 of 100 requests left, then 80 of 100.
    for (minute, remaining) in [(17, "5"), (27, "80")] {
        for _ in 0..6 {
            s.push(
                "GET",
                3,
                m(minute),
                40,
                false,
                vec![
                    attr("http.request.method", json!("GET")),
                    attr("server.address", json!("api.github.com")),
                    attr("http.response.status_code", json!(200)),
                    attr(
                        "http.response.header.x-ratelimit-remaining",
                        json!(remaining),
                    ),
                    attr("http.response.header.x-ratelimit-limit", json!("100")),
                ],
            );
        }
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_rule_kind_fires_on_its_failure_and_resolves() {
    let svc = Service::start_with("alerts", |c| c.rules.enabled = false).await;
    let m = minutes_ago();

    send(&svc, incident_spans(&m)).await;

    let rules = vec![("t.yaml".to_string(), parse("t.yaml", RULES).unwrap())];
    let mut ev = Evaluator::new(svc.pool.clone(), rules.clone());
    let fired = ev.evaluate_all_at(m(20)).await.unwrap();
    assert_eq!(
        summary(&fired),
        set(&[
            "Burn conv-5 firing",
            "Empty list_items firing",
            "Errors search firing",
            "Headroom api.github.com firing",
            "Loop echo firing",
            "Slow query_database firing"
        ]),
        "the rare tool (2 calls) and the short conversation must not fire"
    );
    let loop_alert = fired.iter().find(|n| n.alert == "Loop").unwrap();
    assert_eq!(loop_alert.labels["session"], "sess-loop");
    assert_eq!(loop_alert.value, Some(6.0));

    // The API shows them firing.
    let api: Value = reqwest::get(format!("http://{}/api/v1/alerts", svc.admin))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    // In Prometheus's shape: the envelope, `activeAt`, the value as text, the annotations the
    // firing notification carried.
    assert_eq!(api["status"], "success", "{api}");
    let firing: Vec<&Value> = api["data"]["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|a| a["state"] == "firing")
        .collect();
    assert_eq!(firing.len(), 6, "{api}");
    let looped = firing
        .iter()
        .find(|a| a["labels"]["alertname"] == "Loop")
        .unwrap();
    assert_eq!(looped["value"], "6e0", "{looped}");
    assert!(looped["activeAt"].as_str().is_some(), "{looped}");
    assert_eq!(
        looped["annotations"]["summary"], "echo repeated 6 times",
        "annotations as notified: {looped}"
    );

    // A restarted evaluator restores the state: re-evaluating fires nothing twice.
    let mut restarted = Evaluator::new(svc.pool.clone(), rules);
    assert_eq!(restarted.restore().await.unwrap(), 6);
    let again = restarted.evaluate_all_at(m(21)).await.unwrap();
    assert!(
        again
            .iter()
            .all(|n| matches!(n.event, Event::Resolved { .. })),
        "no alert fires twice after a restart: {:?}",
        summary(&again)
    );
    // (At m+21 the 5-minute error window no longer holds minute 15: `Errors` may resolve here.)

    // Healthy traffic (or none) later: every alert resolves, once.
    let mut later = again;
    later.extend(restarted.evaluate_all_at(m(30)).await.unwrap());
    let later2 = restarted.evaluate_all_at(m(50)).await.unwrap();
    let mut resolved = summary(&later);
    resolved.extend(summary(&later2));
    assert_eq!(
        resolved,
        set(&[
            "Burn conv-5 resolved",
            "Empty list_items resolved",
            "Errors search resolved",
            "Headroom api.github.com resolved",
            "Loop echo resolved",
            "Slow query_database resolved"
        ])
    );
    let events: Vec<(String, String, String)> =
        sqlx::query_as("SELECT alert, status, key FROM alert_events ORDER BY id")
            .fetch_all(&svc.pool)
            .await
            .unwrap();
    assert_eq!(
        events.len(),
        12,
        "one firing and one resolved event per alert: {events:?}"
    );

    let rules_api: Value = reqwest::get(format!("http://{}/api/v1/rules", svc.admin))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(rules_api["status"], "success", "{rules_api}");
    let health = rules_api["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|g| g["name"] == "tool-health")
        .expect("the service's own rules");
    assert!(health["interval"].as_f64().unwrap() > 0.0, "{health}");
    let rule = &health["rules"][0];
    assert_eq!(rule["type"], "alerting", "{rule}");
    assert!(
        rule["duration"].is_number() && rule["evaluationTime"].is_number(),
        "{rule}"
    );
    assert!(
        rule["lastEvaluation"].is_string() && rule["health"].is_string(),
        "{rule}"
    );
    svc.stop().await.unwrap();
}

/// Where arguments are not captured, a loop is the same tool failing or coming back empty
/// again and again in one session, counted once per call (a call traced on both sides is one),
/// and the alert says so rather than claiming the same arguments. The backtest agrees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loops_without_arguments_are_repeated_failures_and_say_so() {
    let svc = Service::start_with("alerts_loop_words", |c| c.rules.enabled = false).await;
    let m = minutes_ago();
    let mut s = Spans::new();
    for _ in 0..6 {
        s.both_sides(
            "flaky",
            m(15),
            10,
            true,
            vec![attr("gen_ai.conversation.id", json!("sess-flaky"))],
        );
        s.tool(
            "echo",
            m(15),
            10,
            false,
            vec![
                attr("gen_ai.conversation.id", json!("sess-echo")),
                attr("gen_ai.tool.call.arguments", json!(r#"{"q":"same"}"#)),
            ],
        );
    }
    // A client process calling a tool in a loop without opening a span of its own: each call
    // is a root CLIENT span in its own trace; the process (service.instance.id) is the session.
    let mut own = Spans::new();
    own.instance = Some("agent-7f3a".into());
    for _ in 0..6 {
        own.push(
            "tools/call flaky_fetch",
            3,
            m(15),
            10,
            true,
            vec![
                attr("mcp.method.name", json!("tools/call")),
                attr("gen_ai.tool.name", json!("flaky_fetch")),
            ],
        );
    }
    send(&svc, s).await;
    send(&svc, own).await;
    let text = "groups:
  - name: t
    interval: 1m
    rules:
      - alert: Loop
        kind: retry_loop
        window: 10m
        min_repeats: 5
        min_samples: 5
        annotations: {summary: 'session {{ $labels.session }} {{ $reason }}'}
";
    let rules = vec![("t.yaml".to_string(), parse("t.yaml", text).unwrap())];
    let mut ev = Evaluator::new(svc.pool.clone(), rules);
    let fired = ev.evaluate_all_at(m(20)).await.unwrap();
    let mut got: Vec<(String, Option<f64>, String)> = fired
        .iter()
        .map(|n| {
            (
                n.labels["session"].clone(),
                n.value,
                n.annotations["summary"].clone(),
            )
        })
        .collect();
    got.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        got,
        [
            (
                "instance:agent-7f3a".to_string(),
                Some(6.0),
                "session instance:agent-7f3a got 6 failed or empty results from flaky_fetch (its arguments are not captured)"
                    .to_string()
            ),
            (
                "sess-echo".to_string(),
                Some(6.0),
                "session sess-echo called echo 6 times with the same arguments".to_string()
            ),
            (
                "sess-flaky".to_string(),
                Some(6.0),
                "session sess-flaky got 6 failed or empty results from flaky (its arguments are not captured)"
                    .to_string()
            ),
        ]
    );
    // The replay counts the same calls.
    let dir = std::env::temp_dir().join(format!("toolsight-loop-words-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("t.yaml");
    std::fs::write(&file, text).unwrap();
    let report: Value = serde_json::from_str(&common::output(
        common::toolsight()
            .args(["rules", "backtest", "--json", "--rules"])
            .arg(&file)
            .args(["--from", &m(20).to_rfc3339(), "--to", &m(21).to_rfc3339()])
            .env("DATABASE_URL", &svc.database_url),
    ))
    .unwrap();
    let mut replayed: Vec<(String, f64)> = report["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["status"] == "firing")
        .map(|e| {
            (
                e["key"].as_str().unwrap().to_owned(),
                e["value"].as_f64().unwrap_or(f64::NAN),
            )
        })
        .collect();
    replayed.sort_by(|a, b| a.0.cmp(&b.0));
    let sessions: Vec<(&str, f64)> = ["instance:agent-7f3a", "sess-echo", "sess-flaky"]
        .into_iter()
        .map(|s| (s, 6.0))
        .collect();
    assert_eq!(replayed.len(), sessions.len(), "{report}");
    for ((key, value), (session, want)) in replayed.iter().zip(&sessions) {
        assert!(key.contains(session) && value == want, "{report}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    svc.stop().await.unwrap();
}

/// The first minute of a test history: whole minutes, two hours ago.
fn minutes_ago() -> impl Fn(i64) -> DateTime<Utc> {
    let now = Utc::now();
    let t0 = Utc
        .timestamp_opt(now.timestamp() / 60 * 60 - 2 * 3600, 0)
        .unwrap();
    move |k: i64| t0 + chrono::Duration::minutes(k)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_while_pending_keeps_the_for_progress() {
    let svc = Service::start_with("alerts_pending", |c| c.rules.enabled = false).await;
    let m = minutes_ago();
    let mut s = Spans::new();
    for minute in 10..=16 {
        for i in 0..30 {
            s.tool("search", m(minute), 50, i % 3 == 0, vec![]);
        }
    }
    send(&svc, s).await;
    let rules = vec![(
        "p.yaml".to_string(),
        parse(
            "p.yaml",
            "groups:\n  - name: p\n    interval: 1m\n    rules:\n      - alert: Errors\n        kind: error_rate\n        window: 5m\n        fire_above: 0.05\n        for: 3m\n        min_samples: 20\n",
        )
        .unwrap(),
    )];
    // Every evaluation runs in a freshly restarted evaluator.
    let mut fired = Vec::new();
    for minute in 11..=16 {
        let mut ev = Evaluator::new(svc.pool.clone(), rules.clone());
        let restored = ev.restore().await.unwrap();
        assert_eq!(restored, usize::from(minute > 11), "state at m+{minute}");
        let notices = ev.evaluate_all_at(m(minute)).await.unwrap();
        if minute < 14 {
            let phase: String = sqlx::query_scalar("SELECT phase FROM alert_state")
                .fetch_one(&svc.pool)
                .await
                .unwrap();
            assert_eq!(phase, "pending", "m+{minute}");
        }
        fired.extend(notices.into_iter().map(|n| (minute, n.event)));
    }
    // Pending since m+11; `for: 3m` is over at m+14, across three restarts.
    assert_eq!(
        fired,
        vec![(
            14,
            Event::Firing {
                since_ms: m(11).timestamp_millis(),
                at_ms: m(14).timestamp_millis()
            }
        )]
    );
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM alert_events")
        .fetch_one(&svc.pool)
        .await
        .unwrap();
    assert_eq!(events, 1, "one firing event, none repeated after restarts");
    svc.stop().await.unwrap();
}

type EventRow = (String, String, String, DateTime<Utc>, DateTime<Utc>);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backtest_replays_what_the_live_evaluator_did() {
    let svc = Service::start_with("alerts_backtest", |c| c.rules.enabled = false).await;
    let m = minutes_ago();
    send(&svc, incident_spans(&m)).await;

    // The live evaluator at every aligned minute of the range.
    let rules = vec![("t.yaml".to_string(), parse("t.yaml", RULES).unwrap())];
    let mut ev = Evaluator::new(svc.pool.clone(), rules);
    for k in 0..=50 {
        ev.evaluate_all_at(m(k)).await.unwrap();
    }
    let live: Vec<EventRow> = sqlx::query_as(
        "SELECT alert, key, status, since, at FROM alert_events ORDER BY at, alert, key, status",
    )
    .fetch_all(&svc.pool)
    .await
    .unwrap();
    assert_eq!(
        live.len(),
        12,
        "every rule fired and resolved once: {live:?}"
    );

    // The replay, through the command line.
    let dir = std::env::temp_dir().join(format!("toolsight-backtest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("t.yaml");
    std::fs::write(&file, RULES).unwrap();
    let backtest = |json: bool| {
        let mut cmd = common::toolsight();
        cmd.args(["rules", "backtest", "--rules"])
            .arg(&file)
            .args(["--from", &m(0).to_rfc3339(), "--to", &m(50).to_rfc3339()])
            .env("DATABASE_URL", &svc.database_url);
        if json {
            cmd.arg("--json");
        }
        common::output(&mut cmd)
    };
    let report: Value = serde_json::from_str(&backtest(true)).unwrap();
    let parse_t = |v: &Value| -> DateTime<Utc> { v.as_str().unwrap().parse().unwrap() };
    let mut replayed: Vec<EventRow> = report["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["alert"].as_str().unwrap().to_owned(),
                e["key"].as_str().unwrap().to_owned(),
                e["status"].as_str().unwrap().to_owned(),
                parse_t(&e["since"]),
                parse_t(&e["at"]),
            )
        })
        .collect();
    replayed.sort_by(|a, b| (a.4, &a.0, &a.1, &a.2).cmp(&(b.4, &b.0, &b.1, &b.2)));
    assert_eq!(
        replayed, live,
        "same alerts, keys, pending and fire/resolve times"
    );
    assert_eq!(report["evaluations"], 51);
    assert_eq!(report["episodes"].as_array().unwrap().len(), 6);

    let table = backtest(false);
    assert!(
        table.contains("Loop: fired 1 time(s)") && table.contains("sess-loop"),
        "{table}"
    );
    let _ = std::fs::remove_dir_all(&dir);
    svc.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_live_loop_fires_on_fresh_failures() {
    let dir = std::env::temp_dir().join(format!("toolsight-live-rules-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("live.yaml");
    std::fs::write(
        &path,
        "groups:\n  - name: live\n    interval: 1s\n    rules:\n      - alert: LiveErrors\n        kind: error_rate\n        window: 1m\n        fire_above: 0.5\n        min_samples: 5\n        labels: {severity: page}\n",
    )
    .unwrap();
    let svc = Service::start_with("alerts_live", |c| c.rules.files = vec![path.clone()]).await;
    let mut s = Spans::new();
    let now = Utc::now() - chrono::Duration::seconds(2);
    for _ in 0..10 {
        s.tool("flaky", now, 20, true, vec![]);
    }
    send(&svc, s).await;
    let a = common::firing_alert("LiveErrors to fire", svc.admin, |a| {
        a["labels"]["alertname"] == "LiveErrors"
    })
    .await;
    assert_eq!(a["labels"]["tool"], "flaky");
    assert_eq!(a["value"], "1e0");
    let rules: Value = reqwest::get(format!("http://{}/api/v1/rules", svc.admin))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let rule = &rules["data"]["groups"][0]["rules"][0];
    assert_eq!(rule["name"], "LiveErrors");
    assert_eq!(rule["health"], "ok");
    assert_eq!(rule["state"], "firing");
    assert_eq!(rule["alerts"][0]["labels"]["tool"], "flaky", "{rule}");
    svc.stop().await.unwrap();
}

/// Groups evaluate independently: a group whose query is stuck (its table locked) neither
/// delays another group's alert nor hides that it is stuck: each instant it cannot run is
/// counted in `toolsight_rule_group_iterations_missed_total{group}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_group_delays_no_other_and_its_missed_instants_are_counted() {
    let dir = std::env::temp_dir().join(format!("toolsight-stuck-group-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("groups.yaml");
    std::fs::write(
        &path,
        "groups:
  - name: stuck
    interval: 1s
    rules:
      - alert: Headroom
        kind: rate_limit_headroom
        window: 1m
        remaining_below: 0.1
        min_samples: 1
  - name: live
    interval: 1s
    rules:
      - alert: LiveErrors
        kind: error_rate
        window: 1m
        fire_above: 0.5
        min_samples: 5
        for: 3s
",
    )
    .unwrap();
    let svc =
        Service::start_with("alerts_stuck_group", |c| c.rules.files = vec![path.clone()]).await;
    let mut s = Spans::new();
    let now = Utc::now() - chrono::Duration::seconds(2);
    for _ in 0..10 {
        s.tool("flaky", now, 20, true, vec![]);
    }
    send(&svc, s).await;
    // Stored; now the stuck group's table is locked (its query waits as long as the lock is
    // held), and the live alert needs 3 s more of evaluations to fire.
    let mut blocker = svc.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE upstream_rollup_1m IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    common::firing_alert(
        "the other group's alert to fire while one group is stuck",
        svc.admin,
        |a| a["labels"]["alertname"] == "LiveErrors",
    )
    .await;
    eventually("the stuck group's missed instants, counted", || async {
        let missed = common::sample(
            &svc.metrics().await,
            "toolsight_rule_group_iterations_missed_total{group=\"stuck\"}",
        )?;
        (missed >= 2.0).then_some(())
    })
    .await;
    assert_eq!(
        common::sample(
            &svc.metrics().await,
            "toolsight_rule_group_iterations_missed_total{group=\"live\"}"
        )
        .unwrap_or(0.0),
        0.0,
        "the live group missed nothing"
    );
    // Unlocked, the stuck group evaluates again.
    blocker.rollback().await.unwrap();
    eventually("the stuck group to evaluate again", || async {
        let at: Option<DateTime<Utc>> = sqlx::query_scalar(
            "SELECT max(last_evaluation) FROM rule_health WHERE group_name = 'stuck'",
        )
        .fetch_one(&svc.pool)
        .await
        .ok()?;
        at.filter(|t| *t > Utc::now() - chrono::Duration::seconds(5))
    })
    .await;
    svc.stop().await.unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

/// The backend pid holding the evaluator lock, if any.
async fn lock_holder(pool: &sqlx::PgPool) -> Option<i32> {
    // Advisory locks are per database; other tests' evaluators hold theirs elsewhere.
    sqlx::query_scalar(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted AND objid = hashtext('toolsight-evaluator')::oid
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
        .fetch_optional(pool)
        .await
        .unwrap()
}

async fn last_evaluation(pool: &sqlx::PgPool) -> Option<DateTime<Utc>> {
    sqlx::query_scalar("SELECT max(last_evaluation) FROM rule_health")
        .fetch_one(pool)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_one_evaluator_and_takeover_when_killed() {
    let dir = std::env::temp_dir().join(format!("toolsight-ha-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let rules = dir.join("ha.yaml");
    std::fs::write(&rules, "groups:\n  - name: ha\n    interval: 1s\n    rules:\n      - alert: HaErrors\n        kind: error_rate\n        window: 1m\n        fire_above: 0.5\n").unwrap();
    let url = common::fresh_database("alerts_ha").await;
    let config = dir.join("toolsight.toml");
    std::fs::write(
        &config,
        format!(
            "[database]\nurl = \"{url}\"\n[otlp]\ngrpc_listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[rules]\nfiles = [\"{}\"]\n",
            rules.display()
        ),
    )
    .unwrap();

    // A starts alone, creates the database and becomes the evaluator.
    let a = serve_ready(&config, &[]).await;
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let a_lock = eventually("A to lead and evaluate", || async {
        match lock_holder(&pool).await {
            Some(pid) if last_evaluation(&pool).await.is_some() => Some(pid),
            _ => None,
        }
    })
    .await;

    // B joins the same database and stands by: still one lock, still A's.
    let b = serve_ready(&config, &[]).await;
    // B is up and has tried for the lock: it reports standing by.
    eventually("B to stand by", || async {
        let text = common::scrape(b.admin).await;
        (common::sample(&text, "toolsight_leader{role=\"evaluator\"}")? == 0.0).then_some(())
    })
    .await;
    assert_eq!(
        common::metric_value(a.admin, "toolsight_leader{role=\"evaluator\"}").await,
        1.0
    );
    let locks: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted AND objid = hashtext('toolsight-evaluator')::oid
         AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(locks, 1);
    assert_eq!(lock_holder(&pool).await, Some(a_lock));

    // A is killed outright; its connection dies with it and B takes over and evaluates.
    drop(a);
    eventually("B to take over", || async {
        lock_holder(&pool).await.filter(|p| *p != a_lock)
    })
    .await;
    let before = last_evaluation(&pool).await.unwrap();
    eventually("B to evaluate", || async {
        last_evaluation(&pool).await.filter(|t| *t > before)
    })
    .await;
    pool.close().await;
    let _ = std::fs::remove_dir_all(&dir);
}

async fn rule_names(svc: &Service) -> Vec<String> {
    let r: Value = reqwest::get(format!("http://{}/api/v1/rules", svc.admin))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    r["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| {
            g["rules"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| r["name"].as_str().unwrap().to_owned())
        })
        .collect()
}

async fn wait_for_rules(svc: &Service, want: &[&str]) {
    eventually(&format!("the rules to become {want:?}"), || async {
        (rule_names(svc).await == want).then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_files_reload_and_bad_files_keep_the_old_rules() {
    let dir = std::env::temp_dir().join(format!("toolsight-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("r.yaml");
    let rule = |name: &str| {
        format!(
            "groups:\n  - name: r\n    interval: 1s\n    rules:\n      - alert: {name}\n        kind: error_rate\n        window: 1m\n        fire_above: 0.5\n        min_samples: 5\n"
        )
    };
    std::fs::write(&path, rule("First")).unwrap();
    let p = path.clone();
    let svc = Service::start_with("alerts_reload", move |c| c.rules.files = vec![p]).await;
    wait_for_rules(&svc, &["First"]).await;

    // First fires on fresh failures.
    let mut s = Spans::new();
    for _ in 0..10 {
        s.tool(
            "flaky",
            Utc::now() - chrono::Duration::seconds(2),
            20,
            true,
            vec![],
        );
    }
    send(&svc, s).await;
    let firing = || async {
        let api: Value = reqwest::get(format!("http://{}/api/v1/alerts", svc.admin))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        api["data"]["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["labels"]["alertname"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    eventually("First to fire", || async {
        (firing().await == ["First"]).then_some(())
    })
    .await;

    // A broken edit is refused: the old rules stay.
    std::fs::write(&path, "groups:\n  - name: r\n    rules: [\n").unwrap();
    eventually("the broken rule file to be seen", || async {
        (svc.metric("toolsight_reloads_total{file=\"rules\",result=\"invalid\"}")
            .await
            == 1.0)
            .then_some(())
    })
    .await;
    assert_eq!(rule_names(&svc).await, ["First"]);

    // A valid edit replaces them; the alert of the removed rule goes away.
    std::fs::write(&path, rule("Second")).unwrap();
    wait_for_rules(&svc, &["Second"]).await;
    eventually("the alert of the removed rule to go away", || async {
        (!firing().await.contains(&"First".to_string())).then_some(())
    })
    .await;
    svc.stop().await.unwrap();
}
