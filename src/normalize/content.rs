//! Measuring tool results and fingerprinting tool arguments without keeping them.

use regex::Regex;
use serde_json::Value;
use sha2::{Digest, Sha256};

/// What toolsight keeps of a captured tool result: its size and shape, never its content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResultShape {
    /// Byte length of the captured result attribute.
    pub bytes: i64,
    /// Items in the result: rows of a returned list, keys of a returned object, content parts.
    /// `None` when the captured value was cut and cannot be parsed.
    pub items: Option<i32>,
    /// No content: an empty content list, empty text, `[]`, `{}` or null.
    pub empty: bool,
    /// `isError` / `is_error` read from the result payload, when it says.
    pub is_error: Option<bool>,
}

/// Measures a captured result value (a JSON string in every source seen so far).
pub fn measure_result(raw: &str) -> ResultShape {
    let bytes = raw.len() as i64;
    match serde_json::from_str::<Value>(raw) {
        Ok(v) => {
            let items = count_items(&v);
            ResultShape {
                bytes,
                items: Some(items.min(i32::MAX as u64) as i32),
                empty: items == 0,
                is_error: is_error_flag(&v),
            }
        }
        // Not JSON (plain text, or a JSON value cut by an attribute length limit).
        Err(_) => {
            let t = raw.trim();
            ResultShape {
                bytes,
                items: if looks_truncated_json(t) {
                    None
                } else {
                    Some(i32::from(!t.is_empty()))
                },
                empty: t.is_empty(),
                is_error: None,
            }
        }
    }
}

fn looks_truncated_json(t: &str) -> bool {
    t.starts_with('{') || t.starts_with('[')
}

fn is_error_flag(v: &Value) -> Option<bool> {
    let obj = v.as_object()?;
    obj.get("isError")
        .or_else(|| obj.get("is_error"))
        .and_then(Value::as_bool)
}

/// Counts the items of a result: a list's length, an object's keys, the parts of a
/// `CallToolResult`, looking through the wrappers MCP SDKs put around returned values.
pub fn count_items(v: &Value) -> u64 {
    match v {
        Value::Null => 0,
        Value::Bool(_) | Value::Number(_) => 1,
        Value::String(s) => count_text(s),
        Value::Array(items) => {
            // A content list holding one text part: look inside the text.
            if items.len() == 1
                && let Some(text) = text_part(&items[0])
            {
                return count_text(text);
            }
            if !items.is_empty() && items.iter().all(|i| text_part(i).is_some()) {
                return items
                    .iter()
                    .filter(|i| text_part(i).is_some_and(|t| count_text(t) > 0))
                    .count() as u64;
            }
            items.len() as u64
        }
        Value::Object(obj) => {
            // CallToolResult: structured content wins, then the content parts.
            if let Some(content) = obj.get("content").filter(|c| c.is_array()) {
                if let Some(sc) = obj.get("structuredContent").filter(|s| !s.is_null()) {
                    return count_items(sc);
                }
                return count_items(content);
            }
            // Wrappers: FastMCP's structured `{"result": …}`, OpenLLMetry's
            // `{"result": …, "is_error": …}`.
            if let Some(inner) = obj.get("result") {
                let only_wrapper = obj
                    .keys()
                    .all(|k| k == "result" || k == "is_error" || k == "isError");
                if only_wrapper {
                    return count_items(inner);
                }
            }
            obj.len() as u64
        }
    }
}

fn text_part(v: &Value) -> Option<&str> {
    let obj = v.as_object()?;
    if obj.get("type").and_then(Value::as_str) != Some("text") {
        return None;
    }
    obj.get("text")
        .or_else(|| obj.get("content"))
        .and_then(Value::as_str)
}

fn count_text(s: &str) -> u64 {
    let t = s.trim();
    if t.is_empty() {
        return 0;
    }
    if (t.starts_with('[') || t.starts_with('{'))
        && let Ok(v) = serde_json::from_str::<Value>(t)
    {
        return match &v {
            Value::Array(a) => a.len() as u64,
            Value::Object(o) => o.len() as u64,
            _ => 1,
        };
    }
    1
}

/// A 16-byte fingerprint of the canonical form of a tool's arguments (keys sorted, no
/// whitespace), so equal arguments hash equally whatever their key order.
pub fn args_hash(args: &Value) -> [u8; 16] {
    let mut canon = String::new();
    canonical_json(args, &mut canon);
    let digest = Sha256::digest(canon.as_bytes());
    let mut out = [0u8; 16];
    out.copy_from_slice(&digest[..16]);
    out
}

fn canonical_json(v: &Value, out: &mut String) {
    match v {
        Value::Object(obj) => {
            let mut keys: Vec<&String> = obj.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String((*k).clone()).to_string());
                out.push(':');
                canonical_json(&obj[k.as_str()], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical_json(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// Parses captured arguments: a JSON string, or already structured.
pub fn parse_args(raw: &str) -> Value {
    serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_owned()))
}

/// The redaction applied to the opt-in stored copies of arguments and results.
#[derive(Debug, Clone)]
pub struct Redactor {
    /// Object keys (lowercase, matched case-insensitively as substrings) whose values are replaced.
    pub keys: Vec<String>,
    /// Patterns replaced inside every string value.
    pub patterns: Vec<Regex>,
    /// The stored copy is cut to this many bytes.
    pub max_bytes: usize,
}

pub const REDACTED: &str = "[REDACTED]";

impl Redactor {
    /// A redacted, size-bounded JSON copy of `v`.
    pub fn redact(&self, v: &Value) -> String {
        let mut v = v.clone();
        self.redact_in_place(&mut v);
        let mut s = v.to_string();
        if s.len() > self.max_bytes {
            let mut cut = self.max_bytes;
            while !s.is_char_boundary(cut) {
                cut -= 1;
            }
            s.truncate(cut);
            s.push('…');
        }
        s
    }

    fn redact_in_place(&self, v: &mut Value) {
        match v {
            Value::Object(obj) => {
                for (k, val) in obj.iter_mut() {
                    let lk = k.to_ascii_lowercase();
                    if self.keys.iter().any(|rk| lk.contains(rk.as_str())) {
                        *val = Value::String(REDACTED.to_owned());
                    } else {
                        self.redact_in_place(val);
                    }
                }
            }
            Value::Array(items) => items.iter_mut().for_each(|i| self.redact_in_place(i)),
            Value::String(s) => {
                for re in &self.patterns {
                    if re.is_match(s) {
                        *s = re.replace_all(s, REDACTED).into_owned();
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn empty_results_are_recognised_in_every_shape() {
        for raw in [
            r#"{"content": [], "structuredContent": {"result": []}, "isError": false}"#,
            "[]",
            "{}",
            "",
            "  ",
            "null",
            r#"{"content": [{"type": "text", "text": "[]"}]}"#,
            r#"{"content": [{"type": "text", "text": ""}]}"#,
            r#"[{"type": "text", "content": "{}"}]"#,
        ] {
            let s = measure_result(raw);
            assert!(s.empty, "{raw:?} should be empty");
            assert_eq!(s.items, Some(0), "{raw:?}");
        }
    }

    #[test]
    fn items_count_rows_inside_text_content() {
        let raw = r#"{"content":[{"type":"text","text":"[1,2,3]"}],"isError":false}"#;
        let s = measure_result(raw);
        assert_eq!(s.items, Some(3));
        assert!(!s.empty);
        assert_eq!(s.is_error, Some(false));
        assert_eq!(s.bytes, raw.len() as i64);
        let s = measure_result(r#"{"result": "same", "is_error": true}"#);
        assert_eq!((s.items, s.is_error), (Some(1), Some(true)));
        let s =
            measure_result(r#"{"content":[],"structuredContent":{"result":[{"a":1},{"a":2}]}}"#);
        assert_eq!(s.items, Some(2));
    }

    #[test]
    fn cut_json_is_measured_but_not_counted() {
        let s = measure_result(r#"{"content": [{"type": "text", "text": "xxxx"#);
        assert_eq!(s.items, None);
        assert!(!s.empty);
    }

    #[test]
    fn argument_hash_ignores_key_order_and_whitespace() {
        let a = parse_args(r#"{"b": 1, "a": {"y": [1, 2], "x": "s"}}"#);
        let b = json!({"a": {"x": "s", "y": [1, 2]}, "b": 1});
        assert_eq!(args_hash(&a), args_hash(&b));
        assert_ne!(args_hash(&a), args_hash(&json!({"b": 2})));
    }

    #[test]
    fn redaction_replaces_keys_and_patterns_and_bounds_size() {
        let r = Redactor {
            keys: vec!["password".into(), "token".into()],
            patterns: vec![Regex::new(r"[\w.+-]+@[\w-]+\.[\w.]+").unwrap()],
            max_bytes: 60,
        };
        let out = r.redact(&json!({"user": "ann@example.com", "Password": "hunter2", "q": "ok"}));
        assert!(
            !out.contains("hunter2") && !out.contains("ann@example.com"),
            "{out}"
        );
        assert!(out.contains(REDACTED));
        let long = r.redact(&json!({"q": "x".repeat(500)}));
        assert!(long.len() <= 64, "{}", long.len());
    }
}
