//! Typed lookups over OTLP attribute lists.
//!
//! Spans carry a handful of attributes, so a linear scan beats building a map per span.

use std::borrow::Cow;

use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value::Value};

/// The value stored under `key`, if any.
pub(crate) fn get<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a Value> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

/// A string attribute, or a scalar rendered as a string.
pub(crate) fn get_str<'a>(attrs: &'a [KeyValue], key: &str) -> Option<Cow<'a, str>> {
    scalar_str(get(attrs, key)?)
}

/// A string attribute that is present and not empty.
pub(crate) fn get_nonempty<'a>(attrs: &'a [KeyValue], key: &str) -> Option<Cow<'a, str>> {
    get_str(attrs, key).filter(|s| !s.trim().is_empty())
}

/// The first of `keys` that holds a non-empty string.
pub(crate) fn first_nonempty<'a>(attrs: &'a [KeyValue], keys: &[&str]) -> Option<Cow<'a, str>> {
    keys.iter().find_map(|k| get_nonempty(attrs, k))
}

/// An integer attribute; accepts ints, doubles and numeric strings (instrumentations disagree).
pub(crate) fn get_i64(attrs: &[KeyValue], key: &str) -> Option<i64> {
    match get(attrs, key)? {
        Value::IntValue(i) => Some(*i),
        Value::DoubleValue(d) if d.is_finite() => Some(*d as i64),
        Value::StringValue(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// The first of `keys` that holds an integer.
pub(crate) fn first_i64(attrs: &[KeyValue], keys: &[&str]) -> Option<i64> {
    keys.iter().find_map(|k| get_i64(attrs, k))
}

/// A captured HTTP header: semantic conventions store a string array, older instrumentations a
/// plain string. The first value is returned.
pub(crate) fn header<'a>(attrs: &'a [KeyValue], key: &str) -> Option<Cow<'a, str>> {
    match get(attrs, key)? {
        Value::ArrayValue(arr) => arr
            .values
            .iter()
            .filter_map(|v| v.value.as_ref())
            .find_map(scalar_str),
        v => scalar_str(v),
    }
}

fn scalar_str(v: &Value) -> Option<Cow<'_, str>> {
    match v {
        Value::StringValue(s) => Some(Cow::Borrowed(s.as_str())),
        Value::IntValue(i) => Some(Cow::Owned(i.to_string())),
        Value::DoubleValue(d) => Some(Cow::Owned(d.to_string())),
        Value::BoolValue(b) => Some(Cow::Borrowed(if *b { "true" } else { "false" })),
        _ => None,
    }
}

/// Logfire's placeholder for a value it judged sensitive: `[Scrubbed due to 'auth']`. Such a
/// value is not data: it must never become a name, a key or part of a hash.
pub(crate) fn is_scrubbed(s: &str) -> bool {
    s.trim_start().starts_with("[Scrubbed due to ")
}

/// Whether any string inside `v` (keys included) is a scrubbed placeholder.
pub(crate) fn holds_scrubbed(v: &serde_json::Value) -> bool {
    use serde_json::Value as J;
    match v {
        J::String(s) => is_scrubbed(s),
        J::Array(a) => a.iter().any(holds_scrubbed),
        J::Object(o) => o.iter().any(|(k, v)| is_scrubbed(k) || holds_scrubbed(v)),
        _ => false,
    }
}

/// Converts an attribute value into JSON, for attributes that carry structured content as
/// OTLP maps instead of JSON strings (`gen_ai.tool.call.arguments` may be either).
pub(crate) fn to_json(v: &Value) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        Value::StringValue(s) => J::String(s.clone()),
        Value::BoolValue(b) => J::Bool(*b),
        Value::IntValue(i) => J::from(*i),
        Value::DoubleValue(d) => serde_json::Number::from_f64(*d).map_or(J::Null, J::Number),
        Value::BytesValue(b) => J::String(hex::encode(b)),
        Value::ArrayValue(a) => J::Array(
            a.values
                .iter()
                .map(|v| v.value.as_ref().map_or(J::Null, to_json))
                .collect(),
        ),
        Value::KvlistValue(kv) => J::Object(
            kv.values
                .iter()
                .map(|kv| {
                    let v = kv
                        .value
                        .as_ref()
                        .and_then(|v| v.value.as_ref())
                        .map_or(J::Null, to_json);
                    (kv.key.clone(), v)
                })
                .collect(),
        ),
        // A string-table reference (profiles signal only); never seen on spans.
        Value::StringValueStrindex(_) => J::Null,
    }
}
