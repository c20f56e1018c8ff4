//! The raw-row policy: which calls keep their raw rows for `retention.raw`, and which are kept
//! only for `retention.sampled_out` (long enough for the two sides of a call to be joined).
//!
//! Rollups and the rules' per-minute state are written for every call before this is asked, so
//! the policy never changes a rollup, a rule value or a dashboard panel built on them. It
//! decides from what the row itself reports (never from what a join adds later), so a retried
//! export always lands in the same place and is stored once. Sampling is by trace: every span
//! of a sampled trace is kept, so both sides of a call, and the LLM and upstream calls it made,
//! stay together.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::normalize::{LlmCall, Outcome, ToolCall, UpstreamCall};

/// The raw-row policy, from the `[ingest]` settings `raw_keep_ok`, `raw_slow` and
/// `raw_slow_tools`. The default keeps every row.
#[derive(Debug, Clone, PartialEq)]
pub struct RawPolicy {
    /// Share of traces whose ordinary calls (ok, not empty, not slow) keep their raw rows:
    /// 1 keeps every row, 0.1 one trace in ten. Errors, cancellations, empty results and slow
    /// calls are always kept.
    pub keep_ok: f64,
    /// A call at least this slow is always kept.
    pub slow: Duration,
    /// Per-tool thresholds, by tool name, in place of `slow`.
    pub slow_tools: BTreeMap<String, Duration>,
}

impl Default for RawPolicy {
    fn default() -> Self {
        RawPolicy {
            keep_ok: 1.0,
            slow: Duration::from_secs(1),
            slow_tools: BTreeMap::new(),
        }
    }
}

impl RawPolicy {
    /// True when every row is kept.
    pub fn keeps_all(&self) -> bool {
        self.keep_ok >= 1.0
    }

    /// Whether ordinary calls of this trace are kept: the trace id's first eight bytes, read as
    /// a number, below `keep_ok` of the range. Trace ids are random, so this keeps `keep_ok`
    /// of the traces, and every span of one trace decides alike.
    pub fn samples(&self, trace_id: &[u8; 16]) -> bool {
        if self.keep_ok >= 1.0 {
            return true;
        }
        if self.keep_ok <= 0.0 {
            return false;
        }
        let head = u64::from_be_bytes(trace_id[..8].try_into().expect("8 bytes"));
        (head as f64) < self.keep_ok * (u64::MAX as f64)
    }

    fn slow_for(&self, tool: &str) -> Duration {
        self.slow_tools.get(tool).copied().unwrap_or(self.slow)
    }

    fn is_slow(&self, duration_us: i64, threshold: Duration) -> bool {
        duration_us >= 0 && duration_us as u128 >= threshold.as_micros()
    }

    /// Whether a tool call keeps its raw row: what this side reported (not what the join adds
    /// later) failed, was cancelled, came back empty or took at least the tool's threshold, or
    /// its trace is sampled.
    pub fn keeps_tool_call(&self, c: &ToolCall) -> bool {
        self.keeps_all()
            || c.own_outcome.unwrap_or(c.outcome) != Outcome::Ok
            || c.result.is_some_and(|r| r.empty)
            || self.is_slow(c.span.duration_us, self.slow_for(&c.tool))
            || self.samples(&c.span.trace_id)
    }

    /// Whether an LLM call keeps its raw row: failed, slow, or sampled.
    pub fn keeps_llm_call(&self, c: &LlmCall) -> bool {
        self.keeps_all()
            || c.error
            || self.is_slow(c.span.duration_us, self.slow)
            || self.samples(&c.span.trace_id)
    }

    /// Whether an upstream call keeps its raw row: no status or an error status (4xx, 5xx, a
    /// refused rate limit), slow, or sampled.
    pub fn keeps_upstream_call(&self, c: &UpstreamCall) -> bool {
        self.keeps_all()
            || c.status_code.is_none_or(|s| s >= 400)
            || self.is_slow(c.span.duration_us, self.slow)
            || self.samples(&c.span.trace_id)
    }

    /// The configuration's problems, as `ingest.raw_<key>: ...`.
    pub fn validate(&self, p: &mut Vec<String>) {
        if !(0.0..=1.0).contains(&self.keep_ok) {
            p.push(format!(
                "ingest.raw_keep_ok: {} is outside 0..=1",
                self.keep_ok
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sampling_keeps_about_the_share_asked_and_whole_traces() {
        let policy = RawPolicy {
            keep_ok: 0.25,
            ..RawPolicy::default()
        };
        let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut kept = 0;
        for _ in 0..100_000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let mut trace = [0u8; 16];
            trace[..8].copy_from_slice(&seed.to_le_bytes());
            trace[8..].copy_from_slice(&seed.rotate_left(17).to_le_bytes());
            let first = policy.samples(&trace);
            assert_eq!(first, policy.samples(&trace), "one trace decides alike");
            kept += usize::from(first);
        }
        assert!((24_000..26_000).contains(&kept), "kept {kept} of 100000");
        assert!(RawPolicy::default().samples(&[0xff; 16]));
        let none = RawPolicy {
            keep_ok: 0.0,
            ..RawPolicy::default()
        };
        assert!(!none.samples(&[0; 16]));
    }
}
