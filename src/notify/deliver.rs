//! Delivery: sending outbox rows to webhooks, SMTP servers and Alertmanagers, with retries,
//! backoff and a circuit breaker per receiver target.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use backon::BackoffBuilder;
use chrono::Utc;
use hmac::Mac;
use lettre::AsyncTransport;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::config::{EmailReceiver, Notify, ReceiverConfig, SmtpTls};
use super::payload;
use crate::metrics::{DeliveryLabel, Metrics, ReceiverLabel};
use crate::store::notify::{self as outbox, OutboxRow};

/// Why a delivery failed.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// Timeouts, connection errors, 5xx, 408, 429: tried again later.
    #[error("{0}")]
    Transient(String),
    /// Other 4xx, an invalid message: never tried again.
    #[error("{0}")]
    Rejected(String),
}

impl DeliveryError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, DeliveryError::Transient(_))
    }
}

fn http_error(e: reqwest::Error) -> DeliveryError {
    // `without_url`: the URL may hold a token.
    let e = e.without_url();
    // Every cause: the one that says what went wrong ("invalid peer certificate:
    // UnknownIssuer", "connection refused") is often several levels down.
    let mut msg = format!("{e}");
    let mut cause = std::error::Error::source(&e);
    while let Some(c) = cause {
        msg.push_str(&format!(": {c}"));
        cause = c.source();
    }
    DeliveryError::Transient(msg)
}

async fn check_status(r: reqwest::Response) -> Result<(), DeliveryError> {
    let status = r.status();
    if status.is_success() {
        return Ok(());
    }
    let body: String = r
        .text()
        .await
        .unwrap_or_default()
        .chars()
        .take(512)
        .collect();
    let msg = format!("receiver answered {status}: {}", body.trim());
    if status.is_server_error() || status.as_u16() == 408 || status.as_u16() == 429 {
        Err(DeliveryError::Transient(msg))
    } else {
        Err(DeliveryError::Rejected(msg))
    }
}

/// The HMAC-SHA256 signature header value of a webhook body.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes())
        .expect("hmac takes keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Sends one receiver's notifications.
pub struct Sender {
    receiver: ReceiverConfig,
    http: reqwest::Client,
    smtp: Option<lettre::AsyncSmtpTransport<lettre::Tokio1Executor>>,
}

impl Sender {
    pub fn new(receiver: ReceiverConfig) -> Result<Sender, DeliveryError> {
        crate::install_crypto_provider();
        // Webhooks, Alertmanager and SMTP trust the same roots: the platform's (through
        // rustls-platform-verifier), plus the receiver's `ca_file`.
        let ca = receiver.ca_pem().map_err(DeliveryError::Rejected)?;
        let mut http = reqwest::Client::builder()
            .timeout(receiver.timeout())
            .user_agent(concat!("toolsight/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = &ca {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| DeliveryError::Rejected(format!("ca_file: {e}")))?;
            http = http.tls_certs_merge(certs);
        }
        let http = http
            .build()
            .map_err(|e| DeliveryError::Rejected(format!("http client: {e}")))?;
        let smtp = match &receiver {
            ReceiverConfig::Email(e) => Some(smtp_transport(e, receiver.timeout(), ca.as_deref())?),
            _ => None,
        };
        Ok(Sender {
            receiver,
            http,
            smtp,
        })
    }

    pub async fn send(&self, row: &OutboxRow) -> Result<(), DeliveryError> {
        match &self.receiver {
            ReceiverConfig::Webhook(r) => {
                let url = r
                    .url
                    .as_ref()
                    .ok_or_else(|| DeliveryError::Rejected("no url".into()))?;
                let body = serde_json::to_vec(&row.payload.0)
                    .map_err(|e| DeliveryError::Rejected(e.to_string()))?;
                let mut req = self
                    .http
                    .post(url.expose())
                    .header("content-type", "application/json")
                    .header("idempotency-key", format!("toolsight-{}", row.id));
                if let Some(secret) = &r.hmac_secret {
                    req = req.header("x-toolsight-signature", signature(secret.expose(), &body));
                }
                for (k, v) in &r.headers {
                    req = req.header(k.as_str(), v.expose());
                }
                check_status(req.body(body).send().await.map_err(http_error)?).await
            }
            ReceiverConfig::Alertmanager(r) => {
                let ends = Utc::now()
                    + chrono::Duration::from_std(r.resend_every() * 4).unwrap_or_default();
                let body = payload::alertmanager_at_send(&row.payload.0, ends);
                let url = format!("{}/api/v2/alerts", row.target.trim_end_matches('/'));
                check_status(
                    self.http
                        .post(url)
                        .json(&body)
                        .send()
                        .await
                        .map_err(http_error)?,
                )
                .await
            }
            ReceiverConfig::Email(r) => self.email(r, row).await,
        }
    }

    async fn email(&self, r: &EmailReceiver, row: &OutboxRow) -> Result<(), DeliveryError> {
        use lettre::message::{Mailbox, MultiPart, SinglePart, header::ContentType};
        let p = &row.payload.0;
        let text = |k: &str| p[k].as_str().unwrap_or_default().to_owned();
        let bad = |e: String| DeliveryError::Rejected(e);
        let from: Mailbox = r
            .from
            .as_deref()
            .unwrap_or_default()
            .parse()
            .map_err(|e| bad(format!("from: {e}")))?;
        let domain = from.email.domain().to_owned();
        let mut msg = lettre::Message::builder()
            .from(from)
            .subject(text("subject"))
            // One id per notification: a resend after a crash is recognisably the same mail.
            .message_id(Some(format!("<toolsight-{}@{domain}>", row.id)));
        for to in &r.to {
            msg = msg.to(to.parse().map_err(|e| bad(format!("to {to}: {e}")))?);
        }
        let msg = msg
            .multipart(
                MultiPart::alternative()
                    .singlepart(
                        SinglePart::builder()
                            .header(ContentType::TEXT_PLAIN)
                            .body(text("text")),
                    )
                    .singlepart(
                        SinglePart::builder()
                            .header(ContentType::TEXT_HTML)
                            .body(text("html")),
                    ),
            )
            .map_err(|e| bad(e.to_string()))?;
        let smtp = self
            .smtp
            .as_ref()
            .ok_or_else(|| bad("no smtp transport".into()))?;
        match smtp.send(msg).await {
            Ok(_) => Ok(()),
            Err(e) if e.is_permanent() => Err(DeliveryError::Rejected(format!("smtp: {e}"))),
            Err(e) => Err(DeliveryError::Transient(format!("smtp: {e}"))),
        }
    }
}

fn smtp_transport(
    r: &EmailReceiver,
    timeout: std::time::Duration,
    ca: Option<&[u8]>,
) -> Result<lettre::AsyncSmtpTransport<lettre::Tokio1Executor>, DeliveryError> {
    use lettre::transport::smtp::authentication::Credentials;
    use lettre::transport::smtp::client::{Certificate, Tls, TlsParameters};
    type T = lettre::AsyncSmtpTransport<lettre::Tokio1Executor>;
    let (host, port) = r
        .smarthost
        .as_deref()
        .and_then(|h| h.rsplit_once(':'))
        .and_then(|(h, p)| Some((h.to_owned(), p.parse::<u16>().ok()?)))
        .ok_or_else(|| DeliveryError::Rejected("smarthost must be host:port".into()))?;
    let err = |e: lettre::transport::smtp::Error| DeliveryError::Rejected(format!("smtp: {e}"));
    let mut b = match r.tls.unwrap_or_default() {
        SmtpTls::Starttls => T::starttls_relay(&host).map_err(err)?,
        SmtpTls::Tls => T::relay(&host).map_err(err)?,
        SmtpTls::None => T::builder_dangerous(&host),
    }
    .port(port)
    .timeout(Some(timeout));
    if let Some(pem) = ca {
        let params = TlsParameters::builder(host.clone())
            .add_root_certificate(Certificate::from_pem(pem).map_err(err)?)
            .build()
            .map_err(err)?;
        b = match r.tls.unwrap_or_default() {
            SmtpTls::Starttls => b.tls(Tls::Required(params)),
            SmtpTls::Tls => b.tls(Tls::Wrapper(params)),
            SmtpTls::None => b,
        };
    }
    if let (Some(user), Some(pass)) = (&r.username, &r.password) {
        b = b.credentials(Credentials::new(user.clone(), pass.expose().to_owned()));
    }
    Ok(b.build())
}

/// A circuit breaker: after `threshold` consecutive failures the target is left alone for
/// `cooldown`, then one attempt decides (half-open).
#[derive(Debug, Default)]
struct Breaker {
    failures: u32,
    open_until: Option<Instant>,
}

impl Breaker {
    fn is_open(&self, now: Instant) -> bool {
        self.open_until.is_some_and(|t| now < t)
    }
    fn success(&mut self) {
        self.failures = 0;
        self.open_until = None;
    }
    fn failure(&mut self, threshold: u32, cooldown: Duration, now: Instant) -> bool {
        self.failures += 1;
        if self.failures >= threshold {
            self.open_until = Some(now + cooldown);
            return true;
        }
        false
    }
}

/// The delay before retry number `attempt` (0-based): exponential with jitter, capped.
pub fn backoff(settings: &Notify, attempt: u32) -> Duration {
    backon::ExponentialBuilder::default()
        .with_min_delay(settings.retry_initial)
        .with_max_delay(settings.retry_max)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
        .nth(attempt as usize)
        .unwrap_or(settings.retry_max)
}

/// Delivers one receiver's outbox rows until `stop`: in order per target (a failing
/// notification holds back the later ones to the same target, so "resolved" never overtakes
/// "firing"), each receiver in its own task so a dead one does not slow the others.
pub async fn run(
    sender: Sender,
    pool: PgPool,
    settings: Arc<Notify>,
    metrics: Arc<Metrics>,
    wake: Arc<tokio::sync::Notify>,
    stop: CancellationToken,
) {
    let name = sender.receiver.name().to_owned();
    let mut breakers: HashMap<String, Breaker> = HashMap::new();
    let label = |result: &'static str| DeliveryLabel {
        receiver: name.clone(),
        result,
    };
    loop {
        match outbox::pending_outbox(&pool, &name, 100).await {
            Ok(rows) => {
                let mut held: HashSet<String> = HashSet::new();
                for row in rows {
                    if stop.is_cancelled() {
                        return;
                    }
                    let now = Utc::now();
                    let breaker = breakers.entry(row.target.clone()).or_default();
                    if held.contains(&row.target)
                        || row.next_attempt_at > now
                        || breaker.is_open(Instant::now())
                    {
                        held.insert(row.target.clone());
                        continue;
                    }
                    let age = (now - row.created_at).to_std().unwrap_or_default();
                    if age > settings.give_up_after {
                        let why = format!("gave up after {}", humantime::format_duration(age));
                        tracing::error!(receiver = %name, id = row.id, attempts = row.attempts, "{why}");
                        let _ = outbox::mark_failed(&pool, row.id, &why).await;
                        metrics
                            .notifications
                            .get_or_create(&label("given_up"))
                            .inc();
                        continue;
                    }
                    match sender.send(&row).await {
                        Ok(()) => {
                            breaker.success();
                            metrics.notify_attempts.get_or_create(&label("ok")).inc();
                            if let Err(e) = outbox::mark_delivered(&pool, row.id).await {
                                // Delivered but not recorded: the row is sent again later
                                // (receivers see the same idempotency key / message id).
                                tracing::warn!(receiver = %name, id = row.id, error = %e, "recording a delivery failed");
                                held.insert(row.target.clone());
                                continue;
                            }
                            metrics
                                .notifications
                                .get_or_create(&label("delivered"))
                                .inc();
                            tracing::info!(receiver = %name, id = row.id, group = %row.group_key, "notification delivered");
                        }
                        Err(e) if e.is_retryable() => {
                            metrics.notify_attempts.get_or_create(&label("retry")).inc();
                            let opened = breaker.failure(
                                settings.breaker_failures,
                                settings.breaker_cooldown,
                                Instant::now(),
                            );
                            let delay = backoff(&settings, row.attempts.max(0) as u32);
                            let next = now + chrono::Duration::from_std(delay).unwrap_or_default();
                            tracing::warn!(receiver = %name, id = row.id, attempt = row.attempts + 1, retry_in = ?delay, error = %e, "notification delivery failed; will retry");
                            if opened {
                                tracing::warn!(receiver = %name, cooldown = ?settings.breaker_cooldown, "receiver circuit open");
                            }
                            let _ = outbox::mark_retry(&pool, row.id, next, &e.to_string()).await;
                            held.insert(row.target.clone());
                        }
                        Err(e) => {
                            metrics
                                .notify_attempts
                                .get_or_create(&label("rejected"))
                                .inc();
                            metrics.notifications.get_or_create(&label("failed")).inc();
                            tracing::error!(receiver = %name, id = row.id, error = %e, "notification rejected by the receiver; not retried");
                            let _ = outbox::mark_failed(&pool, row.id, &e.to_string()).await;
                        }
                    }
                }
                let open = breakers.values().any(|b| b.is_open(Instant::now()));
                metrics
                    .notify_circuit_open
                    .get_or_create(&ReceiverLabel {
                        receiver: name.clone(),
                    })
                    .set(i64::from(open));
            }
            Err(e) => tracing::warn!(receiver = %name, error = %e, "reading the outbox failed"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = wake.notified() => {}
            _ = tokio::time::sleep(Duration::from_millis(250)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_hex() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature("Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        let n = Notify {
            retry_initial: Duration::from_millis(100),
            retry_max: Duration::from_secs(2),
            ..Notify::default()
        };
        let d0 = backoff(&n, 0);
        let d5 = backoff(&n, 5);
        assert!(
            d0 >= Duration::from_millis(100) && d0 <= Duration::from_millis(200),
            "{d0:?}"
        );
        assert!(
            d5 >= Duration::from_secs(2) && d5 <= Duration::from_secs(4),
            "{d5:?}"
        );
    }

    #[test]
    fn breaker_opens_after_consecutive_failures_and_closes_on_success() {
        let mut b = Breaker::default();
        let now = Instant::now();
        let cool = Duration::from_secs(30);
        assert!(!b.failure(3, cool, now));
        assert!(!b.failure(3, cool, now));
        assert!(b.failure(3, cool, now));
        assert!(b.is_open(now));
        assert!(!b.is_open(now + cool));
        b.success();
        assert!(!b.is_open(now));
    }
}
