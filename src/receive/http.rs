//! OTLP/HTTP: `POST /v1/traces`, protobuf or JSON, optionally compressed.

use std::io::Read;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message;

use super::{Ingest, ReceiveError, span_count};

const TRANSPORT_PB: &str = "http_protobuf";
const TRANSPORT_JSON: &str = "http_json";

/// Size limits of the HTTP receiver.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Largest request body as sent (compressed).
    pub max_body_bytes: usize,
    /// Largest request body after decompression.
    pub max_decoded_bytes: usize,
    /// Time to receive a whole body once the headers are in.
    pub body_timeout: std::time::Duration,
}

/// A refused request's body is read and thrown away (at most this much, for at most
/// [`DISCARD_TIME`]) before the answer, so an HTTP/1.1 client still sending it reads the 503
/// instead of a broken pipe.
const DISCARD_BYTES: usize = 64 << 20;
const DISCARD_TIME: std::time::Duration = std::time::Duration::from_secs(5);

/// The body format of an OTLP/HTTP export.
#[derive(Clone, Copy, PartialEq, Debug)]
pub(crate) enum Format {
    Protobuf,
    Json,
}

impl Format {
    fn content_type(self) -> &'static str {
        match self {
            Format::Protobuf => "application/x-protobuf",
            Format::Json => "application/json",
        }
    }
    fn transport(self) -> &'static str {
        match self {
            Format::Protobuf => TRANSPORT_PB,
            Format::Json => TRANSPORT_JSON,
        }
    }
}

/// `google.rpc.Status`, the body of OTLP/HTTP error responses.
#[derive(Clone, PartialEq, prost::Message, serde::Serialize)]
struct RpcStatus {
    #[prost(int32, tag = "1")]
    code: i32,
    #[prost(string, tag = "2")]
    message: String,
}

#[derive(Clone)]
struct AppState {
    ingest: Arc<Ingest>,
    limits: Limits,
}

/// The OTLP/HTTP router.
pub(crate) fn router(ingest: Arc<Ingest>, limits: Limits) -> Router {
    let state = AppState { ingest, limits };
    Router::new()
        .route("/v1/traces", post(export))
        // Runs before the body is read: refused exports cost no bandwidth or memory.
        .route_layer(axum::middleware::from_fn_with_state(state.clone(), admit))
        .layer(DefaultBodyLimit::max(limits.max_body_bytes))
        .with_state(state)
}

async fn admit(
    State(state): State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if req.method() != axum::http::Method::POST {
        return next.run(req).await; // 405 from the router
    }
    let (mut parts, body) = req.into_parts();
    let format = match format_of(&parts.headers) {
        Ok(f) => f,
        // Answered in protobuf, the OTLP default, when the client's type is not ours.
        Err(e) => return refuse(&state, Format::Protobuf, e, body).await,
    };
    let authorization = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let principal = match state.ingest.authenticate(authorization) {
        Ok(p) => p,
        Err(e) => return refuse(&state, format, e, body).await,
    };
    // Held until the response is ready.
    let _permit = match state.ingest.admit() {
        Ok(p) => p,
        Err(e) => return refuse(&state, format, e, body).await,
    };
    // The whole body within the time allowed: a client trickling bytes (or sending none) loses
    // its export slot and its connection instead of holding them.
    let limit = state.limits.max_body_bytes;
    let bytes =
        match tokio::time::timeout(state.limits.body_timeout, axum::body::to_bytes(body, limit))
            .await
        {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                let too_large = std::error::Error::source(&e)
                    .is_some_and(|s| s.is::<http_body_util::LengthLimitError>());
                let e = if too_large {
                    ReceiveError::TooLarge { limit }
                } else {
                    ReceiveError::Malformed(format!("reading the request body: {e}"))
                };
                return error_response(&state, format, e);
            }
            Err(_) => {
                let mut resp = error_response(
                    &state,
                    format,
                    ReceiveError::BodyTimeout(state.limits.body_timeout),
                );
                resp.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
                return resp;
            }
        };
    parts.extensions.insert(format);
    parts.extensions.insert(principal);
    next.run(axum::extract::Request::from_parts(
        parts,
        axum::body::Body::from(bytes),
    ))
    .await
}

/// Answers a request refused before its body was read, after reading (and dropping) what the
/// client sends of it, bounded in bytes and time; past the bound the connection is closed.
async fn refuse(
    state: &AppState,
    format: Format,
    e: ReceiveError,
    body: axum::body::Body,
) -> Response {
    use http_body_util::BodyExt;
    let mut body = body;
    let mut read = 0usize;
    let drained = tokio::time::timeout(DISCARD_TIME, async {
        while let Some(frame) = body.frame().await {
            let Ok(frame) = frame else { return false };
            if let Some(data) = frame.data_ref() {
                read += data.len();
                if read > DISCARD_BYTES {
                    return false;
                }
            }
        }
        true
    })
    .await
    .unwrap_or(false);
    let mut resp = error_response(state, format, e);
    if !drained {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

fn format_of(headers: &HeaderMap) -> Result<Format, ReceiveError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mime = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match mime.as_str() {
        "application/x-protobuf" | "application/protobuf" => Ok(Format::Protobuf),
        "application/json" => Ok(Format::Json),
        _ => Err(ReceiveError::UnsupportedMediaType(ct.to_owned())),
    }
}

/// Runs behind `admit`, which has already checked the content type.
async fn export(
    State(state): State<AppState>,
    axum::Extension(format): axum::Extension<Format>,
    axum::Extension(principal): axum::Extension<super::auth::Principal>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Response {
    let body = match body {
        Ok(b) => b,
        Err(rejection) if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return error_response(
                &state,
                format,
                ReceiveError::TooLarge {
                    limit: state.limits.max_body_bytes,
                },
            );
        }
        Err(rejection) => {
            return error_response(
                &state,
                format,
                ReceiveError::Malformed(rejection.body_text()),
            );
        }
    };
    let encoding = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    // The decoded size is estimated and reserved before anything is decoded.
    let decoded = decompress(encoding, &body, state.limits.max_decoded_bytes).and_then(|b| {
        let estimate = match format {
            Format::Protobuf => super::budget::estimate_protobuf(&b)?,
            Format::Json => super::budget::estimate_json(&b),
        };
        let reserved = state.ingest.reserve(estimate)?;
        let req = decode(format, &b)?;
        // Accepted exports are forwarded as they came (JSON also as protobuf for gRPC targets).
        let original = state.ingest.forwarding().then(|| match format {
            Format::Protobuf => crate::forward::Original::Protobuf(b.clone()),
            Format::Json => crate::forward::Original::Json {
                json: b.clone(),
                protobuf: state
                    .ingest
                    .forwarding_needs_protobuf()
                    .then(|| bytes::Bytes::from(req.encode_to_vec())),
            },
        });
        Ok((req, original, reserved))
    });
    drop(body);
    let (req, original, _reserved) = match decoded {
        Ok(r) => r,
        Err(e) => return error_response(&state, format, e),
    };
    state
        .ingest
        .count_received(format.transport(), span_count(&req));
    match state.ingest.export(req, &principal, original).await {
        Ok(acc) => {
            let partial = acc.rejected_spans > 0;
            state
                .ingest
                .count_export(format.transport(), if partial { "partial" } else { "ok" });
            let resp = ExportTraceServiceResponse {
                partial_success: partial.then_some(ExportTracePartialSuccess {
                    rejected_spans: acc.rejected_spans,
                    error_message: acc.error_message,
                }),
            };
            let body = match format {
                Format::Protobuf => resp.encode_to_vec(),
                // Unset fields are omitted, as OTLP/JSON encoders do: `{}` on full success.
                Format::Json => match &resp.partial_success {
                    None => b"{}".to_vec(),
                    Some(p) => serde_json::to_vec(&serde_json::json!({
                        "partialSuccess": {"rejectedSpans": p.rejected_spans, "errorMessage": p.error_message}
                    }))
                    .unwrap_or_default(),
                },
            };
            ([(header::CONTENT_TYPE, format.content_type())], body).into_response()
        }
        Err(e) => error_response(&state, format, e),
    }
}

fn error_response(state: &AppState, format: Format, e: ReceiveError) -> Response {
    state
        .ingest
        .count_export(format.transport(), e.metric_label());
    if e.http_status() >= 500 && !e.is_retryable() {
        tracing::error!(error = %e, "export failed");
    } else {
        tracing::debug!(error = %e, "export refused");
    }
    let status = RpcStatus {
        code: e.grpc_code() as i32,
        message: e.to_string(),
    };
    let body = match format {
        Format::Protobuf => status.encode_to_vec(),
        Format::Json => serde_json::to_vec(&status).unwrap_or_default(),
    };
    let code = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = (code, [(header::CONTENT_TYPE, format.content_type())], body).into_response();
    if code == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"toolsight\""),
        );
    }
    if let Some(secs) = e.retry_after_secs() {
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    resp
}

/// Decompresses per the `Content-Encoding` value (`""` when absent), refusing output beyond
/// `limit` bytes (no decompression bombs: reading stops at the limit).
pub(crate) fn decompress(
    encoding: &str,
    body: &Bytes,
    limit: usize,
) -> Result<Bytes, ReceiveError> {
    let encoding = encoding.trim().to_ascii_lowercase();
    let reader: Box<dyn Read + '_> = match encoding.as_str() {
        "" | "identity" => {
            if body.len() > limit {
                return Err(ReceiveError::TooLarge { limit });
            }
            return Ok(body.clone());
        }
        "gzip" | "x-gzip" => Box::new(flate2::read::MultiGzDecoder::new(body.as_ref())),
        "deflate" => Box::new(flate2::read::ZlibDecoder::new(body.as_ref())),
        "zstd" => Box::new(
            zstd::stream::read::Decoder::new(body.as_ref())
                .map_err(|e| ReceiveError::Malformed(format!("zstd: {e}")))?,
        ),
        other => return Err(ReceiveError::UnsupportedEncoding(other.to_owned())),
    };
    let mut out = Vec::with_capacity((body.len() * 4).min(limit));
    reader
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| ReceiveError::Malformed(format!("{encoding} body: {e}")))?;
    if out.len() > limit {
        return Err(ReceiveError::TooLarge { limit });
    }
    Ok(Bytes::from(out))
}

/// Decodes an (already decompressed) export body.
pub(crate) fn decode(
    format: Format,
    body: &[u8],
) -> Result<ExportTraceServiceRequest, ReceiveError> {
    match format {
        Format::Protobuf => ExportTraceServiceRequest::decode(body)
            .map_err(|e| ReceiveError::Malformed(format!("protobuf: {e}"))),
        Format::Json => {
            serde_json::from_slice(body).map_err(|e| ReceiveError::Malformed(format!("json: {e}")))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn gzip_and_zstd_round_trip() {
        let data = vec![7u8; 10_000];
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&data).unwrap();
        let gz = Bytes::from(gz.finish().unwrap());
        assert_eq!(decompress("gzip", &gz, 20_000).unwrap().len(), 10_000);
        let zs = Bytes::from(zstd::encode_all(data.as_slice(), 3).unwrap());
        assert_eq!(decompress("zstd", &zs, 20_000).unwrap().len(), 10_000);
    }

    #[test]
    fn decompression_bombs_stop_at_the_limit() {
        // 64 MiB of zeros compress to ~64 KiB.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        let chunk = vec![0u8; 1 << 20];
        for _ in 0..64 {
            gz.write_all(&chunk).unwrap();
        }
        let bomb = Bytes::from(gz.finish().unwrap());
        assert!(bomb.len() < 200_000);
        let err = decompress("gzip", &bomb, 4 << 20).unwrap_err();
        assert!(matches!(err, ReceiveError::TooLarge { limit } if limit == 4 << 20));
    }

    #[test]
    fn corrupt_or_unknown_encodings_are_refused() {
        let junk = Bytes::from_static(b"not gzip at all");
        assert!(matches!(
            decompress("gzip", &junk, 1000),
            Err(ReceiveError::Malformed(_))
        ));
        assert!(matches!(
            decompress("br", &junk, 1000),
            Err(ReceiveError::UnsupportedEncoding(_))
        ));
    }

    #[test]
    fn content_types() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONTENT_TYPE,
            "application/json; charset=utf-8".parse().unwrap(),
        );
        assert_eq!(format_of(&h).unwrap(), Format::Json);
        h.insert(header::CONTENT_TYPE, "text/plain".parse().unwrap());
        assert!(matches!(
            format_of(&h),
            Err(ReceiveError::UnsupportedMediaType(_))
        ));
    }
}
