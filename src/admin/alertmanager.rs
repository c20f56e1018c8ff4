//! The Alertmanager API v2 surface that `amtool`, Grafana's Alertmanager data source and Karma
//! use: status, alerts (with filters), alert groups, and silences, in Alertmanager's shapes.
//! Alerts are toolsight's firing alerts (pending ones are not sent to an Alertmanager either);
//! a silenced one is `suppressed`. Silence ids are toolsight's, as strings.

use std::collections::BTreeMap;

use axum::extract::{Path, RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::{AdminState, active_alerts, error, store_error};
use crate::notify::route::{Matcher, Op, Routes, all_match};
use crate::store;

/// `GET /api/v2/status`.
pub(super) async fn status(State(s): State<AdminState>) -> Response {
    axum::Json(json!({
        "cluster": {"name": "toolsight", "peers": [], "status": "disabled"},
        "config": {"original": ""},
        "uptime": s.started,
        "versionInfo": {
            "branch": "", "buildDate": "", "buildUser": "", "goVersion": "",
            "revision": "", "version": env!("CARGO_PKG_VERSION"),
        },
    }))
    .into_response()
}

/// The query parameters Alertmanager's alert listings take.
struct AlertQuery {
    filter: Vec<Matcher>,
    silenced: bool,
    active: bool,
    receiver: Option<regex::Regex>,
}

fn parse_bool(name: &str, v: &str) -> Result<bool, String> {
    v.parse()
        .map_err(|_| format!("{name}={v:?}: expected true or false"))
}

/// `filter` matchers as Alertmanager writes them: `name="value"`, `name=~"re"`, also several
/// in braces (`{a="x",b!="y"}`).
fn parse_filter(v: &str) -> Result<Vec<Matcher>, String> {
    let inner = v.trim();
    let inner = inner
        .strip_prefix('{')
        .and_then(|i| i.strip_suffix('}'))
        .unwrap_or(inner);
    split_matchers(inner)
        .into_iter()
        .filter(|m| !m.trim().is_empty())
        .map(|m| m.parse::<Matcher>())
        .collect()
}

/// Splits on commas outside double quotes.
fn split_matchers(s: &str) -> Vec<&str> {
    let (mut out, mut start, mut quoted, mut escaped) = (Vec::new(), 0, false, false);
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&s[start..]);
    out
}

impl AlertQuery {
    fn parse(raw: Option<&str>) -> Result<AlertQuery, String> {
        let mut q = AlertQuery {
            filter: Vec::new(),
            silenced: true,
            active: true,
            receiver: None,
        };
        for (k, v) in url::form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
            match k.as_ref() {
                "filter" => q.filter.extend(parse_filter(&v)?),
                "silenced" => q.silenced = parse_bool("silenced", &v)?,
                "active" => q.active = parse_bool("active", &v)?,
                // toolsight has no inhibition and processes every alert at once.
                "inhibited" | "unprocessed" => {
                    parse_bool(&k, &v)?;
                }
                "receiver" => {
                    q.receiver = Some(
                        regex::Regex::new(&format!("^(?:{v})$"))
                            .map_err(|e| format!("receiver={v:?}: {e}"))?,
                    )
                }
                _ => {}
            }
        }
        Ok(q)
    }
}

/// A label set's fingerprint: 16 hex digits of FNV-1a over the sorted labels.
fn fingerprint(labels: &BTreeMap<String, String>) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (k, v) in labels {
        for b in k.bytes().chain([0xff]).chain(v.bytes()).chain([0xff]) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    format!("{h:016x}")
}

/// One firing alert in Alertmanager's `gettableAlert` shape, with the receivers its labels
/// route to.
fn gettable(a: &super::ActiveAlert, routes: &Routes, now: DateTime<Utc>) -> (Value, Vec<String>) {
    let receivers: Vec<String> = routes
        .of(&a.labels)
        .into_iter()
        .map(|r| r.receiver.clone())
        .collect();
    let state = if a.silenced_by.is_empty() {
        "active"
    } else {
        "suppressed"
    };
    let starts = a.fired_at.or(a.active_since).unwrap_or(now);
    let value = json!({
        "labels": a.labels,
        "annotations": a.annotations,
        "startsAt": starts,
        // Renewed on every listing while it fires, as a Prometheus resends it.
        "endsAt": now + chrono::Duration::minutes(5),
        "updatedAt": now,
        "generatorURL": "",
        "fingerprint": fingerprint(&a.labels),
        "receivers": receivers.iter().map(|r| json!({"name": r})).collect::<Vec<_>>(),
        "status": {
            "state": state,
            "silencedBy": a.silenced_by.iter().map(i64::to_string).collect::<Vec<_>>(),
            "inhibitedBy": [],
            "mutedBy": [],
        },
    });
    (value, receivers)
}

/// The firing alerts the query selects, each with its receivers.
async fn selected(
    s: &AdminState,
    raw: Option<&str>,
) -> Result<Vec<(Value, Vec<String>)>, Response> {
    let q = AlertQuery::parse(raw).map_err(|e| error(StatusCode::BAD_REQUEST, e))?;
    let now = Utc::now();
    let routes = Routes::new(&s.notify);
    let alerts = active_alerts(s, now).await?;
    Ok(alerts
        .iter()
        .filter(|a| a.state == "firing")
        .filter(|a| all_match(&q.filter, &a.labels))
        .filter(|a| {
            let silenced = !a.silenced_by.is_empty();
            (silenced && q.silenced) || (!silenced && q.active)
        })
        .map(|a| gettable(a, &routes, now))
        .filter(|(_, receivers)| {
            q.receiver
                .as_ref()
                .is_none_or(|re| receivers.iter().any(|r| re.is_match(r)))
        })
        .collect())
}

/// `GET /api/v2/alerts`.
pub(super) async fn alerts(State(s): State<AdminState>, RawQuery(raw): RawQuery) -> Response {
    match selected(&s, raw.as_deref()).await {
        Ok(alerts) => {
            axum::Json(alerts.into_iter().map(|(a, _)| a).collect::<Vec<_>>()).into_response()
        }
        Err(r) => r,
    }
}

/// `GET /api/v2/alerts/groups`: the firing alerts grouped as the notifier groups them, by
/// receiver and the route's `group_by` labels.
pub(super) async fn groups(State(s): State<AdminState>, RawQuery(raw): RawQuery) -> Response {
    let alerts = match selected(&s, raw.as_deref()).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let routes = Routes::new(&s.notify);
    let mut groups: BTreeMap<(String, BTreeMap<String, String>), Vec<Value>> = BTreeMap::new();
    for (alert, _) in alerts {
        let labels: BTreeMap<String, String> =
            serde_json::from_value(alert["labels"].clone()).unwrap_or_default();
        for route in routes.of(&labels) {
            let by: BTreeMap<String, String> = if route.per_alert {
                labels.clone()
            } else {
                route
                    .group_by
                    .iter()
                    .filter_map(|k| Some((k.clone(), labels.get(k)?.clone())))
                    .collect()
            };
            groups
                .entry((route.receiver.clone(), by))
                .or_default()
                .push(alert.clone());
        }
    }
    let out: Vec<Value> = groups
        .into_iter()
        .map(|((receiver, labels), alerts)| {
            json!({"labels": labels, "receiver": {"name": receiver}, "alerts": alerts})
        })
        .collect();
    axum::Json(out).into_response()
}

/// A matcher as Alertmanager's API carries it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiMatcher {
    pub name: String,
    pub value: String,
    pub is_regex: bool,
    /// Absent in older clients: equal.
    #[serde(default = "yes")]
    pub is_equal: bool,
}

fn yes() -> bool {
    true
}

impl ApiMatcher {
    /// The matcher as toolsight stores it (`name=value`, `name!~re`, …).
    pub fn to_text(&self) -> String {
        let op = match (self.is_regex, self.is_equal) {
            (false, true) => "=",
            (false, false) => "!=",
            (true, true) => "=~",
            (true, false) => "!~",
        };
        format!("{}{op}{}", self.name, self.value)
    }

    /// From `name=value`, `name!=value`, `name=~re` or `name!~re` (regexes checked).
    pub fn parse(text: &str) -> Result<ApiMatcher, String> {
        let m: Matcher = text.parse()?;
        Ok(ApiMatcher {
            is_regex: matches!(m.op, Op::Re | Op::NotRe),
            is_equal: matches!(m.op, Op::Eq | Op::Re),
            name: m.name,
            value: m.value,
        })
    }

    /// From a stored matcher (none when it no longer parses).
    fn from_text(text: &str) -> Option<ApiMatcher> {
        Self::parse(text).ok()
    }
}

/// `postableSilence`: a new silence, or with `id` the replacement of one.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PostableSilence {
    #[serde(default)]
    pub id: Option<String>,
    pub matchers: Vec<ApiMatcher>,
    pub starts_at: DateTime<Utc>,
    pub ends_at: DateTime<Utc>,
    pub created_by: String,
    pub comment: String,
}

fn gettable_silence(x: store::notify::Silence, now: DateTime<Utc>) -> Value {
    let view = super::SilenceView::at(x, now);
    json!({
        "id": view.id.to_string(),
        "status": {"state": view.state},
        "updatedAt": view.created_at,
        "matchers": view.matchers.iter().filter_map(|m| ApiMatcher::from_text(m)).collect::<Vec<_>>(),
        "startsAt": view.starts_at,
        "endsAt": view.ends_at,
        "createdBy": view.created_by,
        "comment": view.comment,
    })
}

/// A silence id as toolsight gives them (an integer, as text); else the 404's message.
fn silence_id(id: &str) -> Result<i64, String> {
    id.parse().map_err(|_| format!("no silence with id {id:?}"))
}

/// `GET /api/v2/silences` (with `filter` matchers: the silences holding every one of them).
pub(super) async fn list_silences(
    State(s): State<AdminState>,
    RawQuery(raw): RawQuery,
) -> Response {
    let mut filter = Vec::new();
    for (k, v) in url::form_urlencoded::parse(raw.unwrap_or_default().as_bytes()) {
        if k == "filter" {
            match parse_filter(&v) {
                Ok(m) => filter.extend(m),
                Err(e) => return error(StatusCode::BAD_REQUEST, e),
            }
        }
    }
    let now = Utc::now();
    match store::notify::silences(&s.pool, now - chrono::Duration::hours(24)).await {
        Ok(rows) => {
            let shown: Vec<Value> = rows
                .into_iter()
                // As Alertmanager: each filter matcher matches the value of one of the
                // silence's matchers of its label.
                .filter(|x| {
                    filter.iter().all(|f| {
                        x.matchers
                            .0
                            .iter()
                            .filter_map(|m| m.parse::<Matcher>().ok())
                            .any(|m| {
                                m.name == f.name
                                    && f.matches(&BTreeMap::from([(m.name.clone(), m.value)]))
                            })
                    })
                })
                .map(|x| gettable_silence(x, now))
                .collect();
            axum::Json(shown).into_response()
        }
        Err(e) => store_error(e),
    }
}

/// `GET /api/v2/silence/{id}`.
pub(super) async fn get_silence(State(s): State<AdminState>, Path(id): Path<String>) -> Response {
    let id = match silence_id(&id) {
        Ok(i) => i,
        Err(e) => return error(StatusCode::NOT_FOUND, e),
    };
    match store::notify::silence(&s.pool, id).await {
        Ok(Some(x)) => axum::Json(gettable_silence(x, Utc::now())).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no silence with id {id}")),
        Err(e) => store_error(e),
    }
}

/// `POST /api/v2/silences`: `{"silenceID": "…"}`. With `id`, the silence it names ends and
/// this one takes its place, as in Alertmanager.
pub(super) async fn post_silence(
    State(s): State<AdminState>,
    body: Result<axum::Json<PostableSilence>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let axum::Json(n) = match body {
        Ok(b) => b,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    let matchers: Vec<String> = n.matchers.iter().map(ApiMatcher::to_text).collect();
    let new = super::NewSilence {
        matchers,
        duration: None,
        starts_at: Some(n.starts_at),
        ends_at: Some(n.ends_at),
        created_by: n.created_by,
        comment: n.comment,
    };
    if let Some(old) = n.id.as_deref().filter(|i| !i.is_empty()) {
        let old = match silence_id(old) {
            Ok(i) => i,
            Err(e) => return error(StatusCode::NOT_FOUND, e),
        };
        if let Err(e) = store::notify::expire_silence(&s.pool, old).await {
            return store_error(e);
        }
    }
    match super::create_silence(&s, new).await {
        Ok(silence) => axum::Json(json!({"silenceID": silence.id.to_string()})).into_response(),
        Err(r) => r,
    }
}

/// `DELETE /api/v2/silence/{id}`: 200 when it ended now.
pub(super) async fn delete_silence(
    State(s): State<AdminState>,
    Path(id): Path<String>,
) -> Response {
    let id = match silence_id(&id) {
        Ok(i) => i,
        Err(e) => return error(StatusCode::NOT_FOUND, e),
    };
    super::expire(&s, id, StatusCode::OK).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_as_amtool_and_grafana_send_them() {
        let m = parse_filter(r#"{alertname="Loop",tool=~"se.*",service!="a,b"}"#).unwrap();
        let shown: Vec<String> = m.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["alertname=Loop", "tool=~se.*", "service!=a,b"]);
        assert_eq!(parse_filter("severity=warning").unwrap().len(), 1);
        assert!(parse_filter("no-operator").is_err());
    }

    #[test]
    fn api_matchers_round_trip_through_stored_text() {
        for (text, regex, equal) in [
            ("tool=search", false, true),
            ("tool!=search", false, false),
            ("tool=~se.*", true, true),
            ("tool!~se.*", true, false),
        ] {
            let m = ApiMatcher::from_text(text).unwrap();
            assert_eq!((m.is_regex, m.is_equal), (regex, equal), "{text}");
            assert_eq!(m.to_text(), text);
        }
    }

    #[test]
    fn fingerprints_depend_on_every_label() {
        let a: BTreeMap<String, String> = [("a".into(), "1".into())].into();
        let b: BTreeMap<String, String> = [("a".into(), "2".into())].into();
        assert_ne!(fingerprint(&a), fingerprint(&b));
        assert_eq!(fingerprint(&a).len(), 16);
        assert_eq!(fingerprint(&a), fingerprint(&a.clone()));
    }
}
