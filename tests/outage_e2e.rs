//! A database outage in the middle of a load run: the service stays up, `/readyz` turns 503,
//! exports get retryable errors, ingest resumes by itself when the database returns, and every
//! acknowledged span is in the database exactly once.

mod common;

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
    common::eventually("exports to be refused", || async {
        (refused.load(Ordering::Relaxed) > 0).then_some(())
    })
    .await;

    // It returns; ingest resumes by itself.
    common::database_outage("outage_load", false).await;
    svc.wait_readyz(200).await;
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
