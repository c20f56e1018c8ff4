//! Pure message building: the Alertmanager webhook format (version 4), emails, and alerts
//! pushed to Alertmanager's `POST /api/v2/alerts`.

use std::collections::BTreeMap;

use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Value, json};

use super::group::{GroupAlert, Status};

/// Where links point.
#[derive(Debug, Clone)]
pub struct Links {
    pub external_url: String,
    pub grafana_url: String,
}

/// Grafana dashboard uids the links open (the dashboards ship with these).
pub const TOOL_DASHBOARD: &str = "toolsight-tool";
pub const OVERVIEW_DASHBOARD: &str = "toolsight-overview";

fn enc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

impl Links {
    /// The dashboard for an alert: the tool detail filtered to its service and tool, or the
    /// overview filtered to its service for alerts not about one tool.
    pub fn dashboard(&self, labels: &BTreeMap<String, String>) -> String {
        let base = self.grafana_url.trim_end_matches('/');
        let service = labels.get("service").map(String::as_str).unwrap_or("");
        match labels.get("tool") {
            Some(tool) => format!(
                "{base}/d/{TOOL_DASHBOARD}/tool-detail?var-service={}&var-tool={}",
                enc(service),
                enc(tool)
            ),
            None => format!(
                "{base}/d/{OVERVIEW_DASHBOARD}/overview?var-service={}",
                enc(service)
            ),
        }
    }
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// Labels (or annotations) every alert has with the same value.
fn common(maps: &[&BTreeMap<String, String>]) -> BTreeMap<String, String> {
    let Some(first) = maps.first() else {
        return BTreeMap::new();
    };
    first
        .iter()
        .filter(|(k, v)| maps.iter().all(|m| m.get(*k) == Some(*v)))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

fn status(alerts: &[GroupAlert]) -> &'static str {
    if alerts.iter().any(|a| a.status == Status::Firing) {
        "firing"
    } else {
        "resolved"
    }
}

/// The Alertmanager webhook payload, version "4", so existing consumers work unchanged.
pub fn webhook(
    receiver: &str,
    group_key: &str,
    group_labels: &BTreeMap<String, String>,
    alerts: &[GroupAlert],
    max_alerts: Option<usize>,
    links: &Links,
) -> Value {
    let shown = max_alerts
        .filter(|m| *m > 0)
        .unwrap_or(usize::MAX)
        .min(alerts.len());
    let labels: Vec<&BTreeMap<String, String>> = alerts.iter().map(|a| &a.labels).collect();
    let annotations: Vec<&BTreeMap<String, String>> =
        alerts.iter().map(|a| &a.annotations).collect();
    json!({
        "version": "4",
        "groupKey": group_key,
        "truncatedAlerts": alerts.len() - shown,
        "status": status(alerts),
        "receiver": receiver,
        "groupLabels": group_labels,
        "commonLabels": common(&labels),
        "commonAnnotations": common(&annotations),
        "externalURL": links.external_url,
        "alerts": alerts[..shown].iter().map(|a| json!({
            "status": match a.status { Status::Firing => "firing", Status::Resolved => "resolved" },
            "labels": a.labels,
            "annotations": a.annotations,
            "startsAt": rfc3339(a.starts_at),
            "endsAt": match (a.status, a.ends_at) {
                (Status::Resolved, Some(t)) => rfc3339(t),
                _ => "0001-01-01T00:00:00Z".to_owned(),
            },
            "generatorURL": links.dashboard(&a.labels),
            "fingerprint": a.fingerprint,
        })).collect::<Vec<_>>(),
    })
}

fn num(v: Option<f64>) -> String {
    match v {
        Some(v) if v.is_finite() && v.abs() >= 100.0 => format!("{v:.0}"),
        Some(v) if v.is_finite() => format!("{v:.3}"),
        _ => "-".into(),
    }
}

fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// One email per notification group: subject, plain text and HTML.
pub fn email(
    group_labels: &BTreeMap<String, String>,
    alerts: &[GroupAlert],
    links: &Links,
) -> Value {
    let firing = alerts.iter().filter(|a| a.status == Status::Firing).count();
    let head = if firing > 0 {
        format!("[FIRING:{firing}]")
    } else {
        format!("[RESOLVED:{}]", alerts.len())
    };
    let group = group_labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ");
    let subject = format!("{head} {group}").trim().to_owned();
    let get = |a: &GroupAlert, k: &str| a.labels.get(k).cloned().unwrap_or_else(|| "-".into());
    let mut text = format!("{subject}\n\n");
    let mut html = format!(
        "<html><body><h2>{}</h2><table border=\"1\" cellpadding=\"4\" cellspacing=\"0\">\
         <tr><th>status</th><th>alert</th><th>service</th><th>tool</th><th>value</th><th>threshold</th><th>since</th><th>summary</th><th>dashboard</th></tr>",
        html_escape(&subject)
    );
    for a in alerts {
        let status = match a.status {
            Status::Firing => "firing",
            Status::Resolved => "resolved",
        };
        let link = links.dashboard(&a.labels);
        let summary = a
            .annotations
            .get("summary")
            .or_else(|| a.annotations.get("description"))
            .cloned()
            .unwrap_or_default();
        let since = a.starts_at.format("%Y-%m-%d %H:%M:%S UTC").to_string();
        // Example calls: their links when a trace URL is configured, else their trace ids.
        let traces = a
            .annotations
            .get("example_trace_urls")
            .map(|u| u.split(' ').collect::<Vec<_>>().join("\n    "))
            .or_else(|| a.annotations.get("example_traces").cloned())
            .map(|t| format!("  example traces:\n    {t}\n"))
            .unwrap_or_default();
        text.push_str(&format!(
            "- {status}: {alert}\n  service: {service}\n  tool: {tool}\n  value: {value}\n  threshold: {threshold}\n  since: {since}\n  {summary}\n  dashboard: {link}\n{traces}\n",
            alert = get(a, "alertname"),
            service = get(a, "service"),
            tool = get(a, "tool"),
            value = num(a.value),
            threshold = num(a.threshold),
        ));
        html.push_str(&format!(
            "<tr><td>{status}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{since}</td><td>{}</td><td><a href=\"{}\">open</a></td></tr>",
            html_escape(&get(a, "alertname")),
            html_escape(&get(a, "service")),
            html_escape(&get(a, "tool")),
            num(a.value),
            num(a.threshold),
            html_escape(&summary),
            html_escape(&link),
        ));
    }
    html.push_str("</table></body></html>");
    json!({"subject": subject, "text": text, "html": html})
}

/// Alerts for `POST /api/v2/alerts`. Firing alerts carry no `endsAt` here: the sender sets it
/// at send time (a few resend intervals ahead, so Alertmanager resolves them if toolsight dies).
pub fn alertmanager(alerts: &[GroupAlert], links: &Links) -> Value {
    Value::Array(
        alerts
            .iter()
            .map(|a| {
                let mut v = json!({
                    "labels": a.labels,
                    "annotations": a.annotations,
                    "startsAt": rfc3339(a.starts_at),
                    "generatorURL": links.dashboard(&a.labels),
                });
                if let (Status::Resolved, Some(end)) = (a.status, a.ends_at) {
                    v["endsAt"] = json!(rfc3339(end));
                }
                v
            })
            .collect(),
    )
}

/// Sets `endsAt` on the firing alerts of an Alertmanager payload.
pub fn alertmanager_at_send(payload: &Value, ends_at: DateTime<Utc>) -> Value {
    let mut v = payload.clone();
    if let Some(items) = v.as_array_mut() {
        for a in items {
            if a.get("endsAt").is_none() {
                a["endsAt"] = json!(rfc3339(ends_at));
            }
        }
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alert(tool: &str, status: Status) -> GroupAlert {
        GroupAlert {
            fingerprint: format!("fp-{tool}"),
            labels: [
                ("alertname", "ToolErrorRate"),
                ("service", "billing mcp"),
                ("tool", tool),
                ("severity", "warning"),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
            annotations: [("summary".to_string(), format!("{tool} <fails>"))].into(),
            status,
            starts_at: DateTime::from_timestamp(1_800_000_000, 0).unwrap(),
            ends_at: (status == Status::Resolved)
                .then(|| DateTime::from_timestamp(1_800_000_600, 0).unwrap()),
            value: Some(0.25),
            threshold: Some(0.05),
            notified: None,
        }
    }

    fn links() -> Links {
        Links {
            external_url: "http://toolsight:9464".into(),
            grafana_url: "http://grafana:3000/".into(),
        }
    }

    #[test]
    fn webhook_is_the_version_4_format() {
        let alerts = [
            alert("search", Status::Firing),
            alert("fetch", Status::Resolved),
        ];
        let group = [("alertname".to_string(), "ToolErrorRate".to_string())].into();
        let v = webhook(
            "ops",
            "ops:{alertname=\"ToolErrorRate\"}",
            &group,
            &alerts,
            Some(1),
            &links(),
        );
        assert_eq!(v["version"], "4");
        assert_eq!(v["status"], "firing");
        assert_eq!(v["truncatedAlerts"], 1);
        assert_eq!(v["commonLabels"]["service"], "billing mcp");
        assert!(v["commonLabels"].get("tool").is_none());
        assert_eq!(v["commonAnnotations"], json!({}));
        let a = &v["alerts"][0];
        assert_eq!(a["endsAt"], "0001-01-01T00:00:00Z");
        assert_eq!(
            a["generatorURL"],
            "http://grafana:3000/d/toolsight-tool/tool-detail?var-service=billing+mcp&var-tool=search"
        );
        for k in ["status", "labels", "annotations", "startsAt", "fingerprint"] {
            assert!(a.get(k).is_some(), "{k}");
        }
    }

    #[test]
    fn email_has_subject_both_parts_and_the_dashboard_link() {
        let group = [("alertname".to_string(), "ToolErrorRate".to_string())].into();
        let v = email(&group, &[alert("search", Status::Firing)], &links());
        assert_eq!(v["subject"], "[FIRING:1] alertname=ToolErrorRate");
        let text = v["text"].as_str().unwrap();
        assert!(text.contains("tool: search") && text.contains("value: 0.250"));
        assert!(text.contains("threshold: 0.050"));
        let html = v["html"].as_str().unwrap();
        assert!(html.contains("search &lt;fails&gt;"), "escaped: {html}");
        assert!(html.contains("var-tool=search"));
    }

    #[test]
    fn alertmanager_alerts_get_ends_at_when_sent() {
        let p = alertmanager(
            &[alert("a", Status::Firing), alert("b", Status::Resolved)],
            &links(),
        );
        assert!(p[0].get("endsAt").is_none());
        let sent = alertmanager_at_send(&p, DateTime::from_timestamp(1_900_000_000, 0).unwrap());
        assert_eq!(sent[0]["endsAt"], "2030-03-17T17:46:40.000Z");
        assert_eq!(sent[1]["endsAt"], "2027-01-15T08:10:00.000Z");
    }
}
