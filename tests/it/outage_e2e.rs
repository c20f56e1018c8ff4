//! A database outage in the middle of a load run: the service stays up, `/readyz` turns 503,
//! exports get retryable errors, ingest resumes by itself when the database returns, and every
//! acknowledged span is in the database exactly once.

use crate::common;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use chrono::Utc;
use common::Service;
use common::spans::Spans;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_acknowledged_span_survives_an_outage_under_load() {
    let svc = Arc::new(Service::start("outage_load").await);
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));

    // Four exporters, 20 spans per export, retrying refused exports as OTLP exporters do.
    let mut senders = Vec::new();
    for _ in 0..4 {
        let (svc, stop, acked, refused) =
            (svc.clone(), stop.clone(), acked.clone(), refused.clone());
        senders.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            while !stop.load(Ordering::Relaxed) {
                let mut s = Spans::new();
                for _ in 0..20 {
                    s.tool("lookup", Utc::now(), 20, false, vec![]);
                }
                let body = s.body();
                loop {
                    let r = client
                        .post(svc.http_url())
                        .header("content-type", "application/json")
                        .body(body.clone())
                        .send()
                        .await;
                    match r {
                        Ok(r) if r.status() == 200 => {
                            acked.fetch_add(20, Ordering::Relaxed);
                            break;
                        }
                        Ok(r) => {
                            let status = r.status();
                            let retry_after = r.headers().contains_key("retry-after");
                            let text = r.text().await.unwrap_or_default();
                            assert!(status == 503 && retry_after, "retryable: {status} {text}");
                            refused.fetch_add(1, Ordering::Relaxed);
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                        Err(e) => panic!("the service stays up: {e}"),
                    }
                }
            }
        }));
    }
    common::eventually("the first acknowledged exports", || async {
        (acked.load(Ordering::Relaxed) > 0).then_some(())
    })
    .await;

    // The database goes away for toolsight.
    common::database_outage("outage_load", true).await;
    svc.wait_readyz(503).await;
    // The container's HEALTHCHECK says so too (exit 1 with the reason), and when it returns,
    // healthy again (below).
    let health = || {
        common::toolsight()
            .args(["healthcheck", "--url", &format!("http://{}", svc.admin)])
            .env("TOOLSIGHT_OTLP__HTTP_LISTEN", "0.0.0.0:4318")
            .output()
            .unwrap()
    };
    let out = health();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not ready (503"),
        "{out:?}"
    );
    common::eventually("exports to be refused", || async {
        (refused.load(Ordering::Relaxed) > 0).then_some(())
    })
    .await;

    // It returns; ingest resumes by itself.
    common::database_outage("outage_load", false).await;
    svc.wait_readyz(200).await;
    let out = health();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ready");
    let resumed_from = acked.load(Ordering::Relaxed);
    common::eventually("ingest to resume", || async {
        (acked.load(Ordering::Relaxed) > resumed_from + 100).then_some(())
    })
    .await;
    stop.store(true, Ordering::Relaxed);
    for s in senders {
        s.await.unwrap();
    }
    let acked = acked.load(Ordering::Relaxed) as i64;
    assert_eq!(svc.count("SELECT count(*) FROM tool_calls").await, acked);
    assert_eq!(
        svc.count("SELECT sum(calls)::bigint FROM tool_rollup_1m")
            .await,
        acked,
        "no span counted twice in the rollups"
    );
    Arc::try_unwrap(svc)
        .ok()
        .expect("senders are done")
        .stop()
        .await
        .unwrap();
}

/// A first run that needs nothing: with `database.url` left at its default, `serve` runs a
/// private PostgreSQL cluster from the system's binaries (here `database.embedded = "always"`:
/// the machine's own server answers on 5432, which `auto` would use), ingests into it over its
/// Unix socket, and stops it when the service stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_run_without_a_database_runs_a_private_cluster_and_stops_it() {
    let dir = std::env::temp_dir().join(format!("toolsight-pg-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let config = std::env::temp_dir().join(format!("toolsight-pg-{}.toml", std::process::id()));
    std::fs::write(
        &config,
        format!(
            "[database]\nembedded = \"always\"\nembedded_dir = \"{}\"\n",
            dir.display()
        ),
    )
    .unwrap();
    let mut child = common::serve_ready(&config, &[]).await;
    assert!(dir.join("data/PG_VERSION").exists(), "cluster initialised");
    assert!(
        dir.join(".s.PGSQL.5432").exists(),
        "listening on its socket"
    );

    let mut s = Spans::new();
    s.tool("first_run_tool", Utc::now(), 12, false, vec![]);
    let r = reqwest::Client::new()
        .post(child.http_url())
        .header("content-type", "application/json")
        .body(s.body())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let tools = format!("http://{}/api/v1/tools?since=1h", child.admin);
    common::eventually("the call in the private cluster", || async {
        let body = reqwest::get(&tools).await.ok()?.text().await.ok()?;
        body.contains("first_run_tool").then_some(())
    })
    .await;

    // The CLI finds the running cluster with the same settings.
    let table = common::output(
        common::toolsight()
            .args(["tools", "--since", "1h", "--config"])
            .arg(&config),
    );
    assert!(table.contains("first_run_tool"), "{table}");

    // A graceful stop (SIGTERM) stops the cluster too.
    let pid = child.process.0.id().to_string();
    common::python::run(std::process::Command::new("kill").args(["-TERM", &pid]));
    let status = tokio::task::spawn_blocking(move || child.process.0.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status}");
    assert!(
        !dir.join("data/postmaster.pid").exists(),
        "the cluster is stopped"
    );
    assert!(!dir.join(".s.PGSQL.5432").exists());
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&config);
}

/// The exit status says whether trying again can help: 75 (EX_TEMPFAIL) while the database is
/// unreachable, 1 for a configuration that is wrong.
#[test]
fn the_exit_status_says_whether_to_retry() {
    let nobody = common::free_port();
    let down = common::toolsight()
        .arg("migrate")
        .env_remove("TOOLSIGHT_CONFIG")
        .env(
            "DATABASE_URL",
            format!("postgres://postgres@127.0.0.1:{nobody}/toolsight"),
        )
        .env("TOOLSIGHT_DATABASE__CONNECT_TIMEOUT", "1s")
        .output()
        .unwrap();
    assert_eq!(
        down.status.code(),
        Some(75),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    let wrong = common::toolsight()
        .arg("config")
        .env_remove("TOOLSIGHT_CONFIG")
        .env("TOOLSIGHT_INGEST__WRITERS", "many")
        .output()
        .unwrap();
    assert_eq!(
        wrong.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&wrong.stderr)
    );
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("ingest.writers"));
}
