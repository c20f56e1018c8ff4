//! Pure rule evaluation: a rule's observations at `now` → state transitions and events.
//! The live loop, and any replay of history, run this same code.

use std::collections::{BTreeMap, HashMap};

use super::rules::{self, Baseline, Kind, Rule};
use super::state::{self, AlertState, Event, Phase, Signal, Timing};
use crate::store::alerts::Observation;

/// The alerts being tracked, by (alert name, key).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Alerts {
    pub map: HashMap<(String, String), Tracked>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Tracked {
    pub group: String,
    /// The key labels.
    pub labels: BTreeMap<String, String>,
    pub state: AlertState,
}

/// A notification-worthy transition.
#[derive(Debug, Clone, PartialEq)]
pub struct Notice {
    pub alert: String,
    pub key: String,
    /// `alertname`, the key labels and the rule's labels.
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub event: Event,
    pub value: Option<f64>,
    /// The threshold the value was judged against (none when the key stopped reporting).
    pub threshold: Option<f64>,
}

/// The canonical key of a label set: `name=value,…` in name order.
pub fn key_of(labels: &BTreeMap<String, String>) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// The signal of one observation, and the threshold it was judged against (for annotations).
pub fn signal(rule: &Rule, o: &Observation, firing: bool) -> (Signal, f64) {
    let min = rule.min_samples;
    let n = o.samples.max(0) as u64;
    match &rule.kind {
        Kind::ErrorRate(t) => (
            state::above(o.value, n, min, t.fire_above, t.clear(), firing),
            t.fire_above,
        ),
        Kind::Latency(l) => {
            if n < min {
                return (Signal::NoData, 0.0);
            }
            let mut sig = Signal::Clear;
            let mut threshold = f64::NAN;
            if let Some(above) = l.above {
                let ms = above.as_secs_f64() * 1000.0;
                threshold = ms;
                sig = state::above(o.value, n, min, ms, ms, firing);
            }
            if let (Some(r), Some(base)) = (&l.regression, o.baseline) {
                let fire_at =
                    (base * r.fire_ratio).max(base + r.min_increase.as_secs_f64() * 1000.0);
                let clear_at = base * r.clear_ratio.unwrap_or(r.fire_ratio);
                let reg = state::above(o.value, n, min, fire_at, clear_at, firing);
                if threshold.is_nan()
                    || reg == Signal::Fire
                    || (reg == Signal::Hold && sig != Signal::Fire)
                {
                    threshold = fire_at;
                }
                sig = strongest(sig, reg);
            }
            (sig, if threshold.is_nan() { 0.0 } else { threshold })
        }
        Kind::EmptyResults(e) => {
            // A tool whose baseline is mostly empty anyway does not page.
            if let (Some(limit), Some(base)) = (e.baseline_below, o.baseline)
                && base >= limit
                && !firing
            {
                return (Signal::Clear, e.fire_above);
            }
            (
                state::above(
                    o.value,
                    n,
                    min,
                    e.fire_above,
                    e.clear_below.unwrap_or(e.fire_above),
                    firing,
                ),
                e.fire_above,
            )
        }
        Kind::RetryLoop(r) => {
            let t = r.min_repeats as f64;
            (
                state::above(o.value, n, min.min(r.min_repeats), t - 0.5, t - 0.5, firing),
                t,
            )
        }
        Kind::TokenBurn(t) => {
            let by_median = t
                .ratio_to_median
                .zip(o.extra)
                .filter(|_| n >= min)
                .map(|(r, m)| r * m);
            let limit = match (by_median, t.budget) {
                (Some(a), Some(b)) => a.min(b as f64),
                (Some(a), None) => a,
                (None, Some(b)) => b as f64,
                (None, None) => return (Signal::NoData, 0.0),
            };
            (
                if o.value > limit {
                    Signal::Fire
                } else {
                    Signal::Clear
                },
                limit,
            )
        }
        Kind::RateLimitHeadroom(h) => {
            let headroom = state::below(
                o.value,
                n,
                min,
                h.remaining_below,
                h.clear_at.unwrap_or(h.remaining_below),
                firing,
            );
            let throttled = match (h.rate_limited_above, o.extra) {
                (Some(limit), Some(share)) => state::above(share, n, min, limit, limit, firing),
                _ => Signal::Clear,
            };
            (strongest(headroom, throttled), h.remaining_below)
        }
    }
}

/// An observation judged: its signal, and the value and threshold that decided it, worded.
#[derive(Debug, Clone, PartialEq)]
pub struct Judged {
    pub signal: Signal,
    pub value: f64,
    pub threshold: f64,
    /// What fired and why, for `{{ $reason }}`.
    pub reason: String,
}

/// [`signal`], with the value and threshold of the condition that decided it. A rule with two
/// conditions (rate-limit headroom, or the share of 429s) reports the one that fired: a 429
/// storm without rate-limit headers is "answered 429 to 30% of calls (pages above 5%)", not
/// "NaN of its rate limit left".
pub fn judge(rule: &Rule, o: &Observation, firing: bool) -> Judged {
    let (sig, threshold) = signal(rule, o, firing);
    if let Kind::RateLimitHeadroom(h) = &rule.kind {
        let n = o.samples.max(0) as u64;
        let headroom = state::below(
            o.value,
            n,
            rule.min_samples,
            h.remaining_below,
            h.clear_at.unwrap_or(h.remaining_below),
            firing,
        );
        let decided_by_429s = !matches!(headroom, Signal::Fire | Signal::Hold)
            && matches!(sig, Signal::Fire | Signal::Hold);
        if let (true, Some(limit), Some(share)) = (decided_by_429s, h.rate_limited_above, o.extra) {
            return Judged {
                signal: sig,
                value: share,
                threshold: limit,
                reason: format!(
                    "answered 429 to {} of calls (pages above {})",
                    percent(share),
                    percent(limit)
                ),
            };
        }
        let reason = if o.value.is_finite() {
            format!(
                "has {} of its rate limit left (pages below {})",
                percent(o.value),
                percent(threshold)
            )
        } else {
            "sends no rate-limit headers".to_owned()
        };
        return Judged {
            signal: sig,
            value: o.value,
            threshold,
            reason,
        };
    }
    if let Kind::RetryLoop(_) = &rule.kind {
        let tool = o.labels.get("tool").map_or("the tool", String::as_str);
        let times = rules::format_value(o.value);
        return Judged {
            signal: sig,
            value: o.value,
            threshold,
            reason: if o.extra == Some(0.0) {
                format!(
                    "got {times} failed or empty results from {tool} (its arguments are not captured)"
                )
            } else {
                format!("called {tool} {times} times with the same arguments")
            },
        };
    }
    Judged {
        signal: sig,
        value: o.value,
        threshold,
        reason: format!(
            "{} (threshold {})",
            rules::format_value(o.value),
            rules::format_value(threshold)
        ),
    }
}

fn percent(ratio: f64) -> String {
    let p = ratio * 100.0;
    if p.fract() == 0.0 || p >= 10.0 {
        format!("{p:.0}%")
    } else {
        format!("{p:.1}%")
    }
}

fn strongest(a: Signal, b: Signal) -> Signal {
    use Signal::*;
    match (a, b) {
        (Fire, _) | (_, Fire) => Fire,
        (Hold, _) | (_, Hold) => Hold,
        (Clear, _) | (_, Clear) => Clear,
        _ => NoData,
    }
}

/// The baseline window's end for a rule evaluated over the window ending at `now_ms`. Rollups
/// are per minute and the current window starts at the minute holding `now - window`, so the
/// previous window ends there: the two never share a minute (an incident's first minute must not
/// leak into its own baseline).
pub fn baseline_end_ms(baseline: Baseline, now_ms: i64, window_ms: i64) -> i64 {
    match baseline {
        Baseline::PreviousWindow | Baseline::Both => {
            (now_ms - window_ms).div_euclid(60_000) * 60_000
        }
        Baseline::WeekAgo => now_ms - 7 * 24 * 3_600_000,
    }
}

/// Applies one rule's observations at `now_ms`. Keys tracked but not observed get `NoData`
/// (traffic stopped), so a firing alert resolves instead of firing forever. Returns the
/// notices; `changed` collects the keys whose state changed (to persist).
pub fn apply(
    rule: &Rule,
    group: &str,
    observations: &[Observation],
    alerts: &mut Alerts,
    now_ms: i64,
    changed: &mut Vec<(String, String)>,
) -> Vec<Notice> {
    let timing = Timing {
        for_: rule.for_,
        keep_firing_for: rule.keep_firing_for,
    };
    let mut notices = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for o in observations.iter().filter(|o| {
        rule.matchers
            .iter()
            .all(|(k, v)| o.labels.get(k) == Some(v))
    }) {
        let key = key_of(&o.labels);
        seen.insert(key.clone());
        let entry = alerts
            .map
            .entry((rule.alert.clone(), key.clone()))
            .or_insert_with(|| Tracked {
                group: group.to_owned(),
                labels: o.labels.clone(),
                state: AlertState::default(),
            });
        let judged = judge(rule, o, entry.state.phase == Phase::Firing);
        let value = Some(judged.value).filter(|v| v.is_finite());
        let before = entry.state.clone();
        let event = entry.state.step(judged.signal, value, now_ms, timing);
        if entry.state != before {
            changed.push((rule.alert.clone(), key.clone()));
        }
        if let Some(event) = event {
            notices.push(notice(
                rule,
                &key,
                &entry.labels,
                event,
                value,
                Some(judged.threshold),
                &judged.reason,
            ));
        }
    }
    let unseen: Vec<String> = alerts
        .map
        .keys()
        .filter(|(a, k)| *a == rule.alert && !seen.contains(k))
        .map(|(_, k)| k.clone())
        .collect();
    for key in unseen {
        let Some(entry) = alerts.map.get_mut(&(rule.alert.clone(), key.clone())) else {
            continue;
        };
        let before = entry.state.clone();
        let event = entry.state.step(Signal::NoData, None, now_ms, timing);
        if entry.state != before {
            changed.push((rule.alert.clone(), key.clone()));
        }
        if let Some(event) = event {
            let value = entry.state.value;
            notices.push(notice(
                rule,
                &key,
                &entry.labels,
                event,
                value,
                None,
                "stopped reporting",
            ));
        }
        // Forget keys that are long resolved and quiet: memory does not grow with key churn.
        if entry.state.phase == Phase::Inactive
            || (entry.state.phase == Phase::Resolved
                && entry
                    .state
                    .resolved_at_ms
                    .is_some_and(|r| now_ms - r > 3_600_000))
        {
            alerts.map.remove(&(rule.alert.clone(), key.clone()));
            changed.push((rule.alert.clone(), key));
        }
    }
    notices
}

fn notice(
    rule: &Rule,
    key: &str,
    key_labels: &BTreeMap<String, String>,
    event: Event,
    value: Option<f64>,
    threshold: Option<f64>,
    reason: &str,
) -> Notice {
    let mut labels = key_labels.clone();
    labels.extend(rule.labels.clone());
    labels.insert("alertname".into(), rule.alert.clone());
    let annotations = rule
        .annotations
        .iter()
        .map(|(k, t)| {
            (
                k.clone(),
                rules::render(
                    t,
                    &labels,
                    value.unwrap_or(f64::NAN),
                    threshold.unwrap_or(0.0),
                    reason,
                ),
            )
        })
        .collect();
    Notice {
        alert: rule.alert.clone(),
        key: key.to_owned(),
        labels,
        annotations,
        event,
        value,
        threshold,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evaluate::rules::parse;

    fn rule(yaml: &str) -> Rule {
        let text = format!("groups:\n  - name: g\n    interval: 1m\n    rules:\n{yaml}");
        parse("t.yaml", &text)
            .unwrap_or_else(|p| panic!("{p:?}"))
            .groups
            .remove(0)
            .rules
            .remove(0)
    }

    fn obs(tool: &str, value: f64, samples: i64, baseline: Option<f64>) -> Observation {
        Observation {
            labels: [("service", "s"), ("side", "server"), ("tool", tool)]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            value,
            samples,
            baseline,
            extra: None,
        }
    }

    const MIN: i64 = 60_000;

    /// 429s from an upstream that sends no rate-limit headers: the alert says it fired on the
    /// 429 share, with that share and its threshold, never "NaN of its rate limit left".
    #[test]
    fn rate_limit_alerts_say_which_condition_fired() {
        let r = rule(
            "      - alert: RL\n        kind: rate_limit_headroom\n        window: 5m\n        remaining_below: 0.1\n        clear_at: 0.2\n        rate_limited_above: 0.05\n        min_samples: 5\n        annotations: {summary: '{{ $labels.upstream }} {{ $reason }}: {{ $value }} vs {{ $threshold }}'}\n",
        );
        let upstream = |headroom: f64, share: f64| Observation {
            labels: [("service", "s"), ("upstream", "api.example.com")]
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            value: headroom,
            samples: 50,
            baseline: None,
            extra: Some(share),
        };
        let mut alerts = Alerts::default();
        let mut changed = Vec::new();
        let fired = apply(
            &r,
            "g",
            &[upstream(f64::NAN, 0.3)],
            &mut alerts,
            0,
            &mut changed,
        );
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].value, Some(0.3));
        assert_eq!(fired[0].threshold, Some(0.05));
        assert_eq!(
            fired[0].annotations["summary"],
            "api.example.com answered 429 to 30% of calls (pages above 5%): 0.300 vs 0.050"
        );
        // Fired by headroom: the headroom and its threshold.
        let mut alerts = Alerts::default();
        let fired = apply(
            &r,
            "g",
            &[upstream(0.04, 0.0)],
            &mut alerts,
            0,
            &mut changed,
        );
        assert_eq!(
            (fired[0].value, fired[0].threshold),
            (Some(0.04), Some(0.1))
        );
        assert_eq!(
            fired[0].annotations["summary"],
            "api.example.com has 4% of its rate limit left (pages below 10%): 0.040 vs 0.100"
        );
    }

    #[test]
    fn error_rate_fires_after_for_and_resolves_with_hysteresis() {
        let r = rule(
            "      - alert: Err\n        kind: error_rate\n        window: 5m\n        fire_above: 0.05\n        clear_below: 0.03\n        for: 2m\n        labels: {severity: critical}\n        annotations: {summary: '{{ $labels.tool }} fails {{ $value }}'}\n",
        );
        let mut alerts = Alerts::default();
        let mut changed = Vec::new();
        let mut at = |m: i64, v: f64, n: i64| {
            apply(
                &r,
                "g",
                &[obs("search", v, n, None)],
                &mut alerts,
                m * MIN,
                &mut changed,
            )
        };
        assert!(at(0, 0.2, 100).is_empty(), "pending");
        assert!(at(1, 0.2, 100).is_empty(), "still pending");
        let fired = at(2, 0.2, 100);
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].labels["alertname"], "Err");
        assert_eq!(fired[0].labels["severity"], "critical");
        assert_eq!(fired[0].annotations["summary"], "search fails 0.200");
        assert!(matches!(fired[0].event, Event::Firing { since_ms: 0, .. }));
        assert!(
            at(3, 0.04, 100).is_empty(),
            "between clear and fire: stays firing"
        );
        let resolved = at(4, 0.02, 100);
        assert!(matches!(resolved[0].event, Event::Resolved { .. }));
    }

    #[test]
    fn low_traffic_never_fires() {
        let r = rule(
            "      - alert: Err\n        kind: error_rate\n        window: 5m\n        fire_above: 0.05\n        min_samples: 20\n",
        );
        let mut alerts = Alerts::default();
        let mut changed = Vec::new();
        for m in 0..10 {
            // 1 error in 2 calls: 50%, but only 2 samples.
            assert!(
                apply(
                    &r,
                    "g",
                    &[obs("t", 0.5, 2, None)],
                    &mut alerts,
                    m * MIN,
                    &mut changed
                )
                .is_empty()
            );
        }
    }

    #[test]
    fn latency_regression_needs_ratio_and_absolute_increase() {
        let r = rule(
            "      - alert: Slow\n        kind: latency\n        window: 10m\n        regression: {fire_ratio: 1.5, clear_ratio: 1.2, min_increase: 200ms}\n        min_samples: 10\n",
        );
        let sig = |v: f64, b: f64, firing: bool| signal(&r, &obs("t", v, 50, Some(b)), firing).0;
        assert_eq!(sig(30.0, 10.0, false), Signal::Clear, "×3 but only +20 ms");
        assert_eq!(sig(2000.0, 200.0, false), Signal::Fire, "200 ms → 2 s");
        assert_eq!(
            sig(290.0, 200.0, false),
            Signal::Clear,
            "+45%: below ×1.5 and +200 ms"
        );
        assert_eq!(sig(450.0, 200.0, false), Signal::Fire);
        assert_eq!(
            sig(260.0, 200.0, true),
            Signal::Hold,
            "+30% while firing: above the ×1.2 clear ratio"
        );
        assert_eq!(sig(230.0, 200.0, true), Signal::Clear);
        assert_eq!(
            signal(&r, &obs("t", 2000.0, 50, None), false).0,
            Signal::Clear,
            "no baseline, no regression"
        );
    }

    #[test]
    fn traffic_stopping_resolves_a_firing_alert_and_keys_are_forgotten() {
        let r = rule(
            "      - alert: Err\n        kind: error_rate\n        window: 5m\n        fire_above: 0.05\n        min_samples: 1\n",
        );
        let mut alerts = Alerts::default();
        let mut changed = Vec::new();
        assert_eq!(
            apply(
                &r,
                "g",
                &[obs("t", 1.0, 10, None)],
                &mut alerts,
                0,
                &mut changed
            )
            .len(),
            1
        );
        let resolved = apply(&r, "g", &[], &mut alerts, MIN, &mut changed);
        assert!(matches!(resolved[0].event, Event::Resolved { .. }));
        apply(&r, "g", &[], &mut alerts, 90 * MIN, &mut changed);
        assert!(alerts.map.is_empty(), "{alerts:?}");
    }

    #[test]
    fn the_previous_window_never_shares_a_minute_with_the_current_one() {
        // Current window at 14:15:10 over 1m covers the minutes 14:14 and 14:15; the baseline
        // must end at 14:14:00, not 14:14:10 (which would take in the 14:14 minute again).
        let at = |h: i64, m: i64, s: i64| ((h * 60 + m) * 60 + s) * 1000;
        assert_eq!(
            baseline_end_ms(Baseline::PreviousWindow, at(14, 15, 10), 60_000),
            at(14, 14, 0)
        );
        assert_eq!(
            baseline_end_ms(Baseline::PreviousWindow, at(14, 15, 0), 600_000),
            at(14, 5, 0)
        );
    }

    #[test]
    fn matchers_select_keys() {
        let r = rule(
            "      - alert: Err\n        kind: error_rate\n        window: 5m\n        fire_above: 0.05\n        min_samples: 1\n        match: {tool: search}\n",
        );
        let mut alerts = Alerts::default();
        let mut changed = Vec::new();
        let fired = apply(
            &r,
            "g",
            &[obs("search", 1.0, 10, None), obs("other", 1.0, 10, None)],
            &mut alerts,
            0,
            &mut changed,
        );
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].labels["tool"], "search");
    }
}
