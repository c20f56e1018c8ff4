//! Notifications end to end, against real peers: a webhook receiver (version-4 payload, HMAC
//! signature, down for a while), a real SMTP server (Python's aiosmtpd), a real Prometheus
//! Alertmanager, and a service killed between writing the outbox and sending.
//!
//! The alert is a retry loop (three identical calls in a 20 s window, evaluated every second):
//! it fires on the first evaluation after the spans land and resolves when they leave the window. The window is wide so that an evaluator slowed by a busy machine still sees the calls.

use crate::common;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use chrono::Utc;
use common::spans::{Spans, attr, send};
use common::{Process, Service, eventually, free_port, output, serve_ready, toolsight};
use serde_json::{Value, json};
use toolsight::notify::config::{Notify, ReceiverConfig};

const RULES: &str = "groups:
  - name: notify
    interval: 1s
    rules:
      - alert: Loop
        kind: retry_loop
        window: 20s
        min_repeats: 3
        min_samples: 1
        labels: {severity: warning}
        annotations: {summary: '{{ $labels.tool }} repeated {{ $value }} times'}
";

fn rules_file(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("toolsight-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("rules.yaml");
    std::fs::write(&path, RULES).unwrap();
    path
}

/// Three identical calls of each tool in one conversation, just now.
fn loops(tools: &[&str]) -> Spans {
    let mut s = Spans::new();
    let at = Utc::now() - chrono::Duration::milliseconds(500);
    for tool in tools {
        for _ in 0..3 {
            s.tool(
                tool,
                at,
                10,
                false,
                vec![
                    attr("gen_ai.conversation.id", json!("conv-1")),
                    attr("gen_ai.tool.call.arguments", json!(r#"{"q":"same"}"#)),
                ],
            );
        }
    }
    s
}

/// Waits for the rule evaluator to run: the loops must land while it does (they leave the 20 s
/// window soon).
async fn evaluating(pool: &sqlx::PgPool) {
    eventually("the evaluator", || async {
        let n: i64 = sqlx::query_scalar("SELECT count(*) FROM rule_health")
            .fetch_one(pool)
            .await
            .ok()?;
        (n > 0).then_some(())
    })
    .await
}

fn receiver(toml_text: &str) -> ReceiverConfig {
    toml::from_str(toml_text).unwrap()
}

/// Fast timings for tests: group for 1 s, retry from 100 ms.
fn fast(receivers: Vec<ReceiverConfig>, default: &str) -> Notify {
    Notify {
        receivers,
        receiver: default.into(),
        group_wait: Duration::from_secs(1),
        group_interval: Duration::from_secs(1),
        retry_initial: Duration::from_millis(100),
        retry_max: Duration::from_millis(400),
        external_url: "http://toolsight.test:9464".into(),
        grafana_url: "http://grafana.test:3000".into(),
        trace_url: "http://jaeger.test/trace/{trace_id}".into(),
        ..Notify::default()
    }
}

/// One request the webhook receiver got.
#[derive(Debug, Clone)]
struct Hit {
    answered: u16,
    idempotency: String,
    signature: String,
    team: String,
    body: Vec<u8>,
}

impl Hit {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
}

/// A webhook receiver that answers 503 to the first `fail` requests (or while `down`).
#[derive(Clone, Default)]
struct Hook {
    state: Arc<Mutex<(usize, bool, Vec<Hit>)>>,
}

impl Hook {
    fn failing(first: usize) -> Hook {
        let h = Hook::default();
        h.state.lock().unwrap().0 = first;
        h
    }
    fn set_down(&self, down: bool) {
        self.state.lock().unwrap().1 = down;
    }
    fn hits(&self) -> Vec<Hit> {
        self.state.lock().unwrap().2.clone()
    }
    fn delivered(&self) -> Vec<Hit> {
        self.hits()
            .into_iter()
            .filter(|h| h.answered == 200)
            .collect()
    }
    fn delivered_with_status(&self, status: &str) -> Option<Hit> {
        self.delivered()
            .into_iter()
            .find(|h| h.json()["status"] == status)
    }

    async fn start(&self) -> SocketAddr {
        let state = self.state.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: HeaderMap, body: axum::body::Bytes| {
                let state = state.clone();
                async move {
                    let mut s = state.lock().unwrap();
                    let fail = s.1 || s.0 > 0;
                    if s.0 > 0 {
                        s.0 -= 1;
                    }
                    let h = |k: &str| {
                        headers
                            .get(k)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned()
                    };
                    let answered = if fail { 503 } else { 200 };
                    s.2.push(Hit {
                        answered,
                        idempotency: h("idempotency-key"),
                        signature: h("x-toolsight-signature"),
                        team: h("x-team"),
                        body: body.to_vec(),
                    });
                    if fail {
                        (StatusCode::SERVICE_UNAVAILABLE, "receiver down")
                    } else {
                        (StatusCode::OK, "ok")
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        addr
    }
}

/// The service with the loop rule and one receiver (the default route), evaluating.
async fn notifying(name: &str, receiver_toml: &str) -> Service {
    let rules = rules_file(name);
    let r = receiver(receiver_toml);
    let notify = fast(vec![r.clone()], r.name());
    let svc = Service::start_with(name, move |c| {
        c.rules.files = vec![rules];
        c.notify = notify;
    })
    .await;
    evaluating(&svc.pool).await;
    svc
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_grouped_signed_silenced_and_delivered_once_after_the_receiver_was_down() {
    let hook = Hook::failing(3);
    let addr = hook.start().await;
    let svc = notifying(
        "notify_webhook",
        &format!(
            "name = \"hook\"\ntype = \"webhook\"\nurl = \"http://{addr}/hook?token=SECRET123\"\nhmac_secret = \"s3cret\"\nheaders = {{ X-Team = \"mcp\" }}\n"
        ),
    )
    .await;
    let admin = format!("http://{}", svc.admin);

    // Silence one of the three tools through the command line.
    let added = output(toolsight().args([
        "silence",
        "add",
        "tool=list_items",
        "--comment",
        "maintenance",
        "--author",
        "tester",
        "--duration",
        "10m",
        "--url",
        &admin,
    ]));
    assert!(added.starts_with("silence 1 until"), "{added}");

    send(&svc, loops(&["search", "fetch", "list_items"])).await;

    // The silenced alert fires, and shows its silence.
    let list = common::firing_alert("the silenced alert in the API", svc.admin, |a| {
        a["labels"]["tool"] == "list_items"
    })
    .await;
    assert_eq!(list["silenced"], true);
    assert_eq!(list["silencedBy"], json!([1]));

    // Three 503s, then the firing notification arrives: one, for the whole group.
    let firing = eventually("the firing notification", || async {
        hook.delivered_with_status("firing")
    })
    .await;
    let p = firing.json();
    assert_eq!(p["version"], "4");
    assert_eq!(p["receiver"], "hook");
    assert_eq!(p["groupLabels"], json!({"alertname": "Loop"}));
    assert_eq!(p["commonLabels"]["severity"], "warning");
    assert_eq!(p["commonLabels"]["service"], "svc");
    assert_eq!(p["truncatedAlerts"], 0);
    assert_eq!(p["externalURL"], "http://toolsight.test:9464");
    let alerts = p["alerts"].as_array().unwrap();
    let mut tools: Vec<&str> = alerts
        .iter()
        .map(|a| a["labels"]["tool"].as_str().unwrap())
        .collect();
    tools.sort();
    assert_eq!(tools, ["fetch", "search"], "the silenced tool is left out");
    for a in alerts {
        assert_eq!(a["status"], "firing");
        assert_eq!(a["endsAt"], "0001-01-01T00:00:00Z");
        assert_eq!(a["fingerprint"].as_str().unwrap().len(), 16);
        // From a number to a trace: the loop's calls (three traces) as examples, with links.
        let ids: Vec<&str> = a["annotations"]["example_traces"]
            .as_str()
            .unwrap_or_else(|| panic!("example traces in {a}"))
            .split(',')
            .collect();
        assert_eq!(ids.len(), 3, "{a}");
        assert!(ids.iter().all(|i| i.len() == 32), "{a}");
        assert_eq!(
            a["annotations"]["example_trace_urls"],
            ids.iter()
                .map(|i| format!("http://jaeger.test/trace/{i}"))
                .collect::<Vec<_>>()
                .join(" ")
        );
        assert!(
            a["annotations"]["summary"]
                .as_str()
                .unwrap()
                .ends_with("repeated 3 times")
        );
        assert!(a["generatorURL"].as_str().unwrap().starts_with(
            "http://grafana.test:3000/d/toolsight-tool/tool-detail?var-service=svc&var-tool="
        ));
        for k in ["labels", "annotations", "startsAt"] {
            assert!(a.get(k).is_some(), "{k}");
        }
    }
    assert_eq!(
        firing.signature,
        toolsight::notify::deliver::signature("s3cret", &firing.body)
    );
    assert_eq!(firing.team, "mcp");
    let attempts: Vec<Hit> = hook
        .hits()
        .into_iter()
        .filter(|h| h.idempotency == firing.idempotency)
        .collect();
    assert_eq!(
        attempts.iter().map(|h| h.answered).collect::<Vec<_>>(),
        [503, 503, 503, 200],
        "the same notification retried until acknowledged"
    );

    let listed = output(toolsight().args(["silence", "list", "--url", &admin]));
    assert!(
        listed.contains("maintenance") && listed.contains("active"),
        "{listed}"
    );

    // Healthy again: one resolved notification, then nothing more.
    let resolved = eventually("the resolved notification", || async {
        hook.delivered_with_status("resolved")
    })
    .await;
    let r = resolved.json();
    assert_eq!(r["alerts"].as_array().unwrap().len(), 2);
    for a in r["alerts"].as_array().unwrap() {
        assert_eq!(a["status"], "resolved");
        assert_ne!(a["endsAt"], "0001-01-01T00:00:00Z");
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        hook.delivered().len(),
        2,
        "exactly one firing and one resolved"
    );

    output(toolsight().args(["silence", "expire", "1", "--url", &admin]));
    let listed = output(toolsight().args(["silence", "list", "--url", &admin]));
    assert!(listed.contains("expired"), "{listed}");

    // Retries are counted; errors recorded for the retries never show the URL's token.
    let metrics = svc.metrics().await;
    assert!(
        metrics.contains("toolsight_notify_attempts_total{receiver=\"hook\",result=\"retry\"} 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains("toolsight_notifications_total{receiver=\"hook\",result=\"delivered\"} 2")
    );
    let errors: Vec<Option<String>> = sqlx::query_scalar("SELECT last_error FROM notify_outbox")
        .fetch_all(&svc.pool)
        .await
        .unwrap();
    assert_eq!(errors.len(), 2);
    assert!(errors.iter().flatten().all(|e| !e.contains("SECRET123")));
    svc.stop().await.unwrap();
}

/// A silence on a rule's own label (`severity`) silences the alert in the API too, and when it
/// expires while the alert fires, the alert goes out at the next group_interval (1 s here),
/// as Alertmanager sends it, not after repeat_interval (4 h).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silence_on_a_rule_label_holds_and_its_expiry_sends_at_the_next_group_interval() {
    let hook = Hook::default();
    let addr = hook.start().await;
    let svc = notifying(
        "notify_silence_expiry",
        &format!("name = \"hook\"\ntype = \"webhook\"\nurl = \"http://{addr}/hook\"\n"),
    )
    .await;
    let admin = format!("http://{}", svc.admin);
    let added = output(toolsight().args([
        "silence",
        "add",
        "severity=warning",
        "--comment",
        "deploy",
        "--author",
        "tester",
        "--duration",
        "1h",
        "--url",
        &admin,
    ]));
    assert!(added.starts_with("silence 1 until"), "{added}");

    // The loop goes on (fresh calls every 2 s) so the alert keeps firing throughout.
    let looping = {
        let url = svc.http_url();
        tokio::spawn(async move {
            loop {
                let _ = reqwest::Client::new()
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(loops(&["search"]).body())
                    .send()
                    .await;
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        })
    };
    let firing = common::firing_alert("the alert firing in the API", svc.admin, |_| true).await;
    assert_eq!(firing["labels"]["severity"], "warning");
    assert_eq!(firing["silenced"], true, "{firing}");
    assert_eq!(firing["silencedBy"], json!([1]));

    // The group was due and sent nothing: its next look is saved, group_interval ahead.
    eventually("the silenced group's next flush, saved", || async {
        let soon: Option<bool> =
            sqlx::query_scalar("SELECT flush_at < now() + interval '1 minute' FROM notify_groups")
                .fetch_optional(&svc.pool)
                .await
                .ok()?;
        soon.filter(|s| *s)
    })
    .await;
    assert!(hook.hits().is_empty(), "silenced: nothing sent");

    output(toolsight().args(["silence", "expire", "1", "--url", &admin]));
    let sent = eventually(
        "the firing notification after the silence expired",
        || async { hook.delivered_with_status("firing") },
    )
    .await;
    looping.abort();
    let p = sent.json();
    assert_eq!(p["alerts"][0]["labels"]["tool"], "search");
    assert_eq!(p["alerts"][0]["labels"]["severity"], "warning");
    svc.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_rejecting_with_4xx_is_not_retried() {
    // A receiver answering 400: logged and counted, never retried.
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(|| async { (StatusCode::BAD_REQUEST, "unknown team") }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let svc = notifying(
        "notify_4xx",
        &format!("name = \"bad\"\ntype = \"webhook\"\nurl = \"http://{addr}/hook\"\n"),
    )
    .await;
    send(&svc, loops(&["search"])).await;
    let (status, attempts, error): (String, i32, Option<String>) =
        eventually("the rejected notification", || async {
            sqlx::query_as(
                "SELECT status, attempts, last_error FROM notify_outbox WHERE status <> 'pending' ORDER BY id LIMIT 1",
            )
            .fetch_optional(&svc.pool)
            .await
            .unwrap()
        })
        .await;
    assert_eq!((status.as_str(), attempts), ("failed", 1));
    assert!(
        error.unwrap().contains("400 Bad Request: unknown team"),
        "the response body is kept"
    );
    let metrics = svc.metrics().await;
    assert!(
        metrics.contains("toolsight_notify_attempts_total{receiver=\"bad\",result=\"rejected\"} 1"),
        "{metrics}"
    );
    svc.stop().await.unwrap();
}

async fn wait_port(port: u16) {
    eventually("the peer to listen", || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()
            .map(|_| ())
    })
    .await
}

/// A real SMTP server (Python's aiosmtpd) on a free port that keeps each mail it gets in
/// `maildir` (Maildir); `tls` adds its extra arguments (certificate and key: STARTTLS).
async fn smtp_server(maildir: &std::path::Path, tls: &[&std::path::Path]) -> (Process, u16) {
    let python = common::python::venv("smtp-venv", "import aiosmtpd", |pip| {
        common::python::run(pip().arg("aiosmtpd==1.4.6"))
    });
    let _ = std::fs::remove_dir_all(maildir);
    let port = free_port();
    let mut cmd = Command::new(python);
    cmd.args(["-m", "aiosmtpd", "-n", "-l"])
        .arg(format!("127.0.0.1:{port}"));
    if let [cert, key] = tls {
        cmd.arg("--tlscert").arg(cert).arg("--tlskey").arg(key);
    }
    let smtp = Process(
        cmd.args(["-c", "aiosmtpd.handlers.Mailbox"])
            .arg(maildir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_port(port).await;
    (smtp, port)
}

/// The first mail delivered to `maildir`, as it arrived.
async fn first_mail(what: &str, maildir: &std::path::Path) -> Vec<u8> {
    let new = maildir.join("new");
    eventually(what, || async {
        let first = std::fs::read_dir(&new).ok()?.flatten().next()?;
        std::fs::read(first.path()).ok()
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn email_through_a_real_smtp_server() {
    let maildir = std::env::temp_dir().join(format!("toolsight-maildir-{}", std::process::id()));
    let (_smtp, port) = smtp_server(&maildir, &[]).await;

    let svc = notifying(
        "notify_email",
        &format!(
            "name = \"mail\"\ntype = \"email\"\nsmarthost = \"127.0.0.1:{port}\"\ntls = \"none\"\nfrom = \"toolsight@example.com\"\nto = [\"oncall@example.com\", \"mcp-team@example.com\"]\n"
        ),
    )
    .await;
    send(&svc, loops(&["search"])).await;
    let raw = first_mail("the email", &maildir).await;
    let msg = mail_parser::MessageParser::default()
        .parse(&raw)
        .expect("a parsable email");
    assert_eq!(
        msg.subject(),
        Some("[FIRING:1] alertname=Loop"),
        "one email for the group"
    );
    let to: Vec<String> = msg
        .to()
        .unwrap()
        .iter()
        .filter_map(|a| a.address().map(str::to_owned))
        .collect();
    assert_eq!(to, ["oncall@example.com", "mcp-team@example.com"]);
    let text = msg.body_text(0).unwrap();
    for want in [
        "tool: search",
        "service: svc",
        "value: 3.000",
        "threshold: 3.000",
        "since: ",
        "http://grafana.test:3000/d/toolsight-tool/tool-detail?var-service=svc&var-tool=search",
        "example traces:\n    http://jaeger.test/trace/",
    ] {
        assert!(text.contains(want), "{want} in {text}");
    }
    let html = msg.body_html(0).unwrap();
    assert!(
        html.contains("<table") && html.contains("var-tool=search"),
        "{html}"
    );
    svc.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alerts_pushed_to_a_real_alertmanager_fire_and_resolve() {
    // This test builds HTTP clients before any in-process service does it.
    toolsight::install_crypto_provider();
    let dir = std::env::temp_dir().join(format!("toolsight-am-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("alertmanager.yml");
    std::fs::write(
        &config,
        "route:\n  receiver: 'null'\nreceivers:\n  - name: 'null'\n",
    )
    .unwrap();
    let port = free_port();
    let _am = Process(
        Command::new(alertmanager_binary())
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--cluster.listen-address=")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus-alertmanager (Debian package prometheus-alertmanager)"),
    );
    let am = format!("http://127.0.0.1:{port}");
    eventually("alertmanager ready", || async {
        let r = reqwest::get(format!("{am}/-/ready")).await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;

    let svc = notifying(
        "notify_am",
        &format!(
            "name = \"am\"\ntype = \"alertmanager\"\nurls = [\"{am}\"]\nresend_every = \"1s\"\nresolved_for = \"5s\"\n"
        ),
    )
    .await;
    send(&svc, loops(&["search"])).await;

    let ours = |alerts: Value| -> Option<Value> {
        alerts
            .as_array()?
            .iter()
            .find(|a| a["labels"]["alertname"] == "Loop" && a["labels"]["tool"] == "search")
            .cloned()
    };
    let listed = || async {
        reqwest::get(format!("{am}/api/v2/alerts"))
            .await
            .ok()?
            .json::<Value>()
            .await
            .ok()
    };
    let alert = eventually("the alert in Alertmanager", || async {
        ours(listed().await?)
    })
    .await;
    assert_eq!(alert["status"]["state"], "active");
    assert_eq!(alert["labels"]["severity"], "warning");
    assert_eq!(alert["annotations"]["summary"], "search repeated 3 times");
    assert!(
        alert["generatorURL"]
            .as_str()
            .unwrap()
            .contains("var-tool=search")
    );

    // Resolved: Alertmanager no longer lists it as active.
    eventually("the alert resolved in Alertmanager", || async {
        ours(listed().await?).is_none().then_some(())
    })
    .await;
    // Firing pushes get `endsAt` when sent; resolved ones carry it in the outbox.
    let pushes = |resolved: bool| {
        format!(
            "SELECT count(*) FROM notify_outbox WHERE status = 'delivered' AND target = '{am}' AND (payload::text LIKE '%endsAt%') = {resolved}"
        )
    };
    assert!(svc.count(&pushes(false)).await >= 1, "firing pushes");
    assert!(svc.count(&pushes(true)).await >= 1, "resolved pushes");
    svc.stop().await.unwrap();
}

fn alertmanager_binary() -> PathBuf {
    std::env::var("TOOLSIGHT_TEST_ALERTMANAGER")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("/usr/bin/prometheus-alertmanager"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_after_writing_the_outbox_the_notification_is_sent_once_after_restart() {
    // This test builds HTTP clients before any in-process service does it.
    toolsight::install_crypto_provider();
    let hook = Hook::default();
    hook.set_down(true);
    let addr = hook.start().await;
    let rules = rules_file("notify-kill");
    let url = common::fresh_database("notify_kill").await;
    let config = rules.with_file_name("toolsight.toml");
    std::fs::write(
        &config,
        format!(
            "[database]\nurl = \"{url}\"\n[otlp]\ngrpc_listen = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[rules]\nfiles = [\"{}\"]\n[notify]\nreceiver = \"hook\"\ngroup_wait = \"1s\"\ngroup_interval = \"1s\"\nretry_initial = \"100ms\"\nretry_max = \"300ms\"\n[[notify.receivers]]\nname = \"hook\"\ntype = \"webhook\"\nurl = \"http://{addr}/hook\"\n",
            rules.display()
        ),
    )
    .unwrap();

    let a = serve_ready(&config, &[]).await;
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    evaluating(&pool).await;

    let body = loops(&["search"]).body();
    let r = reqwest::Client::new()
        .post(a.http_url())
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    // The notification is in the outbox and has been tried against the dead receiver.
    eventually("a failed attempt", || async {
        let attempts: Option<i32> =
            sqlx::query_scalar("SELECT max(attempts) FROM notify_outbox WHERE status = 'pending'")
                .fetch_one(&pool)
                .await
                .unwrap();
        attempts.filter(|a| *a >= 1)
    })
    .await;

    // The service dies outright; the receiver comes back; the service restarts, here as two
    // replicas on the same database: the notification is delivered once, not once per replica.
    drop(a);
    hook.set_down(false);
    let restarted = serve_ready(&config, &[]).await;
    let replica = serve_ready(&config, &[]).await;
    let firing = eventually("the firing notification", || async {
        hook.delivered_with_status("firing")
    })
    .await;
    eventually("the resolved notification", || async {
        hook.delivered_with_status("resolved")
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let delivered = hook.delivered();
    assert_eq!(
        delivered
            .iter()
            .filter(|h| h.json()["status"] == "firing")
            .count(),
        1,
        "one firing notification across the kill and the takeover"
    );
    assert_eq!(
        delivered
            .iter()
            .filter(|h| h.idempotency == firing.idempotency)
            .count(),
        1
    );
    let pending: i64 =
        sqlx::query_scalar("SELECT count(*) FROM notify_outbox WHERE status <> 'delivered'")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(pending, 0);
    drop((restarted, replica));
    pool.close().await;
}

/// An HTTPS webhook receiver (Python's `http.server` behind `ssl`) that appends each body it
/// gets, one per line, to `log`.
const HTTPS_HOOK: &str = r#"
import http.server, ssl, sys
port, cert, key, log = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
class Hook(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["content-length"]))
        with open(log, "ab") as f:
            f.write(body + b"\n")
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")
    def log_message(self, *args):
        pass
server = http.server.HTTPServer(("127.0.0.1", port), Hook)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
server.socket = ctx.wrap_socket(server.socket, server_side=True)
server.serve_forever()
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_and_smtp_trust_a_private_ca_from_ca_file() {
    let pki = crate::tls_e2e::pki("receiver-ca");
    let (ca, cert, key) = (
        pki.dir.join("ca.pem"),
        pki.dir.join("server.pem"),
        pki.dir.join("server.key"),
    );
    let log = pki.dir.join("hook.log");
    let hook_port = free_port();
    let _hook = Process(
        Command::new("python3")
            .arg("-c")
            .arg(HTTPS_HOOK)
            .arg(hook_port.to_string())
            .args([&cert, &key, &log])
            .spawn()
            .unwrap(),
    );
    wait_port(hook_port).await;

    // Without the CA, the receiver's certificate is refused and nothing is delivered.
    let hook = |name: &str, ca_line: &str| {
        format!(
            "name = \"{name}\"\ntype = \"webhook\"\nurl = \"https://localhost:{hook_port}/hook\"\n{ca_line}"
        )
    };
    let svc = notifying("notify_ca_refused", &hook("hook", "")).await;
    send(&svc, loops(&["search"])).await;
    let error: String = eventually("a refused delivery", || async {
        sqlx::query_scalar("SELECT last_error FROM notify_outbox WHERE last_error IS NOT NULL")
            .fetch_optional(&svc.pool)
            .await
            .unwrap()
    })
    .await;
    assert!(error.to_lowercase().contains("certificate"), "{error}");
    assert!(!log.exists(), "nothing reached the receiver");
    svc.stop().await.unwrap();

    // With it, the webhook is delivered over TLS ...
    let ca_line = format!("ca_file = \"{}\"\n", ca.display());
    let svc = notifying("notify_ca_hook", &hook("hook", &ca_line)).await;
    send(&svc, loops(&["search"])).await;
    let body = eventually("the webhook over TLS", || async {
        std::fs::read_to_string(&log).ok()
    })
    .await;
    let first: Value = serde_json::from_str(body.lines().next().unwrap()).unwrap();
    assert_eq!(first["commonLabels"]["alertname"], "Loop", "{first}");
    svc.stop().await.unwrap();

    // ... and so is the email, over STARTTLS to a real SMTP server with the same certificate.
    let maildir = pki.dir.join("maildir");
    let (_smtp, smtp_port) = smtp_server(&maildir, &[cert.as_path(), key.as_path()]).await;
    let svc = notifying(
        "notify_ca_mail",
        &format!(
            "name = \"mail\"\ntype = \"email\"\nsmarthost = \"localhost:{smtp_port}\"\ntls = \"starttls\"\nfrom = \"toolsight@example.com\"\nto = [\"oncall@example.com\"]\n{ca_line}"
        ),
    )
    .await;
    send(&svc, loops(&["search"])).await;
    let raw = first_mail("the email over STARTTLS", &maildir).await;
    let msg = mail_parser::MessageParser::default().parse(&raw).unwrap();
    assert_eq!(msg.subject(), Some("[FIRING:1] alertname=Loop"));
    svc.stop().await.unwrap();
}

/// `amtool` (the real one, from Debian's prometheus-alertmanager package) against toolsight's
/// Alertmanager API v2, with the admin token: it adds a silence, lists it and the alerts, and
/// expires it; what toolsight then sends follows the silence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amtool_silences_and_queries_alerts_through_the_alertmanager_api() {
    let amtool = std::env::var("TOOLSIGHT_TEST_AMTOOL").unwrap_or_else(|_| "amtool".into());
    let token = "an-admin-token-for-amtool-0123";
    let hook = Hook::default();
    let addr = hook.start().await;
    let rules = rules_file("amtool");
    let r = receiver(&format!(
        "name = \"hook\"\ntype = \"webhook\"\nurl = \"http://{addr}/hook\"\n"
    ));
    let mut notify = fast(vec![r], "hook");
    notify.group_by = vec!["alertname".into(), "tool".into()];
    let svc = Service::start_with("amtool", move |c| {
        c.rules.files = vec![rules];
        c.notify = notify;
        c.auth.admin_token = Some(toolsight::secret::Secret::new(token));
    })
    .await;
    evaluating(&svc.pool).await;
    let dir = std::env::temp_dir().join(format!("toolsight-amtool-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let http_config = dir.join("http.yml");
    std::fs::write(
        &http_config,
        format!("authorization:\n  type: Bearer\n  credentials: {token}\n"),
    )
    .unwrap();
    let url = format!("--alertmanager.url=http://{}", svc.admin);
    let am = |args: &[&str]| {
        let out = Command::new(&amtool)
            .args(args)
            .arg(&url)
            .arg(format!("--http.config.file={}", http_config.display()))
            .output()
            .expect("amtool (apt-get install prometheus-alertmanager)");
        assert!(out.status.success(), "amtool {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };

    // Without the token: refused.
    let refused = Command::new(&amtool)
        .args(["alert", "query", &url])
        .output()
        .unwrap();
    assert!(!refused.status.success(), "{refused:?}");

    let id = am(&[
        "silence",
        "add",
        "tool=list_items",
        "--comment=maintenance",
        "--author=tester",
        "--duration=10m",
    ]);
    assert_eq!(id.trim(), "1");
    let listed: Value = serde_json::from_str(&am(&["silence", "query", "-o", "json"])).unwrap();
    assert_eq!(listed[0]["id"], "1", "{listed}");
    assert_eq!(listed[0]["status"]["state"], "active", "{listed}");
    assert_eq!(listed[0]["createdBy"], "tester");
    assert_eq!(
        listed[0]["matchers"][0],
        json!({"name": "tool", "value": "list_items", "isRegex": false, "isEqual": true})
    );

    send(&svc, loops(&["search", "list_items"])).await;
    // What toolsight sends: the search loop, not the silenced one.
    let firing = eventually("the firing notification", || async {
        hook.delivered_with_status("firing")
    })
    .await;
    assert_eq!(firing.json()["commonLabels"]["tool"], "search");

    // amtool sees the active alert by default and the silenced one with -s.
    let active: Value = serde_json::from_str(&am(&["alert", "query", "-o", "json"])).unwrap();
    let tools = |v: &Value| -> Vec<String> {
        let mut t: Vec<String> = v
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a["labels"]["tool"].as_str().unwrap().to_owned())
            .collect();
        t.sort();
        t
    };
    assert_eq!(tools(&active), ["search"], "{active}");
    assert_eq!(active[0]["status"]["state"], "active");
    assert_eq!(active[0]["receivers"][0]["name"], "hook");
    let all: Value =
        serde_json::from_str(&am(&["alert", "query", "-s", "-a", "-o", "json"])).unwrap();
    assert_eq!(tools(&all), ["list_items", "search"], "{all}");
    let silenced = all
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["labels"]["tool"] == "list_items")
        .unwrap();
    assert_eq!(silenced["status"]["state"], "suppressed");
    assert_eq!(silenced["status"]["silencedBy"], json!(["1"]));
    let filtered: Value = serde_json::from_str(&am(&[
        "alert",
        "query",
        "-s",
        "-a",
        "-o",
        "json",
        "tool=~list.*",
    ]))
    .unwrap();
    assert_eq!(tools(&filtered), ["list_items"], "{filtered}");

    // The groups endpoint, as Karma and Grafana read it: one per (receiver, group_by labels),
    // the silenced alert included.
    let groups: Value = reqwest::Client::new()
        .get(format!("http://{}/api/v2/alerts/groups", svc.admin))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(groups.as_array().unwrap().len(), 2, "{groups}");
    assert_eq!(groups[0]["receiver"]["name"], "hook");
    assert_eq!(groups[0]["labels"]["alertname"], "Loop");
    // Expired: the silenced alert is sent at the next group interval.
    am(&["silence", "expire", "1"]);
    let expired: Value =
        serde_json::from_str(&am(&["silence", "query", "--expired", "-o", "json"])).unwrap();
    assert_eq!(expired[0]["status"]["state"], "expired", "{expired}");
    eventually(
        "the notification of the alert no longer silenced",
        || async {
            hook.delivered()
                .into_iter()
                .find(|h| h.json()["commonLabels"]["tool"] == "list_items")
        },
    )
    .await;

    svc.stop().await.unwrap();
}
