//! The captured OTLP metric exports (`tests/fixtures/metrics/captured`, made by
//! `capture_metrics.py` with the Python SDK): the OTLP types toolsight receives with decode every
//! one of them, protobuf and JSON, and they hold what the metrics receiver has to handle: every
//! metric type, both temporalities, and a counter reset (a second process, a new start time).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value;
use opentelemetry_proto::tonic::metrics::v1::{metric::Data, number_data_point::Value};
use prost::Message;

fn captures() -> Vec<(String, ExportMetricsServiceRequest)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/metrics/captured");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| matches!(p.extension().and_then(|e| e.to_str()), Some("pb" | "json")))
        .filter(|p| !p.ends_with("versions.json"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            let name = p.file_stem().unwrap().to_string_lossy().into_owned();
            let run = name.split_once('_').unwrap().1.to_owned();
            let req = if p.extension().unwrap() == "pb" {
                ExportMetricsServiceRequest::decode(bytes.as_slice()).unwrap()
            } else {
                serde_json::from_slice(&bytes).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
            };
            (run, req)
        })
        .collect()
}

/// (metric name) -> (kind, temporality, monotonic) as one run exported it.
fn kinds(req: &ExportMetricsServiceRequest) -> BTreeMap<String, (&'static str, i32, bool)> {
    let mut out = BTreeMap::new();
    for rm in &req.resource_metrics {
        for sm in &rm.scope_metrics {
            for m in &sm.metrics {
                let k = match &m.data {
                    Some(Data::Gauge(_)) => ("gauge", 0, false),
                    Some(Data::Sum(s)) => ("sum", s.aggregation_temporality, s.is_monotonic),
                    Some(Data::Histogram(h)) => ("histogram", h.aggregation_temporality, false),
                    Some(Data::ExponentialHistogram(h)) => {
                        ("exponential_histogram", h.aggregation_temporality, false)
                    }
                    Some(Data::Summary(_)) => ("summary", 0, false),
                    None => ("none", 0, false),
                };
                out.insert(m.name.clone(), k);
            }
        }
    }
    out
}

/// The `cache.requests{cache.result=miss}` points of a run: (start, time, value).
fn misses(all: &[(String, ExportMetricsServiceRequest)], run: &str) -> Vec<(u64, u64, i64)> {
    let mut out = Vec::new();
    for (_, req) in all.iter().filter(|(r, _)| r == run) {
        for m in req
            .resource_metrics
            .iter()
            .flat_map(|rm| &rm.scope_metrics)
            .flat_map(|sm| &sm.metrics)
            .filter(|m| m.name == "cache.requests")
        {
            let Some(Data::Sum(s)) = &m.data else {
                continue;
            };
            for p in &s.data_points {
                let miss = p.attributes.iter().any(|a| {
                    a.key == "cache.result"
                        && a.value.as_ref().and_then(|v| v.value.as_ref())
                            == Some(&any_value::Value::StringValue("miss".into()))
                });
                if let (true, Some(Value::AsInt(v))) = (miss, &p.value) {
                    out.push((p.start_time_unix_nano, p.time_unix_nano, *v));
                }
            }
        }
    }
    out
}

#[test]
fn every_captured_metric_export_decodes_with_every_type_and_temporality() {
    let all = captures();
    let runs: BTreeSet<&str> = all.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(
        runs,
        BTreeSet::from([
            "cumulative-json",
            "cumulative-pb",
            "cumulative-pb-2",
            "delta-pb"
        ])
    );
    // What every run exports, by kind and temporality (1 delta, 2 cumulative).
    for run in &runs {
        let mut seen = BTreeMap::new();
        for (_, req) in all.iter().filter(|(r, _)| r == run) {
            seen.extend(kinds(req));
        }
        let monotonic = if *run == "delta-pb" { 1 } else { 2 };
        let want = [
            ("process.memory.limit", ("gauge", 0, false)),
            ("system.memory.utilization", ("gauge", 0, false)),
            // The instrumentation reports memory as an up-down counter, not a gauge.
            ("process.memory.usage", ("sum", 2, false)),
            ("cache.requests", ("sum", monotonic, true)),
            ("cache.hits", ("sum", monotonic, true)),
            ("cache.size", ("sum", 2, false)),
            ("http.server.active_requests", ("sum", 2, false)),
            ("db.client.connection.count", ("sum", 2, false)),
            ("db.client.connection.max", ("sum", 2, false)),
            (
                "mcp.server.operation.duration",
                ("histogram", monotonic, false),
            ),
            (
                "http.server.request.duration",
                ("exponential_histogram", monotonic, false),
            ),
        ];
        for (name, kind) in want {
            assert_eq!(seen.get(name), Some(&kind), "{run}: {name}");
        }
    }
    // Cumulative misses only grow within a process; the second process starts again from a
    // later start time and a lower value: a counter reset.
    let first = misses(&all, "cumulative-pb");
    let second = misses(&all, "cumulative-pb-2");
    assert!(first.len() >= 5 && second.len() >= 5);
    assert!(
        first
            .windows(2)
            .all(|w| w[0].2 <= w[1].2 && w[0].0 == w[1].0)
    );
    assert!(second[0].0 > first[0].0, "a new start time");
    assert!(second[0].2 < first.last().unwrap().2, "a lower value");
    // Delta points each cover their own interval.
    let delta = misses(&all, "delta-pb");
    assert!(
        delta
            .windows(2)
            .all(|w| w[1].0 >= w[0].1 && w[1].0 > w[0].0)
    );
}
