//! PostgreSQL binary COPY encoding of records (about twice as fast as UNNEST inserts).

use crate::normalize::{LlmCall, McpRequest, Outcome, SpanRef, ToolCall, UpstreamCall};

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_US: i64 = 946_684_800_000_000;
/// Longest name-like text stored (tool, service, model, error type, …); longer values are cut.
const MAX_NAME_BYTES: usize = 512;
/// Longest free text stored (redacted copies are already bounded by their own setting).
const MAX_TEXT_BYTES: usize = 64 * 1024;

/// The text PostgreSQL stores for `s` in a column bounded by `max` bytes: cut at a char boundary,
/// NUL (which PostgreSQL text cannot hold) as U+FFFD. Keys arrive already in their stored form
/// (`normalize::keys`), which this leaves unchanged.
fn stored_text(s: &str, max: usize) -> std::borrow::Cow<'_, str> {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    let s = &s[..end];
    if s.contains('\0') {
        s.replace('\0', "\u{FFFD}").into()
    } else {
        s.into()
    }
}

/// The columns each encoder writes, in its order. Every COPY and every move out of a staging
/// table names them, so a column that a newer migration adds (with its default) leaves an older
/// writer working: rolling upgrades never depend on column order.
pub mod columns {
    const SPAN: [&str; 7] = [
        "trace_id",
        "span_id",
        "parent_span_id",
        "start_time",
        "duration_us",
        "service",
        "service_instance",
    ];

    const fn with_span<const N: usize, const M: usize>(
        own: [&'static str; N],
    ) -> [&'static str; M] {
        let mut out = [""; M];
        let mut i = 0;
        while i < M {
            out[i] = if i < SPAN.len() {
                SPAN[i]
            } else {
                own[i - SPAN.len()]
            };
            i += 1;
        }
        out
    }

    pub const TOOL_CALLS: [&str; 28] = with_span([
        "tool",
        "side",
        "source",
        "outcome",
        "error_type",
        "session_key",
        "session_source",
        "request_id",
        "result_bytes",
        "result_items",
        "result_empty",
        "args_hash",
        "args_redacted",
        "result_redacted",
        "counted",
        "inner_span_id",
        "peer_span_id",
        "own_outcome",
        "overhead_us",
        "loop_counted",
        "kept",
    ]);
    pub const MCP_REQUESTS: [&str; 13] =
        with_span(["method", "side", "source", "outcome", "orphan", "counted"]);
    pub const LLM_CALLS: [&str; 16] = with_span([
        "model",
        "provider",
        "operation",
        "input_tokens",
        "output_tokens",
        "error",
        "session_key",
        "session_source",
        "kept",
    ]);
    pub const UPSTREAM_CALLS: [&str; 15] = with_span([
        "server_address",
        "method",
        "status_code",
        "ratelimit_remaining",
        "ratelimit_limit",
        "ratelimit_reset_at",
        "retry_after_s",
        "kept",
    ]);
    pub const TOOL_ROLLUP: [&str; 18] = [
        "minute",
        "service",
        "tool",
        "side",
        "calls",
        "errors",
        "cancellations",
        "with_result",
        "empty_results",
        "result_bytes",
        "result_items",
        "duration_us_sum",
        "latency_hist",
        "shard",
        "sized_results",
        "counted_results",
        "overhead_calls",
        "overhead_us_sum",
    ];
    pub const METHOD_ROLLUP: [&str; 9] = [
        "minute",
        "service",
        "method",
        "side",
        "calls",
        "errors",
        "orphans",
        "latency_hist",
        "shard",
    ];
    pub const LLM_ROLLUP: [&str; 9] = [
        "minute",
        "service",
        "model",
        "calls",
        "errors",
        "input_tokens",
        "output_tokens",
        "latency_hist",
        "shard",
    ];
    pub const UPSTREAM_ROLLUP: [&str; 9] = [
        "minute",
        "service",
        "server_address",
        "calls",
        "rate_limited",
        "server_errors",
        "min_remaining_ratio",
        "latency_hist",
        "shard",
    ];
    pub const LOOP_CALLS: [&str; 9] = [
        "minute",
        "service",
        "tool",
        "session_key",
        "args_hash",
        "shard",
        "calls",
        "failed",
        "stuck",
    ];
    pub const SESSION_TOKENS: [&str; 5] = ["minute", "service", "session_key", "shard", "tokens"];
}

/// A field count as COPY's row header wants it.
const fn fields(columns: &[&str]) -> i16 {
    columns.len() as i16
}

/// One COPY ... FROM STDIN (FORMAT binary) payload.
pub struct CopyBuf {
    buf: Vec<u8>,
    rows: usize,
}

impl CopyBuf {
    pub fn new() -> Self {
        let mut buf = Vec::with_capacity(64 * 1024);
        buf.extend_from_slice(b"PGCOPY\n\xff\r\n\0");
        buf.extend_from_slice(&0i32.to_be_bytes()); // flags
        buf.extend_from_slice(&0i32.to_be_bytes()); // header extension length
        CopyBuf { buf, rows: 0 }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.buf.extend_from_slice(&(-1i16).to_be_bytes());
        self.buf
    }

    fn row(&mut self, fields: i16) {
        self.rows += 1;
        self.buf.extend_from_slice(&fields.to_be_bytes());
    }

    fn null(&mut self) {
        self.buf.extend_from_slice(&(-1i32).to_be_bytes());
    }

    fn bytes(&mut self, b: &[u8]) {
        self.buf.extend_from_slice(&(b.len() as i32).to_be_bytes());
        self.buf.extend_from_slice(b);
    }

    fn opt_bytes(&mut self, b: Option<&[u8]>) {
        match b {
            Some(b) => self.bytes(b),
            None => self.null(),
        }
    }

    /// Text, cut at a char boundary to `max` bytes; NUL (which PostgreSQL text cannot hold)
    /// becomes U+FFFD so one bad string cannot fail a whole batch.
    fn text_max(&mut self, s: &str, max: usize) {
        self.bytes(stored_text(s, max).as_bytes());
    }

    fn name(&mut self, s: &str) {
        self.text_max(s, MAX_NAME_BYTES);
    }

    fn opt_name(&mut self, s: Option<&str>) {
        match s {
            Some(s) => self.name(s),
            None => self.null(),
        }
    }

    fn opt_text(&mut self, s: Option<&str>) {
        match s {
            Some(s) => self.text_max(s, MAX_TEXT_BYTES),
            None => self.null(),
        }
    }

    fn i64(&mut self, v: i64) {
        self.buf.extend_from_slice(&8i32.to_be_bytes());
        self.buf.extend_from_slice(&v.to_be_bytes());
    }

    fn opt_i64(&mut self, v: Option<i64>) {
        match v {
            Some(v) => self.i64(v),
            None => self.null(),
        }
    }

    fn opt_i32(&mut self, v: Option<i32>) {
        match v {
            Some(v) => {
                self.buf.extend_from_slice(&4i32.to_be_bytes());
                self.buf.extend_from_slice(&v.to_be_bytes());
            }
            None => self.null(),
        }
    }

    fn opt_f64(&mut self, v: Option<f64>) {
        match v {
            Some(v) => {
                self.buf.extend_from_slice(&8i32.to_be_bytes());
                self.buf.extend_from_slice(&v.to_bits().to_be_bytes());
            }
            None => self.null(),
        }
    }

    fn bool(&mut self, v: bool) {
        self.buf.extend_from_slice(&1i32.to_be_bytes());
        self.buf.push(u8::from(v));
    }

    fn opt_bool(&mut self, v: Option<bool>) {
        match v {
            Some(v) => self.bool(v),
            None => self.null(),
        }
    }

    /// timestamptz from Unix nanoseconds.
    fn ts(&mut self, unix_nanos: i64) {
        self.i64(unix_nanos / 1000 - PG_EPOCH_OFFSET_US);
    }

    /// trace_id, span_id, parent_span_id, start_time, duration_us, service, service_instance.
    fn span_ref(&mut self, s: &SpanRef) {
        self.bytes(&s.trace_id);
        self.bytes(&s.span_id);
        self.opt_bytes(s.parent_span_id.as_ref().map(|p| p.as_slice()));
        self.ts(s.start_unix_nanos);
        self.i64(s.duration_us);
        self.name(&s.service);
        self.opt_name(s.service_instance.as_deref());
    }

    /// A `bigint[]` in PostgreSQL's binary array format.
    fn int8_array(&mut self, values: &[i64]) {
        let len = 20 + values.len() * 12;
        self.buf.extend_from_slice(&(len as i32).to_be_bytes());
        self.buf.extend_from_slice(&1i32.to_be_bytes()); // dimensions
        self.buf.extend_from_slice(&0i32.to_be_bytes()); // no NULLs
        self.buf.extend_from_slice(&20i32.to_be_bytes()); // element type: int8
        self.buf
            .extend_from_slice(&(values.len() as i32).to_be_bytes());
        self.buf.extend_from_slice(&1i32.to_be_bytes()); // lower bound
        for v in values {
            self.buf.extend_from_slice(&8i32.to_be_bytes());
            self.buf.extend_from_slice(&v.to_be_bytes());
        }
    }

    fn i16(&mut self, v: i16) {
        self.buf.extend_from_slice(&2i32.to_be_bytes());
        self.buf.extend_from_slice(&v.to_be_bytes());
    }

    fn counters(&mut self, values: &[i64]) {
        values.iter().for_each(|v| self.i64(*v));
    }

    /// minute, service, tool, side, 8 counters, latency_hist, shard, sized_results,
    /// counted_results, overhead_calls, overhead_us_sum.
    #[allow(clippy::too_many_arguments)] // one argument per column
    pub fn tool_rollup(
        &mut self,
        minute: i64,
        service: &str,
        tool: &str,
        side: &str,
        counters: &[i64; 8],
        hist: &[i64],
        shard: i16,
        known: [i64; 2],
        overhead: [i64; 2],
    ) {
        self.row(fields(&columns::TOOL_ROLLUP));
        self.ts(minute);
        self.name(service);
        self.name(tool);
        self.name(side);
        self.counters(counters);
        self.int8_array(hist);
        self.i16(shard);
        self.counters(&known);
        self.counters(&overhead);
    }

    /// minute, service, method, side, calls, errors, orphans, latency_hist, shard.
    #[allow(clippy::too_many_arguments)] // one argument per column
    pub fn method_rollup(
        &mut self,
        minute: i64,
        service: &str,
        method: &str,
        side: &str,
        counters: &[i64; 3],
        hist: &[i64],
        shard: i16,
    ) {
        self.row(fields(&columns::METHOD_ROLLUP));
        self.ts(minute);
        self.name(service);
        self.name(method);
        self.name(side);
        self.counters(counters);
        self.int8_array(hist);
        self.i16(shard);
    }

    /// minute, service, model, calls, errors, input_tokens, output_tokens, latency_hist, shard.
    #[allow(clippy::too_many_arguments)] // one argument per column
    pub fn llm_rollup(
        &mut self,
        minute: i64,
        service: &str,
        model: &str,
        counters: &[i64; 4],
        hist: &[i64],
        shard: i16,
    ) {
        self.row(fields(&columns::LLM_ROLLUP));
        self.ts(minute);
        self.name(service);
        self.name(model);
        self.counters(counters);
        self.int8_array(hist);
        self.i16(shard);
    }

    /// minute, service, server_address, calls, rate_limited, server_errors, min_remaining_ratio,
    /// latency_hist, shard.
    #[allow(clippy::too_many_arguments)] // one argument per column
    pub fn upstream_rollup(
        &mut self,
        minute: i64,
        service: &str,
        address: &str,
        counters: &[i64; 3],
        min_ratio: Option<f64>,
        hist: &[i64],
        shard: i16,
    ) {
        self.row(fields(&columns::UPSTREAM_ROLLUP));
        self.ts(minute);
        self.name(service);
        self.name(address);
        self.counters(counters);
        self.opt_f64(min_ratio);
        self.int8_array(hist);
        self.i16(shard);
    }

    /// minute, service, tool, session_key, args_hash, shard, calls, failed, stuck.
    pub fn loop_calls(
        &mut self,
        minute: i64,
        [service, tool, session]: [&str; 3],
        args_hash: &[u8],
        shard: i16,
        counters: [i64; 3],
    ) {
        self.row(fields(&columns::LOOP_CALLS));
        self.ts(minute);
        self.name(service);
        self.name(tool);
        self.name(session);
        self.bytes(args_hash);
        self.i16(shard);
        self.counters(&counters);
    }

    /// minute, service, session_key, shard, tokens.
    pub fn session_tokens(
        &mut self,
        minute: i64,
        service: &str,
        session: &str,
        shard: i16,
        tokens: i64,
    ) {
        self.row(fields(&columns::SESSION_TOKENS));
        self.ts(minute);
        self.name(service);
        self.name(session);
        self.i16(shard);
        self.i64(tokens);
    }

    pub fn tool_call(&mut self, c: &ToolCall, kept: bool) {
        self.row(fields(&columns::TOOL_CALLS));
        self.span_ref(&c.span);
        self.name(&c.tool);
        self.name(c.side.as_str());
        self.name(c.source.as_str());
        self.name(c.outcome.as_str());
        self.opt_name(c.error_type.as_deref());
        self.name(&c.session_key);
        self.name(c.session_source.as_str());
        self.opt_name(c.request_id.as_deref());
        self.opt_i64(c.result.and_then(|r| r.bytes));
        self.opt_i32(c.result.and_then(|r| r.items));
        self.opt_bool(c.result.map(|r| r.empty));
        self.opt_bytes(c.args_hash.as_ref().map(|h| h.as_slice()));
        self.opt_text(c.args_redacted.as_deref());
        self.opt_text(c.result_redacted.as_deref());
        // Joined with the other side after the commit (`store::correlate`).
        self.bool(c.counted);
        self.opt_bytes(c.inner_span_id.as_ref().map(|p| p.as_slice()));
        self.opt_bytes(c.peer_span_id.as_ref().map(|p| p.as_slice()));
        self.opt_name(c.own_outcome.map(Outcome::as_str));
        self.opt_i64(c.overhead_us);
        self.bool(c.loop_counted);
        self.bool(kept);
    }

    pub fn mcp_request(&mut self, r: &McpRequest) {
        self.row(fields(&columns::MCP_REQUESTS));
        self.span_ref(&r.span);
        self.name(&r.method);
        self.name(r.side.as_str());
        self.name(r.source.as_str());
        self.name(r.outcome.as_str());
        self.bool(r.orphan);
        self.bool(true);
    }

    pub fn llm_call(&mut self, c: &LlmCall, kept: bool) {
        self.row(fields(&columns::LLM_CALLS));
        self.span_ref(&c.span);
        self.name(&c.model);
        self.opt_name(c.provider.as_deref());
        self.name(&c.operation);
        self.i64(c.input_tokens);
        self.i64(c.output_tokens);
        self.bool(c.error);
        self.name(&c.session_key);
        self.name(c.session_source.as_str());
        self.bool(kept);
    }

    pub fn upstream_call(&mut self, c: &UpstreamCall, kept: bool) {
        self.row(fields(&columns::UPSTREAM_CALLS));
        self.span_ref(&c.span);
        self.name(&c.server_address);
        self.opt_name(c.method.as_deref());
        self.opt_i32(c.status_code);
        self.opt_f64(c.rate_limit.remaining);
        self.opt_f64(c.rate_limit.limit);
        match c.rate_limit.reset_at_unix_nanos {
            Some(t) => self.ts(t),
            None => self.null(),
        }
        self.opt_f64(c.rate_limit.retry_after_s);
        self.bool(kept);
    }
}

impl Default for CopyBuf {
    fn default() -> Self {
        Self::new()
    }
}

/// COPY payloads for the four raw tables (tool_calls, mcp_requests, llm_calls, upstream_calls),
/// each tool, LLM and upstream call marked kept or sampled out by `policy`.
pub fn encode_records<'a>(
    batches: impl IntoIterator<Item = &'a crate::normalize::Normalized>,
    policy: &crate::store::policy::RawPolicy,
) -> [CopyBuf; 4] {
    let mut bufs = [
        CopyBuf::new(),
        CopyBuf::new(),
        CopyBuf::new(),
        CopyBuf::new(),
    ];
    for r in batches {
        r.tool_calls
            .iter()
            .for_each(|c| bufs[0].tool_call(c, policy.keeps_tool_call(c)));
        r.mcp_requests.iter().for_each(|c| bufs[1].mcp_request(c));
        r.llm_calls
            .iter()
            .for_each(|c| bufs[2].llm_call(c, policy.keeps_llm_call(c)));
        r.upstream_calls
            .iter()
            .for_each(|c| bufs[3].upstream_call(c, policy.keeps_upstream_call(c)));
    }
    bufs
}

#[cfg(test)]
mod key_tests {
    use super::*;
    use crate::normalize::keys;

    /// The rollups key on the normalized strings and PostgreSQL stores the COPY's text: the two
    /// agree on every input, so two spans whose keys are stored equal always share one rollup
    /// row (and one batch can never hold two deltas for the same stored row).
    #[test]
    fn a_normalized_key_is_stored_as_it_is() {
        let parts = ["x", "\0", "\u{FFFD}", "é", "ツ", "a", "_", &"p".repeat(100)];
        let mut seed: u64 = 0x2545_F491_4F6C_DD1D;
        let mut next = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let mut seen: std::collections::HashMap<String, String> = Default::default();
        for _ in 0..20_000 {
            let len = (next() % 12) as usize;
            let raw: String = (0..len)
                .map(|_| parts[(next() % parts.len() as u64) as usize])
                .collect();
            for max in [keys::MAX_NAME_BYTES, keys::MAX_SESSION_BYTES] {
                let key = keys::canonical(&raw, max);
                let stored = stored_text(&key, MAX_NAME_BYTES).into_owned();
                assert_eq!(stored, key, "stored unchanged: {raw:?}");
                // Equal stored text means equal keys: one rollup row.
                if let Some(other) = seen.insert(stored.clone(), key.clone()) {
                    assert_eq!(other, key);
                }
            }
        }
    }
}
