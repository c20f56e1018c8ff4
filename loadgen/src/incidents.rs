//! `toolsight-loadgen --scenario incidents`: the incidents scenario of `toolsight demo`
//! (`toolsight::demo`), sent to any OTLP receiver, one export per second.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use toolsight::demo::{Incidents, Phase};

use super::client::{Client, Outcome};
use super::{LoadConfig, Report};

/// Runs the scenario for `cfg.duration` (at least 3 s), one export per second.
pub async fn run(cfg: &LoadConfig) -> anyhow::Result<Report> {
    let mut client = Client::connect(cfg.protocol, &cfg.endpoint, cfg.gzip, cfg.timeout).await?;
    let started = Instant::now();
    let total = cfg.duration.max(Duration::from_secs(3));
    let mut scenario = Incidents::new(cfg.run_id);
    let mut report = Report::empty(cfg);
    let mut phase = None;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    while started.elapsed() < total {
        tick.tick().await;
        let now_phase = Phase::at(started.elapsed(), total);
        if phase != Some(now_phase) {
            phase = Some(now_phase);
            eprintln!(
                "[{:>4.0}s] {}",
                started.elapsed().as_secs_f64(),
                now_phase.name()
            );
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let req = scenario.second(now_phase, now);
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
