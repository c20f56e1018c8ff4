//! The rule groups' windows, kept in memory between evaluations.
//!
//! A group reads the same per-minute state every interval, and between two evaluations only
//! the rows written since have changed. [`Window`] keeps the rows of the minutes its group's
//! rules read (`tool_rollup_1m`, `loop_calls_1m`, `session_tokens_1m`: one row per key, minute
//! and writer shard) and on each evaluation reads again only the rows whose version is newer
//! than the previous read: `xmin` (the transaction that wrote the row version) not older than the
//! oldest transaction still running when that read began (its snapshot's xmin). Every row
//! version of an older transaction was committed before that read and is in it; a row of a
//! transaction running then, or started since, is read again. A writer's upsert or the join's
//! correction writes a new row version, so nothing is missed and nothing is counted twice: a
//! re-read row replaces the kept one. Which minutes to re-read comes from
//! `toolsight_changed_minutes`, where the three tables' statement triggers mark (table, minute,
//! writer shard) in every writing transaction (migration 0011): a marker's row version has the
//! xmin of the rows it points at, so the same test finds the changed minutes, and an
//! evaluation reads a few minutes' rows, not its whole windows again. Minutes no rule of the
//! group reads any more are dropped after each evaluation, so what is kept is bounded by the
//! keys the cardinality guard admits times the minutes of the longest window (and of its
//! baseline).
//!
//! Keys are kept as small ids (a key's strings once, however many minutes and shards hold it),
//! so the rules aggregate by indexing arrays instead of hashing strings for every row, and the
//! sums of a span are computed once per evaluation however many rules read it.
//!
//! The rules then aggregate in memory. Each function here computes exactly what its SQL
//! definition in [`super::alerts`] computes (tests hold the two equal, value for value), at a
//! cost that follows the keys of the window, never the calls, and without merging histograms in
//! PL/pgSQL: one evaluation of 5,000 tools reads a few thousand changed rows instead of
//! merging a hundred thousand histograms.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::StoreError;
use super::rollup::hist_quantile;
use crate::evaluate::engine::{self, Observation, labels};
use crate::normalize::cardinality::OVERFLOW;

const MINUTE_MS: i64 = 60_000;

/// Minutes as milliseconds since the epoch; a span `[lo, hi)` holds the minutes `m` with
/// `lo <= m < hi` (the bounds need not be whole minutes: `hi` is the evaluation instant).
type Span = (i64, i64);

/// The rollup minutes a rule reads for a window ending at `to`: whole minutes, the one holding
/// `to - window` included, up to `to` (the SQL's `RANGE`).
pub fn span(to: DateTime<Utc>, window_secs: f64) -> Span {
    let to = to.timestamp_millis();
    let from = to - (window_secs * 1000.0).round() as i64;
    (from.div_euclid(MINUTE_MS) * MINUTE_MS, to)
}

/// Sorted, disjoint, non-empty spans.
fn normalize(mut spans: Vec<Span>) -> Vec<Span> {
    spans.retain(|(lo, hi)| lo < hi);
    spans.sort_unstable();
    let mut out: Vec<Span> = Vec::with_capacity(spans.len());
    for (lo, hi) in spans {
        match out.last_mut() {
            Some(last) if lo <= last.1 => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
}

/// The parts of `need` outside `have` (both normalized).
fn subtract(need: &[Span], have: &[Span]) -> Vec<Span> {
    let mut out = Vec::new();
    for &(mut lo, hi) in need {
        for &(a, b) in have {
            if b <= lo || a >= hi {
                continue;
            }
            if a > lo {
                out.push((lo, a));
            }
            lo = lo.max(b);
            if lo >= hi {
                break;
            }
        }
        if lo < hi {
            out.push((lo, hi));
        }
    }
    out
}

/// The parts of `a` inside `b` (both normalized).
fn intersect(a: &[Span], b: &[Span]) -> Vec<Span> {
    let mut out = Vec::new();
    for &(lo, hi) in a {
        for &(c, d) in b {
            let (x, y) = (lo.max(c), hi.min(d));
            if x < y {
                out.push((x, y));
            }
        }
    }
    normalize(out)
}

/// A tool, as rollups key it: (service, tool, side).
pub type ToolKey = (String, String, String);

/// One `tool_rollup_1m` row: what the tool-health rules read of it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ToolMinute {
    pub calls: i64,
    pub errors: i64,
    pub with_result: i64,
    pub empty_results: i64,
    /// The latency histogram from its first non-empty bucket: `hist[i]` is bucket
    /// `hist_from + i`. The length of the stored array is `hist_from + hist.len()`.
    pub hist_from: usize,
    pub hist: Vec<i64>,
}

/// A repeated call, as `loop_calls_1m` keys it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LoopKey {
    pub service: String,
    pub tool: String,
    pub session: String,
    /// Empty: calls without captured arguments (failed or empty).
    pub args: Vec<u8>,
}

/// One `loop_calls_1m` row.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LoopMinute {
    pub calls: i64,
    pub failed: i64,
    pub stuck: i64,
}

/// A session, as `session_tokens_1m` keys it: (service, session).
pub type SessionKey = (String, String);

/// The keys of one table as small ids: rows are kept, and summed, by id, so an evaluation
/// hashes and compares integers and indexes arrays instead of hashing strings for every row of
/// its window.
#[derive(Debug)]
struct Keys<K> {
    ids: HashMap<Arc<K>, u32>,
    keys: Vec<Arc<K>>,
}

impl<K> Default for Keys<K> {
    fn default() -> Self {
        Keys {
            ids: HashMap::new(),
            keys: Vec::new(),
        }
    }
}

impl<K: std::hash::Hash + Eq> Keys<K> {
    fn id(&mut self, key: K) -> u32 {
        if let Some(&id) = self.ids.get(&key) {
            return id;
        }
        let id = self.keys.len() as u32;
        let key = Arc::new(key);
        self.keys.push(key.clone());
        self.ids.insert(key, id);
        id
    }

    fn len(&self) -> usize {
        self.keys.len()
    }
}

/// The rows of one table for the minutes read, by minute, then by (key id, shard).
#[derive(Debug)]
struct Minutes<K, V> {
    keys: Keys<K>,
    rows: BTreeMap<i64, HashMap<(u32, i16), V>>,
    /// The spans read (normalized).
    loaded: Vec<Span>,
    /// The spans this evaluation read (kept when it finishes; the rest is dropped).
    used: Vec<Span>,
}

impl<K, V> Default for Minutes<K, V> {
    fn default() -> Self {
        Minutes {
            keys: Keys::default(),
            rows: BTreeMap::new(),
            loaded: Vec::new(),
            used: Vec::new(),
        }
    }
}

impl<K: std::hash::Hash + Eq, V> Minutes<K, V> {
    fn put(&mut self, minute: i64, key: K, shard: i16, v: V) {
        let id = self.keys.id(key);
        self.rows.entry(minute).or_default().insert((id, shard), v);
    }

    fn within(&self, (lo, hi): Span) -> impl Iterator<Item = (&(u32, i16), &V)> {
        self.rows.range(lo..hi.max(lo)).flat_map(|(_, m)| m.iter())
    }

    /// Keeps only the minutes of the spans used since the last call, and forgets the keys no
    /// kept row has once they are most of those known (so ids stay dense and bounded by the
    /// keys of the window).
    fn finish(&mut self) {
        let used = normalize(std::mem::take(&mut self.used));
        self.loaded = intersect(&self.loaded, &used);
        let loaded = &self.loaded;
        self.rows
            .retain(|m, _| loaded.iter().any(|(lo, hi)| lo <= m && m < hi));
        if self.keys.len() < 4096 {
            return;
        }
        let mut live = vec![false; self.keys.len()];
        for m in self.rows.values() {
            for (id, _) in m.keys() {
                live[*id as usize] = true;
            }
        }
        let n = live.iter().filter(|l| **l).count();
        if n * 2 > self.keys.len() {
            return;
        }
        let mut renumbered = vec![u32::MAX; self.keys.len()];
        let mut keys = Keys::default();
        for (old, key) in std::mem::take(&mut self.keys.keys).into_iter().enumerate() {
            if live[old] {
                renumbered[old] = keys.keys.len() as u32;
                keys.ids.insert(key.clone(), keys.keys.len() as u32);
                keys.keys.push(key);
            }
        }
        self.keys = keys;
        for m in self.rows.values_mut() {
            *m = std::mem::take(m)
                .into_iter()
                .map(|((id, shard), v)| ((renumbered[id as usize], shard), v))
                .collect();
        }
    }

    fn len(&self) -> usize {
        self.rows.values().map(HashMap::len).sum()
    }
}

/// Per-tool sums over a span, by key id (ids without rows in it hold zeros).
#[derive(Debug, Default)]
struct ToolSums {
    by_id: Vec<ToolMinute>,
    present: Vec<u32>,
}

/// Which of the three tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Table {
    Tools,
    Loops,
    Tokens,
}

/// The `xmin` test: the row version was written by a transaction not older than `$n` (the low
/// 32 bits of a snapshot's xmin), modulo 2^32 as PostgreSQL compares transaction ids.
fn changed(n: u8) -> String {
    format!("(${n}::bigint IS NULL OR ((xmin::text::bigint - ${n}) & 4294967295) < 2147483648)")
}

/// Which rows of a table a read takes: a span of minutes, or some minutes.
enum Rows<'a> {
    Span(Span),
    Minutes(&'a [DateTime<Utc>]),
}

impl Table {
    fn name(self) -> &'static str {
        match self {
            Table::Tools => "tool_rollup_1m",
            Table::Loops => "loop_calls_1m",
            Table::Tokens => "session_tokens_1m",
        }
    }
}

/// The windows of one rule group: see the module documentation.
#[derive(Debug, Default)]
pub struct Window {
    tools: Minutes<ToolKey, ToolMinute>,
    loops: Minutes<LoopKey, LoopMinute>,
    tokens: Minutes<SessionKey, i64>,
    /// The low 32 bits of the snapshot xmin taken before the last read.
    watermark: Option<i64>,
    /// Whether this evaluation has read the changed rows yet.
    refreshed: bool,
    /// Rows read since [`Window::begin`] (changed and newly loaded).
    pub rows_read: u64,
    /// The tool sums of the spans this evaluation's rules read: rules of one group share
    /// windows (both latency rules, the error rate and empty results), and each span is summed
    /// once. Cleared when an evaluation begins and whenever tool rows are read.
    tool_sums: Vec<(Span, Arc<ToolSums>)>,
}

impl Window {
    /// Starts an evaluation: the first read reads the rows changed since the previous one.
    pub fn begin(&mut self) {
        self.refreshed = false;
        self.rows_read = 0;
        self.tool_sums.clear();
    }

    /// Ends an evaluation: minutes no rule read in it are dropped.
    pub fn finish(&mut self) {
        self.tools.finish();
        self.loops.finish();
        self.tokens.finish();
    }

    /// Rows kept, over the three tables.
    pub fn len(&self) -> usize {
        self.tools.len() + self.loops.len() + self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Makes `spans` of `table` current: on the first read of an evaluation, the rows changed
    /// since the previous evaluation's read; then whatever part of `spans` was never read.
    async fn ensure(
        &mut self,
        pool: &PgPool,
        table: Table,
        spans: &[Span],
    ) -> Result<(), StoreError> {
        if !self.refreshed {
            let (mark,): (i64,) = sqlx::query_as(
                "SELECT (pg_snapshot_xmin(pg_current_snapshot())::text::bigint & 4294967295)",
            )
            .fetch_one(pool)
            .await?;
            if let Some(old) = self.watermark {
                // The minutes written since the last read (`toolsight_changed_minutes`, marked
                // by the tables' triggers in the writing transactions), and of those only the
                // ones kept: re-read, only the row versions written since.
                let marked: Vec<(String, DateTime<Utc>)> = sqlx::query_as(&format!(
                    "SELECT tbl, minute FROM toolsight_changed_minutes WHERE {}",
                    changed(1)
                ))
                .bind(old)
                .fetch_all(pool)
                .await?;
                for t in [Table::Tools, Table::Loops, Table::Tokens] {
                    let loaded = match t {
                        Table::Tools => &self.tools.loaded,
                        Table::Loops => &self.loops.loaded,
                        Table::Tokens => &self.tokens.loaded,
                    };
                    let mut minutes: Vec<DateTime<Utc>> = marked
                        .iter()
                        .filter(|(tbl, m)| {
                            let m = m.timestamp_millis();
                            tbl == t.name() && loaded.iter().any(|(lo, hi)| *lo <= m && m < *hi)
                        })
                        .map(|(_, m)| *m)
                        .collect();
                    minutes.sort_unstable();
                    minutes.dedup();
                    if !minutes.is_empty() {
                        self.read(pool, t, Rows::Minutes(&minutes), Some(old))
                            .await?;
                    }
                }
            }
            self.watermark = Some(mark);
            self.refreshed = true;
        }
        let spans = normalize(spans.to_vec());
        let loaded = match table {
            Table::Tools => &self.tools.loaded,
            Table::Loops => &self.loops.loaded,
            Table::Tokens => &self.tokens.loaded,
        };
        for s in subtract(&spans, loaded) {
            self.read(pool, table, Rows::Span(s), None).await?;
        }
        let (loaded, used) = match table {
            Table::Tools => (&mut self.tools.loaded, &mut self.tools.used),
            Table::Loops => (&mut self.loops.loaded, &mut self.loops.used),
            Table::Tokens => (&mut self.tokens.loaded, &mut self.tokens.used),
        };
        *loaded = normalize(loaded.iter().chain(&spans).copied().collect());
        used.extend(&spans);
        Ok(())
    }

    /// Reads the rows of `table` in `rows`: all of them, or those changed since `since`.
    async fn read(
        &mut self,
        pool: &PgPool,
        table: Table,
        rows: Rows<'_>,
        since: Option<i64>,
    ) -> Result<(), StoreError> {
        let at = |ms: i64| DateTime::<Utc>::from_timestamp_millis(ms).unwrap_or_default();
        // A span is a range scan on the minute index; listed minutes are looked up one by one
        // (a late row in an old minute must not turn the read into a scan of the window).
        let (which, lo, hi, minutes) = match rows {
            Rows::Span((lo, hi)) => (
                format!("minute >= $1 AND minute < $2 AND {}", changed(3)),
                Some(at(lo)),
                Some(at(hi)),
                None,
            ),
            Rows::Minutes(m) => (
                format!("minute = ANY($4) AND {}", changed(3)),
                None,
                None,
                Some(m),
            ),
        };
        // Binds the same four parameters whichever form the filter takes.
        macro_rules! bind {
            ($q:expr) => {
                $q.bind(lo).bind(hi).bind(since).bind(minutes)
            };
        }
        match table {
            Table::Tools => {
                type Row = (
                    DateTime<Utc>,
                    String,
                    String,
                    String,
                    i16,
                    i64,
                    i64,
                    i64,
                    i64,
                    Vec<i64>,
                );
                let rows: Vec<Row> = bind!(sqlx::query_as(&format!(
                    "SELECT minute, service, tool, side, shard, calls, errors, with_result, empty_results, latency_hist
                     FROM tool_rollup_1m WHERE {which}"
                )))
                .fetch_all(pool)
                .await?;
                self.rows_read += rows.len() as u64;
                if !rows.is_empty() {
                    self.tool_sums.clear();
                }
                for (m, service, tool, side, shard, calls, errors, with_result, empty, hist) in rows
                {
                    let from = hist.iter().position(|&c| c != 0).unwrap_or(hist.len());
                    let v = ToolMinute {
                        calls,
                        errors,
                        with_result,
                        empty_results: empty,
                        hist_from: from,
                        hist: hist[from..].to_vec(),
                    };
                    self.tools
                        .put(m.timestamp_millis(), (service, tool, side), shard, v);
                }
            }
            Table::Loops => {
                type Row = (
                    DateTime<Utc>,
                    String,
                    String,
                    String,
                    Vec<u8>,
                    i16,
                    i64,
                    i64,
                    i64,
                );
                let rows: Vec<Row> = bind!(sqlx::query_as(&format!(
                    "SELECT minute, service, tool, session_key, args_hash, shard, calls, failed, stuck
                     FROM loop_calls_1m WHERE {which}"
                )))
                .fetch_all(pool)
                .await?;
                self.rows_read += rows.len() as u64;
                for (m, service, tool, session, args, shard, calls, failed, stuck) in rows {
                    let key = LoopKey {
                        service,
                        tool,
                        session,
                        args,
                    };
                    let v = LoopMinute {
                        calls,
                        failed,
                        stuck,
                    };
                    self.loops.put(m.timestamp_millis(), key, shard, v);
                }
            }
            Table::Tokens => {
                let rows: Vec<(DateTime<Utc>, String, String, i16, i64)> =
                    bind!(sqlx::query_as(&format!(
                        "SELECT minute, service, session_key, shard, tokens
                         FROM session_tokens_1m WHERE {which}"
                    )))
                    .fetch_all(pool)
                    .await?;
                self.rows_read += rows.len() as u64;
                for (m, service, session, shard, tokens) in rows {
                    self.tokens
                        .put(m.timestamp_millis(), (service, session), shard, tokens);
                }
            }
        }
        Ok(())
    }

    /// Sums of the tool rows in `span`, per tool, histograms merged (once per span and
    /// evaluation).
    fn tool_sums(&mut self, span: Span) -> Arc<ToolSums> {
        if let Some((_, sums)) = self.tool_sums.iter().find(|(s, _)| *s == span) {
            return sums.clone();
        }
        let mut out = ToolSums {
            by_id: vec![ToolMinute::default(); self.tools.keys.len()],
            present: Vec::new(),
        };
        let mut seen = vec![false; self.tools.keys.len()];
        for ((id, _), v) in self.tools.within(span) {
            let a = &mut out.by_id[*id as usize];
            if !std::mem::replace(&mut seen[*id as usize], true) {
                out.present.push(*id);
            }
            a.calls += v.calls;
            a.errors += v.errors;
            a.with_result += v.with_result;
            a.empty_results += v.empty_results;
            let len = v.hist_from + v.hist.len();
            if a.hist.len() < len {
                a.hist.resize(len, 0);
            }
            for (c, add) in a.hist[v.hist_from..len].iter_mut().zip(&v.hist) {
                *c += add;
            }
        }
        let out = Arc::new(out);
        self.tool_sums.push((span, out.clone()));
        out
    }

    fn tool_key(&self, id: u32) -> &ToolKey {
        &self.tools.keys.keys[id as usize]
    }

    /// [`super::alerts::latency`], from the kept rows.
    pub async fn latency(
        &mut self,
        pool: &PgPool,
        to: DateTime<Utc>,
        window_secs: f64,
        quantile: f64,
        z: f64,
        baseline_to: Option<DateTime<Utc>>,
    ) -> Result<Vec<Observation>, StoreError> {
        let cur = span(to, window_secs);
        let base = baseline_to.map(|b| span(b, window_secs));
        let spans: Vec<Span> = std::iter::once(cur).chain(base).collect();
        self.ensure(pool, Table::Tools, &spans).await?;
        let current = self.tool_sums(cur);
        let base = base.map(|b| self.tool_sums(b));
        let mut out = Vec::with_capacity(current.present.len());
        for &id in &current.present {
            let a = &current.by_id[id as usize];
            let Some(v) = hist_quantile(&a.hist, quantile) else {
                continue;
            };
            let lo = hist_quantile(&a.hist, engine::quantile_lower_rank(quantile, z, a.calls));
            let b = base
                .as_ref()
                .and_then(|base| base.by_id.get(id as usize))
                .and_then(|b| {
                    hist_quantile(&b.hist, engine::quantile_upper_rank(quantile, z, b.calls))
                });
            out.push(tool_observation(self.tool_key(id), v, a.calls, b, lo));
        }
        Ok(out)
    }

    /// [`super::alerts::error_rate`], from the kept rows.
    pub async fn error_rate(
        &mut self,
        pool: &PgPool,
        to: DateTime<Utc>,
        window_secs: f64,
    ) -> Result<Vec<Observation>, StoreError> {
        let cur = span(to, window_secs);
        self.ensure(pool, Table::Tools, &[cur]).await?;
        let current = self.tool_sums(cur);
        Ok(current
            .present
            .iter()
            .map(|&id| (id, &current.by_id[id as usize]))
            .filter(|(_, a)| a.calls > 0)
            .map(|(id, a)| {
                let v = a.errors as f64 / a.calls as f64;
                tool_observation(self.tool_key(id), v, a.calls, None, None)
            })
            .collect())
    }

    /// [`super::alerts::empty_results`], from the kept rows.
    pub async fn empty_results(
        &mut self,
        pool: &PgPool,
        to: DateTime<Utc>,
        window_secs: f64,
        baseline_to: DateTime<Utc>,
    ) -> Result<Vec<Observation>, StoreError> {
        let (cur, base) = (span(to, window_secs), span(baseline_to, window_secs));
        self.ensure(pool, Table::Tools, &[cur, base]).await?;
        let share = |a: &ToolMinute| a.empty_results as f64 / a.with_result as f64;
        let base = self.tool_sums(base);
        let current = self.tool_sums(cur);
        Ok(current
            .present
            .iter()
            .map(|&id| (id, &current.by_id[id as usize]))
            .filter(|(_, a)| a.with_result > 0)
            .map(|(id, a)| {
                let b = base
                    .by_id
                    .get(id as usize)
                    .filter(|b| b.with_result > 0)
                    .map(share);
                tool_observation(self.tool_key(id), share(a), a.with_result, b, None)
            })
            .collect())
    }

    /// [`super::alerts::retry_loops`], from the kept rows.
    pub async fn retry_loops(
        &mut self,
        pool: &PgPool,
        to: DateTime<Utc>,
        window_secs: f64,
        min_repeats: i64,
        after_errors_only: bool,
        polling_secs: f64,
    ) -> Result<Vec<Observation>, StoreError> {
        let cur = span(to, window_secs);
        self.ensure(pool, Table::Loops, &[cur]).await?;
        let polling = super::alerts::polling_calls_per_minute(polling_secs);
        #[derive(Default, Clone, Copy)]
        struct Sums {
            n: i64,
            failed: i64,
            stuck: i64,
            busiest: i64,
        }
        // Dense by key id: per minute over the writers' shards, then per key over the minutes.
        let keys = &self.loops.keys;
        let folded: Vec<bool> = keys.keys.iter().map(|k| k.session == OVERFLOW).collect();
        let mut sums = vec![Sums::default(); keys.len()];
        let mut touched: Vec<u32> = Vec::new();
        let mut minute_sums = vec![LoopMinute::default(); keys.len()];
        let mut in_minute: Vec<u32> = Vec::new();
        for (_, minute) in self.loops.rows.range(cur.0..cur.1.max(cur.0)) {
            for ((id, _), v) in minute {
                if folded[*id as usize] {
                    continue;
                }
                let s = &mut minute_sums[*id as usize];
                if *s == LoopMinute::default() {
                    in_minute.push(*id);
                }
                s.calls += v.calls;
                s.failed += v.failed;
                s.stuck += v.stuck;
            }
            for id in in_minute.drain(..) {
                let v = std::mem::take(&mut minute_sums[id as usize]);
                if v.calls <= 0 {
                    continue;
                }
                let s = &mut sums[id as usize];
                if s.n == 0 && s.busiest == 0 {
                    touched.push(id);
                }
                s.n += v.calls;
                s.failed += v.failed;
                s.stuck += v.stuck;
                s.busiest = s.busiest.max(v.calls);
            }
        }
        let mut best: HashMap<(&str, &str, &str), i64> = HashMap::new();
        for id in touched {
            let (key, s) = (&keys.keys[id as usize], &sums[id as usize]);
            if s.n < min_repeats
                || (after_errors_only && s.failed <= 0)
                || !(s.stuck > 0 || s.busiest > polling)
            {
                continue;
            }
            let v = s.n * 2 + i64::from(!key.args.is_empty());
            let b = best
                .entry((&key.service, &key.tool, &key.session))
                .or_insert(v);
            *b = (*b).max(v);
        }
        Ok(best
            .into_iter()
            .map(|((service, tool, session), v)| Observation {
                labels: labels(&[
                    ("service", service.to_owned()),
                    ("tool", tool.to_owned()),
                    ("session", session.to_owned()),
                ]),
                value: (v / 2) as f64,
                samples: v / 2,
                baseline: None,
                extra: Some((v % 2) as f64),
            })
            .collect())
    }

    /// [`super::alerts::token_burn`], from the kept rows.
    pub async fn token_burn(
        &mut self,
        pool: &PgPool,
        to: DateTime<Utc>,
        window_secs: f64,
    ) -> Result<Vec<Observation>, StoreError> {
        let cur = span(to, window_secs);
        self.ensure(pool, Table::Tokens, &[cur]).await?;
        let keys = &self.tokens.keys.keys;
        let mut by_id = vec![None::<i64>; keys.len()];
        for ((id, _), tokens) in self.tokens.within(cur) {
            *by_id[*id as usize].get_or_insert(0) += tokens;
        }
        let sessions: Vec<(&SessionKey, i64)> = by_id
            .into_iter()
            .enumerate()
            .filter_map(|(id, t)| Some((&*keys[id], t?)))
            .filter(|(key, _)| key.1 != OVERFLOW)
            .collect();
        let mut per_service: HashMap<&str, Vec<f64>> = HashMap::new();
        for ((service, _), tokens) in &sessions {
            per_service
                .entry(service.as_str())
                .or_default()
                .push(*tokens as f64);
        }
        let medians: HashMap<&str, (f64, i64)> = per_service
            .into_iter()
            .map(|(service, mut t)| {
                t.sort_by(f64::total_cmp);
                (service, (median(&t), t.len() as i64))
            })
            .collect();
        Ok(sessions
            .into_iter()
            .map(|((service, session), tokens)| {
                let (median, n) = medians[service.as_str()];
                Observation {
                    labels: labels(&[("service", service.clone()), ("session", session.clone())]),
                    value: tokens as f64,
                    samples: n,
                    baseline: None,
                    extra: Some(median),
                }
            })
            .collect())
    }
}

fn tool_observation(
    (service, tool, side): &ToolKey,
    value: f64,
    samples: i64,
    baseline: Option<f64>,
    extra: Option<f64>,
) -> Observation {
    Observation {
        labels: labels(&[
            ("service", service.clone()),
            ("tool", tool.clone()),
            ("side", side.clone()),
        ]),
        value,
        samples,
        baseline,
        extra,
    }
}

/// The median of sorted values as PostgreSQL's `percentile_cont(0.5)` computes it.
pub fn median(sorted: &[f64]) -> f64 {
    let pos = 0.5 * (sorted.len() as f64 - 1.0);
    let (lo, hi) = (pos.floor(), pos.ceil());
    let first = sorted[lo as usize];
    if lo == hi {
        return first;
    }
    first + (sorted[hi as usize] - first) * (pos - lo)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_subtract_and_intersect() {
        let have = normalize(vec![(0, 10), (20, 30), (5, 12)]);
        assert_eq!(have, vec![(0, 12), (20, 30)]);
        assert_eq!(subtract(&[(5, 25)], &have), vec![(12, 20)]);
        assert_eq!(
            subtract(&[(-5, 40)], &have),
            vec![(-5, 0), (12, 20), (30, 40)]
        );
        assert_eq!(subtract(&[(0, 12)], &have), vec![]);
        assert_eq!(intersect(&have, &[(10, 25)]), vec![(10, 12), (20, 25)]);
    }

    #[test]
    fn a_span_is_the_sql_range() {
        let to = DateTime::parse_from_rfc3339("2026-12-01T10:05:30Z")
            .unwrap()
            .with_timezone(&Utc);
        let (lo, hi) = span(to, 600.0);
        assert_eq!(
            DateTime::from_timestamp_millis(lo).unwrap().to_rfc3339(),
            "2026-12-01T09:55:00+00:00"
        );
        assert_eq!(hi, to.timestamp_millis());
    }

    #[test]
    fn keys_no_kept_row_has_are_forgotten_and_the_rest_keep_their_rows() {
        let mut m: Minutes<String, i64> = Minutes::default();
        // 5,000 keys in minute 0, 1,000 of them again in minute 60,000.
        for k in 0..5_000i64 {
            m.put(0, format!("k{k}"), 0, k);
        }
        for k in 0..1_000i64 {
            m.put(MINUTE_MS, format!("k{k}"), 1, -k);
        }
        m.loaded = vec![(0, 2 * MINUTE_MS)];
        m.used = vec![(0, 2 * MINUTE_MS)];
        m.finish();
        assert_eq!(m.keys.len(), 5_000, "every key still has a row");
        // Minute 0 leaves the window: 4,000 keys have no row any more.
        m.used = vec![(MINUTE_MS, 2 * MINUTE_MS)];
        m.finish();
        assert_eq!(m.keys.len(), 1_000);
        assert_eq!(m.len(), 1_000);
        let mut seen: Vec<(String, i16, i64)> = m
            .within((0, 2 * MINUTE_MS))
            .map(|((id, shard), v)| ((*m.keys.keys[*id as usize]).clone(), *shard, *v))
            .collect();
        seen.sort();
        let mut want: Vec<(String, i16, i64)> =
            (0..1_000i64).map(|k| (format!("k{k}"), 1, -k)).collect();
        want.sort();
        assert_eq!(seen, want);
        // Ids are dense again and a known key finds its id.
        assert!(m.keys.ids.values().all(|&id| (id as usize) < 1_000));
        let id = m.keys.id("k7".to_owned());
        assert_eq!(*m.keys.keys[id as usize], "k7");
        assert_eq!(m.keys.len(), 1_000);
    }

    #[test]
    fn median_matches_percentile_cont() {
        assert_eq!(median(&[1.0]), 1.0);
        assert_eq!(median(&[1.0, 2.0]), 1.5);
        assert_eq!(median(&[1.0, 2.0, 10.0]), 2.0);
    }
}
