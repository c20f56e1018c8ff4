//! Pure routing: label matchers, routes to receivers, group keys and alert fingerprints.

use std::collections::BTreeMap;
use std::time::Duration;

use sha2::Digest;

use super::config::{Notify, ReceiverConfig};

/// A label matcher: `name=value`, `name!=value`, `name=~regex`, `name!~regex` (regexes are
/// anchored, as in Alertmanager).
#[derive(Debug, Clone)]
pub(crate) struct Matcher {
    pub name: String,
    pub op: Op,
    pub value: String,
    regex: Option<regex::Regex>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Op {
    Eq,
    NotEq,
    Re,
    NotRe,
}

impl std::str::FromStr for Matcher {
    type Err = String;

    fn from_str(s: &str) -> Result<Matcher, String> {
        let ops = [
            ("=~", Op::Re),
            ("!~", Op::NotRe),
            ("!=", Op::NotEq),
            ("=", Op::Eq),
        ];
        let (at, op, len) = ops
            .iter()
            .filter_map(|(t, op)| s.find(t).map(|i| (i, *op, t.len())))
            .min_by_key(|(i, _, len)| (*i, usize::MAX - len))
            .ok_or_else(|| {
                format!(
                    "matcher {s:?}: expected name=value, name!=value, name=~regex or name!~regex"
                )
            })?;
        let name = s[..at].trim();
        let value = s[at + len..].trim().trim_matches('"');
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("matcher {s:?}: {name:?} is not a label name"));
        }
        let regex = match op {
            Op::Re | Op::NotRe => Some(
                regex::Regex::new(&format!("^(?:{value})$"))
                    .map_err(|e| format!("matcher {s:?}: {e}"))?,
            ),
            _ => None,
        };
        Ok(Matcher {
            name: name.to_owned(),
            op,
            value: value.to_owned(),
            regex,
        })
    }
}

impl std::fmt::Display for Matcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let op = match self.op {
            Op::Eq => "=",
            Op::NotEq => "!=",
            Op::Re => "=~",
            Op::NotRe => "!~",
        };
        write!(f, "{}{op}{}", self.name, self.value)
    }
}

impl Matcher {
    /// Whether the labels satisfy the matcher (a missing label is the empty string).
    pub(crate) fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let v = labels.get(&self.name).map(String::as_str).unwrap_or("");
        match self.op {
            Op::Eq => v == self.value,
            Op::NotEq => v != self.value,
            Op::Re => self.regex.as_ref().is_some_and(|r| r.is_match(v)),
            Op::NotRe => !self.regex.as_ref().is_some_and(|r| r.is_match(v)),
        }
    }
}

pub(crate) fn all_match(matchers: &[Matcher], labels: &BTreeMap<String, String>) -> bool {
    matchers.iter().all(|m| m.matches(labels))
}

/// When a group is sent: Alertmanager's `group_wait`, `group_interval`, `repeat_interval` and
/// `send_resolved`; `resolved_for` keeps resolved alerts in the group (Alertmanager pushes).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub(crate) struct Timing {
    pub group_wait: Duration,
    pub group_interval: Duration,
    pub repeat_interval: Duration,
    pub send_resolved: bool,
    pub resolved_for: Option<Duration>,
}

/// A resolved route: where an alert goes and how it is grouped.
#[derive(Debug, Clone)]
pub(crate) struct Route {
    pub receiver: String,
    matchers: Vec<Matcher>,
    /// Empty with `per_alert`: one group per alert.
    pub group_by: Vec<String>,
    pub per_alert: bool,
    pub timing: Timing,
    pub continue_matching: bool,
}

/// The routing table built from the configuration (validated beforehand).
#[derive(Debug, Clone, Default)]
pub(crate) struct Routes {
    specific: Vec<Route>,
    default: Option<Route>,
}

impl Routes {
    pub(crate) fn new(n: &Notify) -> Routes {
        let receiver_of = |name: &str| n.receivers.iter().find(|r| r.name() == name);
        let make = |receiver: &str,
                    matchers: &[String],
                    group_by: Option<&Vec<String>>,
                    wait: Option<Duration>,
                    interval: Option<Duration>,
                    repeat: Option<Duration>,
                    resolved: Option<bool>,
                    cont: bool|
         -> Option<Route> {
            let r = receiver_of(receiver)?;
            let mut route = Route {
                receiver: receiver.to_owned(),
                matchers: matchers.iter().filter_map(|m| m.parse().ok()).collect(),
                group_by: group_by.cloned().unwrap_or_else(|| n.group_by.clone()),
                per_alert: false,
                timing: Timing {
                    group_wait: wait.unwrap_or(n.group_wait),
                    group_interval: interval.unwrap_or(n.group_interval),
                    repeat_interval: repeat.unwrap_or(n.repeat_interval),
                    send_resolved: resolved.unwrap_or(n.send_resolved),
                    resolved_for: None,
                },
                continue_matching: cont,
            };
            // Alertmanager groups by itself: push each alert as it changes, resend firing
            // ones periodically and resolved ones for a while, as Prometheus does.
            if let ReceiverConfig::Alertmanager(r) = r {
                route.per_alert = true;
                route.group_by.clear();
                route.timing = Timing {
                    group_wait: Duration::ZERO,
                    group_interval: Duration::ZERO,
                    repeat_interval: r.resend_every(),
                    send_resolved: true,
                    resolved_for: Some(r.resolved_for()),
                };
            }
            Some(route)
        };
        Routes {
            specific: n
                .routes
                .iter()
                .filter_map(|r| {
                    make(
                        &r.receiver,
                        &r.matchers,
                        r.group_by.as_ref(),
                        r.group_wait,
                        r.group_interval,
                        r.repeat_interval,
                        r.send_resolved,
                        r.continue_matching,
                    )
                })
                .collect(),
            default: make(&n.receiver, &[], None, None, None, None, None, false),
        }
    }

    /// The routes an alert with these labels takes (none: it is not sent anywhere).
    pub(crate) fn of(&self, labels: &BTreeMap<String, String>) -> Vec<&Route> {
        let mut out = Vec::new();
        for r in &self.specific {
            if all_match(&r.matchers, labels) {
                out.push(r);
                if !r.continue_matching {
                    return out;
                }
            }
        }
        if out.is_empty()
            && let Some(d) = &self.default
        {
            out.push(d);
        }
        out
    }
}

/// An alert's identity: a hash of its labels (16 hex digits, like Alertmanager's).
pub(crate) fn fingerprint(labels: &BTreeMap<String, String>) -> String {
    let mut h = sha2::Sha256::new();
    for (k, v) in labels {
        h.update(k.as_bytes());
        h.update([0xff]);
        h.update(v.as_bytes());
        h.update([0xff]);
    }
    hex::encode(&h.finalize()[..8])
}

impl Route {
    /// The group an alert belongs to on this route: its key and labels.
    pub(crate) fn group_of(
        &self,
        labels: &BTreeMap<String, String>,
    ) -> (String, BTreeMap<String, String>) {
        let group_labels: BTreeMap<String, String> = if self.per_alert {
            labels.clone()
        } else {
            self.group_by
                .iter()
                .filter_map(|k| labels.get(k).map(|v| (k.clone(), v.clone())))
                .collect()
        };
        let inner = group_labels
            .iter()
            .map(|(k, v)| format!("{k}={v:?}"))
            .collect::<Vec<_>>()
            .join(",");
        (format!("{}:{{{inner}}}", self.receiver), group_labels)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::notify::config::{ReceiverConfig, RouteConfig};

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn matchers_parse_and_match() {
        let l = labels(&[("tool", "search"), ("severity", "critical")]);
        for (m, want) in [
            ("tool=search", true),
            ("tool!=search", false),
            ("severity=~crit.*|page", true),
            ("severity=~crit", false),
            ("severity!~warn.*", true),
            ("missing=", true),
            ("tool = \"search\"", true),
        ] {
            assert_eq!(m.parse::<Matcher>().unwrap().matches(&l), want, "{m}");
        }
        assert!("no operator".parse::<Matcher>().is_err());
        assert!("tool=~(".parse::<Matcher>().is_err());
        assert!("=x".parse::<Matcher>().is_err());
    }

    /// A receiver of `kind` ("webhook", "email" or "alertmanager") with what it needs.
    fn receiver(name: &str, kind: &str) -> ReceiverConfig {
        let needs = match kind {
            "webhook" => "url = \"http://127.0.0.1:1/\"",
            "alertmanager" => "urls = [\"http://127.0.0.1:9093\"]",
            _ => "",
        };
        toml::from_str(&format!("name = \"{name}\"\ntype = \"{kind}\"\n{needs}")).unwrap()
    }

    #[test]
    fn routes_first_match_continue_and_default() {
        let n = Notify {
            receivers: vec![
                receiver("ops", "webhook"),
                receiver("pager", "webhook"),
                receiver("am", "alertmanager"),
            ],
            receiver: "ops".into(),
            routes: vec![
                RouteConfig {
                    receiver: "am".into(),
                    continue_matching: true,
                    ..Default::default()
                },
                RouteConfig {
                    receiver: "pager".into(),
                    matchers: vec!["severity=critical".into()],
                    group_by: Some(vec!["alertname".into(), "service".into()]),
                    ..Default::default()
                },
            ],
            ..Default::default()
        };
        let routes = Routes::new(&n);
        let names = |l: &BTreeMap<String, String>| {
            routes
                .of(l)
                .iter()
                .map(|r| r.receiver.clone())
                .collect::<Vec<_>>()
        };
        let crit = labels(&[
            ("alertname", "A"),
            ("service", "s"),
            ("severity", "critical"),
        ]);
        assert_eq!(names(&crit), ["am", "pager"]);
        assert_eq!(names(&labels(&[("alertname", "A")])), ["am"]);
        let pager = routes.of(&crit)[1];
        assert_eq!(
            pager.group_of(&crit).0,
            "pager:{alertname=\"A\",service=\"s\"}"
        );
        let am = routes.of(&crit)[0];
        assert!(am.per_alert && am.timing.resolved_for.is_some());

        let only_default = Routes::new(&Notify {
            receivers: vec![receiver("ops", "webhook")],
            receiver: "ops".into(),
            ..Default::default()
        });
        assert_eq!(only_default.of(&crit)[0].receiver, "ops");
        assert!(Routes::new(&Notify::default()).of(&crit).is_empty());
    }

    #[test]
    fn fingerprints_depend_on_every_label() {
        let a = fingerprint(&labels(&[("a", "1"), ("b", "2")]));
        assert_eq!(a.len(), 16);
        assert_ne!(a, fingerprint(&labels(&[("a", "1"), ("b", "3")])));
        assert_ne!(
            fingerprint(&labels(&[("a", "1b"), ("", "")])),
            fingerprint(&labels(&[("a", "1"), ("b", "")]))
        );
    }
}
