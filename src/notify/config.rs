//! The `[notify]` configuration: receivers, routes and delivery settings.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::secret::Secret;
use serde::{Deserialize, Serialize};

use super::route::Matcher;

/// Notification settings. The `[notify]` table itself is the default route.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Notify {
    /// This service's URL, sent as `externalURL`.
    pub external_url: String,
    /// Grafana's URL: alert links open the tool detail dashboard there.
    pub grafana_url: String,
    /// Firing alerts carry up to this many example trace ids of their key (the failed, empty
    /// and slowest calls first) in the `example_traces` annotation; 0: none.
    pub example_traces: usize,
    /// Where a trace id opens, `{trace_id}` replaced (Jaeger `http://jaeger:16686/trace/{trace_id}`,
    /// Tempo, a vendor): the links go in `example_trace_urls`. Empty: ids only.
    pub trace_url: String,
    pub receivers: Vec<ReceiverConfig>,
    /// The default route: alerts no route below matches go here (empty: nowhere).
    pub receiver: String,
    pub group_by: Vec<String>,
    #[serde(with = "humantime_serde")]
    pub group_wait: Duration,
    #[serde(with = "humantime_serde")]
    pub group_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub repeat_interval: Duration,
    pub send_resolved: bool,
    /// Specific routes, tried in order; the first match wins unless it says `continue`.
    pub routes: Vec<RouteConfig>,
    /// First retry delay; doubles per attempt (with jitter) up to `retry_max`.
    #[serde(with = "humantime_serde")]
    pub retry_initial: Duration,
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// A notification still undelivered after this long is given up (counted, logged).
    #[serde(with = "humantime_serde")]
    pub give_up_after: Duration,
    /// Consecutive failures that open a receiver's circuit, and how long it stays open.
    pub breaker_failures: u32,
    #[serde(with = "humantime_serde")]
    pub breaker_cooldown: Duration,
}

impl Default for Notify {
    fn default() -> Self {
        Notify {
            external_url: "http://127.0.0.1:9464".into(),
            grafana_url: "http://127.0.0.1:3000".into(),
            example_traces: 3,
            trace_url: String::new(),
            receivers: Vec::new(),
            receiver: String::new(),
            group_by: vec!["alertname".into()],
            group_wait: Duration::from_secs(30),
            group_interval: Duration::from_secs(300),
            repeat_interval: Duration::from_secs(4 * 3600),
            send_resolved: true,
            routes: Vec::new(),
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(300),
            give_up_after: Duration::from_secs(24 * 3600),
            breaker_failures: 5,
            breaker_cooldown: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SmtpTls {
    /// STARTTLS upgrade (port 587).
    #[default]
    Starttls,
    /// TLS from the first byte (port 465).
    Tls,
    /// No TLS: only for a relay on the same host or network.
    None,
}

/// One receiver, by its `type`: each takes the fields that apply to it and refuses the others.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ReceiverConfig {
    Webhook(WebhookReceiver),
    Email(EmailReceiver),
    Alertmanager(AlertmanagerReceiver),
}

/// A JSON POST per notification.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookReceiver {
    pub name: String,
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// A PEM file of CA certificates to trust besides the platform's (a private CA).
    pub ca_file: Option<std::path::PathBuf>,
    /// The URL (a secret: webhook URLs often carry tokens).
    pub url: Option<Secret>,
    /// Signs the body with HMAC-SHA256 in `X-Toolsight-Signature: sha256=<hex>`.
    pub hmac_secret: Option<Secret>,
    /// Extra headers (values may be secrets).
    #[serde(default)]
    pub headers: BTreeMap<String, Secret>,
    /// At most this many alerts per message (the rest are counted in `truncatedAlerts`).
    pub max_alerts: Option<usize>,
}

/// A mail per notification, over SMTP.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmailReceiver {
    pub name: String,
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// A PEM file of CA certificates to trust besides the platform's (a private CA).
    pub ca_file: Option<std::path::PathBuf>,
    /// `host:port` of the SMTP server.
    pub smarthost: Option<String>,
    pub tls: Option<SmtpTls>,
    pub username: Option<String>,
    pub password: Option<Secret>,
    pub from: Option<String>,
    #[serde(default)]
    pub to: Vec<String>,
}

/// Alerts pushed to Prometheus Alertmanager instances, which group and route them themselves.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertmanagerReceiver {
    pub name: String,
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// A PEM file of CA certificates to trust besides the platform's (a private CA).
    pub ca_file: Option<std::path::PathBuf>,
    /// Base URLs of the instances (`http://host:9093`).
    #[serde(default)]
    pub urls: Vec<String>,
    /// Resend firing alerts this often.
    #[serde(default, with = "humantime_serde")]
    pub resend_every: Option<Duration>,
    /// Keep resending resolved alerts this long.
    #[serde(default, with = "humantime_serde")]
    pub resolved_for: Option<Duration>,
}

impl ReceiverConfig {
    pub fn name(&self) -> &str {
        match self {
            ReceiverConfig::Webhook(r) => &r.name,
            ReceiverConfig::Email(r) => &r.name,
            ReceiverConfig::Alertmanager(r) => &r.name,
        }
    }

    /// The CA file trusted besides the platform's roots, if any.
    pub fn ca_file(&self) -> Option<&std::path::Path> {
        match self {
            ReceiverConfig::Webhook(r) => r.ca_file.as_deref(),
            ReceiverConfig::Email(r) => r.ca_file.as_deref(),
            ReceiverConfig::Alertmanager(r) => r.ca_file.as_deref(),
        }
    }

    /// The certificates of [`ReceiverConfig::ca_file`] (none without one), as PEM.
    pub fn ca_pem(&self) -> Result<Option<Vec<u8>>, String> {
        let Some(path) = self.ca_file() else {
            return Ok(None);
        };
        let pem = std::fs::read(path)
            .map_err(|e| format!("`ca_file` {}: cannot read: {e}", path.display()))?;
        match reqwest::Certificate::from_pem_bundle(&pem) {
            Ok(certs) if !certs.is_empty() => Ok(Some(pem)),
            _ => Err(format!(
                "`ca_file` {}: holds no PEM certificate",
                path.display()
            )),
        }
    }

    /// The delivery timeout (10 s unless set).
    pub fn timeout(&self) -> Duration {
        match self {
            ReceiverConfig::Webhook(r) => r.timeout,
            ReceiverConfig::Email(r) => r.timeout,
            ReceiverConfig::Alertmanager(r) => r.timeout,
        }
        .unwrap_or(Duration::from_secs(10))
    }
}

impl AlertmanagerReceiver {
    pub fn resend_every(&self) -> Duration {
        self.resend_every.unwrap_or(Duration::from_secs(60))
    }
    pub fn resolved_for(&self) -> Duration {
        self.resolved_for.unwrap_or(Duration::from_secs(15 * 60))
    }
}

/// A route: matchers on the alert's labels, the receiver, and grouping settings that default
/// to the `[notify]` ones.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub receiver: String,
    /// `name=value`, `name!=value`, `name=~regex`, `name!~regex`; all must hold.
    #[serde(default)]
    pub matchers: Vec<String>,
    pub group_by: Option<Vec<String>>,
    #[serde(default, with = "humantime_serde")]
    pub group_wait: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub group_interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub repeat_interval: Option<Duration>,
    pub send_resolved: Option<bool>,
    /// Keep trying the routes after this one when it matches.
    #[serde(default, rename = "continue")]
    pub continue_matching: bool,
}

impl Notify {
    /// Every problem of the notification settings.
    pub fn validate(&self, p: &mut Vec<String>) {
        if !self.trace_url.is_empty() && !self.trace_url.contains("{trace_id}") {
            p.push("notify.trace_url: must contain {trace_id}".into());
        }
        if self.example_traces > 20 {
            p.push("notify.example_traces: at most 20".into());
        }
        let mut names = std::collections::HashSet::new();
        for (i, r) in self.receivers.iter().enumerate() {
            let at = format!("notify.receivers[{i}] ({})", r.name());
            if r.name().is_empty() {
                p.push(format!("notify.receivers[{i}]: `name` is required"));
            }
            if !names.insert(r.name()) {
                p.push(format!("{at}: the name is used twice"));
            }
            if let Err(e) = r.ca_pem() {
                p.push(format!("{at}: {e}"));
            }
            match r {
                ReceiverConfig::Webhook(w) => match &w.url {
                    None => p.push(format!("{at}: webhook needs `url`")),
                    Some(u) => {
                        if reqwest::Url::parse(u.expose()).is_err() {
                            p.push(format!("{at}: `url` is not a valid URL"));
                        }
                    }
                },
                ReceiverConfig::Email(e) => {
                    match e.smarthost.as_deref().and_then(|h| h.rsplit_once(':')) {
                        Some((_, port)) if port.parse::<u16>().is_ok() => {}
                        _ => p.push(format!("{at}: email needs `smarthost` as host:port")),
                    }
                    if e.from.is_none() {
                        p.push(format!("{at}: email needs `from`"));
                    }
                    if e.to.is_empty() {
                        p.push(format!("{at}: email needs at least one address in `to`"));
                    }
                    for a in e.from.iter().chain(&e.to) {
                        if a.parse::<lettre::message::Mailbox>().is_err() {
                            p.push(format!("{at}: {a:?} is not an email address"));
                        }
                    }
                    if e.password.is_some() && e.username.is_none() {
                        p.push(format!("{at}: `password` without `username`"));
                    }
                }
                ReceiverConfig::Alertmanager(a) => {
                    if a.urls.is_empty() {
                        p.push(format!(
                            "{at}: alertmanager needs at least one URL in `urls`"
                        ));
                    }
                    for u in &a.urls {
                        if reqwest::Url::parse(u).is_err() {
                            p.push(format!("{at}: {u:?} is not a valid URL"));
                        }
                    }
                }
            }
        }
        let known = |name: &str| self.receivers.iter().any(|r| r.name() == name);
        if !self.receiver.is_empty() && !known(&self.receiver) {
            p.push(format!(
                "notify.receiver: no receiver is named {:?}",
                self.receiver
            ));
        }
        for (i, r) in self.routes.iter().enumerate() {
            if !known(&r.receiver) {
                p.push(format!(
                    "notify.routes[{i}]: no receiver is named {:?}",
                    r.receiver
                ));
            }
            for m in &r.matchers {
                if let Err(e) = m.parse::<Matcher>() {
                    p.push(format!("notify.routes[{i}]: {e}"));
                }
            }
        }
        if self.retry_initial.is_zero() || self.retry_max < self.retry_initial {
            p.push("notify.retry_initial must be positive and at most notify.retry_max".into());
        }
        if self.breaker_failures == 0 {
            p.push("notify.breaker_failures: must be at least 1".into());
        }
    }
}
