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
pub struct Limits {
    /// Largest request body as sent (compressed).
    pub max_body_bytes: usize,
    /// Largest request body after decompression.
    pub max_decoded_bytes: usize,
}

/// The body format of an OTLP/HTTP export.
#[derive(Clone, Copy, PartialEq, Debug)]
pub enum Format {
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
pub fn router(ingest: Arc<Ingest>, limits: Limits) -> Router {
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
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if req.method() != axum::http::Method::POST {
        return next.run(req).await; // 405 from the router
    }
    let format = match format_of(req.headers()) {
        Ok(f) => f,
        // Answered in protobuf, the OTLP default, when the client's type is not ours.
        Err(e) => return error_response(&state, Format::Protobuf, e),
    };
    let authorization = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    let principal = match state.ingest.authenticate(authorization) {
        Ok(p) => p,
        Err(e) => return error_response(&state, format, e),
    };
    match state.ingest.admit() {
        // Held until the response is ready.
        Ok(_permit) => {
            req.extensions_mut().insert(format);
            req.extensions_mut().insert(principal);
            next.run(req).await
        }
        Err(e) => error_response(&state, format, e),
    }
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
    let req = match decompress(encoding, &body, state.limits.max_decoded_bytes)
        .and_then(|b| decode(format, &b))
    {
        Ok(r) => r,
        Err(e) => return error_response(&state, format, e),
    };
    state
        .ingest
        .count_received(format.transport(), span_count(&req));
    match state.ingest.export(req, &principal).await {
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
pub fn decompress(encoding: &str, body: &Bytes, limit: usize) -> Result<Bytes, ReceiveError> {
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
pub fn decode(format: Format, body: &[u8]) -> Result<ExportTraceServiceRequest, ReceiveError> {
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
