//! OTLP receivers (gRPC and HTTP) and the one place their errors map to protocol statuses.

pub mod auth;
pub(crate) mod budget;
pub(crate) mod grpc;
pub(crate) mod http;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;

use crate::metrics::{ExportLabel, KindLabel, Metrics, ReasonLabel, TransportLabel};
use crate::normalize::{self, Options};
use crate::store::{SubmitError, Writer};

/// The `[otlp]` settings: the two OTLP listeners and the bounds on what a client may send.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Otlp {
    pub grpc_listen: std::net::SocketAddr,
    pub http_listen: std::net::SocketAddr,
    pub max_request_bytes: usize,
    pub max_decompressed_bytes: usize,
    pub max_concurrent_exports: usize,
    /// Time an OTLP/HTTP client has to send a whole request body once its headers are in.
    #[serde(with = "humantime_serde")]
    pub body_timeout: std::time::Duration,
    /// On shutdown, how long exports in progress may take before their connections are cut.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: std::time::Duration,
    /// Estimated decoded memory of all exports in progress, at most; one export may take half.
    pub decode_budget_bytes: usize,
    /// Connections open at most on each OTLP port; beyond, new ones are closed at once.
    pub max_connections: usize,
    /// A connection with no byte either way and no export in progress for this long is closed
    /// (also bounds an HTTP/1.1 client's time to send its headers, and a TLS handshake).
    #[serde(with = "humantime_serde")]
    pub idle_timeout: std::time::Duration,
}

impl Default for Otlp {
    fn default() -> Self {
        Otlp {
            grpc_listen: ([127, 0, 0, 1], 4317).into(),
            http_listen: ([127, 0, 0, 1], 4318).into(),
            max_request_bytes: 16 << 20,
            max_decompressed_bytes: 64 << 20,
            max_concurrent_exports: 64,
            body_timeout: std::time::Duration::from_secs(15),
            drain_timeout: std::time::Duration::from_secs(20),
            decode_budget_bytes: 512 << 20,
            max_connections: 4096,
            idle_timeout: std::time::Duration::from_secs(60),
        }
    }
}

/// Errors answered to an exporter. Each maps to one HTTP status and one gRPC code, and says
/// whether the client should retry.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReceiveError {
    #[error("unsupported content type {0:?}: use application/x-protobuf or application/json")]
    UnsupportedMediaType(String),
    #[error("unsupported content encoding {0:?}: use gzip, zstd, deflate or none")]
    UnsupportedEncoding(String),
    #[error("request body larger than {limit} bytes")]
    TooLarge { limit: usize },
    #[error(
        "the export would take about {estimate} bytes once decoded, more than the {limit} one export may take: send fewer spans per request"
    )]
    TooLargeDecoded { estimate: usize, limit: usize },
    #[error("malformed export request: {0}")]
    Malformed(String),
    #[error("the request body did not arrive within {0:?}")]
    BodyTimeout(std::time::Duration),
    #[error(
        "toolsight is overloaded (write queue full or too many exports in progress), retry later"
    )]
    Overloaded,
    #[error("storage unavailable, retry later: {0}")]
    Unavailable(String),
    #[error("{0}")]
    Unauthenticated(&'static str),
    #[error("this token may not send spans for service {0:?}")]
    PermissionDenied(String),
}

impl ReceiveError {
    /// Whether an OTLP client should retry the same request.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ReceiveError::Overloaded | ReceiveError::Unavailable(_)
        )
    }

    pub fn http_status(&self) -> u16 {
        match self {
            ReceiveError::UnsupportedMediaType(_) | ReceiveError::UnsupportedEncoding(_) => 415,
            ReceiveError::TooLarge { .. } | ReceiveError::TooLargeDecoded { .. } => 413,
            ReceiveError::Malformed(_) => 400,
            ReceiveError::BodyTimeout(_) => 408,
            ReceiveError::Overloaded | ReceiveError::Unavailable(_) => 503,
            ReceiveError::Unauthenticated(_) => 401,
            ReceiveError::PermissionDenied(_) => 403,
        }
    }

    pub fn grpc_code(&self) -> tonic::Code {
        match self {
            ReceiveError::UnsupportedMediaType(_)
            | ReceiveError::UnsupportedEncoding(_)
            | ReceiveError::Malformed(_) => tonic::Code::InvalidArgument,
            ReceiveError::TooLarge { .. } | ReceiveError::TooLargeDecoded { .. } => {
                tonic::Code::InvalidArgument
            }
            ReceiveError::BodyTimeout(_) => tonic::Code::DeadlineExceeded,
            ReceiveError::Overloaded | ReceiveError::Unavailable(_) => tonic::Code::Unavailable,
            ReceiveError::Unauthenticated(_) => tonic::Code::Unauthenticated,
            ReceiveError::PermissionDenied(_) => tonic::Code::PermissionDenied,
        }
    }

    /// Seconds a client should wait before retrying, for retryable errors.
    pub fn retry_after_secs(&self) -> Option<u64> {
        match self {
            ReceiveError::Overloaded => Some(1),
            ReceiveError::Unavailable(_) => Some(5),
            _ => None,
        }
    }

    /// The label of `toolsight_exports_total{result}`.
    pub fn metric_label(&self) -> &'static str {
        match self {
            ReceiveError::UnsupportedMediaType(_) => "unsupported_media_type",
            ReceiveError::UnsupportedEncoding(_) => "unsupported_encoding",
            ReceiveError::TooLarge { .. } | ReceiveError::TooLargeDecoded { .. } => "too_large",
            ReceiveError::Malformed(_) => "malformed",
            ReceiveError::BodyTimeout(_) => "body_timeout",
            ReceiveError::Overloaded => "overloaded",
            ReceiveError::Unavailable(_) => "unavailable",
            ReceiveError::Unauthenticated(_) => "unauthenticated",
            ReceiveError::PermissionDenied(_) => "permission_denied",
        }
    }
}

/// A successful export: how many spans were rejected and why (for `partial_success`).
#[derive(Debug, Default, PartialEq)]
pub struct Accepted {
    pub rejected_spans: i64,
    pub error_message: String,
}

/// Held while an admitted export is decoded, normalized and stored; bounds the exports in
/// progress (and so the memory their bodies take).
#[derive(Clone)]
pub struct Admission(#[allow(dead_code)] Arc<Permit>);

/// An export in progress: counted in `toolsight_exports_in_progress` until dropped.
pub struct Permit {
    _permit: tokio::sync::OwnedSemaphorePermit,
    gauge: prometheus_client::metrics::gauge::Gauge,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// The receive → normalize → store path shared by both transports.
pub struct Ingest {
    in_progress: Arc<tokio::sync::Semaphore>,
    writer: Writer,
    options: Options,
    metrics: Arc<Metrics>,
    ready: Arc<AtomicBool>,
    auth: Arc<auth::Auth>,
    guard: normalize::cardinality::Guard,
    budget: budget::Budget,
    forward: crate::forward::Forwarder,
}

impl Ingest {
    pub fn new(
        writer: Writer,
        options: Options,
        max_concurrent_exports: usize,
        metrics: Arc<Metrics>,
        ready: Arc<AtomicBool>,
    ) -> Self {
        Ingest {
            in_progress: Arc::new(tokio::sync::Semaphore::new(max_concurrent_exports.max(1))),
            writer,
            options,
            metrics,
            ready,
            auth: Arc::new(auth::Auth::open()),
            guard: normalize::cardinality::Guard::new(Default::default()),
            budget: budget::Budget::new(512 << 20),
            forward: Default::default(),
        }
    }

    /// Bounds the decoded memory of the exports in progress (see `budget`).
    pub fn with_decode_budget(mut self, bytes: usize) -> Self {
        self.budget = budget::Budget::new(bytes);
        self
    }

    /// Reserves an export's estimated decoded size from the budget, before it is decoded.
    pub fn reserve(&self, estimate: usize) -> Result<budget::Reserved, ReceiveError> {
        self.budget.reserve(estimate)
    }

    /// Bounds the distinct services, keys and sessions (see `normalize::cardinality`).
    pub fn with_cardinality(mut self, limits: normalize::cardinality::Limits) -> Self {
        self.guard = normalize::cardinality::Guard::new(limits);
        self
    }

    /// Passes accepted exports on to the `[forward]` targets.
    pub fn with_forwarder(mut self, forward: crate::forward::Forwarder) -> Self {
        self.forward = forward;
        self
    }

    /// Whether accepted exports are forwarded (so their bytes must be kept).
    pub fn forwarding(&self) -> bool {
        self.forward.is_enabled()
    }

    /// Whether a JSON export must also be kept as protobuf (for a gRPC forwarding target).
    pub fn forwarding_needs_protobuf(&self) -> bool {
        self.forward.needs_protobuf()
    }

    /// Requires the given tokens on every export.
    pub fn with_auth(mut self, auth: Arc<auth::Auth>) -> Self {
        self.auth = auth;
        self
    }

    /// Checks the `Authorization` header (HTTP) or metadata (gRPC), before the body is read.
    pub fn authenticate(
        &self,
        authorization: Option<&str>,
    ) -> Result<auth::Principal, ReceiveError> {
        self.auth.authenticate(authorization).map_err(|f| {
            ReceiveError::Unauthenticated(match f {
                auth::AuthFailure::Missing => {
                    "a bearer token is required (Authorization: Bearer <token>)"
                }
                auth::AuthFailure::Invalid => "invalid token",
            })
        })
    }

    /// Refuses work before it is decoded when it could not be stored anyway, or when too many
    /// exports are already in progress. The permit must be held until the export is answered.
    pub fn admit(&self) -> Result<Admission, ReceiveError> {
        if !self.ready.load(Ordering::Relaxed) {
            return Err(ReceiveError::Unavailable("database unreachable".into()));
        }
        if self.writer.is_saturated() {
            return Err(ReceiveError::Overloaded);
        }
        self.in_progress
            .clone()
            .try_acquire_owned()
            .map(|p| {
                self.metrics.exports_in_progress.inc();
                Admission(Arc::new(Permit {
                    _permit: p,
                    gauge: self.metrics.exports_in_progress.clone(),
                }))
            })
            .map_err(|_| ReceiveError::Overloaded)
    }

    /// Normalizes and stores one export; returns once its records are committed. An accepted
    /// export's `original` bytes are then queued for the forwarding targets.
    pub async fn export(
        &self,
        req: ExportTraceServiceRequest,
        principal: &auth::Principal,
        original: Option<crate::forward::Original>,
    ) -> Result<Accepted, ReceiveError> {
        if let Some(service) = principal.forbidden_service(&req) {
            let service = service.to_owned();
            self.metrics
                .spans_rejected
                .get_or_create(&ReasonLabel {
                    reason: "unauthorized_service",
                })
                .inc_by(span_count(&req) as u64);
            tracing::warn!(token = principal.name(), service = %service, "export for a service outside the token's scope refused");
            return Err(ReceiveError::PermissionDenied(service));
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as i64)
            .unwrap_or(0);
        let mut records = normalize::normalize(&req, now, &self.options);
        drop(req);
        if records.keys_cut > 0 {
            self.metrics.keys_truncated.inc_by(records.keys_cut);
        }
        if records.scrubbed > 0 {
            self.metrics.scrubbed_fields.inc_by(records.scrubbed);
        }
        let folded = self.guard.apply(&mut records, now, principal.name());
        for (kind, n) in [
            ("service", folded.services),
            ("key", folded.keys),
            ("session", folded.sessions),
        ] {
            if n > 0 {
                self.metrics
                    .cardinality_folded
                    .get_or_create(&KindLabel { kind })
                    .inc_by(n);
            }
        }
        self.metrics
            .cardinality_tracked
            .set(self.guard.tracked() as i64);
        let spans = records.spans;
        let rejected = records.rejected_total();
        for (reason, n) in &records.rejected {
            self.metrics
                .spans_rejected
                .get_or_create(&ReasonLabel {
                    reason: reason.as_str(),
                })
                .inc_by(*n);
        }
        let accepted = Accepted {
            rejected_spans: rejected as i64,
            error_message: records.first_rejection.clone().unwrap_or_default(),
        };
        let dropped = records.dropped.clone();
        let mcp = !records.tool_calls.is_empty() || !records.mcp_requests.is_empty();
        if records.records() > 0 {
            self.writer.submit(records).await.map_err(|e| match e {
                SubmitError::QueueFull => ReceiveError::Overloaded,
                e @ (SubmitError::Closed | SubmitError::Unavailable(_)) => {
                    ReceiveError::Unavailable(e.to_string())
                }
                e @ SubmitError::Rejected(_) => ReceiveError::Malformed(e.to_string()),
            })?;
        }
        for (reason, n) in dropped {
            self.metrics
                .spans_dropped
                .get_or_create(&ReasonLabel {
                    reason: reason.as_str(),
                })
                .inc_by(n);
        }
        self.metrics.spans_accepted.inc_by(spans - rejected);
        if let Some(original) = original {
            self.forward.offer(&original, mcp);
        }
        Ok(accepted)
    }

    pub(crate) fn count_received(&self, transport: &'static str, spans: usize) {
        self.metrics
            .spans_received
            .get_or_create(&TransportLabel { transport })
            .inc_by(spans as u64);
    }

    pub(crate) fn count_export(&self, transport: &'static str, result: &'static str) {
        self.metrics
            .exports
            .get_or_create(&ExportLabel { transport, result })
            .inc();
    }
}

pub(crate) fn span_count(req: &ExportTraceServiceRequest) -> usize {
    req.resource_spans
        .iter()
        .flat_map(|rs| &rs.scope_spans)
        .map(|ss| ss.spans.len())
        .sum()
}
