//! The alert state machine: pure, driven by the evaluation's signal and an injected `now`.
//!
//! inactive → pending (the condition holds, `for` not yet elapsed) → firing → resolved, with
//! `keep_firing_for` and hysteresis (a firing alert stays firing while its value is between the
//! clear and fire thresholds). Times are Unix milliseconds, so the state persists as plain numbers.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// What one evaluation says about one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signal {
    /// The fire condition holds.
    Fire,
    /// Between the clear and the fire threshold: a firing alert stays firing, nothing else
    /// starts or continues pending.
    Hold,
    /// The condition is clear.
    Clear,
    /// Too few samples to judge: never fires; for a firing alert it counts as clear.
    NoData,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Inactive,
    Pending,
    Firing,
    Resolved,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Inactive => "inactive",
            Phase::Pending => "pending",
            Phase::Firing => "firing",
            Phase::Resolved => "resolved",
        }
    }
}

/// One alert's state (one rule and key).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertState {
    pub phase: Phase,
    /// When the condition started holding (pending and firing alerts).
    pub active_since_ms: Option<i64>,
    /// When the alert fired.
    pub fired_at_ms: Option<i64>,
    /// The last evaluation at which a firing alert's condition still held (Fire or Hold).
    pub last_held_ms: Option<i64>,
    pub resolved_at_ms: Option<i64>,
    /// The latest evaluated value.
    pub value: Option<f64>,
}

impl Default for AlertState {
    fn default() -> Self {
        AlertState {
            phase: Phase::Inactive,
            active_since_ms: None,
            fired_at_ms: None,
            last_held_ms: None,
            resolved_at_ms: None,
            value: None,
        }
    }
}

/// What a transition tells the notifiers. Exactly one `Firing` per firing episode and one
/// `Resolved` after it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Event {
    Firing { since_ms: i64, at_ms: i64 },
    Resolved { since_ms: i64, at_ms: i64 },
}

/// The rule's timing settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Timing {
    pub for_: Duration,
    pub keep_firing_for: Duration,
}

fn ms(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

impl AlertState {
    /// Applies one evaluation at `now_ms`; returns the event it causes, if any.
    pub fn step(
        &mut self,
        signal: Signal,
        value: Option<f64>,
        now_ms: i64,
        t: Timing,
    ) -> Option<Event> {
        if value.is_some() {
            self.value = value;
        }
        match (self.phase, signal) {
            (Phase::Firing, Signal::Fire | Signal::Hold) => {
                self.last_held_ms = Some(now_ms);
                None
            }
            (Phase::Firing, Signal::Clear | Signal::NoData) => {
                let held = self.last_held_ms.unwrap_or(now_ms);
                if now_ms - held < ms(t.keep_firing_for) {
                    return None;
                }
                let since = self.active_since_ms.unwrap_or(now_ms);
                self.phase = Phase::Resolved;
                self.resolved_at_ms = Some(now_ms);
                Some(Event::Resolved {
                    since_ms: since,
                    at_ms: now_ms,
                })
            }
            (Phase::Pending, Signal::Fire) => {
                let since = self.active_since_ms.unwrap_or(now_ms);
                if now_ms - since >= ms(t.for_) {
                    self.fire(since, now_ms)
                } else {
                    None
                }
            }
            (Phase::Pending, _) => {
                *self = AlertState {
                    value: self.value,
                    ..AlertState::default()
                };
                None
            }
            (Phase::Inactive | Phase::Resolved, Signal::Fire) => {
                let value = self.value;
                *self = AlertState {
                    value,
                    ..AlertState::default()
                };
                self.active_since_ms = Some(now_ms);
                if t.for_.is_zero() {
                    self.fire(now_ms, now_ms)
                } else {
                    self.phase = Phase::Pending;
                    None
                }
            }
            (Phase::Inactive | Phase::Resolved, _) => None,
        }
    }

    fn fire(&mut self, since_ms: i64, now_ms: i64) -> Option<Event> {
        self.phase = Phase::Firing;
        self.active_since_ms = Some(since_ms);
        self.fired_at_ms = Some(now_ms);
        self.last_held_ms = Some(now_ms);
        self.resolved_at_ms = None;
        Some(Event::Firing {
            since_ms,
            at_ms: now_ms,
        })
    }
}

/// The signal of a "fire above" rule with hysteresis and a minimum sample count.
pub fn above(
    value: f64,
    samples: u64,
    min_samples: u64,
    fire_above: f64,
    clear_below: f64,
    firing: bool,
) -> Signal {
    if samples < min_samples || value.is_nan() {
        Signal::NoData
    } else if value > fire_above {
        Signal::Fire
    } else if firing && value >= clear_below {
        Signal::Hold
    } else {
        Signal::Clear
    }
}

/// The signal of a "fire below" rule (rate-limit headroom) with hysteresis.
pub fn below(
    value: f64,
    samples: u64,
    min_samples: u64,
    fire_below: f64,
    clear_at: f64,
    firing: bool,
) -> Signal {
    if samples < min_samples || value.is_nan() {
        Signal::NoData
    } else if value < fire_below {
        Signal::Fire
    } else if firing && value < clear_at {
        Signal::Hold
    } else {
        Signal::Clear
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: i64 = 60_000;

    fn timing(for_min: u64, keep_min: u64) -> Timing {
        Timing {
            for_: Duration::from_secs(for_min * 60),
            keep_firing_for: Duration::from_secs(keep_min * 60),
        }
    }

    /// Runs (minute, signal) steps; checks the phase after each and the events emitted.
    fn run(t: Timing, steps: &[(i64, Signal, Phase, Option<&str>)]) {
        let mut s = AlertState::default();
        for (i, (minute, signal, want_phase, want_event)) in steps.iter().enumerate() {
            let ev = s.step(*signal, Some(1.0), minute * MIN, t);
            let got = ev.map(|e| match e {
                Event::Firing { since_ms, .. } => format!("firing since {}", since_ms / MIN),
                Event::Resolved { since_ms, .. } => format!("resolved since {}", since_ms / MIN),
            });
            assert_eq!(
                s.phase, *want_phase,
                "step {i} (minute {minute}, {signal:?})"
            );
            assert_eq!(
                got.as_deref(),
                *want_event,
                "step {i} (minute {minute}, {signal:?})"
            );
        }
    }

    use Phase::*;
    use Signal::*;

    #[test]
    fn fires_at_once_without_for() {
        run(
            timing(0, 0),
            &[
                (0, Clear, Inactive, None),
                (1, Fire, Firing, Some("firing since 1")),
                (2, Fire, Firing, None),
                (3, Clear, Resolved, Some("resolved since 1")),
                (4, Clear, Resolved, None),
            ],
        );
    }

    #[test]
    fn pending_until_for_has_elapsed() {
        run(
            timing(5, 0),
            &[
                (0, Fire, Pending, None),
                (4, Fire, Pending, None),
                (5, Fire, Firing, Some("firing since 0")),
                (6, Fire, Firing, None),
            ],
        );
    }

    #[test]
    fn a_clear_evaluation_resets_pending() {
        run(
            timing(5, 0),
            &[
                (0, Fire, Pending, None),
                (3, Clear, Inactive, None),
                (4, Fire, Pending, None),
                (8, Fire, Pending, None),
                (9, Fire, Firing, Some("firing since 4")),
            ],
        );
    }

    #[test]
    fn hold_keeps_firing_but_does_not_start_or_continue_pending() {
        run(
            timing(2, 0),
            &[
                (0, Fire, Pending, None),
                (1, Hold, Inactive, None),
                (2, Fire, Pending, None),
                (4, Fire, Firing, Some("firing since 2")),
                (5, Hold, Firing, None),
                (6, Hold, Firing, None),
                (7, Clear, Resolved, Some("resolved since 2")),
            ],
        );
    }

    #[test]
    fn keep_firing_for_delays_the_resolve() {
        run(
            timing(0, 5),
            &[
                (0, Fire, Firing, Some("firing since 0")),
                (1, Clear, Firing, None),
                (4, Clear, Firing, None),
                (5, Fire, Firing, None),
                (9, Clear, Firing, None),
                (10, Clear, Resolved, Some("resolved since 0")),
            ],
        );
    }

    #[test]
    fn no_data_never_fires_and_resolves_a_firing_alert() {
        run(
            timing(0, 0),
            &[
                (0, NoData, Inactive, None),
                (1, Fire, Firing, Some("firing since 1")),
                (2, NoData, Resolved, Some("resolved since 1")),
                (3, NoData, Resolved, None),
                (4, Fire, Firing, Some("firing since 4")),
            ],
        );
    }

    #[test]
    fn state_round_trips_through_json_mid_episode() {
        // What the evaluator persists and restores across a restart.
        let t = timing(5, 0);
        let mut s = AlertState::default();
        s.step(Fire, Some(0.2), 0, t);
        s.step(Fire, Some(0.3), 3 * MIN, t);
        let mut restored: AlertState =
            serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(restored, s);
        assert_eq!(
            restored.step(Fire, None, 5 * MIN, t),
            Some(Event::Firing {
                since_ms: 0,
                at_ms: 5 * MIN
            })
        );
        assert_eq!(
            restored.step(Fire, None, 6 * MIN, t),
            None,
            "no duplicate firing event"
        );
        assert_eq!(restored.value, Some(0.3));
    }

    #[test]
    fn signals_honour_min_samples_and_hysteresis() {
        assert_eq!(above(0.2, 5, 20, 0.05, 0.03, false), NoData);
        assert_eq!(above(0.2, 20, 20, 0.05, 0.03, false), Fire);
        assert_eq!(above(0.04, 20, 20, 0.05, 0.03, false), Clear);
        assert_eq!(above(0.04, 20, 20, 0.05, 0.03, true), Hold);
        assert_eq!(above(0.02, 20, 20, 0.05, 0.03, true), Clear);
        assert_eq!(below(0.05, 10, 5, 0.1, 0.2, false), Fire);
        assert_eq!(below(0.15, 10, 5, 0.1, 0.2, true), Hold);
        assert_eq!(below(0.15, 10, 5, 0.1, 0.2, false), Clear);
        assert_eq!(below(0.25, 10, 5, 0.1, 0.2, true), Clear);
        assert_eq!(below(0.05, 1, 5, 0.1, 0.2, true), NoData);
    }
}
