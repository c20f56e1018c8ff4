//! OTLP/gRPC: `opentelemetry.proto.collector.trace.v1.TraceService/Export`.

use std::sync::Arc;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTracePartialSuccess, ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use tokio::net::TcpListener;
use tonic::codec::CompressionEncoding;
use tonic::{Request, Response, Status};

use super::{Ingest, ReceiveError, span_count};

const TRANSPORT: &str = "grpc";

struct Receiver {
    ingest: Arc<Ingest>,
}

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

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        // The admission permit rides in the extensions until the export is answered.
        let (_meta, extensions, req) = request.into_parts();
        let principal = extensions
            .get::<super::auth::Principal>()
            .cloned()
            .ok_or_else(|| Status::unauthenticated("no credentials"))?;
        self.ingest.count_received(TRANSPORT, span_count(&req));
        match self.ingest.export(req, &principal).await {
            Ok(acc) => {
                let result = if acc.rejected_spans > 0 {
                    "partial"
                } else {
                    "ok"
                };
                self.ingest.count_export(TRANSPORT, result);
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
                self.ingest.count_export(TRANSPORT, e.metric_label());
                Err(to_status(&e))
            }
        }
    }
}

/// tonic answers a request it cannot decode itself, before the handler runs: INTERNAL for a
/// garbage or truncated message or a broken compressed body, OUT_OF_RANGE for a message over the
/// decoding limit, RESOURCE_EXHAUSTED for a compressed one that decodes over it. OTLP exporters
/// retry OUT_OF_RANGE and RESOURCE_EXHAUSTED (the same bad request again and again) and the
/// handler never answers any of the three, so each is the client's permanent error here:
/// INVALID_ARGUMENT, counted like the HTTP receiver's 400 and 413.
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

/// Serves OTLP/gRPC on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    ingest: Arc<Ingest>,
    max_decoded_bytes: usize,
    tls: Option<tonic::transport::ServerTlsConfig>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), tonic::transport::Error> {
    let gate = ingest.clone();
    let counted = ingest.clone();
    let service = TraceServiceServer::new(Receiver { ingest })
        .accept_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Zstd)
        .max_decoding_message_size(max_decoded_bytes);
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
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    builder
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
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener),
            shutdown,
        )
        .await
}
