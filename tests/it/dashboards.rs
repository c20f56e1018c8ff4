//! The Grafana dashboards and the deployment bundle.
//!
//! Every dashboard is checked for structure (unique panel ids, only the provisioned datasource,
//! every variable defined), then every panel and variable query is run against a PostgreSQL
//! seeded through the real ingest path, with Grafana's PostgreSQL macros expanded the way
//! Grafana expands them, over a short and a long time range. The p95 a panel shows is compared
//! with the p95 the rule engine computes for the same tool and window.

use crate::common;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use chrono::{DateTime, Duration, SecondsFormat, TimeZone, Utc};
use common::Service;
use common::spans::{Spans, attr, send};
use regex::Regex;
use serde_json::{Value, json};
use sqlx::{Column, Row, TypeInfo};

const DATASOURCE_UID: &str = "toolsight-pg";

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn dashboards() -> Vec<(String, Value)> {
    let mut out: Vec<(String, Value)> = std::fs::read_dir(repo().join("dashboards"))
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .map(|e| {
            let text = std::fs::read_to_string(e.path()).unwrap();
            let v: Value = serde_json::from_str(&text)
                .unwrap_or_else(|err| panic!("{}: {err}", e.path().display()));
            (e.file_name().to_string_lossy().into_owned(), v)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        out.len(),
        4,
        "overview, tool detail, collector health, and its Prometheus variant"
    );
    out
}

/// The dashboards of a PostgreSQL datasource (all but the Prometheus variant).
fn pg_dashboards() -> Vec<(String, Value)> {
    let pg: Vec<_> = dashboards()
        .into_iter()
        .filter(|(_, d)| variables(d)[0]["query"] == "grafana-postgresql-datasource")
        .collect();
    assert_eq!(pg.len(), 3, "overview, tool detail, collector health");
    pg
}

/// The collector health dashboard for a Prometheus that scrapes `/metrics`.
fn prometheus_dashboard() -> (String, Value) {
    dashboards()
        .into_iter()
        .find(|(_, d)| variables(d)[0]["query"] == "prometheus")
        .expect("a Prometheus-datasource dashboard")
}

/// The datasource every panel and query names: the dashboard's `datasource` variable.
const DATASOURCE_VAR: &str = "${datasource}";

fn panels(d: &Value) -> Vec<&Value> {
    d["panels"].as_array().unwrap().iter().collect()
}

fn variables(d: &Value) -> Vec<&Value> {
    d["templating"]["list"].as_array().unwrap().iter().collect()
}

/// Grafana's own variables, which need no definition.
fn builtin(name: &str) -> bool {
    name.starts_with("__") || name == "timeFilter"
}

#[test]
fn dashboards_are_well_formed() {
    let var_ref = Regex::new(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)").unwrap();
    let mut uids = BTreeSet::new();
    for (file, d) in dashboards() {
        assert!(uids.insert(d["uid"].as_str().unwrap().to_owned()), "{file}");
        let defined: BTreeSet<String> = variables(&d)
            .iter()
            .map(|v| v["name"].as_str().unwrap().to_owned())
            .collect();
        // Imports anywhere: the datasource is a variable, its default the provisioned one.
        let first = variables(&d)[0];
        assert_eq!(
            (&first["name"], &first["type"]),
            (&json!("datasource"), &json!("datasource")),
            "{file}"
        );
        let prometheus = first["query"] == "prometheus";
        if !prometheus {
            assert_eq!(first["current"]["value"], DATASOURCE_UID, "{file}");
        }
        let mut ids = BTreeSet::new();
        let mut queries = Vec::new();
        for v in variables(&d).into_iter().skip(1) {
            if v["type"] == "textbox" {
                continue;
            }
            assert_eq!(v["datasource"]["uid"], DATASOURCE_VAR, "{file} variable");
            queries.push(v["query"].as_str().unwrap().to_owned());
        }
        for a in d["annotations"]["list"].as_array().unwrap() {
            assert_eq!(a["datasource"]["uid"], DATASOURCE_VAR, "{file} annotation");
            queries.push(a["target"]["rawSql"].as_str().unwrap().to_owned());
        }
        for p in panels(&d) {
            let title = p["title"].as_str().unwrap();
            assert!(
                ids.insert(p["id"].as_i64().unwrap()),
                "{file}: id of {title}"
            );
            assert_eq!(p["datasource"]["uid"], DATASOURCE_VAR, "{file}: {title}");
            let targets = p["targets"].as_array().unwrap();
            assert!(!targets.is_empty(), "{file}: {title}");
            for t in targets {
                assert_eq!(t["datasource"]["uid"], DATASOURCE_VAR, "{file}: {title}");
                if prometheus {
                    assert!(t["expr"].as_str().is_some_and(|e| e.contains("toolsight_")));
                } else {
                    assert_eq!(t["rawQuery"], true);
                    queries.push(t["rawSql"].as_str().unwrap().to_owned());
                }
            }
        }
        for q in queries {
            for c in var_ref.captures_iter(&q) {
                let name = &c[1];
                assert!(
                    builtin(name) || defined.contains(name),
                    "{file}: ${name} is not defined in {q}"
                );
            }
        }
    }
    // Alert firing and resolved events are annotations on the latency and error panels.
    for (file, d) in pg_dashboards()
        .into_iter()
        .filter(|(_, d)| d["uid"] != "toolsight-health")
    {
        let annotation = &d["annotations"]["list"][0];
        let on: BTreeSet<i64> = annotation["filter"]["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i.as_i64().unwrap())
            .collect();
        for p in panels(&d) {
            let title = p["title"].as_str().unwrap().to_lowercase();
            if p["type"] == "timeseries" && (title.contains("latency") || title.contains("error")) {
                assert!(on.contains(&p["id"].as_i64().unwrap()), "{file}: {title}");
            }
        }
    }
    // Alert links open these dashboards with these variables.
    for uid in [
        toolsight::notify::payload::TOOL_DASHBOARD,
        toolsight::notify::payload::OVERVIEW_DASHBOARD,
    ] {
        let (_, d) = dashboards()
            .into_iter()
            .find(|(_, d)| d["uid"] == uid)
            .unwrap_or_else(|| panic!("no dashboard {uid}"));
        let names: Vec<&str> = variables(&d)
            .iter()
            .map(|v| v["name"].as_str().unwrap())
            .collect();
        assert!(names.contains(&"service"), "{uid}");
    }
    let ds: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(repo().join("dashboards/provisioning/datasources/toolsight.yaml"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(ds["datasources"][0]["uid"], DATASOURCE_UID);
    assert_eq!(
        ds["datasources"][0]["type"],
        "grafana-postgresql-datasource"
    );
    let provider: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(repo().join("dashboards/provisioning/dashboards/toolsight.yaml"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(provider["providers"][0]["type"], "file");
}

/// A dashboard time range and the interval Grafana would pick for it.
struct Range {
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    /// `$__interval` as Grafana writes it, and in milliseconds.
    interval: &'static str,
    interval_ms: i64,
}

fn quote_list(values: &[String]) -> String {
    values
        .iter()
        .map(|v| format!("'{}'", v.replace('\'', "''")))
        .collect::<Vec<_>>()
        .join(",")
}

fn seconds(interval: &str) -> i64 {
    humantime::parse_duration(interval).unwrap().as_secs() as i64
}

/// A text box variable's value in a query: as typed (its default), quotes doubled, as Grafana's
/// SQL datasources put a single-value variable.
fn textboxes(d: &Value, sql: &str) -> String {
    let mut s = sql.to_owned();
    for v in variables(d).into_iter().filter(|v| v["type"] == "textbox") {
        let (name, value) = (v["name"].as_str().unwrap(), v["query"].as_str().unwrap());
        s = s.replace(&format!("${{{name}}}"), &value.replace('\'', "''"));
    }
    s
}

/// Expands a query as Grafana's PostgreSQL datasource does: template variables first
/// (multi-value ones as a quoted, comma-separated list; `$__interval`, `$__interval_ms`), then
/// the macros, whose arguments run to the first `)`.
fn expand(sql: &str, r: &Range, vars: &BTreeMap<String, Vec<String>>) -> String {
    let ts = |t: DateTime<Utc>| format!("'{}'", t.to_rfc3339_opts(SecondsFormat::AutoSi, true));
    let mut s = sql
        .replace("$__interval_ms", &r.interval_ms.to_string())
        .replace("$__interval", r.interval);
    for (name, values) in vars {
        s = s
            .replace(&format!("${{{name}}}"), &quote_list(values))
            .replace(&format!("${name}"), &quote_list(values));
    }
    let macro_re = Regex::new(r"\$(__[_a-zA-Z0-9]+)\(([^\)]*)\)").unwrap();
    macro_re
        .replace_all(&s, |c: &regex::Captures| {
            let args: Vec<&str> = c[2].split(',').map(str::trim).collect();
            match &c[1] {
                "__time" => format!("{} AS \"time\"", args[0]),
                "__timeFilter" => format!("{} BETWEEN {} AND {}", args[0], ts(r.from), ts(r.to)),
                "__timeFrom" => ts(r.from),
                "__timeTo" => ts(r.to),
                "__timeGroup" | "__timeGroupAlias" => {
                    let secs = seconds(args[1]);
                    let g = format!("floor(extract(epoch from {})/{secs})*{secs}", args[0]);
                    if &c[1] == "__timeGroupAlias" {
                        format!("{g} AS \"time\"")
                    } else {
                        g
                    }
                }
                "__unixEpochFilter" => format!(
                    "{} >= {} AND {} <= {}",
                    args[0],
                    r.from.timestamp(),
                    args[0],
                    r.to.timestamp()
                ),
                other => panic!("macro {other} is not expanded by this test"),
            }
        })
        .into_owned()
}

/// Runs a query; returns (column name, type name) and the rows as JSON-ish text.
async fn run(pool: &sqlx::PgPool, sql: &str) -> (Vec<(String, String)>, usize) {
    let rows = sqlx::query(sql)
        .fetch_all(pool)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{sql}"));
    let cols = rows
        .first()
        .map(|r| {
            r.columns()
                .iter()
                .map(|c| (c.name().to_owned(), c.type_info().name().to_owned()))
                .collect()
        })
        .unwrap_or_default();
    (cols, rows.len())
}

fn numeric(ty: &str) -> bool {
    matches!(
        ty,
        "FLOAT8" | "FLOAT4" | "INT8" | "INT4" | "INT2" | "NUMERIC"
    )
}

/// Seeds two hours of traffic, a week-old baseline, errors, empty results, a retry loop, LLM
/// sessions and rate-limited upstream calls, through OTLP.
async fn seed(svc: &Service, now: DateTime<Utc>) {
    let mut s = Spans::new();
    let rows = json!(r#"{"content":[{"type":"text","text":"[1,2,3]"}]}"#);
    let none = json!(r#"{"content":[]}"#);
    for back in (0..120).step_by(5) {
        let at = now - Duration::minutes(back);
        for i in 0..6u64 {
            s.tool(
                "search",
                at,
                100 + i * 40,
                i == 0,
                vec![attr("error.type", json!("timeout"))],
            );
            s.tool(
                "list_items",
                at,
                30,
                false,
                vec![attr(
                    "gen_ai.tool.call.result",
                    if i % 2 == 0 {
                        rows.clone()
                    } else {
                        none.clone()
                    },
                )],
            );
        }
    }
    // Calls traced on both sides: the transport overhead panel.
    for back in (0..120).step_by(10) {
        s.both_sides_with_overhead("fetch_page", now - Duration::minutes(back), 120, 8);
    }
    for i in 0..10u64 {
        s.tool(
            "search",
            now - Duration::days(7) - Duration::minutes(5),
            80 + i * 10,
            false,
            vec![],
        );
    }
    for _ in 0..6 {
        s.tool(
            "echo",
            now - Duration::minutes(3),
            10,
            false,
            vec![
                attr("gen_ai.conversation.id", json!("loop-session")),
                attr("gen_ai.tool.call.arguments", json!(r#"{"q":"same"}"#)),
            ],
        );
    }
    for (i, tokens) in [1200, 900, 30_000].iter().enumerate() {
        s.push(
            "chat gpt-4o",
            3,
            now - Duration::minutes(4),
            400,
            false,
            vec![
                attr("gen_ai.request.model", json!("gpt-4o")),
                attr("gen_ai.usage.input_tokens", json!(tokens - 100)),
                attr("gen_ai.usage.output_tokens", json!(100)),
                attr("gen_ai.conversation.id", json!(format!("conv-{i}"))),
            ],
        );
    }
    for _ in 0..5 {
        s.push(
            "GET",
            3,
            now - Duration::minutes(2),
            40,
            false,
            vec![
                attr("http.request.method", json!("GET")),
                attr("server.address", json!("api.github.com")),
                attr("http.response.status_code", json!(429)),
                attr("http.response.header.x-ratelimit-remaining", json!("4")),
                attr("http.response.header.x-ratelimit-limit", json!("100")),
            ],
        );
    }
    // A span no rule models (dropped, counted) ...
    s.push(
        "SELECT users",
        3,
        now - Duration::minutes(1),
        5,
        false,
        vec![],
    );
    send(svc, s).await;
    // ... and one that ends before it starts (rejected, counted).
    let bad = json!({"resourceSpans": [{"resource": {"attributes": [attr("service.name", json!("svc"))]},
        "scopeSpans": [{"scope": {"name": "t"}, "spans": [{"traceId": "0123456789abcdef0123456789abcdef", "spanId": "0000000000000001",
        "name": "tools/call x", "kind": 2, "startTimeUnixNano": "2000", "endTimeUnixNano": "1000"}]}]}]});
    let r = reqwest::Client::new()
        .post(svc.http_url())
        .json(&bad)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "a partial success");
}

const RULES: &str = "groups:
  - name: dash
    interval: 1s
    rules:
      - alert: SearchErrors
        kind: error_rate
        window: 10m
        fire_above: 0.05
        min_samples: 5
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_panel_query_runs_on_real_data_and_p95_matches_the_rules() {
    let dir = std::env::temp_dir().join(format!("toolsight-dash-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let rules = dir.join("rules.yaml");
    std::fs::write(&rules, RULES).unwrap();
    let svc = Service::start_with("dashboards", move |c| {
        c.ingest.max_span_age = std::time::Duration::from_secs(8 * 86_400);
        c.admin.record_metrics_every = std::time::Duration::from_secs(1);
        c.rules.files = vec![rules];
        // A receiver that is down: notification rows with failed attempts for the health panels.
        c.notify.receivers = vec![
            toml::from_str("name = \"down\"\ntype = \"webhook\"\nurl = \"http://127.0.0.1:9/\"")
                .unwrap(),
        ];
        c.notify.receiver = "down".into();
        c.notify.group_wait = std::time::Duration::ZERO;
        c.notify.retry_initial = std::time::Duration::from_millis(100);
        c.notify.retry_max = std::time::Duration::from_millis(200);
    })
    .await;
    let now = Utc::now();
    seed(&svc, now).await;
    // The live evaluator fires, the notifier queues, delivery fails and retries.
    common::eventually("a retried notification", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM notify_outbox WHERE attempts > 1")
            .fetch_one(&svc.pool)
            .await
            .ok()?;
        (n > 0).then_some(())
    })
    .await;

    // Every own metric a panel reads alone, recorded at least twice: the rule group's duration is only
    // set once its first evaluation has finished, after the notification it queued.
    let own: BTreeSet<String> = pg_dashboards()
        .iter()
        .flat_map(|(_, d)| {
            Regex::new(r"metric = '(toolsight_[a-z_]+)'")
                .unwrap()
                .captures_iter(&d.to_string())
                .map(|c| c[1].to_owned())
                .collect::<Vec<_>>()
        })
        .collect();
    assert!(own.len() > 5, "{own:?}");
    for m in &own {
        common::eventually(&format!("the collector's own metric {m}"), || async {
            let n: i64 =
                sqlx::query_scalar("SELECT count(*) FROM collector_metrics WHERE metric = $1")
                    .bind(m)
                    .fetch_one(&svc.pool)
                    .await
                    .ok()?;
            (n > 1).then_some(())
        })
        .await;
    }

    let ranges = [
        Range {
            from: now - Duration::minutes(15),
            to: now + Duration::seconds(5),
            interval: "1m",
            interval_ms: 60_000,
        },
        Range {
            from: now - Duration::days(30),
            to: now + Duration::seconds(5),
            interval: "1h",
            interval_ms: 3_600_000,
        },
    ];
    let mut ran = 0;
    for (file, d) in pg_dashboards() {
        for r in &ranges {
            // Variables: each query's own result, "All" selected, in dependency order.
            let mut vars: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for v in variables(&d).into_iter().skip(1) {
                if v["type"] == "textbox" {
                    continue;
                }
                let sql = expand(v["query"].as_str().unwrap(), r, &vars);
                let values: Vec<String> = sqlx::query_scalar(&sql)
                    .fetch_all(&svc.pool)
                    .await
                    .unwrap_or_else(|e| panic!("{file}: {e}\n{sql}"));
                assert!(
                    !values.is_empty(),
                    "{file}: variable {} is empty",
                    v["name"]
                );
                vars.insert(v["name"].as_str().unwrap().to_owned(), values);
                ran += 1;
            }
            // The alert annotations: the events of the alerts the seeded traffic fired.
            for a in d["annotations"]["list"].as_array().unwrap() {
                let sql = expand(a["target"]["rawSql"].as_str().unwrap(), r, &vars);
                let (cols, rows) = run(&svc.pool, &sql).await;
                ran += 1;
                assert!(rows > 0, "{file}: no alert annotations\n{sql}");
                let names: Vec<&str> = cols.iter().map(|(n, _)| n.as_str()).collect();
                assert_eq!(names, ["time", "text", "tags"], "{file}");
            }
            for p in panels(&d) {
                let title = p["title"].as_str().unwrap();
                for t in p["targets"].as_array().unwrap() {
                    let sql = expand(&textboxes(&d, t["rawSql"].as_str().unwrap()), r, &vars);
                    let (cols, rows) = run(&svc.pool, &sql).await;
                    ran += 1;
                    assert!(
                        rows > 0,
                        "{file} [{}]: {title} returned no rows\n{sql}",
                        r.interval
                    );
                    match t["format"].as_str().unwrap() {
                        "time_series" => {
                            assert_eq!(cols[0].0, "time", "{file}: {title}");
                            let values: Vec<&(String, String)> =
                                cols.iter().skip(1).filter(|(n, _)| n != "metric").collect();
                            assert!(
                                !values.is_empty() && values.iter().all(|(_, ty)| numeric(ty)),
                                "{file}: {title}: value columns {cols:?}"
                            );
                        }
                        "table" if p["type"] == "histogram" => {
                            assert!(numeric(&cols[0].1), "{file}: {title}: {cols:?}");
                        }
                        _ => assert!(!cols.is_empty()),
                    }
                }
            }
        }
    }
    assert!(ran > 60, "{ran} queries");

    // From a number to a trace: the tool detail's failed and slowest calls link each trace id
    // through the `trace_url` template.
    let (_, tool) = pg_dashboards()
        .into_iter()
        .find(|(_, d)| d["uid"] == "toolsight-tool")
        .unwrap();
    let all: BTreeMap<String, Vec<String>> = [
        ("service".to_owned(), vec!["svc".to_owned()]),
        ("tool".to_owned(), vec!["search".to_owned()]),
    ]
    .into();
    for title in ["Failed calls", "Slowest calls"] {
        let panel = panels(&tool)
            .into_iter()
            .find(|p| p["title"] == title)
            .unwrap();
        let sql = expand(
            &textboxes(&tool, panel["targets"][0]["rawSql"].as_str().unwrap()),
            &ranges[1],
            &all,
        );
        let rows = sqlx::query(&sql).fetch_all(&svc.pool).await.unwrap();
        assert!(!rows.is_empty(), "{title}\n{sql}");
        for row in &rows {
            let (trace, link): (String, String) = (row.get("trace id"), row.get("link"));
            assert_eq!(trace.len(), 32, "{title}");
            assert_eq!(
                link,
                format!("http://localhost:16686/trace/{trace}"),
                "{title}"
            );
            if title == "Failed calls" {
                assert_ne!(row.get::<String, _>("outcome"), "ok", "{title}");
                assert!(
                    row.get::<Option<String>, _>("error type").is_some(),
                    "{title}"
                );
            }
        }
    }

    // The Prometheus variant reads only metrics the service exports.
    let exported = svc.metrics().await;
    let registered = std::fs::read_to_string(repo().join("src/metrics.rs")).unwrap();
    let (file, prom) = prometheus_dashboard();
    let names: BTreeSet<String> = Regex::new(r"toolsight_[a-z_]+")
        .unwrap()
        .find_iter(&prom["panels"].to_string())
        .map(|m| m.as_str().to_owned())
        .collect();
    assert!(names.len() > 10, "{names:?}");
    for name in names {
        let family = ["_total", "_sum", "_count", "_bucket"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name);
        // A labelled family shows in the scrape once it has a sample; one with none yet (no
        // notification finished here) must at least be registered.
        let registered =
            registered.contains(&format!("\"{}\",", family.trim_start_matches("toolsight_")));
        assert!(
            exported.contains(&format!("# TYPE {family} ")) || registered,
            "{file}: {name} is not exported"
        );
    }

    // The p95 of the "Latency by tool" panel over a 10-minute range equals the latency rule's
    // p95 for the same tool and window.
    let (_, overview) = pg_dashboards()
        .into_iter()
        .find(|(_, d)| d["uid"] == "toolsight-overview")
        .unwrap();
    let panel = panels(&overview)
        .into_iter()
        .find(|p| p["title"] == "Latency by tool")
        .unwrap();
    let end = Utc
        .timestamp_opt(now.timestamp() / 60 * 60 + 60, 0)
        .unwrap();
    let window = Range {
        from: end - Duration::minutes(10),
        // Grafana's range is inclusive; the rule's window ends before `end`.
        to: end - Duration::milliseconds(1),
        interval: "1m",
        interval_ms: 60_000,
    };
    let vars: BTreeMap<String, Vec<String>> = [
        ("service".to_string(), vec!["svc".to_string()]),
        ("tool".to_string(), vec!["search".to_string()]),
    ]
    .into();
    let sql = expand(
        panel["targets"][0]["rawSql"].as_str().unwrap(),
        &window,
        &vars,
    );
    let panel_p95: f64 = sqlx::query(&sql)
        .fetch_one(&svc.pool)
        .await
        .unwrap()
        .get("p95_ms");
    let rule = toolsight::store::alerts::latency(&svc.pool, end, 600.0, 0.95, 0.0, None)
        .await
        .unwrap();
    let rule_p95 = rule
        .iter()
        .find(|o| o.labels["tool"] == "search")
        .unwrap()
        .value;
    assert_eq!(
        panel_p95, rule_p95,
        "panel and rule p95 for the same window"
    );
    assert!(panel_p95 > 100.0 && panel_p95 < 400.0, "{panel_p95}");
    svc.stop().await.unwrap();
}

#[test]
fn the_compose_stack_and_image_are_consistent() {
    let compose: Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(repo().join("docker-compose.yml")).unwrap(),
    )
    .unwrap();
    let services = compose["services"].as_object().unwrap();
    for s in ["postgres", "toolsight", "grafana"] {
        assert!(services.contains_key(s), "{s}");
    }
    // Grafana mounts the provisioning folder and the dashboards that exist in the repository.
    let mounts: Vec<&str> = compose["services"]["grafana"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for m in &mounts {
        let local = m.split(':').next().unwrap();
        assert!(repo().join(local).exists(), "{local}");
    }
    assert!(
        mounts
            .iter()
            .any(|m| m.contains("/etc/grafana/provisioning"))
    );
    // Every variable the datasource file reads is set for Grafana.
    let ds =
        std::fs::read_to_string(repo().join("dashboards/provisioning/datasources/toolsight.yaml"))
            .unwrap();
    let env = &compose["services"]["grafana"]["environment"];
    for c in Regex::new(r"\$\{([A-Z_]+)\}").unwrap().captures_iter(&ds) {
        assert!(env.get(&c[1]).is_some(), "grafana needs {}", &c[1]);
    }
    let url = compose["services"]["toolsight"]["environment"]["DATABASE_URL"]
        .as_str()
        .unwrap();
    assert!(url.contains("@postgres:5432/"), "{url}");

    // The image: multi-stage, non-root, and its configuration (ENV) is valid for the binary.
    let dockerfile = std::fs::read_to_string(repo().join("Dockerfile")).unwrap();
    assert_eq!(
        dockerfile.matches("\nFROM ").count() + usize::from(dockerfile.starts_with("FROM")),
        2
    );
    assert!(dockerfile.contains("\nUSER 10001"));
    // The build stage has what the workspace needs to load and the service to build: every
    // workspace member, the sources, and what they embed (migrations, rule files).
    let manifest: toml::Table = std::fs::read_to_string(repo().join("Cargo.toml"))
        .unwrap()
        .parse()
        .unwrap();
    let members = manifest["workspace"]["members"].as_array().unwrap();
    for dir in ["src", "migrations", "alerts"] {
        assert!(
            dockerfile.contains(&format!("\nCOPY {dir} ./{dir}\n")),
            "the image build does not copy {dir}/"
        );
    }
    // The other members: their manifest in the dependency layer, their sources after it.
    for m in members
        .iter()
        .filter_map(|m| m.as_str())
        .filter(|m| *m != ".")
    {
        let manifest = dockerfile
            .find(&format!("\nCOPY {m}/Cargo.toml ./{m}/\n"))
            .unwrap_or_else(|| panic!("the image build does not copy {m}/Cargo.toml"));
        let sources = dockerfile
            .find(&format!("\nCOPY {m}/src ./{m}/src\n"))
            .unwrap_or_else(|| panic!("the image build does not copy {m}/src"));
        assert!(manifest < sources);
    }
    // Dependencies are built from the manifests before any source is copied; nothing strips
    // the line tables; the container's health is the service's readiness.
    let deps = dockerfile.find("cargo build --release --locked").unwrap();
    assert!(deps < dockerfile.find("\nCOPY src ./src\n").unwrap());
    assert!(!dockerfile.contains("strip "));
    assert!(dockerfile.contains(r#"CMD ["toolsight", "healthcheck""#));
    let ignored = std::fs::read_to_string(repo().join(".dockerignore")).unwrap();
    for dir in ["target", "fuzz", ".git"] {
        assert!(
            ignored.lines().any(|l| l.trim() == dir),
            ".dockerignore: {dir}"
        );
    }
    let env_block = dockerfile
        .split("\nENV ")
        .nth(1)
        .unwrap()
        .split("\nEXPOSE")
        .next()
        .unwrap();
    let config = |extra: &[(&str, &str)]| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_toolsight"));
        cmd.arg("config").env_clear();
        for pair in env_block.split_whitespace().filter(|w| w.contains('=')) {
            let (k, v) = pair.split_once('=').unwrap();
            cmd.env(k, v);
        }
        cmd.env("DATABASE_URL", url).envs(extra.iter().copied());
        cmd.output().unwrap()
    };
    // Listening on all interfaces without tokens is refused unless explicitly allowed ...
    let refused = config(&[]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("is not a loopback address"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    // ... as the compose stack does (its ports are published on 127.0.0.1 only).
    let allow =
        compose["services"]["toolsight"]["environment"]["TOOLSIGHT_AUTH__ALLOW_UNAUTHENTICATED"]
            .as_str()
            .unwrap();
    let out = config(&[("TOOLSIGHT_AUTH__ALLOW_UNAUTHENTICATED", allow)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown = String::from_utf8(out.stdout).unwrap();
    assert!(shown.contains("grpc_listen = \"0.0.0.0:4317\""), "{shown}");
    assert!(shown.contains("format = \"json\""), "{shown}");

    // The systemd unit runs the binary with a config file and checks it first.
    let unit = std::fs::read_to_string(repo().join("deploy/toolsight.service")).unwrap();
    assert!(unit.contains(
        "ExecStartPre=/usr/local/bin/toolsight --config /etc/toolsight/toolsight.toml config"
    ));
    assert!(unit.contains(
        "ExecStart=/usr/local/bin/toolsight --config /etc/toolsight/toolsight.toml serve"
    ));
}
