//! Per-minute rollups computed from a batch's records before they are written, so the database
//! only merges a few hundred pre-aggregated rows per batch.

use std::collections::{HashMap, HashSet};

use super::copy::CopyBuf;
use super::correlate::{MethodRow, ToolRow, ToolState};
use crate::normalize::cardinality::OVERFLOW;
use crate::normalize::{Normalized, Outcome, SpanRef};

/// Histogram buckets: bucket 0 holds durations up to 10 µs, bucket i (1..=111) holds
/// (10·2^((i-1)/4), 10·2^(i/4)] µs. Identical to the SQL function `toolsight_latency_bucket`.
pub const BUCKETS: usize = 112;

pub fn latency_bucket(duration_us: i64) -> usize {
    if duration_us <= 10 {
        return 0;
    }
    let b = (4.0 * (duration_us as f64 / 10.0).ln() / 2f64.ln() - 1e-9).ceil();
    (b as usize).min(BUCKETS - 1)
}

/// Upper bound of bucket `i` in microseconds. Identical to `toolsight_bucket_upper_us`.
pub fn bucket_upper_us(i: usize) -> f64 {
    10.0 * 2f64.powf(i as f64 / 4.0)
}

/// The q-quantile of a histogram in milliseconds, interpolated inside the bucket; `None` for an
/// empty histogram. The same arithmetic, step by step, as the SQL `toolsight_hist_quantile`, so
/// a backtest computes the very values the live rules read (tests compare the two bit for bit).
pub fn hist_quantile(hist: &[i64], q: f64) -> Option<f64> {
    let total: i64 = hist.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total as f64;
    let mut cum: i64 = 0;
    for (i, &c) in hist.iter().enumerate() {
        if c > 0 && (cum + c) as f64 >= rank {
            let lower = if i == 0 { 0.0 } else { bucket_upper_us(i - 1) };
            let upper = bucket_upper_us(i);
            return Some(
                (lower + (upper - lower) * (rank - cum as f64).max(0.0) / c as f64) / 1000.0,
            );
        }
        cum += c;
    }
    Some(bucket_upper_us(hist.len().saturating_sub(1)) / 1000.0)
}

const MINUTE_NANOS: i64 = 60_000_000_000;

fn minute_of(s: &SpanRef) -> i64 {
    minute_at(s.start_unix_nanos)
}

fn minute_at(unix_nanos: i64) -> i64 {
    unix_nanos.div_euclid(MINUTE_NANOS) * MINUTE_NANOS
}

/// What one tool call adds to its rollup row: result emptiness, bytes and items where known.
struct CallFacts {
    outcome: Outcome,
    result_empty: Option<bool>,
    result_bytes: Option<i64>,
    result_items: Option<i32>,
    duration_us: i64,
    overhead_us: Option<i64>,
}

#[derive(Default)]
struct Hist(Vec<i64>);

impl Hist {
    fn add(&mut self, duration_us: i64) {
        self.add_n(duration_us, 1);
    }

    /// `n` may be negative: a correction taking back a count merged before.
    fn add_n(&mut self, duration_us: i64, n: i64) {
        let b = latency_bucket(duration_us);
        if self.0.len() <= b {
            self.0.resize(b + 1, 0);
        }
        self.0[b] += n;
    }
}

#[derive(Default)]
struct ToolAgg {
    calls: i64,
    errors: i64,
    cancellations: i64,
    with_result: i64,
    empty_results: i64,
    result_bytes: i64,
    result_items: i64,
    /// Results whose byte size / item count was known (the divisors of the means).
    sized_results: i64,
    counted_results: i64,
    duration_us_sum: i64,
    hist: Hist,
    /// Client calls joined with their server side, and the sum of their overheads.
    overhead_calls: i64,
    overhead_us_sum: i64,
}

impl ToolAgg {
    /// Adds one call's facts `sign` times (-1 takes back what a call counted before).
    fn count(&mut self, f: &CallFacts, sign: i64) {
        self.calls += sign;
        self.errors += sign * i64::from(f.outcome == Outcome::Error);
        self.cancellations += sign * i64::from(f.outcome == Outcome::Cancelled);
        if let Some(empty) = f.result_empty {
            self.with_result += sign;
            self.empty_results += sign * i64::from(empty);
            if let Some(b) = f.result_bytes {
                self.sized_results += sign;
                self.result_bytes += sign * b;
            }
            if let Some(i) = f.result_items {
                self.counted_results += sign;
                self.result_items += sign * i64::from(i);
            }
        }
        self.duration_us_sum += sign * f.duration_us;
        self.hist.add_n(f.duration_us, sign);
        if let Some(o) = f.overhead_us {
            self.overhead_calls += sign;
            self.overhead_us_sum += sign * o;
        }
    }
}

#[derive(Default)]
struct MethodAgg {
    calls: i64,
    errors: i64,
    orphans: i64,
    hist: Hist,
}

#[derive(Default)]
struct LlmAgg {
    calls: i64,
    errors: i64,
    input_tokens: i64,
    output_tokens: i64,
    hist: Hist,
}

#[derive(Default)]
struct UpstreamAgg {
    calls: i64,
    rate_limited: i64,
    server_errors: i64,
    min_remaining_ratio: Option<f64>,
    hist: Hist,
}

/// What one "same call" key adds in a minute to the retry-loop rule's state.
#[derive(Default)]
struct LoopAgg {
    calls: i64,
    failed: i64,
    stuck: i64,
}

impl LoopAgg {
    fn count(&mut self, outcome: Outcome, result_empty: Option<bool>, sign: i64) {
        self.calls += sign;
        self.failed += sign * i64::from(outcome != Outcome::Ok);
        self.stuck += sign * i64::from(outcome != Outcome::Ok || result_empty == Some(true));
    }
}

/// (minute, service, tool, session key, arguments hash or empty): the key of `loop_calls_1m`,
/// in its primary key's order.
type LoopKey<'a> = (i64, &'a str, &'a str, &'a str, &'a [u8]);

/// Record identity, to count only the rows an insert actually added.
pub type Key = ([u8; 16], [u8; 8]);

/// The rows each raw table actually received, when not all of them did (a retried export).
#[derive(Default)]
pub struct Inserted {
    pub tool_calls: Option<HashSet<Key>>,
    pub mcp_requests: Option<HashSet<Key>>,
    pub llm_calls: Option<HashSet<Key>>,
    pub upstream_calls: Option<HashSet<Key>>,
}

/// Takes a key out of the inserted set: a record counts once even when a batch holds the same
/// span twice.
fn fresh(set: &mut Option<HashSet<Key>>, s: &SpanRef) -> bool {
    match set {
        None => true,
        Some(set) => set.remove(&(s.trace_id, s.span_id)),
    }
}

/// The rollup deltas of one batch.
#[derive(Default)]
pub struct Rollups<'a> {
    tools: HashMap<(&'a str, &'a str, &'static str, i64), ToolAgg>,
    methods: HashMap<(&'a str, &'a str, &'static str, i64), MethodAgg>,
    llm: HashMap<(&'a str, &'a str, i64), LlmAgg>,
    upstream: HashMap<(&'a str, &'a str, i64), UpstreamAgg>,
    loops: HashMap<LoopKey<'a>, LoopAgg>,
    /// (minute, service, session key): LLM tokens.
    tokens: HashMap<(i64, &'a str, &'a str), i64>,
}

impl<'a> Rollups<'a> {
    pub fn add(&mut self, r: &'a Normalized, inserted: &mut Inserted) {
        for c in &r.tool_calls {
            if !fresh(&mut inserted.tool_calls, &c.span) || !c.counted {
                continue;
            }
            if c.loop_counted && c.session_key != OVERFLOW {
                let args = c.args_hash.as_ref().map_or(&[][..], |h| &h[..]);
                self.loops
                    .entry((
                        minute_of(&c.span),
                        &c.span.service,
                        &c.tool,
                        &c.session_key,
                        args,
                    ))
                    .or_default()
                    .count(c.outcome, c.result.map(|r| r.empty), 1);
            }
            let a = self
                .tools
                .entry((
                    &c.span.service,
                    &c.tool,
                    c.side.as_str(),
                    minute_of(&c.span),
                ))
                .or_default();
            a.count(
                &CallFacts {
                    outcome: c.outcome,
                    result_empty: c.result.map(|r| r.empty),
                    result_bytes: c.result.and_then(|r| r.bytes),
                    result_items: c.result.and_then(|r| r.items),
                    duration_us: c.span.duration_us,
                    overhead_us: c.overhead_us,
                },
                1,
            );
        }
        for m in &r.mcp_requests {
            if !fresh(&mut inserted.mcp_requests, &m.span) {
                continue;
            }
            let a = self
                .methods
                .entry((
                    &m.span.service,
                    &m.method,
                    m.side.as_str(),
                    minute_of(&m.span),
                ))
                .or_default();
            a.calls += 1;
            a.errors += i64::from(m.outcome != Outcome::Ok);
            a.orphans += i64::from(m.orphan);
            a.hist.add(m.span.duration_us);
        }
        for l in &r.llm_calls {
            if !fresh(&mut inserted.llm_calls, &l.span) {
                continue;
            }
            let a = self
                .llm
                .entry((&l.span.service, &l.model, minute_of(&l.span)))
                .or_default();
            a.calls += 1;
            a.errors += i64::from(l.error);
            a.input_tokens += l.input_tokens;
            a.output_tokens += l.output_tokens;
            a.hist.add(l.span.duration_us);
            if l.session_key != OVERFLOW {
                *self
                    .tokens
                    .entry((minute_of(&l.span), &l.span.service, &l.session_key))
                    .or_default() += l.input_tokens + l.output_tokens;
            }
        }
        for u in &r.upstream_calls {
            if !fresh(&mut inserted.upstream_calls, &u.span) {
                continue;
            }
            let a = self
                .upstream
                .entry((&u.span.service, &u.server_address, minute_of(&u.span)))
                .or_default();
            a.calls += 1;
            a.rate_limited += i64::from(u.status_code == Some(429));
            a.server_errors += i64::from(u.status_code.is_some_and(|s| s >= 500));
            if let (Some(rem), Some(lim)) = (u.rate_limit.remaining, u.rate_limit.limit)
                && lim > 0.0
            {
                let ratio = rem / lim;
                a.min_remaining_ratio =
                    Some(a.min_remaining_ratio.map_or(ratio, |m: f64| m.min(ratio)));
            }
            a.hist.add(u.span.duration_us);
        }
    }

    /// The contribution of a stored tool call in `state` to its rollup row, times `sign`: the
    /// join (`correlate`) takes back what a row counted before and adds what it counts now.
    pub fn add_tool_row(&mut self, row: &'a ToolRow, state: &'a ToolState, sign: i64) {
        if state.loop_counted && row.session_key != OVERFLOW {
            self.loops
                .entry((
                    minute_at(row.start_unix_nanos),
                    &row.service,
                    &state.tool,
                    &row.session_key,
                    &row.args_hash,
                ))
                .or_default()
                .count(state.outcome, row.result_empty, sign);
        }
        if !state.counted {
            return;
        }
        let side = if row.client { "client" } else { "server" };
        self.tools
            .entry((
                &row.service,
                &state.tool,
                side,
                minute_at(row.start_unix_nanos),
            ))
            .or_default()
            .count(
                &CallFacts {
                    outcome: state.outcome,
                    result_empty: row.result_empty,
                    result_bytes: row.result_bytes,
                    result_items: row.result_items,
                    duration_us: row.duration_us,
                    overhead_us: state.overhead_us,
                },
                sign,
            );
    }

    /// The contribution of a stored client MCP request, times `sign`.
    pub fn add_method_row(&mut self, row: &'a MethodRow, sign: i64) {
        let a = self
            .methods
            .entry((
                &row.service,
                &row.method,
                "client",
                minute_at(row.start_unix_nanos),
            ))
            .or_default();
        a.calls += sign;
        a.errors += sign * i64::from(row.error);
        a.orphans += sign * i64::from(row.orphan);
        a.hist.add_n(row.duration_us, sign);
    }

    /// COPY payloads for the four rollup staging tables and the two of the rules' state, keys
    /// sorted so concurrent writers lock rows in the same order (no deadlocks).
    pub fn encode(self, shard: i16) -> [CopyBuf; 6] {
        let mut bufs: [CopyBuf; 6] = Default::default();
        let mut tools: Vec<_> = self.tools.into_iter().collect();
        tools.sort_by(|a, b| a.0.cmp(&b.0));
        for ((service, tool, side, minute), a) in tools {
            bufs[0].tool_rollup(
                minute,
                service,
                tool,
                side,
                &[
                    a.calls,
                    a.errors,
                    a.cancellations,
                    a.with_result,
                    a.empty_results,
                    a.result_bytes,
                    a.result_items,
                    a.duration_us_sum,
                ],
                &a.hist.0,
                shard,
                [a.sized_results, a.counted_results],
                [a.overhead_calls, a.overhead_us_sum],
            );
        }
        let mut methods: Vec<_> = self.methods.into_iter().collect();
        methods.sort_by(|a, b| a.0.cmp(&b.0));
        for ((service, method, side, minute), a) in methods {
            bufs[1].method_rollup(
                minute,
                service,
                method,
                side,
                &[a.calls, a.errors, a.orphans],
                &a.hist.0,
                shard,
            );
        }
        let mut llm: Vec<_> = self.llm.into_iter().collect();
        llm.sort_by(|a, b| a.0.cmp(&b.0));
        for ((service, model, minute), a) in llm {
            bufs[2].llm_rollup(
                minute,
                service,
                model,
                &[a.calls, a.errors, a.input_tokens, a.output_tokens],
                &a.hist.0,
                shard,
            );
        }
        let mut upstream: Vec<_> = self.upstream.into_iter().collect();
        upstream.sort_by(|a, b| a.0.cmp(&b.0));
        for ((service, address, minute), a) in upstream {
            bufs[3].upstream_rollup(
                minute,
                service,
                address,
                &[a.calls, a.rate_limited, a.server_errors],
                a.min_remaining_ratio,
                &a.hist.0,
                shard,
            );
        }
        let mut loops: Vec<_> = self.loops.into_iter().collect();
        loops.sort_by(|a, b| a.0.cmp(&b.0));
        for ((minute, service, tool, session, args), a) in loops {
            bufs[4].loop_calls(
                minute,
                [service, tool, session],
                args,
                shard,
                [a.calls, a.failed, a.stuck],
            );
        }
        let mut tokens: Vec<_> = self.tokens.into_iter().collect();
        tokens.sort_by(|a, b| a.0.cmp(&b.0));
        for ((minute, service, session), n) in tokens {
            bufs[5].session_tokens(minute, service, session, shard, n);
        }
        bufs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_edges() {
        assert_eq!(latency_bucket(0), 0);
        assert_eq!(latency_bucket(10), 0);
        assert_eq!(latency_bucket(11), 1);
        assert_eq!(latency_bucket(20), 4);
        assert_eq!(latency_bucket(21), 5);
        assert_eq!(latency_bucket(1_000_000), 67);
        assert_eq!(latency_bucket(i64::MAX), 111);
    }
}
