//! Replays the fuzz corpus (`fuzz/corpus/<target>/`) and the crashes the fuzzers found and that
//! were fixed (`fuzz/regressions/<target>/`) through the same functions the `cargo fuzz` targets
//! run, on the stable toolchain; and every real fixture whole and span by span.
//!
//! `TOOLSIGHT_WRITE_FUZZ_SEEDS=1 cargo test --test it fuzz_corpus::` (re)writes the seed inputs
//! derived from the fixtures (`seed-*` files) into the corpus directories.

use std::fs;
use std::path::{Path, PathBuf};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans};
use prost::Message;

type Target = fn(&[u8]);

const TARGETS: [(&str, Target); 4] = [
    ("otlp_protobuf", toolsight::fuzzing::otlp_protobuf),
    ("otlp_json", toolsight::fuzzing::otlp_json),
    ("decompression", toolsight::fuzzing::decompression),
    ("normalizer", toolsight::fuzzing::normalizer),
];

/// Seeds larger than this are left out (libFuzzer mutates small inputs far faster).
const MAX_SEED_BYTES: usize = 16 * 1024;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .map(|e| e.expect("readable directory").path())
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    out
}

fn fixtures() -> Vec<(String, ExportTraceServiceRequest)> {
    let dir = root().join("tests/fixtures");
    let mut out = Vec::new();
    for folder in fs::read_dir(&dir).expect("tests/fixtures") {
        let folder = folder.expect("entry").path();
        for file in files(&folder) {
            let name = file.strip_prefix(&dir).expect("under fixtures");
            let name = name.to_string_lossy().replace('/', "-");
            let bytes = fs::read(&file).expect("fixture");
            let req = match file.extension().and_then(|e| e.to_str()) {
                Some("pb") => ExportTraceServiceRequest::decode(bytes.as_slice()).expect("pb"),
                Some("json") if !name.ends_with("versions.json") => {
                    serde_json::from_slice(&bytes).expect("fixture json")
                }
                _ => continue,
            };
            out.push((name, req));
        }
    }
    assert!(out.len() >= 10, "fixtures found: {}", out.len());
    out
}

/// One request per span, with its resource and scope.
fn per_span(req: &ExportTraceServiceRequest) -> Vec<ExportTraceServiceRequest> {
    let mut out = Vec::new();
    for rs in &req.resource_spans {
        for ss in &rs.scope_spans {
            for span in &ss.spans {
                out.push(ExportTraceServiceRequest {
                    resource_spans: vec![ResourceSpans {
                        scope_spans: vec![ScopeSpans {
                            spans: vec![span.clone()],
                            ..ss.clone()
                        }],
                        ..rs.clone()
                    }],
                });
            }
        }
    }
    out
}

#[test]
fn every_fixture_passes_every_decoding_target_whole_and_span_by_span() {
    let write = std::env::var_os("TOOLSIGHT_WRITE_FUZZ_SEEDS").is_some();
    let mut seeds = 0;
    for (name, req) in fixtures() {
        let pb = req.encode_to_vec();
        let json = serde_json::to_vec(&req).expect("serializes");
        toolsight::fuzzing::otlp_protobuf(&pb);
        toolsight::fuzzing::otlp_json(&json);
        // Picks gzip (2) and zstd (5) in the decompression target.
        toolsight::fuzzing::decompression(&[&[2u8][..], &pb].concat());
        toolsight::fuzzing::decompression(&[&[5u8][..], &json].concat());
        for (i, one) in per_span(&req).iter().enumerate() {
            let pb = one.encode_to_vec();
            let json = serde_json::to_vec(one).expect("serializes");
            toolsight::fuzzing::otlp_protobuf(&pb);
            toolsight::fuzzing::otlp_json(&json);
            if write && pb.len() <= MAX_SEED_BYTES {
                let stem = format!("seed-{}-{i}", name.trim_end_matches(".json"));
                let stem = stem.trim_end_matches(".pb");
                for (target, bytes) in [("otlp_protobuf", &pb), ("otlp_json", &json)] {
                    let dir = root().join("fuzz/corpus").join(target);
                    fs::create_dir_all(&dir).expect("corpus directory");
                    fs::write(dir.join(stem), bytes).expect("seed written");
                }
                seeds += 1;
            }
        }
    }
    if write {
        eprintln!("wrote {seeds} seeds per decoding target");
    }
}

#[test]
fn every_fuzz_target_is_replayed_here() {
    let mut on_disk: Vec<String> = files(&root().join("fuzz/fuzz_targets"))
        .iter()
        .filter_map(|p| Some(p.file_stem()?.to_str()?.to_owned()))
        .collect();
    on_disk.sort();
    let mut here: Vec<String> = TARGETS.iter().map(|(t, _)| t.to_string()).collect();
    here.sort();
    assert_eq!(on_disk, here);
    for t in here {
        assert!(
            !files(&root().join("fuzz/corpus").join(&t)).is_empty(),
            "no corpus kept for {t}"
        );
    }
}

#[test]
fn the_corpus_and_the_fixed_crashes_still_pass() {
    let mut total = 0;
    for (target, run) in TARGETS {
        for dir in ["fuzz/corpus", "fuzz/regressions"] {
            for file in files(&root().join(dir).join(target)) {
                let data = fs::read(&file).expect("corpus file");
                let outcome = std::panic::catch_unwind(|| run(&data));
                assert!(
                    outcome.is_ok(),
                    "{target} fails on {}",
                    file.strip_prefix(root()).unwrap_or(&file).display()
                );
                total += 1;
            }
        }
    }
    // The corpus is committed: an empty replay means the directories moved.
    assert!(total > 100, "only {total} corpus inputs replayed");
}
