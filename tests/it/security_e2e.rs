//! Security end to end: scoped ingest tokens over HTTP and gRPC (401 / 403, counted), the token
//! file reloaded without a restart, the admin API's own token, and redaction proven by scanning
//! every column of the database for a configured secret.

use crate::common;
use std::time::Duration;

use chrono::Utc;
use common::Service;
use common::spans::{Spans, attr};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_client::TraceServiceClient;
use serde_json::json;
use toolsight::receive::auth::TokenConfig;
use toolsight::secret::Secret;

const BILLING: &str = "billing-token-0123456789";
const OPS: &str = "ops-token-0123456789abcd";
const ADMIN: &str = "admin-token-0123456789ab";

fn token(name: &str, secret: &str, services: &[&str]) -> TokenConfig {
    TokenConfig {
        name: name.into(),
        token: Secret::new(secret),
        services: services.iter().map(|s| s.to_string()).collect(),
    }
}

fn calls(n: usize) -> Spans {
    let mut s = Spans::new();
    for _ in 0..n {
        s.tool("lookup", Utc::now(), 20, false, vec![]);
    }
    s
}

async fn post(svc: &Service, service: &str, token: Option<&str>) -> reqwest::Response {
    let mut r = reqwest::Client::new()
        .post(svc.http_url())
        .header("content-type", "application/json")
        .body(calls(3).body_for(service));
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    r.send().await.unwrap()
}

async fn grpc(svc: &Service, service: &str, token: Option<&str>) -> Result<(), tonic::Status> {
    let body: ExportTraceServiceRequest =
        serde_json::from_slice(&calls(2).body_for(service)).unwrap();
    let mut req = tonic::Request::new(body);
    if let Some(t) = token {
        req.metadata_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    let mut client = TraceServiceClient::connect(format!("http://{}", svc.grpc))
        .await
        .unwrap();
    client.export(req).await.map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scoped_tokens_over_http_and_grpc() {
    let svc = Service::start_with("security_tokens", |c| {
        c.auth.tokens = vec![
            token("billing", BILLING, &["billing-*"]),
            token("ops", OPS, &[]),
        ];
        c.auth.admin_token = Some(Secret::new(ADMIN));
    })
    .await;

    // HTTP: no token, a wrong token, a token for another service, then the right ones.
    let r = post(&svc, "billing-mcp", None).await;
    assert_eq!(r.status(), 401);
    assert_eq!(
        r.headers()["www-authenticate"],
        "Bearer realm=\"toolsight\""
    );
    assert_eq!(
        post(&svc, "billing-mcp", Some("nope-nope-nope-nope"))
            .await
            .status(),
        401
    );
    assert_eq!(post(&svc, "search-mcp", Some(BILLING)).await.status(), 403);
    assert_eq!(post(&svc, "billing-mcp", Some(BILLING)).await.status(), 200);
    assert_eq!(post(&svc, "search-mcp", Some(OPS)).await.status(), 200);

    // gRPC: the same answers as gRPC codes.
    assert_eq!(
        grpc(&svc, "billing-mcp", None).await.unwrap_err().code(),
        tonic::Code::Unauthenticated
    );
    assert_eq!(
        grpc(&svc, "search-mcp", Some(BILLING))
            .await
            .unwrap_err()
            .code(),
        tonic::Code::PermissionDenied
    );
    grpc(&svc, "billing-eu", Some(BILLING)).await.unwrap();

    // Only the allowed exports were stored: 3 + 3 over HTTP, 2 over gRPC.
    assert_eq!(svc.count("SELECT count(*) FROM tool_calls").await, 8);
    assert_eq!(
        svc.count("SELECT count(*) FROM tool_calls WHERE service = 'search-mcp'")
            .await,
        3,
        "only the ops token's"
    );

    // The admin API has its own token; ingest tokens do not open it.
    let admin = |t: Option<&str>| {
        let mut r = reqwest::Client::new().get(format!("http://{}/metrics", svc.admin));
        if let Some(t) = t {
            r = r.bearer_auth(t);
        }
        r.send()
    };
    assert_eq!(admin(None).await.unwrap().status(), 401);
    assert_eq!(admin(Some(OPS)).await.unwrap().status(), 401);
    let m = admin(Some(ADMIN)).await.unwrap();
    assert_eq!(m.status(), 200);
    let metrics = m.text().await.unwrap();
    for line in [
        "toolsight_exports_total{transport=\"http_json\",result=\"unauthenticated\"} 2",
        "toolsight_exports_total{transport=\"http_json\",result=\"permission_denied\"} 1",
        "toolsight_exports_total{transport=\"grpc\",result=\"unauthenticated\"} 1",
        "toolsight_exports_total{transport=\"grpc\",result=\"permission_denied\"} 1",
        "toolsight_spans_rejected_total{reason=\"unauthorized_service\"} 5",
    ] {
        assert!(metrics.contains(line), "{line}\n{metrics}");
    }
    let health = reqwest::get(format!("http://{}/healthz", svc.admin))
        .await
        .unwrap();
    assert_eq!(health.status(), 200, "health checks need no token");
    svc.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_file_is_reloaded_without_a_restart() {
    let dir = std::env::temp_dir().join(format!("toolsight-sec-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("tokens.toml");
    let write = |name: &str, tok: &str| {
        std::fs::write(
            &file,
            format!("[[tokens]]\nname = \"{name}\"\ntoken = \"{tok}\"\nservices = [\"svc\"]\n"),
        )
        .unwrap()
    };
    write("first", BILLING);
    let f = file.clone();
    let svc = Service::start_with("security_reload", move |c| c.auth.tokens_file = Some(f)).await;
    assert_eq!(post(&svc, "svc", Some(BILLING)).await.status(), 200);
    // Rotate: the old token stops working, the new one works, no restart.
    tokio::time::sleep(Duration::from_millis(1100)).await; // a distinct modification time
    write("second", OPS);
    common::eventually("the new token", || async {
        (post(&svc, "svc", Some(OPS)).await.status() == 200).then_some(())
    })
    .await;
    assert_eq!(post(&svc, "svc", Some(BILLING)).await.status(), 401);
    // A broken file keeps the tokens in force.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    std::fs::write(&file, "[[tokens]]\nname = ").unwrap();
    common::eventually("the broken token file to be seen", || async {
        (svc.metric("toolsight_reloads_total{file=\"tokens\",result=\"invalid\"}")
            .await
            == 1.0)
            .then_some(())
    })
    .await;
    assert_eq!(post(&svc, "svc", Some(OPS)).await.status(), 200);
    svc.stop().await.unwrap();
}

/// The secret never reaches PostgreSQL: every text, JSON and bytea column of every table is
/// searched for it after spans carrying it in arguments, results and other attributes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_configured_secret_pattern_never_reaches_the_database() {
    const SECRET: &str = "ACME-7731942";
    let svc = Service::start_with("security_redaction", |c| {
        c.privacy.store_redacted_content = true;
        c.privacy.redact_patterns.push(r"ACME-\d{7}".into());
    })
    .await;
    let mut s = Spans::new();
    for i in 0..5 {
        s.tool(
            "lookup_customer",
            Utc::now(),
            20,
            i == 0,
            vec![
                attr(
                    "gen_ai.tool.call.arguments",
                    json!(format!(r#"{{"customer":"{SECRET}","note":"call {i}"}}"#)),
                ),
                attr(
                    "gen_ai.tool.call.result",
                    json!(format!(
                        r#"{{"content":[{{"type":"text","text":"account {SECRET} is active"}}]}}"#
                    )),
                ),
                attr("gen_ai.conversation.id", json!("conv-1")),
                attr("error.type", json!("tool_error")),
            ],
        );
    }
    common::spans::send(&svc, s).await;
    assert_eq!(svc.count("SELECT count(*) FROM tool_calls").await, 5);
    let columns: Vec<(String, String, String)> = sqlx::query_as(
        "SELECT table_name::text, column_name::text, data_type::text FROM information_schema.columns
         WHERE table_schema = 'public' AND data_type IN ('text', 'jsonb', 'json', 'bytea', 'character varying', 'ARRAY')",
    )
    .fetch_all(&svc.pool)
    .await
    .unwrap();
    assert!(columns.len() > 20, "{columns:?}");
    for (table, column, ty) in &columns {
        let expr = if ty == "bytea" {
            format!("encode(\"{column}\", 'escape')")
        } else {
            format!("\"{column}\"::text")
        };
        let n: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM \"{table}\" WHERE {expr} LIKE '%{SECRET}%'"
        ))
        .fetch_one(&svc.pool)
        .await
        .unwrap();
        assert_eq!(n, 0, "{table}.{column} holds the secret");
    }
    // Not vacuous: the redacted copies were stored, with the secret replaced.
    let redacted = svc
        .count("SELECT count(*) FROM tool_calls WHERE args_redacted LIKE '%[REDACTED]%'")
        .await;
    assert_eq!(redacted, 5);
    svc.stop().await.unwrap();
}
