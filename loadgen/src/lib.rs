//! The load generator and the benchmark, apart from the service they drive (as the
//! OpenTelemetry Collector ships telemetrygen): `toolsight-loadgen` sends realistic MCP telemetry
//! at a fixed rate (open loop) or as fast as the service takes it (closed loop), over any OTLP
//! transport, with a live progress line; `toolsight-bench` starts the service on a fresh
//! database, drives it, verifies and reports (`bench`, with its database side in `db`).

pub mod bench;
pub mod client;
mod db;
pub mod incidents;
pub mod traffic;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde::Serialize;
use tokio::sync::Mutex;

pub use client::{Client, Outcome, Protocol};
pub use traffic::Traffic;

use toolsight::normalize;

/// What to send, how fast, for how long.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    pub protocol: Protocol,
    /// `host:port` of the receiver for `protocol`.
    pub endpoint: String,
    pub gzip: bool,
    /// Closed loop: concurrent exporters. Open loop: most requests in flight at once.
    pub concurrency: usize,
    pub spans_per_request: usize,
    /// Spans per second (open loop); `None` sends as fast as answers come back (closed loop).
    pub rate: Option<f64>,
    pub duration: Duration,
    pub progress: bool,
    /// Distinguishes runs, so a second run's spans are new rows, not retries.
    pub run_id: u16,
    pub timeout: Duration,
}

#[derive(Default)]
struct Stats {
    requests_sent: AtomicU64,
    spans_sent: AtomicU64,
    spans_accepted: AtomicU64,
    spans_rejected: AtomicU64,
    spans_refused: AtomicU64,
    spans_failed: AtomicU64,
    requests_not_sent: AtomicU64,
    records_expected: AtomicU64,
    latency_us: std::sync::Mutex<Option<Histogram<u64>>>,
    last_failure: std::sync::Mutex<Option<String>>,
}

impl Stats {
    fn record(&self, outcome: &Outcome, spans: u64, records: u64, latency: Duration) {
        self.requests_sent.fetch_add(1, Ordering::Relaxed);
        self.spans_sent.fetch_add(spans, Ordering::Relaxed);
        match outcome {
            Outcome::Accepted { rejected } => {
                let rejected = (*rejected).max(0) as u64;
                self.spans_accepted
                    .fetch_add(spans - rejected.min(spans), Ordering::Relaxed);
                self.spans_rejected.fetch_add(rejected, Ordering::Relaxed);
                self.records_expected.fetch_add(records, Ordering::Relaxed);
                if let Ok(mut h) = self.latency_us.lock()
                    && let Some(h) = h.as_mut()
                {
                    let _ = h.record(latency.as_micros().max(1) as u64);
                }
            }
            Outcome::Retryable(_) => {
                self.spans_refused.fetch_add(spans, Ordering::Relaxed);
            }
            Outcome::Failed(why) => {
                self.spans_failed.fetch_add(spans, Ordering::Relaxed);
                if let Ok(mut f) = self.last_failure.lock() {
                    *f = Some(why.clone());
                }
            }
        }
    }

    fn p99_ms(&self) -> f64 {
        self.latency_us
            .lock()
            .ok()
            .and_then(|h| {
                h.as_ref()
                    .map(|h| h.value_at_quantile(0.99) as f64 / 1000.0)
            })
            .unwrap_or(0.0)
    }
}

/// The outcome of a load run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub protocol: &'static str,
    pub mode: &'static str,
    pub target_spans_per_sec: Option<f64>,
    pub spans_per_request: usize,
    pub elapsed_secs: f64,
    pub requests_sent: u64,
    pub spans_sent: u64,
    pub spans_accepted: u64,
    /// Reported back as malformed in `partial_success`.
    pub spans_rejected: u64,
    /// Refused with a retryable status (overload, database down).
    pub spans_refused: u64,
    /// Refused for good, or transport errors.
    pub spans_failed: u64,
    /// Open loop: requests due while every in-flight slot was busy.
    pub requests_not_sent: u64,
    /// Records the accepted spans must have produced in PostgreSQL.
    pub records_expected: u64,
    pub accepted_spans_per_sec: f64,
    pub latency_p50_ms: f64,
    pub latency_p99_ms: f64,
    pub latency_max_ms: f64,
    pub last_failure: Option<String>,
}

impl Report {
    /// A report with nothing sent yet.
    pub fn empty(cfg: &LoadConfig) -> Report {
        Report {
            protocol: cfg.protocol.as_str(),
            mode: "scenario",
            target_spans_per_sec: cfg.rate,
            spans_per_request: cfg.spans_per_request,
            elapsed_secs: 0.0,
            requests_sent: 0,
            spans_sent: 0,
            spans_accepted: 0,
            spans_rejected: 0,
            spans_refused: 0,
            spans_failed: 0,
            requests_not_sent: 0,
            records_expected: 0,
            accepted_spans_per_sec: 0.0,
            latency_p50_ms: 0.0,
            latency_p99_ms: 0.0,
            latency_max_ms: 0.0,
            last_failure: None,
        }
    }

    pub fn print(&self) {
        let rate = self
            .target_spans_per_sec
            .map_or("max".to_owned(), |r| format!("{r:.0}/s"));
        println!(
            "{} {} (target {rate}, {} spans/request) for {:.1}s\n  sent      {:>12} spans in {} requests\n  accepted  {:>12} spans ({:.0} spans/s)\n  rejected  {:>12} spans (partial success)\n  refused   {:>12} spans (retryable: overload / unavailable)\n  failed    {:>12} spans\n  not sent  {:>12} requests (generator at its in-flight limit)\n  latency   p50 {:.1} ms  p99 {:.1} ms  max {:.1} ms (accepted exports)",
            self.protocol,
            self.mode,
            self.spans_per_request,
            self.elapsed_secs,
            self.spans_sent,
            self.requests_sent,
            self.spans_accepted,
            self.accepted_spans_per_sec,
            self.spans_rejected,
            self.spans_refused,
            self.spans_failed,
            self.requests_not_sent,
            self.latency_p50_ms,
            self.latency_p99_ms,
            self.latency_max_ms,
        );
        if let Some(f) = &self.last_failure {
            println!("  last failure: {f}");
        }
    }
}

fn now_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// A trace-id prefix no generated request uses: marks where the ids sit in an encoded template.
pub(crate) const MARKER: [u8; 8] = [0xA5, 0x5A, 0xC3, 0x3C, 0x96, 0x69, 0x0F, 0xF0];
/// An encoded template is re-encoded (fresh timestamps) after this long.
const REENCODE_AFTER: Duration = Duration::from_secs(10);

/// An encoded template and where its trace-id prefixes are, so a new request costs one copy
/// and a few thousand 8-byte writes instead of a full encode.
struct Encoded {
    bytes: Vec<u8>,
    offsets: Vec<usize>,
    hex: bool,
    at: Instant,
}

fn find_all(haystack: &[u8], needle: &[u8]) -> Vec<usize> {
    haystack
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect()
}

/// One exporter's state: its template and its connection.
struct Slot {
    traffic: Traffic,
    client: Client,
    records: u64,
    encoded: Option<Encoded>,
    /// A body the service refused with a retryable status: sent again next, as OTLP exporters
    /// retry (it was not stored, so this adds no duplicate).
    refused: Option<bytes::Bytes>,
}

async fn slots(cfg: &LoadConfig, n: usize) -> anyhow::Result<Vec<Slot>> {
    let mut out = Vec::with_capacity(n);
    for w in 0..n {
        let mut traffic = Traffic::new(cfg.spans_per_request, w as u16, 0xC0FFEE + w as u64);
        // The records one request yields, from the normalizer itself (refreshing changes only
        // ids and times, never the shape).
        let probe = normalize::normalize(
            traffic.next(cfg.run_id, now_nanos()),
            now_nanos() as i64,
            &normalize::Options::default(),
        );
        let client = Client::connect(cfg.protocol, &cfg.endpoint, cfg.gzip, cfg.timeout).await?;
        out.push(Slot {
            records: probe.records() as u64,
            traffic,
            client,
            refused: None,
            encoded: None,
        });
    }
    Ok(out)
}

impl Slot {
    /// A new request body: the encoded template with a fresh trace-id prefix.
    fn next_body(&mut self, run_id: u16) -> bytes::Bytes {
        if self
            .encoded
            .as_ref()
            .is_none_or(|e| e.at.elapsed() > REENCODE_AFTER)
        {
            let hex = self.client.is_json();
            let bytes = self
                .client
                .encode_raw(self.traffic.with_prefix(MARKER, now_nanos()));
            let offsets = if hex {
                find_all(&bytes, hex::encode(MARKER).as_bytes())
            } else {
                find_all(&bytes, &MARKER)
            };
            self.encoded = Some(Encoded {
                bytes,
                offsets,
                hex,
                at: Instant::now(),
            });
        }
        let prefix = self.traffic.next_prefix(run_id);
        let enc = self.encoded.as_ref().expect("encoded above");
        let mut raw = enc.bytes.clone();
        if enc.hex {
            let h = hex::encode(prefix);
            enc.offsets
                .iter()
                .for_each(|&o| raw[o..o + 16].copy_from_slice(h.as_bytes()));
        } else {
            enc.offsets
                .iter()
                .for_each(|&o| raw[o..o + 8].copy_from_slice(&prefix));
        }
        self.client.finish_body(raw)
    }
}

async fn send_one(slot: &mut Slot, run_id: u16, stats: &Stats, started: Instant) {
    let spans = slot.traffic.spans() as u64;
    let body = match slot.refused.take() {
        Some(body) => body,
        None => slot.next_body(run_id),
    };
    let outcome = slot.client.send(body.clone()).await;
    if matches!(outcome, Outcome::Retryable(_)) {
        slot.refused = Some(body);
    }
    stats.record(&outcome, spans, slot.records, started.elapsed());
}

/// Runs the load and returns what happened.
pub async fn run(cfg: LoadConfig) -> anyhow::Result<Report> {
    let stats = Arc::new(Stats {
        latency_us: std::sync::Mutex::new(Some(Histogram::new_with_bounds(1, 600_000_000, 3)?)),
        ..Default::default()
    });
    let started = Instant::now();
    let deadline = started + cfg.duration;
    let progress = cfg
        .progress
        .then(|| tokio::spawn(progress_line(stats.clone(), started, cfg.duration)));

    match cfg.rate {
        None => {
            let mut workers = Vec::new();
            for mut slot in slots(&cfg, cfg.concurrency.max(1)).await? {
                let (stats, run_id) = (stats.clone(), cfg.run_id);
                workers.push(tokio::spawn(async move {
                    while Instant::now() < deadline {
                        send_one(&mut slot, run_id, &stats, Instant::now()).await;
                    }
                }));
            }
            for w in workers {
                w.await?;
            }
        }
        Some(rate) => {
            let per_request = cfg.spans_per_request.max(1) as f64;
            let interval = Duration::from_secs_f64(per_request / rate.max(1.0));
            let pool = Arc::new(Mutex::new(slots(&cfg, cfg.concurrency.max(1)).await?));
            let mut due = Instant::now();
            let mut inflight = Vec::new();
            while due < deadline {
                tokio::time::sleep_until(due.into()).await;
                let now = Instant::now();
                while due <= now && due < deadline {
                    let slot = pool.lock().await.pop();
                    match slot {
                        None => {
                            stats.requests_not_sent.fetch_add(1, Ordering::Relaxed);
                        }
                        Some(mut slot) => {
                            let (stats, pool, run_id, scheduled) =
                                (stats.clone(), pool.clone(), cfg.run_id, due);
                            inflight.push(tokio::spawn(async move {
                                // Latency counts from when the request was due, so a slow
                                // service cannot hide its queueing (coordinated omission).
                                send_one(&mut slot, run_id, &stats, scheduled).await;
                                pool.lock().await.push(slot);
                            }));
                        }
                    }
                    due += interval;
                }
                inflight.retain(|h: &tokio::task::JoinHandle<()>| !h.is_finished());
            }
            for h in inflight {
                h.await?;
            }
        }
    }
    let elapsed = started.elapsed();
    if let Some(p) = progress {
        p.abort();
        eprintln!();
    }
    let h = stats.latency_us.lock().ok().and_then(|mut h| h.take());
    let q = |q: f64| {
        h.as_ref()
            .filter(|h| !h.is_empty())
            .map_or(0.0, |h| h.value_at_quantile(q) as f64 / 1000.0)
    };
    let accepted = stats.spans_accepted.load(Ordering::Relaxed);
    Ok(Report {
        protocol: cfg.protocol.as_str(),
        mode: if cfg.rate.is_some() {
            "open-loop"
        } else {
            "closed-loop"
        },
        target_spans_per_sec: cfg.rate,
        spans_per_request: cfg.spans_per_request,
        elapsed_secs: elapsed.as_secs_f64(),
        requests_sent: stats.requests_sent.load(Ordering::Relaxed),
        spans_sent: stats.spans_sent.load(Ordering::Relaxed),
        spans_accepted: accepted,
        spans_rejected: stats.spans_rejected.load(Ordering::Relaxed),
        spans_refused: stats.spans_refused.load(Ordering::Relaxed),
        spans_failed: stats.spans_failed.load(Ordering::Relaxed),
        requests_not_sent: stats.requests_not_sent.load(Ordering::Relaxed),
        records_expected: stats.records_expected.load(Ordering::Relaxed),
        accepted_spans_per_sec: accepted as f64 / elapsed.as_secs_f64().max(1e-9),
        latency_p50_ms: q(0.5),
        latency_p99_ms: q(0.99),
        latency_max_ms: q(1.0),
        last_failure: stats.last_failure.lock().ok().and_then(|f| f.clone()),
    })
}

async fn progress_line(stats: Arc<Stats>, started: Instant, total: Duration) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last = 0u64;
    loop {
        tick.tick().await;
        let accepted = stats.spans_accepted.load(Ordering::Relaxed);
        eprint!(
            "\r[{:>4.0}s/{:.0}s] sent {:>10} accepted {:>10} ({:>8}/s) refused {:>9} failed {:>6} p99 {:>7.1} ms ",
            started.elapsed().as_secs_f64(),
            total.as_secs_f64(),
            stats.spans_sent.load(Ordering::Relaxed),
            accepted,
            accepted - last,
            stats.spans_refused.load(Ordering::Relaxed),
            stats.spans_failed.load(Ordering::Relaxed),
            stats.p99_ms(),
        );
        last = accepted;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;

    #[test]
    fn traffic_is_realistic_and_fully_normalizable() {
        let mut t = Traffic::new(1000, 3, 42);
        assert!(t.spans() >= 1000 && t.spans() < 1003, "{}", t.spans());
        let now = 1_800_000_000_000_000_000;
        let n = normalize::normalize(t.next(1, now), now as i64, &normalize::Options::default());
        assert_eq!(n.rejected_total(), 0);
        assert!(
            !n.tool_calls.is_empty()
                && !n.llm_calls.is_empty()
                && !n.upstream_calls.is_empty()
                && !n.mcp_requests.is_empty()
        );
        let sources: std::collections::HashSet<_> = n.tool_calls.iter().map(|c| c.source).collect();
        assert_eq!(
            sources.len(),
            4,
            "fastmcp, semconv, traceloop, logfire: {sources:?}"
        );
        assert!(
            n.tool_calls
                .iter()
                .any(|c| c.result.is_some_and(|r| r.empty))
        );
        assert!(
            n.tool_calls
                .iter()
                .any(|c| c.result.is_some_and(|r| !r.empty))
        );
        assert!(
            n.upstream_calls
                .iter()
                .all(|u| u.rate_limit.limit == Some(5000.0))
        );
        // FastMCP's nested spans and database spans are dropped, everything else is a record.
        assert_eq!(
            n.records() as u64 + n.dropped.iter().map(|(_, c)| c).sum::<u64>(),
            n.spans
        );

        // A refresh gives new trace ids and current times, the same shape.
        let first: Vec<Vec<u8>> = t.request().resource_spans[0].scope_spans[0]
            .spans
            .iter()
            .map(|s| s.trace_id.clone())
            .collect();
        let m = normalize::normalize(
            t.next(1, now + 1_000_000_000),
            now as i64 + 1_000_000_000,
            &normalize::Options::default(),
        );
        assert_eq!(m.records(), n.records());
        let second: Vec<Vec<u8>> = t.request().resource_spans[0].scope_spans[0]
            .spans
            .iter()
            .map(|s| s.trace_id.clone())
            .collect();
        assert!(first.iter().zip(&second).all(|(a, b)| a != b));
    }

    #[tokio::test]
    async fn patched_bodies_carry_fresh_ids_in_every_span() {
        use prost::Message;
        for protocol in [Protocol::HttpProtobuf, Protocol::HttpJson] {
            let client = Client::connect(protocol, "127.0.0.1:9", false, Duration::from_secs(1))
                .await
                .unwrap();
            let mut slot = Slot {
                traffic: Traffic::new(300, 7, 1),
                client,
                records: 0,
                refused: None,
                encoded: None,
            };
            let mut seen = std::collections::HashSet::new();
            for _ in 0..3 {
                let body = slot.next_body(5);
                let req: ExportTraceServiceRequest = if protocol == Protocol::HttpJson {
                    serde_json::from_slice(&body).unwrap()
                } else {
                    ExportTraceServiceRequest::decode(body).unwrap()
                };
                let prefixes: std::collections::HashSet<Vec<u8>> = req
                    .resource_spans
                    .iter()
                    .flat_map(|rs| &rs.scope_spans)
                    .flat_map(|ss| &ss.spans)
                    .map(|sp| sp.trace_id[..8].to_vec())
                    .collect();
                assert_eq!(prefixes.len(), 1, "{protocol:?}: one prefix per request");
                let prefix = prefixes.into_iter().next().unwrap();
                assert_ne!(prefix, MARKER.to_vec());
                assert!(seen.insert(prefix), "{protocol:?}: prefixes never repeat");
                let n =
                    normalize::normalize(&req, now_nanos() as i64, &normalize::Options::default());
                assert_eq!(n.spans as usize, slot.traffic.spans());
                assert_eq!(n.rejected_total(), 0);
            }
            assert_eq!(
                slot.encoded.as_ref().unwrap().offsets.len(),
                slot.traffic.spans()
            );
        }
    }
}
