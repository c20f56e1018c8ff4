//! `toolsight rules backtest`: replays rules over the stored history.
//!
//! The history is loaded once (the per-minute rollups, and per-second aggregates of the raw rows
//! for the session-level kinds) into polars frames ordered by time. Each evaluation instant then
//! aggregates the rows of its windows with polars and hands the observations to the same
//! [`observe::evaluate_group`] the live evaluator runs: same baselines, engine and state machine.
//!
//! The replay sees every minute complete, as the live loop does once the spans have landed; the
//! live loop evaluating a minute whose spans are still in flight can fire a tick later.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use chrono::{DateTime, Utc};
use polars::prelude::*;
use serde::Serialize;
use sqlx::PgPool;

use super::engine::Alerts;
use super::observe::{self, Windows, to_dt};
use super::rules::{Baseline, Group, Kind, RuleFile};
use super::state::Event;
use crate::evaluate::engine::{Observation, labels};
use crate::store::{StoreError, history, rollup};

#[derive(Debug, thiserror::Error)]
pub enum BacktestError {
    #[error("reading the history: {0}")]
    Store(#[from] StoreError),
    #[error("aggregating the history: {0}")]
    Analytics(#[from] PolarsError),
    #[error("rule {alert} failed at {at}: {error}")]
    Rule {
        alert: String,
        at: DateTime<Utc>,
        error: String,
    },
    #[error("{0}")]
    Range(String),
}

impl BacktestError {
    /// Whether running the backtest again may succeed (the database was unreachable).
    pub fn is_retryable(&self) -> bool {
        matches!(self, BacktestError::Store(e) if e.is_retryable())
    }
}

const MINUTE_MS: i64 = 60_000;

/// A frame ordered by its time column `t`, with the times kept aside for slicing.
struct Frame {
    df: DataFrame,
    t: Vec<i64>,
}

impl Frame {
    fn new(t: Vec<i64>, columns: Vec<Column>) -> PolarsResult<Frame> {
        let mut all = vec![Column::new("t".into(), &t)];
        all.extend(columns);
        Ok(Frame {
            df: DataFrame::new(t.len(), all)?,
            t,
        })
    }

    /// The rows with `lo <= t < hi`.
    fn window(&self, lo: i64, hi: i64) -> LazyFrame {
        let a = self.t.partition_point(|&x| x < lo);
        let b = self.t.partition_point(|&x| x < hi).max(a);
        self.df.slice(a as i64, b - a).lazy()
    }

    /// Rollup minutes of the window `[trunc_minute(to - window), to)`, as `store::alerts` reads them.
    fn minutes(&self, to: DateTime<Utc>, window: Duration) -> LazyFrame {
        let to = to.timestamp_millis();
        let lo = (to - window.as_millis() as i64).div_euclid(MINUTE_MS) * MINUTE_MS;
        self.window(lo, to)
    }
}

fn text(df: &DataFrame, name: &str) -> PolarsResult<Vec<String>> {
    Ok(df
        .column(name)?
        .str()?
        .iter()
        .map(|v| v.unwrap_or_default().to_owned())
        .collect())
}

fn ints(df: &DataFrame, name: &str) -> PolarsResult<Vec<i64>> {
    Ok(df
        .column(name)?
        .i64()?
        .iter()
        .map(|v| v.unwrap_or(0))
        .collect())
}

type ToolKey = (String, String, String);

/// The stored history in memory.
pub struct History {
    tool: Frame,
    hist: Frame,
    upstream: Frame,
    calls: Frame,
    tokens: Frame,
}

impl History {
    /// Loads everything rules evaluated in [from, to] can read.
    pub async fn load(
        pool: &PgPool,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
    ) -> Result<History, BacktestError> {
        let t = history::tool_minutes(pool, from, to).await?;
        let tool = Frame::new(
            t.t_ms,
            vec![
                Column::new("service".into(), t.service),
                Column::new("tool".into(), t.tool),
                Column::new("side".into(), t.side),
                Column::new("calls".into(), t.calls),
                Column::new("errors".into(), t.errors),
                Column::new("with_result".into(), t.with_result),
                Column::new("empty_results".into(), t.empty_results),
            ],
        )?;
        let h = history::hist_minutes(pool, from, to).await?;
        let hist = Frame::new(
            h.t_ms,
            vec![
                Column::new("service".into(), h.service),
                Column::new("tool".into(), h.tool),
                Column::new("side".into(), h.side),
                Column::new("bucket".into(), h.bucket),
                Column::new("count".into(), h.count),
            ],
        )?;
        let u = history::upstream_minutes(pool, from, to).await?;
        let upstream = Frame::new(
            u.t_ms,
            vec![
                Column::new("service".into(), u.service),
                Column::new("upstream".into(), u.upstream),
                Column::new("calls".into(), u.calls),
                Column::new("rate_limited".into(), u.rate_limited),
                Column::new("min_ratio".into(), u.min_ratio),
            ],
        )?;
        let c = history::loop_minutes(pool, from, to).await?;
        let calls = Frame::new(
            c.t_ms,
            vec![
                Column::new("service".into(), c.service),
                Column::new("tool".into(), c.tool),
                Column::new("session".into(), c.session),
                Column::new("args".into(), c.args),
                Column::new("calls".into(), c.calls),
                Column::new("failed".into(), c.failed),
                Column::new("stuck".into(), c.stuck),
            ],
        )?;
        let k = history::token_minutes(pool, from, to).await?;
        let tokens = Frame::new(
            k.t_ms,
            vec![
                Column::new("service".into(), k.service),
                Column::new("session".into(), k.session),
                Column::new("tokens".into(), k.tokens),
            ],
        )?;
        Ok(History {
            tool,
            hist,
            upstream,
            calls,
            tokens,
        })
    }

    /// Rows loaded (rollup minutes, histogram buckets, upstream minutes, loop and token minutes).
    pub fn rows(&self) -> usize {
        [
            &self.tool,
            &self.hist,
            &self.upstream,
            &self.calls,
            &self.tokens,
        ]
        .iter()
        .map(|f| f.t.len())
        .sum()
    }

    /// Merged latency histograms per tool over the window.
    fn histograms(
        &self,
        to: DateTime<Utc>,
        window: Duration,
    ) -> PolarsResult<HashMap<ToolKey, Vec<i64>>> {
        let df = self
            .hist
            .minutes(to, window)
            .group_by([col("service"), col("tool"), col("side"), col("bucket")])
            .agg([col("count").sum()])
            .collect()?;
        let (s, t, d) = (
            text(&df, "service")?,
            text(&df, "tool")?,
            text(&df, "side")?,
        );
        let counts = ints(&df, "count")?;
        let buckets = df.column("bucket")?.i32()?;
        let mut out: HashMap<ToolKey, Vec<i64>> = HashMap::new();
        for (i, b) in buckets.iter().enumerate() {
            let b = b.unwrap_or(0).max(0) as usize;
            let h = out
                .entry((s[i].clone(), t[i].clone(), d[i].clone()))
                .or_default();
            if h.len() <= b {
                h.resize(b + 1, 0);
            }
            h[b] += counts[i];
        }
        Ok(out)
    }

    /// Sums of tool-rollup columns per tool over the window.
    fn tool_sums(
        &self,
        to: DateTime<Utc>,
        window: Duration,
        columns: [&str; 2],
    ) -> PolarsResult<Vec<(ToolKey, i64, i64)>> {
        let df = self
            .tool
            .minutes(to, window)
            .group_by([col("service"), col("tool"), col("side")])
            .agg([col(columns[0]).sum(), col(columns[1]).sum()])
            .collect()?;
        let (s, t, d) = (
            text(&df, "service")?,
            text(&df, "tool")?,
            text(&df, "side")?,
        );
        let (a, b) = (ints(&df, columns[0])?, ints(&df, columns[1])?);
        Ok(s.into_iter()
            .zip(t)
            .zip(d)
            .enumerate()
            .map(|(i, ((s, t), d))| ((s, t, d), a[i], b[i]))
            .collect())
    }
}

fn tool_observation(
    (service, tool, side): ToolKey,
    value: f64,
    samples: i64,
    baseline: Option<f64>,
) -> Observation {
    Observation {
        labels: labels(&[("service", service), ("tool", tool), ("side", side)]),
        value,
        samples,
        baseline,
        extra: None,
    }
}

impl Windows for History {
    type Error = PolarsError;

    async fn latency(
        &mut self,
        to: DateTime<Utc>,
        window: Duration,
        quantile: f64,
        z: f64,
        baseline_to: Option<DateTime<Utc>>,
    ) -> PolarsResult<Vec<Observation>> {
        let current = self.histograms(to, window)?;
        let base = match baseline_to {
            Some(b) => self.histograms(b, window)?,
            None => HashMap::new(),
        };
        let mut out = Vec::new();
        for (key, calls, _) in self.tool_sums(to, window, ["calls", "errors"])? {
            let Some(v) = current
                .get(&key)
                .and_then(|h| rollup::hist_quantile(h, quantile))
            else {
                continue;
            };
            let b = base.get(&key).and_then(|h| {
                let n = h.iter().sum::<i64>();
                rollup::hist_quantile(
                    h,
                    crate::evaluate::engine::quantile_upper_rank(quantile, z, n),
                )
            });
            let lower_rank = crate::evaluate::engine::quantile_lower_rank(quantile, z, calls);
            let lo = current
                .get(&key)
                .and_then(|h| rollup::hist_quantile(h, lower_rank));
            let mut o = tool_observation(key, v, calls, b);
            o.extra = lo;
            out.push(o);
        }
        Ok(out)
    }

    async fn error_rate(
        &mut self,
        to: DateTime<Utc>,
        window: Duration,
    ) -> PolarsResult<Vec<Observation>> {
        Ok(self
            .tool_sums(to, window, ["errors", "calls"])?
            .into_iter()
            .filter(|(_, _, calls)| *calls > 0)
            .map(|(key, errors, calls)| {
                tool_observation(key, errors as f64 / calls as f64, calls, None)
            })
            .collect())
    }

    async fn empty_results(
        &mut self,
        to: DateTime<Utc>,
        window: Duration,
        baseline_to: DateTime<Utc>,
    ) -> PolarsResult<Vec<Observation>> {
        let share = |rows: Vec<(ToolKey, i64, i64)>| -> HashMap<ToolKey, (f64, i64)> {
            rows.into_iter()
                .filter(|(_, _, with)| *with > 0)
                .map(|(k, empty, with)| (k, (empty as f64 / with as f64, with)))
                .collect()
        };
        let cols = ["empty_results", "with_result"];
        let base = share(self.tool_sums(baseline_to, window, cols)?);
        Ok(share(self.tool_sums(to, window, cols)?)
            .into_iter()
            .map(|(key, (v, n))| {
                let b = base.get(&key).map(|(b, _)| *b);
                tool_observation(key, v, n, b)
            })
            .collect())
    }

    async fn retry_loops(
        &mut self,
        to: DateTime<Utc>,
        window: Duration,
        min_repeats: i64,
        after_errors_only: bool,
        polling_interval: Duration,
    ) -> PolarsResult<Vec<Observation>> {
        // Repeats all successful with content that never came faster than the polling
        // interval allows in any minute are polling: as the live query.
        let per_minute =
            crate::store::alerts::polling_calls_per_minute(polling_interval.as_secs_f64());
        let df = self
            .calls
            .minutes(to, window)
            .group_by([col("service"), col("tool"), col("session"), col("args")])
            .agg([
                col("calls").max().alias("busiest"),
                col("calls").sum(),
                col("failed").sum(),
                col("stuck").sum(),
            ])
            .filter(
                col("calls")
                    .gt_eq(lit(min_repeats))
                    .and(lit(!after_errors_only).or(col("failed").gt(lit(0i64))))
                    .and(
                        col("stuck")
                            .gt(lit(0i64))
                            .or(col("busiest").gt(lit(per_minute))),
                    ),
            )
            // calls × 2 + same arguments: the most repeated, ties to the same arguments (as the
            // live query).
            .with_column(
                (col("calls") * lit(2i64) + col("args").neq(lit("")).cast(DataType::Int64))
                    .alias("calls"),
            )
            .group_by([col("service"), col("tool"), col("session")])
            .agg([col("calls").max()])
            .collect()?;
        let (s, t, k) = (
            text(&df, "service")?,
            text(&df, "tool")?,
            text(&df, "session")?,
        );
        let v = ints(&df, "calls")?;
        Ok((0..df.height())
            .map(|i| Observation {
                labels: labels(&[
                    ("service", s[i].clone()),
                    ("tool", t[i].clone()),
                    ("session", k[i].clone()),
                ]),
                value: (v[i] / 2) as f64,
                samples: v[i] / 2,
                baseline: None,
                extra: Some((v[i] % 2) as f64),
            })
            .collect())
    }

    async fn token_burn(
        &mut self,
        to: DateTime<Utc>,
        window: Duration,
    ) -> PolarsResult<Vec<Observation>> {
        let df = self
            .tokens
            .minutes(to, window)
            .group_by([col("service"), col("session")])
            .agg([col("tokens").sum()])
            .collect()?;
        let (s, k, n) = (
            text(&df, "service")?,
            text(&df, "session")?,
            ints(&df, "tokens")?,
        );
        let mut per_service: HashMap<&str, Vec<f64>> = HashMap::new();
        for i in 0..df.height() {
            per_service.entry(&s[i]).or_default().push(n[i] as f64);
        }
        let medians: HashMap<&str, (f64, i64)> = per_service
            .into_iter()
            .map(|(svc, mut v)| {
                v.sort_by(f64::total_cmp);
                (svc, (crate::store::window::median(&v), v.len() as i64))
            })
            .collect();
        Ok((0..df.height())
            .map(|i| {
                let (median, sessions) = medians[s[i].as_str()];
                Observation {
                    labels: labels(&[("service", s[i].clone()), ("session", k[i].clone())]),
                    value: n[i] as f64,
                    samples: sessions,
                    baseline: None,
                    extra: Some(median),
                }
            })
            .collect())
    }

    async fn rate_limit_headroom(
        &mut self,
        to: DateTime<Utc>,
        window: Duration,
    ) -> PolarsResult<Vec<Observation>> {
        let df = self
            .upstream
            .minutes(to, window)
            .group_by([col("service"), col("upstream")])
            .agg([
                col("calls").sum(),
                col("rate_limited").sum(),
                col("min_ratio").min(),
            ])
            .filter(col("calls").gt(lit(0i64)))
            .collect()?;
        let (s, u) = (text(&df, "service")?, text(&df, "upstream")?);
        let (calls, limited) = (ints(&df, "calls")?, ints(&df, "rate_limited")?);
        let ratio: Vec<Option<f64>> = df.column("min_ratio")?.f64()?.iter().collect();
        Ok((0..df.height())
            .map(|i| Observation {
                labels: labels(&[("service", s[i].clone()), ("upstream", u[i].clone())]),
                value: ratio[i].unwrap_or(f64::NAN),
                samples: calls[i],
                baseline: None,
                extra: Some(limited[i] as f64 / calls[i] as f64),
            })
            .collect())
    }
}

/// One firing or resolved transition the replay produced.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplayEvent {
    pub alert: String,
    pub key: String,
    pub labels: BTreeMap<String, String>,
    pub status: &'static str,
    pub since: DateTime<Utc>,
    pub at: DateTime<Utc>,
    pub value: Option<f64>,
}

/// An alert's firing episode: pending from `pending_since`, firing from `fired_at`, until
/// `resolved_at` (none: still firing at the end of the range).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Episode {
    pub alert: String,
    pub key: String,
    pub pending_since: DateTime<Utc>,
    pub fired_at: DateTime<Utc>,
    pub resolved_at: Option<DateTime<Utc>>,
    /// The value when it fired.
    pub value: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    /// Group evaluations replayed.
    pub evaluations: u64,
    /// Rows of history loaded.
    pub rows: usize,
    pub rules: Vec<String>,
    pub events: Vec<ReplayEvent>,
    pub episodes: Vec<Episode>,
}

/// How far before `from` a group's rules read: their windows and baselines.
fn lookback(group: &Group) -> Duration {
    group
        .rules
        .iter()
        .map(|r| {
            let baseline = match &r.kind {
                Kind::Latency(l) => l.regression.as_ref().map(|g| g.baseline),
                Kind::EmptyResults(e) => Some(e.baseline),
                _ => None,
            };
            let back = match baseline {
                None => r.window,
                Some(Baseline::PreviousWindow) => r.window * 2,
                Some(Baseline::WeekAgo | Baseline::Both) => {
                    r.window * 2 + Duration::from_secs(7 * 86_400)
                }
            };
            back + Duration::from_secs(120)
        })
        .max()
        .unwrap_or_default()
}

/// The evaluation instants of a group in [from, to]: the multiples of its interval, as the live
/// loop's aligned ticks.
fn ticks(interval: Duration, from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<i64> {
    let step = interval.as_millis().max(1) as i64;
    let first = (from.timestamp_millis() + step - 1).div_euclid(step) * step;
    (0..)
        .map(|k| first + k * step)
        .take_while(|t| *t <= to.timestamp_millis())
        .collect()
}

/// Replays `files`' rules over [from, to]. `progress` is called with (done, total) evaluations.
pub async fn run(
    pool: &PgPool,
    files: Vec<(String, RuleFile)>,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    mut progress: impl FnMut(u64, u64),
) -> Result<Report, BacktestError> {
    if from >= to {
        return Err(BacktestError::Range(format!(
            "--from ({from}) must be before --to ({to})"
        )));
    }
    let groups: Vec<Group> = files.into_iter().flat_map(|(_, f)| f.groups).collect();
    let back = groups.iter().map(lookback).max().unwrap_or_default();
    let load_from = from - chrono::Duration::from_std(back).unwrap_or_default();
    let mut history = History::load(pool, load_from, to).await?;

    let mut schedule: Vec<(i64, usize)> = groups
        .iter()
        .enumerate()
        .flat_map(|(g, group)| {
            ticks(group.interval, from, to)
                .into_iter()
                .map(move |t| (t, g))
        })
        .collect();
    schedule.sort();
    let total = schedule.len() as u64;
    let mut alerts = Alerts::default();
    let mut events = Vec::new();
    for (done, (t, g)) in schedule.into_iter().enumerate() {
        let now = to_dt(t);
        let out = observe::evaluate_group(&mut history, &groups[g], &mut alerts, now).await;
        if let Some(failed) = out.rules.into_iter().find(|r| r.error.is_some()) {
            return Err(BacktestError::Rule {
                alert: failed.alert,
                at: now,
                error: failed.error.unwrap_or_default(),
            });
        }
        for n in out.notices {
            let (status, since, at) = match n.event {
                Event::Firing { since_ms, at_ms } => ("firing", since_ms, at_ms),
                Event::Resolved { since_ms, at_ms } => ("resolved", since_ms, at_ms),
            };
            events.push(ReplayEvent {
                alert: n.alert,
                key: n.key,
                labels: n.labels,
                status,
                since: to_dt(since),
                at: to_dt(at),
                value: n.value,
            });
        }
        progress(done as u64 + 1, total);
    }
    Ok(Report {
        from,
        to,
        evaluations: total,
        rows: history.rows(),
        rules: groups
            .iter()
            .flat_map(|g| g.rules.iter().map(|r| r.alert.clone()))
            .collect(),
        episodes: episodes(&events),
        events,
    })
}

/// Pairs each firing event with the resolution that follows it.
fn episodes(events: &[ReplayEvent]) -> Vec<Episode> {
    let mut open: HashMap<(&str, &str), usize> = HashMap::new();
    let mut out: Vec<Episode> = Vec::new();
    for e in events {
        let k = (e.alert.as_str(), e.key.as_str());
        if e.status == "firing" {
            open.insert(k, out.len());
            out.push(Episode {
                alert: e.alert.clone(),
                key: e.key.clone(),
                pending_since: e.since,
                fired_at: e.at,
                resolved_at: None,
                value: e.value,
            });
        } else if let Some(i) = open.remove(&k) {
            out[i].resolved_at = Some(e.at);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ticks_are_the_aligned_instants_in_range() {
        let at = |s: i64| to_dt(s * 1000);
        assert_eq!(
            ticks(Duration::from_secs(60), at(30), at(200)),
            vec![60_000, 120_000, 180_000]
        );
        assert_eq!(
            ticks(Duration::from_secs(60), at(60), at(120)),
            vec![60_000, 120_000]
        );
    }

    #[test]
    fn windows_slice_by_time() {
        let f = Frame::new(
            vec![0, 60_000, 120_000, 180_000],
            vec![Column::new("calls".into(), [1i64, 2, 3, 4])],
        )
        .unwrap();
        // 14:03:00 over 2m: minutes 1 and 2; at 14:03:10 the window starts in minute 1 too.
        let sum = |lf: LazyFrame| -> i64 {
            let df = lf.select([col("calls").sum()]).collect().unwrap();
            ints(&df, "calls").unwrap()[0]
        };
        assert_eq!(sum(f.minutes(to_dt(180_000), Duration::from_secs(120))), 5);
        assert_eq!(sum(f.minutes(to_dt(190_000), Duration::from_secs(120))), 9);
    }
}
