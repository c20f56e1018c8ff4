//! The OTLP client side of the load generator: the stack the OpenTelemetry exporters use (tonic
//! for gRPC, HTTP POST of protobuf or JSON), sending pre-encoded bodies so the generator spends
//! its CPU on the service, not on itself.

use std::io::Write;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use prost::Message;
use tonic::codec::{Codec, CompressionEncoding, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::codegen::http::uri::PathAndQuery;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// Which OTLP transport to drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Protocol {
    Grpc,
    HttpProtobuf,
    HttpJson,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::HttpProtobuf => "http-protobuf",
            Protocol::HttpJson => "http-json",
        }
    }
}

/// What the service answered to one export.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Success; `rejected` spans were reported in `partial_success`.
    Accepted { rejected: i64 },
    /// Refused with a retryable status (429/503, UNAVAILABLE, RESOURCE_EXHAUSTED).
    Retryable(String),
    /// Refused for good, or a transport error.
    Failed(String),
}

#[derive(Clone)]
enum Kind {
    Grpc(tonic::client::Grpc<Channel>),
    Http {
        client: reqwest::Client,
        url: String,
        json: bool,
    },
}

/// One connection's worth of client; clone it per worker.
#[derive(Clone)]
pub struct Client {
    kind: Kind,
    gzip: bool,
}

const EXPORT_PATH: &str = "/opentelemetry.proto.collector.trace.v1.TraceService/Export";

impl Client {
    /// `endpoint` is `host:port` of the gRPC or HTTP receiver.
    pub async fn connect(
        protocol: Protocol,
        endpoint: &str,
        gzip: bool,
        timeout: Duration,
    ) -> anyhow::Result<Client> {
        let kind = match protocol {
            Protocol::Grpc => {
                let channel = Endpoint::from_shared(format!("http://{endpoint}"))?
                    .timeout(timeout)
                    .tcp_nodelay(true)
                    .initial_stream_window_size(Some(4 << 20))
                    .initial_connection_window_size(Some(8 << 20))
                    .connect()
                    .await?;
                let mut grpc = tonic::client::Grpc::new(channel);
                if gzip {
                    grpc = grpc.send_compressed(CompressionEncoding::Gzip);
                }
                Kind::Grpc(grpc)
            }
            Protocol::HttpProtobuf | Protocol::HttpJson => Kind::Http {
                client: {
                    toolsight::install_crypto_provider();
                    reqwest::Client::builder()
                }
                .timeout(timeout)
                .tcp_nodelay(true)
                .build()?,
                url: format!("http://{endpoint}/v1/traces"),
                json: protocol == Protocol::HttpJson,
            },
        };
        Ok(Client { kind, gzip })
    }

    /// Whether requests are encoded as OTLP/JSON (ids in hex) rather than protobuf.
    pub fn is_json(&self) -> bool {
        matches!(self.kind, Kind::Http { json: true, .. })
    }

    /// Encodes a request the way this client sends it, uncompressed.
    pub fn encode_raw(&self, req: &ExportTraceServiceRequest) -> Vec<u8> {
        if self.is_json() {
            serde_json::to_vec(req).unwrap_or_default()
        } else {
            req.encode_to_vec()
        }
    }

    /// The body to send: gzip-compressed for HTTP when asked (gRPC compresses itself).
    pub fn finish_body(&self, raw: Vec<u8>) -> Bytes {
        if self.gzip && matches!(self.kind, Kind::Http { .. }) {
            let mut gz = flate2::write::GzEncoder::new(
                Vec::with_capacity(raw.len() / 4),
                flate2::Compression::fast(),
            );
            // Writing to a Vec cannot fail.
            let _ = gz.write_all(&raw);
            return Bytes::from(gz.finish().unwrap_or_default());
        }
        Bytes::from(raw)
    }

    pub async fn send(&mut self, body: Bytes) -> Outcome {
        match &mut self.kind {
            Kind::Grpc(grpc) => {
                if let Err(e) = grpc.ready().await {
                    return Outcome::Failed(format!("grpc not ready: {e}"));
                }
                let path = PathAndQuery::from_static(EXPORT_PATH);
                match grpc
                    .unary::<Bytes, ExportTraceServiceResponse, _>(
                        tonic::Request::new(body),
                        path,
                        RawCodec,
                    )
                    .await
                {
                    Ok(resp) => Outcome::Accepted {
                        rejected: resp
                            .into_inner()
                            .partial_success
                            .map_or(0, |p| p.rejected_spans),
                    },
                    Err(s) if matches!(s.code(), Code::Unavailable | Code::ResourceExhausted) => {
                        Outcome::Retryable(format!("{:?}", s.code()))
                    }
                    Err(s) => Outcome::Failed(format!("{:?}: {}", s.code(), s.message())),
                }
            }
            Kind::Http { client, url, json } => {
                let mut req = client
                    .post(url.as_str())
                    .header(
                        "content-type",
                        if *json {
                            "application/json"
                        } else {
                            "application/x-protobuf"
                        },
                    )
                    .body(body);
                if self.gzip {
                    req = req.header("content-encoding", "gzip");
                }
                let resp = match req.send().await {
                    Ok(r) => r,
                    Err(e) => return Outcome::Failed(format!("http: {e}")),
                };
                let status = resp.status().as_u16();
                let body = resp.bytes().await.unwrap_or_default();
                match status {
                    200 => Outcome::Accepted {
                        rejected: if *json {
                            serde_json::from_slice::<serde_json::Value>(&body)
                                .ok()
                                .and_then(|v| v["partialSuccess"]["rejectedSpans"].as_i64())
                                .unwrap_or(0)
                        } else {
                            ExportTraceServiceResponse::decode(body.as_ref())
                                .ok()
                                .and_then(|r| r.partial_success)
                                .map_or(0, |p| p.rejected_spans)
                        },
                    },
                    429 | 502 | 503 | 504 => Outcome::Retryable(format!("HTTP {status}")),
                    _ => Outcome::Failed(format!("HTTP {status}")),
                }
            }
        }
    }
}

/// Sends already-encoded protobuf bytes; decodes the response with prost.
#[derive(Clone, Copy)]
struct RawCodec;

struct RawEncoder;
struct RespDecoder;

impl Codec for RawCodec {
    type Encode = Bytes;
    type Decode = ExportTraceServiceResponse;
    type Encoder = RawEncoder;
    type Decoder = RespDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RespDecoder {
        RespDecoder
    }
}

impl Encoder for RawEncoder {
    type Item = Bytes;
    type Error = Status;
    fn encode(&mut self, item: Bytes, dst: &mut EncodeBuf<'_>) -> Result<(), Status> {
        dst.put(item);
        Ok(())
    }
}

impl Decoder for RespDecoder {
    type Item = ExportTraceServiceResponse;
    type Error = Status;
    fn decode(
        &mut self,
        src: &mut DecodeBuf<'_>,
    ) -> Result<Option<ExportTraceServiceResponse>, Status> {
        let chunk = src.copy_to_bytes(src.remaining());
        ExportTraceServiceResponse::decode(chunk)
            .map(Some)
            .map_err(|e| Status::internal(format!("decoding response: {e}")))
    }
}
