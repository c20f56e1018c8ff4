//! Alert quality of a rule set on simulated steady traffic: how often each rate or latency rule
//! fires when nothing is wrong, per 1,000 series-hours, at a given call rate per series.
//!
//! The windows are computed the way the store computes them from the rollups (counts over whole
//! minutes, quantiles from the same latency histograms) and fed, minute by minute, through the
//! same engine and state machine as the live evaluator. Deterministic: a fixed seed.

use std::collections::{HashMap, VecDeque};

use super::engine::{Alerts, apply, quantile_lower_rank, quantile_upper_rank, z_of};
use super::rules::{Kind, Rule};
use super::state::Event;
use crate::evaluate::engine::Observation;
use crate::store::rollup::{hist_quantile, latency_bucket};

/// The steady traffic of one simulation.
#[derive(Debug, Clone, Copy)]
pub struct Steady {
    /// Calls per minute of every series.
    pub calls_per_min: u32,
    pub series: usize,
    /// Minutes evaluated (after a warm-up that fills the window and its baseline).
    pub minutes: usize,
    /// The error rate of every series.
    pub error_rate: f64,
    /// The share of empty results of every series.
    pub empty_rate: f64,
    /// Median latency (ms); latencies are log-normal with σ = `latency_sigma`.
    pub median_ms: f64,
    pub latency_sigma: f64,
}

impl Default for Steady {
    fn default() -> Self {
        Steady {
            calls_per_min: 3,
            series: 5000,
            minutes: 60,
            error_rate: 0.01,
            empty_rate: 0.10,
            median_ms: 200.0,
            latency_sigma: 0.5,
        }
    }
}

/// Series that go wrong at `onset` (minutes into the evaluated hour), beside the steady ones.
#[derive(Debug, Clone, Copy)]
pub struct Incident {
    pub series: usize,
    pub onset: usize,
    pub error_rate: f64,
    pub empty_rate: f64,
    pub median_ms: f64,
}

/// A simulation's result: the steady series' quality, and for each incident series the
/// minutes from onset to its first firing (none: it never fired; negative: before onset).
#[derive(Debug, Clone, PartialEq)]
pub struct Simulated {
    pub steady: Quality,
    pub incident_fired_after: Vec<Option<i64>>,
}

/// What one rule did on steady traffic.
#[derive(Debug, Clone, PartialEq)]
pub struct Quality {
    /// Series that fired at least once.
    pub series_fired: usize,
    /// Firing events.
    pub firings: usize,
    pub series_hours: f64,
}

impl Quality {
    pub fn per_1000_series_hours(&self) -> f64 {
        self.firings as f64 * 1000.0 / self.series_hours
    }
}

/// A small, fast generator (xorshift64*): the simulation needs volume, not cryptography.
struct Rng(u64);

impl Rng {
    fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_f491_4f6c_dd1d);
        ((x >> 11) as f64 + 0.5) / (1u64 << 53) as f64
    }

    fn normal(&mut self) -> f64 {
        (-2.0 * self.uniform().ln()).sqrt() * (std::f64::consts::TAU * self.uniform()).cos()
    }

    fn binomial(&mut self, n: u32, p: f64) -> u32 {
        (0..n).filter(|_| self.uniform() < p).count() as u32
    }
}

/// One series-minute: calls, errors, empty results, latency histogram.
#[derive(Clone, Default)]
struct Minute {
    calls: u32,
    errors: u32,
    empty: u32,
    hist: Vec<i64>,
}

fn sum(minutes: &[&Minute]) -> Minute {
    let mut s = Minute::default();
    for m in minutes {
        s.calls += m.calls;
        s.errors += m.errors;
        s.empty += m.empty;
        if s.hist.len() < m.hist.len() {
            s.hist.resize(m.hist.len(), 0);
        }
        for (b, c) in m.hist.iter().enumerate() {
            s.hist[b] += c;
        }
    }
    s
}

/// Runs `rule` (an `error_rate`, `empty_results` or `latency` rule) over steady traffic; `None`
/// for other kinds (they read raw rows, not per-series rates).
pub fn steady(rule: &Rule, traffic: &Steady, seed: u64) -> Option<Quality> {
    simulate(rule, traffic, None, seed).map(|s| s.steady)
}

/// [`steady`] with incident series beside the steady ones.
pub fn simulate(
    rule: &Rule,
    traffic: &Steady,
    incident: Option<&Incident>,
    seed: u64,
) -> Option<Simulated> {
    let window = (rule.window.as_secs() / 60).max(1) as usize;
    let needs_hist = matches!(rule.kind, Kind::Latency(_));
    if !matches!(
        rule.kind,
        Kind::Latency(_) | Kind::EmptyResults(_) | Kind::ErrorRate(_)
    ) {
        return None;
    }
    // The baseline is the window before (on steady traffic a week-old one is its twin).
    let keep = 2 * window;
    let mut rng = Rng(seed | 1);
    let incident_series = incident.map_or(0, |i| i.series);
    let total = traffic.series + incident_series;
    let mut history: Vec<VecDeque<Minute>> = vec![VecDeque::with_capacity(keep + 1); total];
    let mut alerts = Alerts::default();
    let mut changed = Vec::new();
    let mut fired: HashMap<usize, usize> = HashMap::new();
    let mut first_fire: HashMap<usize, usize> = HashMap::new();
    let z = rule.confidence.map_or(0.0, z_of);
    let warm_up = keep;
    for minute in 0..warm_up + traffic.minutes {
        for (i, h) in history.iter_mut().enumerate() {
            let n = traffic.calls_per_min;
            let (error_rate, empty_rate, median_ms) = match incident {
                Some(inc) if i >= traffic.series && minute >= warm_up + inc.onset => {
                    (inc.error_rate, inc.empty_rate, inc.median_ms)
                }
                _ => (traffic.error_rate, traffic.empty_rate, traffic.median_ms),
            };
            let mut m = Minute {
                calls: n,
                errors: rng.binomial(n, error_rate),
                empty: rng.binomial(n, empty_rate),
                hist: Vec::new(),
            };
            if needs_hist {
                for _ in 0..n {
                    let ms = median_ms * (traffic.latency_sigma * rng.normal()).exp();
                    let b = latency_bucket((ms * 1000.0) as i64);
                    if m.hist.len() <= b {
                        m.hist.resize(b + 1, 0);
                    }
                    m.hist[b] += 1;
                }
            }
            h.push_back(m);
            if h.len() > keep {
                h.pop_front();
            }
        }
        if minute < warm_up {
            continue;
        }
        let obs: Vec<Observation> = history
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let all: Vec<&Minute> = h.iter().collect();
                let (base, cur) = all.split_at(all.len() - window);
                let cur = sum(cur);
                let base = sum(base);
                let n = i64::from(cur.calls);
                let (value, baseline, extra) = match &rule.kind {
                    Kind::ErrorRate(_) => (f64::from(cur.errors) / n as f64, None, None),
                    Kind::EmptyResults(_) => (
                        f64::from(cur.empty) / n as f64,
                        Some(f64::from(base.empty) / f64::from(base.calls.max(1))),
                        None,
                    ),
                    Kind::Latency(l) => (
                        hist_quantile(&cur.hist, l.quantile).unwrap_or(f64::NAN),
                        hist_quantile(
                            &base.hist,
                            quantile_upper_rank(l.quantile, z, i64::from(base.calls)),
                        ),
                        hist_quantile(&cur.hist, quantile_lower_rank(l.quantile, z, n)),
                    ),
                    _ => unreachable!("other kinds returned above"),
                };
                Observation {
                    labels: [
                        ("service".to_owned(), "s".to_owned()),
                        ("side".to_owned(), "server".to_owned()),
                        ("tool".to_owned(), i.to_string()),
                    ]
                    .into(),
                    value,
                    samples: n,
                    baseline,
                    extra,
                }
            })
            .collect();
        for n in apply(
            rule,
            "g",
            &obs,
            &mut alerts,
            minute as i64 * 60_000,
            &mut changed,
        ) {
            if matches!(n.event, Event::Firing { .. }) {
                let i: usize = n.labels["tool"].parse().unwrap_or(usize::MAX);
                *fired.entry(i).or_default() += 1;
                first_fire.entry(i).or_insert(minute);
            }
        }
        changed.clear();
    }
    let steady_fired: Vec<usize> = fired
        .iter()
        .filter(|(i, _)| **i < traffic.series)
        .map(|(_, n)| *n)
        .collect();
    let onset = warm_up + incident.map_or(0, |i| i.onset);
    Some(Simulated {
        steady: Quality {
            series_fired: steady_fired.len(),
            firings: steady_fired.iter().sum(),
            series_hours: traffic.series as f64 * traffic.minutes as f64 / 60.0,
        },
        incident_fired_after: (traffic.series..total)
            .map(|i| first_fire.get(&i).map(|m| *m as i64 - onset as i64))
            .collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default rules on low traffic, as the README states: under one false page per 1,000
    /// series-hours for every rate and latency rule.
    #[test]
    fn the_default_rules_stay_quiet_on_steady_low_traffic() {
        let f =
            super::super::rules::parse("default.yaml", include_str!("../../alerts/default.yaml"))
                .unwrap();
        // 5,000 series-hours: enough for "under 1 per 1,000" to mean something.
        let traffic = Steady::default();
        for r in f.groups.iter().flat_map(|g| &g.rules) {
            if let Some(q) = steady(r, &traffic, 7) {
                assert!(
                    q.per_1000_series_hours() < 1.0,
                    "{}: {q:?} ({:.2} per 1,000 series-hours)",
                    r.alert,
                    q.per_1000_series_hours()
                );
            }
        }
    }
}
