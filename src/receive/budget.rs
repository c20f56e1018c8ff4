//! What an export costs once decoded, known before it is decoded. A span can take 2 bytes on
//! the wire and a few hundred in memory, so a byte limit alone lets a small body become gigabytes:
//! each export's decoded size is estimated from a scan of its bytes (protobuf: the message tree,
//! counted by type without allocating; JSON: its objects), refused beyond what one export may
//! take, and reserved from a budget shared by every export in progress.

use std::mem::size_of;
use std::sync::Arc;

use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::span::{Event, Link};
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::ReceiveError;

/// Message nesting accepted (a span's attribute value is 5 deep; each array or key-value-list
/// level adds one or two; prost's own limit is 100).
const MAX_DEPTH: usize = 64;

/// The shared budget of decoded memory, in KiB (a semaphore's permits).
pub(crate) struct Budget {
    kib: Arc<Semaphore>,
    total_kib: usize,
}

/// Decoded memory reserved for one export; given back when dropped.
#[derive(Debug)]
pub struct Reserved(#[allow(dead_code)] Option<OwnedSemaphorePermit>);

impl Budget {
    /// A budget of `bytes` shared by every export in progress; one export may take half of it.
    pub(crate) fn new(bytes: usize) -> Budget {
        let total_kib = (bytes / 1024).clamp(2, Semaphore::MAX_PERMITS);
        Budget {
            kib: Arc::new(Semaphore::new(total_kib)),
            total_kib,
        }
    }

    /// The most one export may take, in bytes.
    pub(crate) fn per_export(&self) -> usize {
        self.total_kib / 2 * 1024
    }

    /// Reserves `estimate` bytes: too large for any export is the client's error (413 /
    /// INVALID_ARGUMENT); no room now, because of the exports in progress, is retryable.
    pub(crate) fn reserve(&self, estimate: usize) -> Result<Reserved, ReceiveError> {
        if estimate > self.per_export() {
            return Err(ReceiveError::TooLargeDecoded {
                estimate,
                limit: self.per_export(),
            });
        }
        let kib = estimate.div_ceil(1024).max(1) as u32;
        self.kib
            .clone()
            .try_acquire_many_owned(kib)
            .map(|p| Reserved(Some(p)))
            .map_err(|_| ReceiveError::Overloaded)
    }
}

/// Bytes a JSON export takes once decoded, at most: every object is counted as the largest
/// message it could be, plus the text itself (strings are no longer decoded than encoded).
pub(crate) fn estimate_json(body: &[u8]) -> usize {
    let objects = body.iter().filter(|&&b| b == b'{').count();
    let largest = size_of::<Span>()
        .max(size_of::<KeyValue>() + size_of::<AnyValue>())
        .max(size_of::<ResourceSpans>())
        .max(size_of::<ScopeSpans>());
    objects.saturating_mul(largest).saturating_add(body.len())
}

/// Bytes a protobuf `ExportTraceServiceRequest` takes once decoded, from a scan of its message
/// tree (no allocation); malformed nesting is refused here already.
pub(crate) fn estimate_protobuf(body: &[u8]) -> Result<usize, ReceiveError> {
    let mut scan = Scan::default();
    scan.message(body, Kind::Request, 0)
        .map_err(|e| ReceiveError::Malformed(format!("protobuf: {e}")))?;
    Ok(scan.bytes.saturating_add(body.len()))
}

#[derive(Clone, Copy)]
enum Kind {
    Request,
    ResourceSpans,
    Resource,
    ScopeSpans,
    Scope,
    Span,
    Event,
    Link,
    KeyValue,
    AnyValue,
    ArrayValue,
    KeyValueList,
}

impl Kind {
    /// The message type of field `tag`, when it is a message the decoder allocates.
    fn child(self, tag: u32) -> Option<Kind> {
        Some(match (self, tag) {
            (Kind::Request, 1) => Kind::ResourceSpans,
            (Kind::ResourceSpans, 1) => Kind::Resource,
            (Kind::ResourceSpans, 2) => Kind::ScopeSpans,
            (Kind::Resource, 1)
            | (Kind::Scope, 3)
            | (Kind::Span, 9)
            | (Kind::Event, 3)
            | (Kind::Link, 4)
            | (Kind::KeyValueList, 1) => Kind::KeyValue,
            (Kind::ScopeSpans, 1) => Kind::Scope,
            (Kind::ScopeSpans, 2) => Kind::Span,
            (Kind::Span, 11) => Kind::Event,
            (Kind::Span, 13) => Kind::Link,
            (Kind::KeyValue, 2) | (Kind::ArrayValue, 1) => Kind::AnyValue,
            (Kind::AnyValue, 5) => Kind::ArrayValue,
            (Kind::AnyValue, 6) => Kind::KeyValueList,
            _ => return None,
        })
    }

    fn size(self) -> usize {
        use opentelemetry_proto::tonic::common::v1 as common;
        match self {
            Kind::Request => 0,
            Kind::ResourceSpans => size_of::<ResourceSpans>(),
            Kind::Resource => size_of::<Resource>(),
            Kind::ScopeSpans => size_of::<ScopeSpans>(),
            Kind::Scope => size_of::<common::InstrumentationScope>(),
            Kind::Span => size_of::<Span>(),
            Kind::Event => size_of::<Event>(),
            Kind::Link => size_of::<Link>(),
            Kind::KeyValue => size_of::<KeyValue>(),
            Kind::AnyValue => size_of::<AnyValue>(),
            Kind::ArrayValue => size_of::<common::ArrayValue>(),
            Kind::KeyValueList => size_of::<common::KeyValueList>(),
        }
    }
}

#[derive(Default)]
struct Scan {
    bytes: usize,
}

fn varint(buf: &mut &[u8]) -> Result<u64, &'static str> {
    let mut v: u64 = 0;
    for i in 0..10 {
        let (&b, rest) = buf.split_first().ok_or("truncated varint")?;
        *buf = rest;
        v |= u64::from(b & 0x7f) << (7 * i);
        if b < 0x80 {
            return Ok(v);
        }
    }
    Err("varint too long")
}

impl Scan {
    fn message(&mut self, mut buf: &[u8], kind: Kind, depth: usize) -> Result<(), &'static str> {
        if depth > MAX_DEPTH {
            return Err("values nested too deep");
        }
        self.bytes = self.bytes.saturating_add(kind.size());
        while !buf.is_empty() {
            let key = varint(&mut buf)?;
            let (tag, wire) = ((key >> 3) as u32, key & 7);
            match wire {
                0 => {
                    varint(&mut buf)?;
                }
                1 => buf = buf.get(8..).ok_or("truncated fixed64")?,
                5 => buf = buf.get(4..).ok_or("truncated fixed32")?,
                2 => {
                    let len = usize::try_from(varint(&mut buf)?).map_err(|_| "length")?;
                    let field = buf.get(..len).ok_or("truncated field")?;
                    buf = &buf[len..];
                    if let Some(child) = kind.child(tag) {
                        self.message(field, child, depth + 1)?;
                    }
                }
                _ => return Err("unsupported wire type"),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
    use prost::Message;

    fn request(spans: usize, attrs: usize) -> ExportTraceServiceRequest {
        let kv = |i: usize| KeyValue {
            key: format!("k{i}"),
            value: Some(AnyValue {
                value: Some(
                    opentelemetry_proto::tonic::common::v1::any_value::Value::StringValue(
                        "v".into(),
                    ),
                ),
            }),
            ..Default::default()
        };
        ExportTraceServiceRequest {
            resource_spans: vec![ResourceSpans {
                scope_spans: vec![ScopeSpans {
                    spans: (0..spans)
                        .map(|_| Span {
                            attributes: (0..attrs).map(kv).collect(),
                            ..Default::default()
                        })
                        .collect(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
        }
    }

    #[test]
    fn empty_spans_cost_their_struct_not_their_two_bytes() {
        let body = request(100_000, 0).encode_to_vec();
        assert!(body.len() < 300_000, "{}", body.len());
        let estimate = estimate_protobuf(&body).unwrap();
        assert!(estimate >= 100_000 * size_of::<Span>(), "{estimate}");
        let json = serde_json::to_vec(&request(1000, 0)).unwrap();
        assert!(estimate_json(&json) >= 1000 * size_of::<Span>());
    }

    #[test]
    fn the_estimate_bounds_what_decoding_allocates() {
        // The structs of every span and attribute, whatever their count.
        for (spans, attrs) in [(1, 0), (10, 10), (1000, 3)] {
            let req = request(spans, attrs);
            let body = req.encode_to_vec();
            let structs = spans * size_of::<Span>()
                + spans * attrs * (size_of::<KeyValue>() + size_of::<AnyValue>());
            assert!(estimate_protobuf(&body).unwrap() >= structs);
        }
    }

    #[test]
    fn truncated_and_too_deep_are_malformed() {
        let body = request(10, 2).encode_to_vec();
        assert!(estimate_protobuf(&body[..body.len() - 3]).is_err());
        // An attribute value of arrays nested 70 deep.
        let mut v = AnyValue {
            value: Some(opentelemetry_proto::tonic::common::v1::any_value::Value::IntValue(1)),
        };
        for _ in 0..70 {
            v = AnyValue {
                value: Some(
                    opentelemetry_proto::tonic::common::v1::any_value::Value::ArrayValue(
                        opentelemetry_proto::tonic::common::v1::ArrayValue { values: vec![v] },
                    ),
                ),
            };
        }
        let mut req = request(1, 0);
        req.resource_spans[0].scope_spans[0].spans[0].attributes = vec![KeyValue {
            key: "deep".into(),
            value: Some(v),
            ..Default::default()
        }];
        assert!(estimate_protobuf(&req.encode_to_vec()).is_err());
    }

    #[test]
    fn the_budget_refuses_what_no_export_may_take_and_defers_the_rest() {
        let b = Budget::new(4 << 20);
        assert!(matches!(
            b.reserve(3 << 20),
            Err(ReceiveError::TooLargeDecoded { .. })
        ));
        let first = b.reserve(2 << 20).unwrap();
        let second = b.reserve(2 << 20).unwrap();
        assert!(matches!(b.reserve(1 << 20), Err(ReceiveError::Overloaded)));
        drop((first, second));
        assert!(b.reserve(1 << 20).is_ok());
    }
}
