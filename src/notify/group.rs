//! Pure aggregation groups: alerts join a group as they change; the group is sent after
//! `group_wait`, changes are batched per `group_interval`, an unchanged firing group is resent
//! every `repeat_interval`. Time is passed in; nothing here does I/O.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::route::Timing;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Firing,
    Resolved,
}

/// One alert as a group holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupAlert {
    pub fingerprint: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    pub status: Status,
    pub starts_at: DateTime<Utc>,
    pub ends_at: Option<DateTime<Utc>>,
    pub value: Option<f64>,
    pub threshold: Option<f64>,
    /// The status last sent to the receiver (none: never sent).
    #[serde(default)]
    pub notified: Option<Status>,
}

/// A group's persisted state.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Group {
    pub labels: BTreeMap<String, String>,
    pub alerts: BTreeMap<String, GroupAlert>,
    pub flush_at: Option<DateTime<Utc>>,
    pub last_sent_at: Option<DateTime<Utc>>,
    /// The timing of the route the group was last updated through.
    #[serde(default)]
    pub timing: Option<Timing>,
}

fn add(t: DateTime<Utc>, d: std::time::Duration) -> DateTime<Utc> {
    t + chrono::Duration::from_std(d).unwrap_or(chrono::Duration::MAX)
}

impl Group {
    /// An alert changed (fired or resolved): schedule the group's next send.
    pub(crate) fn update(&mut self, mut alert: GroupAlert, timing: &Timing, now: DateTime<Utc>) {
        self.timing = Some(*timing);
        if let Some(old) = self.alerts.get(&alert.fingerprint) {
            alert.notified = old.notified;
            if old.status == alert.status && old.notified == Some(alert.status) {
                // Nothing the receiver has not seen.
                self.alerts.insert(alert.fingerprint.clone(), alert);
                return;
            }
        }
        if alert.status == Status::Resolved && alert.notified.is_none() {
            // Resolved before it was ever sent: the receiver never hears of it.
            self.alerts.remove(&alert.fingerprint);
            return;
        }
        self.alerts.insert(alert.fingerprint.clone(), alert);
        let at = match self.last_sent_at {
            None => add(now, timing.group_wait),
            Some(sent) => add(sent, timing.group_interval).max(now),
        };
        self.flush_at = Some(self.flush_at.map_or(at, |f| f.min(at)));
    }

    /// At `now`, if the group is due: the alerts to send (silenced ones left out). The state
    /// is advanced as if the notification was sent; the caller writes it to the outbox in the
    /// same transaction that saves this state.
    pub(crate) fn flush(
        &mut self,
        timing: &Timing,
        now: DateTime<Utc>,
        silenced: impl Fn(&BTreeMap<String, String>) -> bool,
    ) -> Option<Vec<GroupAlert>> {
        if self.flush_at.is_none_or(|f| f > now) {
            return None;
        }
        self.flush_at = None;
        let keep_resolved = |a: &GroupAlert| {
            timing
                .resolved_for
                .zip(a.ends_at)
                .is_some_and(|(d, end)| add(end, d) > now)
        };
        // A silenced alert whose news the receiver has not had: its silence may expire or be
        // expired at any time, and then it goes out at the next group_interval, as in
        // Alertmanager, not after repeat_interval.
        let withheld = self
            .alerts
            .values()
            .any(|a| a.status == Status::Firing && a.notified.is_none() && silenced(&a.labels));
        let mut send: Vec<GroupAlert> = self
            .alerts
            .values()
            .filter(|a| !silenced(&a.labels))
            .filter(|a| match a.status {
                Status::Firing => true,
                Status::Resolved => {
                    timing.send_resolved && (a.notified == Some(Status::Firing) || keep_resolved(a))
                }
            })
            .cloned()
            .collect();
        // As Alertmanager's dedup stage: a flush with nothing the receiver has not heard sends
        // only once repeat_interval has passed since the last notification.
        let news = send.iter().any(|a| a.notified != Some(a.status));
        let repeat_due = self
            .last_sent_at
            .is_none_or(|t| add(t, timing.repeat_interval) <= now);
        if !news && !repeat_due {
            send.clear();
        }
        if !send.is_empty() {
            self.last_sent_at = Some(now);
            for a in &send {
                if let Some(x) = self.alerts.get_mut(&a.fingerprint) {
                    x.notified = Some(a.status);
                }
            }
        }
        // Resolved alerts leave the group once announced (or past `resolved_for`); silenced
        // ones that resolved were never announced and leave too.
        self.alerts
            .retain(|_, a| a.status == Status::Firing || keep_resolved(a));
        if !self.alerts.is_empty() {
            let repeat = match self.last_sent_at {
                Some(sent) if add(sent, timing.repeat_interval) > now => {
                    add(sent, timing.repeat_interval)
                }
                _ => add(now, timing.repeat_interval),
            };
            self.flush_at = Some(if withheld {
                repeat.min(add(now, timing.group_interval))
            } else {
                repeat
            });
        }
        (!send.is_empty()).then_some(send)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.alerts.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const T: Timing = Timing {
        group_wait: Duration::from_secs(30),
        group_interval: Duration::from_secs(300),
        repeat_interval: Duration::from_secs(3600),
        send_resolved: true,
        resolved_for: None,
    };

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap()
    }

    fn alert(fp: &str, status: Status) -> GroupAlert {
        GroupAlert {
            fingerprint: fp.into(),
            labels: [("tool".to_string(), fp.to_string())].into(),
            annotations: Default::default(),
            status,
            starts_at: at(0),
            ends_at: (status == Status::Resolved).then(|| at(0)),
            value: Some(1.0),
            threshold: Some(0.5),
            notified: None,
        }
    }

    fn fps(v: Option<Vec<GroupAlert>>) -> Vec<(String, Status)> {
        v.unwrap_or_default()
            .into_iter()
            .map(|a| (a.fingerprint, a.status))
            .collect()
    }

    #[test]
    fn group_wait_batches_then_group_interval_then_repeat() {
        let mut g = Group::default();
        let never = |_: &BTreeMap<String, String>| false;
        g.update(alert("a", Status::Firing), &T, at(0));
        g.update(alert("b", Status::Firing), &T, at(10));
        assert_eq!(g.flush(&T, at(29), never), None, "group_wait");
        assert_eq!(
            fps(g.flush(&T, at(30), never)),
            [("a".into(), Status::Firing), ("b".into(), Status::Firing)],
            "one notification for both"
        );
        // A change 1 minute later waits for group_interval (5 minutes after the last send).
        g.update(alert("c", Status::Firing), &T, at(90));
        assert_eq!(g.flush(&T, at(300), never), None);
        assert_eq!(fps(g.flush(&T, at(330), never)).len(), 3);
        // Nothing changes: resent after repeat_interval.
        assert_eq!(g.flush(&T, at(330 + 3599), never), None);
        assert_eq!(fps(g.flush(&T, at(330 + 3600), never)).len(), 3);
    }

    /// A silence that expires while its alert fires: the alert goes out at the next
    /// group_interval, as Alertmanager sends it, not after repeat_interval.
    #[test]
    fn an_alert_under_an_expiring_silence_is_sent_at_the_next_group_interval() {
        let mut g = Group::default();
        let silenced = |_: &BTreeMap<String, String>| true;
        let never = |_: &BTreeMap<String, String>| false;
        g.update(alert("a", Status::Firing), &T, at(0));
        assert_eq!(g.flush(&T, at(30), silenced), None, "silenced");
        assert_eq!(g.flush_at, Some(at(330)), "checked again at group_interval");
        assert_eq!(g.flush(&T, at(330), silenced), None, "still silenced");
        // The silence expired at 400: sent at the next group_interval, 630.
        assert_eq!(g.flush(&T, at(629), never), None);
        assert_eq!(
            fps(g.flush(&T, at(630), never)),
            [("a".into(), Status::Firing)]
        );
        assert_eq!(g.flush_at, Some(at(630 + 3600)), "then repeat_interval");
        // Beside an alert already sent, a silenced newcomer is looked at every group_interval,
        // but the one already sent is not sent again before repeat_interval.
        let only_b = |l: &BTreeMap<String, String>| l["tool"] == "b";
        g.update(alert("b", Status::Firing), &T, at(700));
        assert_eq!(g.flush(&T, at(930), only_b), None, "nothing new to say");
        assert_eq!(g.flush_at, Some(at(1230)));
        assert_eq!(
            fps(g.flush(&T, at(1230), never)),
            [("a".into(), Status::Firing), ("b".into(), Status::Firing)],
            "b's silence ended: sent at the next group_interval"
        );
        assert_eq!(g.flush_at, Some(at(1230 + 3600)));
        // Still silenced after it was sent once: nothing new is withheld, repeat_interval.
        assert_eq!(g.flush(&T, at(1230 + 3600), silenced), None);
        assert_eq!(g.flush_at, Some(at(1230 + 7200)));
    }

    #[test]
    fn resolved_is_sent_once_then_the_alert_leaves() {
        let mut g = Group::default();
        let never = |_: &BTreeMap<String, String>| false;
        g.update(alert("a", Status::Firing), &T, at(0));
        g.flush(&T, at(30), never).unwrap();
        g.update(alert("a", Status::Resolved), &T, at(60));
        assert_eq!(
            fps(g.flush(&T, at(330), never)),
            [("a".into(), Status::Resolved)]
        );
        assert!(g.is_empty());
        assert_eq!(g.flush_at, None);
        // Fired and resolved within group_wait: never sent at all.
        let mut h = Group::default();
        h.update(alert("x", Status::Firing), &T, at(0));
        h.update(alert("x", Status::Resolved), &T, at(5));
        assert!(h.is_empty());
    }

    #[test]
    fn silenced_alerts_are_left_out() {
        let mut g = Group::default();
        g.update(alert("a", Status::Firing), &T, at(0));
        g.update(alert("b", Status::Firing), &T, at(0));
        let sent = g.flush(&T, at(30), |l| l["tool"] == "a");
        assert_eq!(fps(sent), [("b".into(), Status::Firing)]);
        let mut all = Group::default();
        all.update(alert("a", Status::Firing), &T, at(0));
        assert_eq!(all.flush(&T, at(30), |_| true), None);
        assert!(all.flush_at.is_some(), "checked again later");
    }

    #[test]
    fn alertmanager_timing_keeps_resending_resolved_for_a_while() {
        let am = Timing {
            group_wait: Duration::ZERO,
            group_interval: Duration::ZERO,
            repeat_interval: Duration::from_secs(60),
            send_resolved: true,
            resolved_for: Some(Duration::from_secs(900)),
        };
        let never = |_: &BTreeMap<String, String>| false;
        let mut g = Group::default();
        g.update(alert("a", Status::Firing), &am, at(0));
        assert_eq!(fps(g.flush(&am, at(0), never)).len(), 1);
        let mut r = alert("a", Status::Resolved);
        r.ends_at = Some(at(100));
        g.update(r, &am, at(100));
        assert_eq!(
            fps(g.flush(&am, at(100), never)),
            [("a".into(), Status::Resolved)]
        );
        assert_eq!(fps(g.flush(&am, at(160), never)).len(), 1, "resent");
        assert_eq!(g.flush(&am, at(1000), never), None);
        assert!(g.is_empty(), "gone after resolved_for");
    }
}
