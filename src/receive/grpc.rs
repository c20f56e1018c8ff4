//! OTLP/gRPC: `opentelemetry.proto.collector.trace.v1.TraceService/Export`.
//!
//! The service is routed here rather than through the generated server so that its messages are
//! decoded by [`BoundedCodec`]: each export's decoded size is estimated from its bytes and
//! reserved from the shared budget before prost allocates anything.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Buf;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message;
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::{Request, Response, Status};

use super::budget::Reserved;
use super::{Ingest, ReceiveError, span_count};

const TRANSPORT: &str = "grpc";
const SERVICE: &str = "opentelemetry.proto.collector.trace.v1.TraceService";
const EXPORT: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

fn to_status(e: &ReceiveError) -> Status {
    let mut status = Status::new(e.grpc_code(), e.to_string());
    if let Some(secs) = e.retry_after_secs() {
        // Plain-text hint; OTLP clients back off exponentially on UNAVAILABLE regardless.
        if let Ok(v) = secs.to_string().parse() {
            status.metadata_mut().insert("retry-after", v);
        }
    }
    status
}

/// A decoded export and the decoded memory it holds from the budget.
pub(crate) struct Bounded {
    req: ExportTraceServiceRequest,
    reserved: Reserved,
    /// The message's bytes, kept when exports are forwarded.
    original: Option<bytes::Bytes>,
}

/// prost, with the decoded size estimated and reserved before decoding.
#[derive(Clone)]
struct BoundedCodec {
    ingest: Arc<Ingest>,
}

impl Codec for BoundedCodec {
    type Encode = ExportTraceServiceResponse;
    type Decode = Bounded;
    type Encoder = ResponseEncoder;
    type Decoder = BoundedCodec;

    fn encoder(&mut self) -> Self::Encoder {
        ResponseEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        self.clone()
    }
}

struct ResponseEncoder;

impl Encoder for ResponseEncoder {
    type Item = ExportTraceServiceResponse;
    type Error = Status;

    fn encode(&mut self, item: Self::Item, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        item.encode(buf)
            .map_err(|e| Status::internal(format!("encoding the response: {e}")))
    }
}

impl Decoder for BoundedCodec {
    type Item = Bounded;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<Bounded>, Status> {
        let refuse = |e: ReceiveError| {
            self.ingest.count_export(TRANSPORT, e.metric_label());
            to_status(&e)
        };
        // The message is one contiguous buffer (tonic reads it whole before decoding).
        let len = buf.remaining();
        let chunk = buf.chunk();
        let estimate = if chunk.len() == len {
            super::budget::estimate_protobuf(chunk)
        } else {
            super::budget::estimate_protobuf(&buf.copy_to_bytes(len))
        }
        .map_err(refuse)?;
        let reserved = self.ingest.reserve(estimate).map_err(refuse)?;
        let malformed =
            |e: prost::DecodeError| refuse(ReceiveError::Malformed(format!("protobuf: {e}")));
        if self.ingest.forwarding() {
            let original = buf.copy_to_bytes(len);
            let req = ExportTraceServiceRequest::decode(original.clone()).map_err(malformed)?;
            return Ok(Some(Bounded {
                req,
                reserved,
                original: Some(original),
            }));
        }
        let req = ExportTraceServiceRequest::decode(buf).map_err(malformed)?;
        Ok(Some(Bounded {
            req,
            reserved,
            original: None,
        }))
    }
}

#[derive(Clone)]
struct Export {
    ingest: Arc<Ingest>,
}

impl tonic::server::UnaryService<Bounded> for Export {
    type Response = ExportTraceServiceResponse;
    type Future =
        futures_util::future::BoxFuture<'static, Result<Response<Self::Response>, Status>>;

    fn call(&mut self, request: Request<Bounded>) -> Self::Future {
        let ingest = self.ingest.clone();
        Box::pin(async move {
            // The admission permit rides in the extensions until the export is answered.
            let (_meta, extensions, bounded) = request.into_parts();
            let Bounded {
                req,
                reserved,
                original,
            } = bounded;
            let principal = extensions
                .get::<super::auth::Principal>()
                .cloned()
                .ok_or_else(|| Status::unauthenticated("no credentials"))?;
            ingest.count_received(TRANSPORT, span_count(&req));
            let original = original.map(crate::forward::Original::Protobuf);
            let result = ingest.export(req, &principal, original).await;
            drop(reserved);
            match result {
                Ok(acc) => {
                    let result = if acc.rejected_spans > 0 {
                        "partial"
                    } else {
                        "ok"
                    };
                    ingest.count_export(TRANSPORT, result);
                    Ok(Response::new(ExportTraceServiceResponse {
                        partial_success: (acc.rejected_spans > 0).then_some(
                            ExportTracePartialSuccess {
                                rejected_spans: acc.rejected_spans,
                                error_message: acc.error_message,
                            },
                        ),
                    }))
                }
                Err(e) => {
                    ingest.count_export(TRANSPORT, e.metric_label());
                    Err(to_status(&e))
                }
            }
        })
    }
}

/// The trace service: `Export`, decoded within the budget; any other method is UNIMPLEMENTED.
#[derive(Clone)]
struct TraceServer {
    ingest: Arc<Ingest>,
    max_decoded_bytes: usize,
    request_timeout: std::time::Duration,
}

impl tonic::server::NamedService for TraceServer {
    const NAME: &'static str = SERVICE;
}

impl<B> tower::Service<http::Request<B>> for TraceServer
where
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = futures_util::future::BoxFuture<'static, Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != EXPORT {
            let status = Status::unimplemented(format!("{} is not served", req.uri().path()));
            return Box::pin(async move { Ok(status.into_http()) });
        }
        let (ingest, limit, timeout) = (
            self.ingest.clone(),
            self.max_decoded_bytes,
            self.request_timeout,
        );
        Box::pin(async move {
            let mut grpc = tonic::server::Grpc::new(BoundedCodec {
                ingest: ingest.clone(),
            })
            .accept_compressed(CompressionEncoding::Gzip)
            .accept_compressed(CompressionEncoding::Zstd)
            .max_decoding_message_size(limit);
            let export = Export {
                ingest: ingest.clone(),
            };
            // Dropping the export at its deadline drops its admission permit with it.
            match tokio::time::timeout(timeout, grpc.unary(export, req)).await {
                Ok(resp) => Ok(resp),
                Err(_) => {
                    ingest.count_export(TRANSPORT, "timeout");
                    Ok(Status::deadline_exceeded(format!(
                        "the export did not complete within {timeout:?}"
                    ))
                    .into_http())
                }
            }
        })
    }
}

/// tonic answers a request it cannot read itself, before the codec or the handler run: INTERNAL
/// for a truncated message or a broken compressed body, OUT_OF_RANGE for a message over the
/// decoding limit, RESOURCE_EXHAUSTED for a compressed one that decodes over it. OTLP exporters
/// retry OUT_OF_RANGE and RESOURCE_EXHAUSTED (the same bad request again and again) and nothing
/// here answers any of the three, so each is the client's permanent error: INVALID_ARGUMENT,
/// counted like the HTTP receiver's 400 and 413.
fn decode_errors_are_permanent<B>(
    ingest: &Ingest,
    mut resp: http::Response<B>,
) -> http::Response<B> {
    let Some(code) = resp
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
    else {
        return resp;
    };
    let result = match tonic::Code::from_i32(code) {
        tonic::Code::Internal => "malformed",
        tonic::Code::OutOfRange | tonic::Code::ResourceExhausted => "too_large",
        _ => return resp,
    };
    ingest.count_export(TRANSPORT, result);
    let code = (tonic::Code::InvalidArgument as i32).to_string();
    if let Ok(v) = http::HeaderValue::from_str(&code) {
        resp.headers_mut().insert("grpc-status", v);
    }
    resp
}

/// Limits of the gRPC receiver.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Largest message, decompressed.
    pub max_decoded_bytes: usize,
    /// Time one export may take, from its headers to its answer: a stream that sends its headers
    /// and nothing more gives its export slot back after it (DEADLINE_EXCEEDED, which exporters
    /// retry; counted as `result="timeout"`).
    pub request_timeout: std::time::Duration,
}

/// Serves OTLP/gRPC on the connections of `conns` until `shutdown` resolves.
pub(crate) async fn serve(
    conns: tokio::sync::mpsc::Receiver<crate::listener::Conn>,
    ingest: Arc<Ingest>,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let gate = ingest.clone();
    let counted = ingest.clone();
    let service = TraceServer {
        ingest,
        max_decoded_bytes: limits.max_decoded_bytes,
        request_timeout: limits.request_timeout,
    };
    // Runs on the request headers, before the body is decoded: an overloaded or disconnected
    // toolsight refuses early and cheaply.
    let admit = move |mut req: Request<()>| {
        let authorization = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let checked = gate
            .authenticate(authorization)
            .and_then(|principal| Ok((principal, gate.admit()?)));
        match checked {
            Ok((principal, permit)) => {
                // The export is in progress on its connection until it is answered.
                let in_flight = req
                    .extensions()
                    .get::<Arc<crate::listener::ConnState>>()
                    .map(|c| Arc::new(c.begin()));
                if let Some(f) = in_flight {
                    req.extensions_mut().insert(f);
                }
                req.extensions_mut().insert(permit);
                req.extensions_mut().insert(principal);
                Ok(req)
            }
            Err(e) => {
                gate.count_export(TRANSPORT, e.metric_label());
                Err(to_status(&e))
            }
        }
    };
    let incoming = futures_util::stream::unfold(conns, |mut conns| async move {
        let conn = conns.recv().await?;
        Some((Ok::<_, std::io::Error>(conn), conns))
    });
    tonic::transport::Server::builder()
        .max_concurrent_streams(Some(crate::listener::MAX_CONCURRENT_STREAMS))
        .layer(tower::util::MapResponseLayer::new(move |resp| {
            decode_errors_are_permanent(&counted, resp)
        }))
        // OTLP exports are large (a 1000-span request is hundreds of KiB): with HTTP/2's default
        // 64 KiB windows a client waits for a window update every 64 KiB.
        .initial_stream_window_size(Some(4 << 20))
        .initial_connection_window_size(Some(8 << 20))
        .add_service(tonic::service::interceptor::InterceptedService::new(
            service, admit,
        ))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await
}
