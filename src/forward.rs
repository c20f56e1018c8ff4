//! OTLP forwarding: every accepted export passed on, as it arrived, to other OTLP receivers
//! (a tracing backend, a vendor, a Collector), so MCP servers that point at toolsight keep
//! their traces elsewhere too.
//!
//! Each target has its own bounded queue (exports and bytes) and its own senders: a slow or
//! dead upstream fills its queue and then loses exports there, counted, but never slows or
//! fails ingest, and never holds back another target. Sends are retried with exponential
//! backoff on the failures OTLP calls retryable.
//!
//! The bytes sent are the export's own (after transport decompression): OTLP/protobuf bodies
//! and gRPC messages go out unchanged; an OTLP/JSON body goes out unchanged to an HTTP
//! target and, only for a gRPC target, as the protobuf encoding of what was decoded.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use backon::BackoffBuilder;
use bytes::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceResponse;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::{ForwardLabel, Metrics, TargetLabel};
use crate::secret::Secret;

const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

/// The `[forward]` settings: where accepted exports are passed on.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Forward {
    pub targets: Vec<Target>,
}

/// One OTLP receiver that gets a copy of every accepted export (`[[forward.targets]]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// Names the target in metrics and logs.
    pub name: String,
    /// `grpc`: the endpoint is `http(s)://host:port`. `http`: the full URL exports are POSTed
    /// to; one without a path gets `/v1/traces`, as OTLP exporters do.
    pub endpoint: String,
    #[serde(default)]
    pub protocol: Protocol,
    /// Sent with every export (gRPC metadata or HTTP headers): `authorization`, a vendor's
    /// API key. Values may be secrets (`env:NAME`, `file:/path`).
    #[serde(default)]
    pub headers: BTreeMap<String, Secret>,
    /// A PEM file of CA certificates to trust besides the system's (a private CA).
    pub ca_file: Option<PathBuf>,
    /// Only exports holding an MCP tool call or MCP request are passed on. The bytes go out
    /// as they arrived, so the choice is per export: an export with one MCP span and ten
    /// others is sent whole.
    #[serde(default)]
    pub mcp_only: bool,
    /// `gzip` compresses what is sent (the content is unchanged).
    #[serde(default)]
    pub compression: Compression,
    /// One attempt's time limit.
    #[serde(default = "default_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Exports waiting for this target, at most; beyond, new ones are dropped and counted.
    #[serde(default = "default_queue_exports")]
    pub queue_exports: usize,
    /// Bytes waiting for this target, at most (same).
    #[serde(default = "default_queue_bytes")]
    pub queue_bytes: usize,
    /// Exports in flight to this target at once.
    #[serde(default = "default_concurrency")]
    pub concurrency: usize,
    /// Retries of a send that failed in a retryable way, then the export is dropped (counted).
    #[serde(default = "default_max_retries")]
    pub max_retries: usize,
    /// First and longest wait between retries (exponential with jitter).
    #[serde(default = "default_retry_initial", with = "humantime_serde")]
    pub retry_initial: Duration,
    #[serde(default = "default_retry_max", with = "humantime_serde")]
    pub retry_max: Duration,
}

fn default_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_queue_exports() -> usize {
    1024
}
fn default_queue_bytes() -> usize {
    64 << 20
}
fn default_concurrency() -> usize {
    4
}
fn default_max_retries() -> usize {
    5
}
fn default_retry_initial() -> Duration {
    Duration::from_millis(200)
}
fn default_retry_max() -> Duration {
    Duration::from_secs(10)
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Grpc,
    Http,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Compression {
    #[default]
    None,
    Gzip,
}

impl Forward {
    pub fn validate(&self, p: &mut Vec<String>) {
        let mut names = std::collections::HashSet::new();
        for (i, t) in self.targets.iter().enumerate() {
            let at = format!("forward.targets[{i}] ({})", t.name);
            if t.name.is_empty() {
                p.push(format!("forward.targets[{i}]: `name` is required"));
            }
            if !names.insert(t.name.as_str()) {
                p.push(format!("{at}: the name is used twice"));
            }
            match url::Url::parse(&t.endpoint) {
                Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => {}
                _ => p.push(format!(
                    "{at}: `endpoint` {:?} is not an http:// or https:// URL",
                    t.endpoint
                )),
            }
            for name in t.headers.keys() {
                if http::HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes()).is_err() {
                    p.push(format!("{at}: {name:?} is not a valid header name"));
                }
            }
            if let Err(e) = t.ca_pem() {
                p.push(format!("{at}: {e}"));
            }
            for (key, v) in [
                ("queue_exports", t.queue_exports),
                ("queue_bytes", t.queue_bytes),
                ("concurrency", t.concurrency),
            ] {
                if v == 0 {
                    p.push(format!("{at}: `{key}` must be at least 1"));
                }
            }
            if t.timeout.is_zero() {
                p.push(format!("{at}: `timeout` must be more than 0s"));
            }
        }
    }
}

impl Target {
    fn ca_pem(&self) -> Result<Option<Vec<u8>>, String> {
        let Some(path) = &self.ca_file else {
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

    /// Where an HTTP target POSTs: the endpoint, with `/v1/traces` when it has no path.
    fn http_url(&self) -> String {
        match url::Url::parse(&self.endpoint) {
            Ok(mut u) if u.path().is_empty() || u.path() == "/" => {
                u.set_path("/v1/traces");
                u.to_string()
            }
            _ => self.endpoint.clone(),
        }
    }
}

/// Why one send failed, and whether it is worth another attempt.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("{0}")]
    Retryable(String),
    #[error("{0}")]
    Rejected(String),
    #[error("invalid target: {0}")]
    Config(String),
}

impl ForwardError {
    pub fn is_retryable(&self) -> bool {
        matches!(self, ForwardError::Retryable(_))
    }
}

/// An accepted export's bytes, as they arrived (decompressed).
#[derive(Clone)]
pub enum Original {
    Protobuf(Bytes),
    /// An OTLP/JSON body, and its protobuf encoding when a gRPC target needs one.
    Json {
        json: Bytes,
        protobuf: Option<Bytes>,
    },
}

impl Original {
    fn len(&self) -> usize {
        match self {
            Original::Protobuf(b) => b.len(),
            Original::Json { json, protobuf } => {
                json.len() + protobuf.as_ref().map_or(0, |p| p.len())
            }
        }
    }
}

struct Queued {
    original: Original,
    bytes: usize,
}

/// One target's side of the forwarder: its queue and counters.
struct Outlet {
    name: String,
    protocol: Protocol,
    mcp_only: bool,
    tx: tokio::sync::mpsc::Sender<Queued>,
    queued_bytes: Arc<AtomicUsize>,
    max_bytes: usize,
    exports: Family<ForwardLabel, Counter>,
    queue_gauge: Gauge,
}

impl Outlet {
    fn count(&self, result: &'static str) {
        count(&self.exports, &self.name, result);
    }
}

fn count(exports: &Family<ForwardLabel, Counter>, target: &str, result: &'static str) {
    exports
        .get_or_create(&ForwardLabel {
            target: target.to_owned(),
            result,
        })
        .inc();
}

/// Hands accepted exports to the targets' queues; cheap to share.
#[derive(Clone, Default)]
pub struct Forwarder {
    outlets: Arc<Vec<Outlet>>,
    needs_protobuf: bool,
}

impl Forwarder {
    /// Starts one dispatcher per target. They stop when `stop` is cancelled, after sending
    /// what their queues hold for up to `drain` (the rest is dropped and counted).
    pub fn start(
        config: &Forward,
        metrics: &Arc<Metrics>,
        drain: Duration,
        stop: CancellationToken,
    ) -> Result<(Forwarder, TaskTracker), ForwardError> {
        crate::install_crypto_provider();
        let tasks = TaskTracker::new();
        let mut outlets = Vec::new();
        for t in &config.targets {
            let client = Client::new(t)?;
            let (tx, rx) = tokio::sync::mpsc::channel(t.queue_exports.max(1));
            let queued_bytes = Arc::new(AtomicUsize::new(0));
            let queue_gauge = metrics
                .forward_queue_bytes
                .get_or_create(&TargetLabel {
                    target: t.name.clone(),
                })
                .clone();
            let dispatcher = Dispatcher {
                target: Arc::new(t.clone()),
                client,
                queued_bytes: queued_bytes.clone(),
                exports: metrics.forward_exports.clone(),
                retries: metrics
                    .forward_retries
                    .get_or_create(&TargetLabel {
                        target: t.name.clone(),
                    })
                    .clone(),
                queue_gauge: queue_gauge.clone(),
            };
            tasks.spawn(dispatcher.run(rx, drain, stop.clone()));
            outlets.push(Outlet {
                name: t.name.clone(),
                protocol: t.protocol,
                mcp_only: t.mcp_only,
                tx,
                queued_bytes,
                max_bytes: t.queue_bytes,
                exports: metrics.forward_exports.clone(),
                queue_gauge,
            });
            tracing::info!(target = %t.name, endpoint = %t.endpoint, protocol = ?t.protocol, mcp_only = t.mcp_only, "forwarding accepted exports");
        }
        tasks.close();
        Ok((
            Forwarder {
                needs_protobuf: config.targets.iter().any(|t| t.protocol == Protocol::Grpc),
                outlets: Arc::new(outlets),
            },
            tasks,
        ))
    }

    pub fn is_enabled(&self) -> bool {
        !self.outlets.is_empty()
    }

    /// Whether a JSON export must also be encoded as protobuf (for a gRPC target).
    pub fn needs_protobuf(&self) -> bool {
        self.needs_protobuf
    }

    /// Queues an accepted export for every target that takes it; never waits.
    pub fn offer(&self, original: &Original, mcp: bool) {
        for o in self.outlets.iter() {
            if o.mcp_only && !mcp {
                o.count("filtered");
                continue;
            }
            let original = match original {
                // An HTTP target takes the JSON as it came: the protobuf copy is not queued.
                Original::Json { json, .. } if o.protocol == Protocol::Http => Original::Json {
                    json: json.clone(),
                    protobuf: None,
                },
                other => other.clone(),
            };
            let bytes = original.len();
            let before = o.queued_bytes.fetch_add(bytes, Ordering::AcqRel);
            if before + bytes > o.max_bytes {
                o.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
                o.count("queue_full");
                continue;
            }
            match o.tx.try_send(Queued { original, bytes }) {
                Ok(()) => {
                    o.queue_gauge.set((before + bytes) as i64);
                }
                Err(e) => {
                    o.queued_bytes.fetch_sub(bytes, Ordering::AcqRel);
                    o.count(match e {
                        tokio::sync::mpsc::error::TrySendError::Full(_) => "queue_full",
                        tokio::sync::mpsc::error::TrySendError::Closed(_) => "stopped",
                    });
                }
            }
        }
    }
}

struct Dispatcher {
    target: Arc<Target>,
    client: Client,
    queued_bytes: Arc<AtomicUsize>,
    exports: Family<ForwardLabel, Counter>,
    retries: Counter,
    queue_gauge: Gauge,
}

impl Dispatcher {
    async fn run(
        self,
        mut rx: tokio::sync::mpsc::Receiver<Queued>,
        drain: Duration,
        stop: CancellationToken,
    ) {
        let this = Arc::new(self);
        let slots = Arc::new(tokio::sync::Semaphore::new(this.target.concurrency.max(1)));
        let sends = TaskTracker::new();
        loop {
            let item = tokio::select! {
                biased;
                _ = stop.cancelled() => break,
                item = rx.recv() => match item {
                    Some(item) => item,
                    None => break,
                },
            };
            let Ok(slot) = slots.clone().acquire_owned().await else {
                break;
            };
            let this = this.clone();
            let stop = stop.clone();
            sends.spawn(async move {
                this.deliver(item, Some(stop)).await;
                drop(slot);
            });
        }
        // Stopping: what is queued gets `drain` to go out (one attempt each), the rest is
        // dropped and counted.
        rx.close();
        let deadline = tokio::time::Instant::now() + drain;
        while let Ok(item) = rx.try_recv() {
            let sent = tokio::time::timeout_at(deadline, async {
                let slot = slots.clone().acquire_owned().await.ok();
                let this = this.clone();
                sends.spawn(async move {
                    this.deliver(item, None).await;
                    drop(slot);
                });
            })
            .await;
            if sent.is_err() {
                break;
            }
        }
        while let Ok(item) = rx.try_recv() {
            this.release(&item);
            count(&this.exports, &this.target.name, "stopped");
        }
        sends.close();
        if tokio::time::timeout_at(deadline, sends.wait())
            .await
            .is_err()
        {
            tracing::warn!(target = %this.target.name, "forwarding stopped with sends still in flight");
        }
    }

    fn release(&self, item: &Queued) {
        let left = self.queued_bytes.fetch_sub(item.bytes, Ordering::AcqRel) - item.bytes;
        self.queue_gauge.set(left as i64);
    }

    /// Sends one export, retrying retryable failures with backoff (`stop` set: no retries
    /// once the service stops).
    async fn deliver(&self, item: Queued, stop: Option<CancellationToken>) {
        self.release(&item);
        let t = &self.target;
        let mut delays = backon::ExponentialBuilder::default()
            .with_min_delay(t.retry_initial)
            .with_max_delay(t.retry_max)
            .with_factor(2.0)
            .with_jitter()
            .with_max_times(t.max_retries)
            .build();
        let result = loop {
            match self.client.send(t, &item.original).await {
                Ok(()) => break "sent",
                Err(e) if e.is_retryable() => {
                    let Some(delay) = delays.next() else {
                        tracing::warn!(target = %t.name, error = %e, "forwarding an export failed, retries exhausted: dropped");
                        break "failed";
                    };
                    let Some(stop) = &stop else {
                        break "failed";
                    };
                    tracing::debug!(target = %t.name, error = %e, ?delay, "forwarding an export failed, retrying");
                    self.retries.inc();
                    tokio::select! {
                        _ = stop.cancelled() => break "failed",
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
                Err(e) => {
                    tracing::warn!(target = %t.name, error = %e, "the target refused a forwarded export: dropped");
                    break "rejected";
                }
            }
        };
        count(&self.exports, &t.name, result);
    }
}

/// A connection to one target.
enum Client {
    Http {
        http: reqwest::Client,
        url: String,
        headers: reqwest::header::HeaderMap,
    },
    Grpc {
        channel: tonic::transport::Channel,
        metadata: Vec<(
            tonic::metadata::MetadataKey<tonic::metadata::Ascii>,
            tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
        )>,
    },
}

impl Client {
    fn new(t: &Target) -> Result<Client, ForwardError> {
        let bad = |what: &str, e: &dyn std::fmt::Display| {
            ForwardError::Config(format!("forward target {}: {what}: {e}", t.name))
        };
        let ca = t.ca_pem().map_err(|e| bad("ca_file", &e))?;
        match t.protocol {
            Protocol::Http => {
                let mut http = reqwest::Client::builder()
                    .timeout(t.timeout)
                    .user_agent(concat!("toolsight/", env!("CARGO_PKG_VERSION")));
                if let Some(pem) = &ca {
                    let certs = reqwest::Certificate::from_pem_bundle(pem)
                        .map_err(|e| bad("ca_file", &e))?;
                    http = http.tls_certs_merge(certs);
                }
                let mut headers = reqwest::header::HeaderMap::new();
                for (k, v) in &t.headers {
                    let name =
                        reqwest::header::HeaderName::from_bytes(k.to_ascii_lowercase().as_bytes())
                            .map_err(|e| bad("header name", &e))?;
                    let mut value =
                        reqwest::header::HeaderValue::from_str(v.expose()).map_err(|_| {
                            bad("header value", &format!("{k} is not a valid header value"))
                        })?;
                    value.set_sensitive(true);
                    headers.insert(name, value);
                }
                if t.compression == Compression::Gzip {
                    headers.insert(
                        reqwest::header::CONTENT_ENCODING,
                        reqwest::header::HeaderValue::from_static("gzip"),
                    );
                }
                Ok(Client::Http {
                    http: http.build().map_err(|e| bad("http client", &e))?,
                    url: t.http_url(),
                    headers,
                })
            }
            Protocol::Grpc => {
                let mut endpoint = tonic::transport::Endpoint::from_shared(t.endpoint.clone())
                    .map_err(|e| bad("endpoint", &e))?
                    .timeout(t.timeout)
                    .connect_timeout(t.timeout);
                if t.endpoint.starts_with("https://") {
                    let mut tls = tonic::transport::ClientTlsConfig::new().with_native_roots();
                    if let Some(pem) = ca {
                        tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
                    }
                    endpoint = endpoint.tls_config(tls).map_err(|e| bad("tls", &e))?;
                }
                let mut metadata = Vec::new();
                for (k, v) in &t.headers {
                    let key =
                        tonic::metadata::MetadataKey::from_bytes(k.to_ascii_lowercase().as_bytes())
                            .map_err(|e| bad("header name", &e))?;
                    let value = v.expose().parse().map_err(|_| {
                        bad("header value", &format!("{k} is not a valid header value"))
                    })?;
                    metadata.push((key, value));
                }
                Ok(Client::Grpc {
                    channel: endpoint.connect_lazy(),
                    metadata,
                })
            }
        }
    }

    async fn send(&self, t: &Target, original: &Original) -> Result<(), ForwardError> {
        match self {
            Client::Http { http, url, headers } => {
                let (body, content_type) = match original {
                    Original::Protobuf(b) => (b.clone(), "application/x-protobuf"),
                    Original::Json { json, .. } => (json.clone(), "application/json"),
                };
                let body = if t.compression == Compression::Gzip {
                    use std::io::Write;
                    let mut gz =
                        flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
                    gz.write_all(&body)
                        .and_then(|_| gz.finish())
                        .map(Bytes::from)
                        .map_err(|e| ForwardError::Rejected(format!("gzip: {e}")))?
                } else {
                    body
                };
                let resp = http
                    .post(url)
                    .headers(headers.clone())
                    .header(reqwest::header::CONTENT_TYPE, content_type)
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| ForwardError::Retryable(error_chain(&e)))?;
                let status = resp.status();
                if status.is_success() {
                    return Ok(());
                }
                let text = resp.text().await.unwrap_or_default();
                let msg = format!(
                    "{url} answered {status}: {}",
                    text.chars().take(200).collect::<String>()
                );
                // OTLP/HTTP: 429, 502, 503 and 504 are retryable; any other error is final.
                if matches!(status.as_u16(), 429 | 502 | 503 | 504) {
                    Err(ForwardError::Retryable(msg))
                } else {
                    Err(ForwardError::Rejected(msg))
                }
            }
            Client::Grpc { channel, metadata } => {
                let body = match original {
                    Original::Protobuf(b) => b.clone(),
                    Original::Json {
                        protobuf: Some(p), ..
                    } => p.clone(),
                    Original::Json { protobuf: None, .. } => {
                        return Err(ForwardError::Rejected(
                            "a JSON export without its protobuf encoding".into(),
                        ));
                    }
                };
                let mut grpc = tonic::client::Grpc::new(channel.clone());
                if t.compression == Compression::Gzip {
                    grpc = grpc.send_compressed(tonic::codec::CompressionEncoding::Gzip);
                }
                grpc.ready().await.map_err(|e| {
                    ForwardError::Retryable(format!("connecting to {}: {e}", t.endpoint))
                })?;
                let mut req = tonic::Request::new(body);
                for (k, v) in metadata {
                    req.metadata_mut().insert(k.clone(), v.clone());
                }
                let path = http::uri::PathAndQuery::from_static(EXPORT_PATH);
                match grpc.unary(req, path, RawCodec).await {
                    Ok(_) => Ok(()),
                    Err(status) => {
                        let msg = format!(
                            "{} answered {:?}: {}",
                            t.endpoint,
                            status.code(),
                            status.message()
                        );
                        // The codes OTLP/gRPC calls retryable.
                        use tonic::Code::*;
                        if matches!(
                            status.code(),
                            Cancelled
                                | DeadlineExceeded
                                | ResourceExhausted
                                | Aborted
                                | OutOfRange
                                | Unavailable
                                | DataLoss
                        ) || error_is_transport(&status)
                        {
                            Err(ForwardError::Retryable(msg))
                        } else {
                            Err(ForwardError::Rejected(msg))
                        }
                    }
                }
            }
        }
    }
}

/// A connection failure surfaces as `Unknown` with a transport error as its source.
fn error_is_transport(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unknown
        && std::error::Error::source(status)
            .is_some_and(|s| s.downcast_ref::<tonic::transport::Error>().is_some())
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

/// Sends the message's bytes as they are; decodes the OTLP response.
#[derive(Clone, Copy)]
struct RawCodec;

impl tonic::codec::Codec for RawCodec {
    type Encode = Bytes;
    type Decode = ExportTraceServiceResponse;
    type Encoder = RawCodec;
    type Decoder = RawCodec;
    fn encoder(&mut self) -> Self::Encoder {
        RawCodec
    }
    fn decoder(&mut self) -> Self::Decoder {
        RawCodec
    }
}

impl tonic::codec::Encoder for RawCodec {
    type Item = Bytes;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Bytes,
        buf: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        use bytes::BufMut;
        buf.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawCodec {
    type Item = ExportTraceServiceResponse;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        buf: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<ExportTraceServiceResponse>, tonic::Status> {
        use prost::Message;
        ExportTraceServiceResponse::decode(buf)
            .map(Some)
            .map_err(|e| tonic::Status::internal(format!("decoding the response: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(endpoint: &str) -> Target {
        toml::from_str(&format!(
            "name = \"t\"\nendpoint = \"{endpoint}\"\nprotocol = \"http\"\n"
        ))
        .unwrap()
    }

    #[test]
    fn http_endpoints_without_a_path_get_the_otlp_one() {
        assert_eq!(
            target("http://127.0.0.1:4318").http_url(),
            "http://127.0.0.1:4318/v1/traces"
        );
        assert_eq!(
            target("https://otlp.example.com/").http_url(),
            "https://otlp.example.com/v1/traces"
        );
        assert_eq!(
            target("https://otlp.example.com/otlp/v1/traces").http_url(),
            "https://otlp.example.com/otlp/v1/traces"
        );
    }

    #[test]
    fn bad_targets_are_each_reported() {
        let f: Forward = toml::from_str(
            "[[targets]]\nname = \"a\"\nendpoint = \"127.0.0.1:4317\"\n\
             [[targets]]\nname = \"a\"\nendpoint = \"http://x:4317\"\nqueue_exports = 0\nheaders = { \"bad header\" = \"v\" }\n",
        )
        .unwrap();
        let mut p = Vec::new();
        f.validate(&mut p);
        assert_eq!(
            p,
            vec![
                "forward.targets[0] (a): `endpoint` \"127.0.0.1:4317\" is not an http:// or https:// URL".to_string(),
                "forward.targets[1] (a): the name is used twice".into(),
                "forward.targets[1] (a): \"bad header\" is not a valid header name".into(),
                "forward.targets[1] (a): `queue_exports` must be at least 1".into(),
            ]
        );
    }
}
