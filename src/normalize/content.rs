//! Measuring tool results and fingerprinting tool arguments without keeping them.

use std::borrow::Cow;

use regex::Regex;
use serde_json::Value;
use serde_json::value::RawValue;
use sha2::{Digest, Sha256};

/// What toolsight keeps of a captured tool result: its size and shape, never its content.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResultShape {
    /// Byte length of the result. `None` when only part of it was captured.
    pub bytes: Option<i64>,
    /// Items in the result: rows of a returned list, keys of a returned object, content parts.
    /// `None` when the captured value was cut and cannot be parsed, or is only part of the result.
    pub items: Option<i32>,
    /// No content: an empty content list, empty text, `[]`, `{}` or null.
    pub empty: bool,
    /// `isError` / `is_error` read from the result payload, when it says.
    pub is_error: Option<bool>,
}

impl ResultShape {
    /// The shape of a result of which only a part was captured: emptiness and the error flag
    /// stand, the size and the item count are unknown.
    pub fn partial(self) -> ResultShape {
        ResultShape {
            bytes: None,
            items: None,
            ..self
        }
    }
}

/// Measures a captured result value (a JSON string in every source seen so far). Parses only
/// as deep as needed, borrowing from the input: no value tree is built.
pub(crate) fn measure_result(raw: &str) -> ResultShape {
    let bytes = raw.len() as i64;
    // Parsed one level at a time; malformed JSON surfaces as an error at the top level.
    match top_node(raw.trim()) {
        Some(node) => {
            let items = count_node(&node);
            ResultShape {
                bytes: Some(bytes),
                items: Some(items.min(i32::MAX as u64) as i32),
                empty: items == 0,
                is_error: match &node {
                    Node::Object(entries) => entries
                        .get("isError")
                        .or_else(|| entries.get("is_error"))
                        .and_then(|v| serde_json::from_str::<bool>(v.get()).ok()),
                    _ => None,
                },
            }
        }
        // Not JSON (plain text, or a JSON value cut by an attribute length limit).
        None => {
            let t = raw.trim();
            ResultShape {
                bytes: Some(bytes),
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

/// One level of a JSON value, its children left unparsed.
enum Node<'a> {
    Null,
    Scalar,
    Str(Cow<'a, str>),
    Array(Vec<&'a RawValue>),
    Object(Entries<'a>),
}

/// An object's members in order, values unparsed.
struct Entries<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'a> Entries<'a> {
    fn get(&self, key: &str) -> Option<&'a RawValue> {
        self.0.iter().find(|(k, _)| k == key).map(|(_, v)| *v)
    }
    fn len(&self) -> usize {
        self.0.len()
    }
    fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(k, _)| k.as_ref())
    }
}

impl<'de: 'a, 'a> serde::Deserialize<'de> for Entries<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for V<'a> {
            type Value = Entries<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<M: serde::de::MapAccess<'de>>(
                self,
                mut m: M,
            ) -> Result<Entries<'a>, M::Error> {
                let mut out = Vec::new();
                while let Some(k) = m.next_key::<Key<'de>>()? {
                    out.push((k.0, m.next_value::<&'de RawValue>()?));
                }
                Ok(Entries(out))
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// A string borrowed from the input when it has no escapes.
struct Key<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> serde::Deserialize<'de> for Key<'a> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(std::marker::PhantomData<&'a ()>);
        impl<'de: 'a, 'a> serde::de::Visitor<'de> for V<'a> {
            type Value = Key<'a>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Key<'a>, E> {
                Ok(Key(Cow::Borrowed(v)))
            }
            fn visit_str<E>(self, v: &str) -> Result<Key<'a>, E> {
                Ok(Key(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E>(self, v: String) -> Result<Key<'a>, E> {
                Ok(Key(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V(std::marker::PhantomData))
    }
}

/// The top level of a document, or `None` when it is not valid JSON at that level.
fn top_node(text: &str) -> Option<Node<'_>> {
    match text.as_bytes().first()? {
        b'{' => serde_json::from_str::<Entries>(text).ok().map(Node::Object),
        b'[' => serde_json::from_str::<Vec<&RawValue>>(text)
            .ok()
            .map(Node::Array),
        _ => serde_json::from_str::<&RawValue>(text).ok().map(node),
    }
}

fn node(raw: &RawValue) -> Node<'_> {
    let text = raw.get();
    match text.as_bytes().first() {
        Some(b'n') => Node::Null,
        Some(b'"') => serde_json::from_str::<Key>(text).map_or(Node::Scalar, |k| Node::Str(k.0)),
        Some(b'[') => {
            serde_json::from_str::<Vec<&RawValue>>(text).map_or(Node::Scalar, Node::Array)
        }
        Some(b'{') => serde_json::from_str::<Entries>(text).map_or(Node::Scalar, Node::Object),
        _ => Node::Scalar,
    }
}

/// Counts the items of a result: a list's length, an object's keys, the parts of a
/// `CallToolResult`, looking through the wrappers MCP SDKs put around returned values.
fn count_node(n: &Node<'_>) -> u64 {
    match n {
        Node::Null => 0,
        Node::Scalar => 1,
        Node::Str(s) => count_text(s),
        Node::Array(items) => {
            let texts: Vec<Option<Cow<'_, str>>> = items.iter().map(|i| text_part(i)).collect();
            // A content list holding one text part: look inside the text.
            if let [Some(text)] = texts.as_slice() {
                return count_text(text);
            }
            if !texts.is_empty() && texts.iter().all(Option::is_some) {
                return texts.iter().flatten().filter(|t| count_text(t) > 0).count() as u64;
            }
            items.len() as u64
        }
        Node::Object(entries) => {
            // CallToolResult: structured content wins, then the content parts.
            if let Some(content) = entries.get("content").filter(|c| c.get().starts_with('[')) {
                if let Some(sc) = entries
                    .get("structuredContent")
                    .filter(|s| s.get() != "null")
                {
                    return count_node(&node(sc));
                }
                return count_node(&node(content));
            }
            // Wrappers: FastMCP's structured `{"result": …}`, OpenLLMetry's
            // `{"result": …, "is_error": …}`.
            if let Some(inner) = entries.get("result")
                && entries
                    .keys()
                    .all(|k| k == "result" || k == "is_error" || k == "isError")
            {
                return count_node(&node(inner));
            }
            entries.len() as u64
        }
    }
}

/// The text of a `{"type": "text", "text": …}` content part (`content` in OpenLLMetry's copy).
fn text_part(v: &RawValue) -> Option<Cow<'_, str>> {
    let Node::Object(entries) = node(v) else {
        return None;
    };
    if entries.get("type").map(RawValue::get) != Some("\"text\"") {
        return None;
    }
    let t = entries.get("text").or_else(|| entries.get("content"))?;
    match node(t) {
        Node::Str(s) => Some(s),
        _ => None,
    }
}

fn count_text(s: &str) -> u64 {
    let t = s.trim();
    if t.is_empty() {
        return 0;
    }
    top_level_items(t).unwrap_or(1)
}

/// Elements of a JSON array or members of a JSON object, counted in one pass over the bytes
/// without building anything. `None` when `t` is not a single bracketed JSON value.
fn top_level_items(t: &str) -> Option<u64> {
    let b = t.as_bytes();
    let (open, close) = match b.first()? {
        b'[' => (b'[', b']'),
        b'{' => (b'{', b'}'),
        _ => return None,
    };
    let (mut depth, mut in_str, mut escaped) = (0usize, false, false);
    let (mut commas, mut any) = (0u64, false);
    for (i, &c) in b.iter().enumerate() {
        if in_str {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match c {
            b'"' => {
                in_str = true;
                any |= depth == 1;
            }
            b'[' | b'{' => {
                any |= depth == 1;
                depth += 1;
            }
            b']' | b'}' => {
                depth = depth.checked_sub(1)?;
                if depth == 0 {
                    // The value must end here, with the bracket that opened it.
                    return (c == close && b[0] == open && t[i + 1..].trim().is_empty())
                        .then_some(if any { commas + 1 } else { 0 });
                }
            }
            b',' if depth == 1 => commas += 1,
            c if depth == 1 && !c.is_ascii_whitespace() => any = true,
            _ => {}
        }
    }
    None
}

/// A 16-byte fingerprint of the canonical form of a tool's arguments (keys sorted, no
/// whitespace), so equal arguments hash equally whatever their key order.
pub(crate) fn args_hash(args: &Value) -> [u8; 16] {
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
pub(crate) fn parse_args(raw: &str) -> Value {
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

pub(crate) const REDACTED: &str = "[REDACTED]";

impl Redactor {
    /// A redacted, size-bounded JSON copy of `v`. Values under secret-named keys are replaced;
    /// patterns are replaced in string values, in numbers (a card number sent as a number) and in
    /// object keys; and once more in the final text, where a cut can make a match that the whole
    /// value did not have (a 22-digit run cut to 16 digits).
    pub fn redact(&self, v: &Value) -> String {
        let mut v = v.clone();
        self.redact_in_place(&mut v);
        let mut s = v.to_string();
        let cut = s.len() > self.max_bytes;
        // Each round cuts to the bound and replaces what matches; a replacement can lengthen the
        // text, so the cut is made again. Two rounds settle every input seen; beyond that the
        // copy is dropped rather than risk keeping a secret.
        for round in 0.. {
            truncate(&mut s, self.max_bytes);
            if !self.patterns.iter().any(|re| re.is_match(&s)) {
                break;
            }
            if round == 3 {
                s = REDACTED.to_owned();
                break;
            }
            for re in &self.patterns {
                if let Cow::Owned(r) = re.replace_all(&s, REDACTED) {
                    s = r;
                }
            }
        }
        if cut {
            s.push('…');
        }
        s
    }

    fn matches(&self, s: &str) -> bool {
        self.patterns.iter().any(|re| re.is_match(s))
    }

    fn redact_in_place(&self, v: &mut Value) {
        match v {
            Value::Object(obj) => {
                if obj.keys().any(|k| self.matches(k)) {
                    *obj = std::mem::take(obj)
                        .into_iter()
                        .map(|(k, val)| {
                            if self.matches(&k) {
                                (REDACTED.to_owned(), val)
                            } else {
                                (k, val)
                            }
                        })
                        .collect();
                }
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
            Value::Number(n) => {
                if self.matches(&n.to_string()) {
                    *v = Value::String(REDACTED.to_owned());
                }
            }
            Value::Bool(_) | Value::Null => {}
        }
    }
}

/// Cuts `s` to at most `max` bytes on a character boundary.
fn truncate(s: &mut String, max: usize) {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
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
        assert_eq!(s.bytes, Some(raw.len() as i64));
        let s = measure_result(r#"{"result": "same", "is_error": true}"#);
        assert_eq!((s.items, s.is_error), (Some(1), Some(true)));
        let s =
            measure_result(r#"{"content":[],"structuredContent":{"result":[{"a":1},{"a":2}]}}"#);
        assert_eq!(s.items, Some(2));
    }

    #[test]
    fn top_level_items_are_counted_without_parsing() {
        assert_eq!(top_level_items("[]"), Some(0));
        assert_eq!(top_level_items("[ ]"), Some(0));
        assert_eq!(top_level_items("{}"), Some(0));
        assert_eq!(top_level_items("[1]"), Some(1));
        assert_eq!(top_level_items(r#"[{"a":[1,2,3]},"x,y",[4,5]]"#), Some(3));
        assert_eq!(top_level_items(r#"{"a":1,"b":{"c":2,"d":3}}"#), Some(2));
        assert_eq!(top_level_items(r#"["say \"hi, there\"", 2]"#), Some(2));
        assert_eq!(top_level_items("[1,2"), None, "cut");
        assert_eq!(top_level_items("[1]]"), None, "trailing");
        assert_eq!(top_level_items("[1} "), None, "mismatched");
        assert_eq!(top_level_items("not json"), None);
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

    #[test]
    fn secrets_in_numbers_keys_and_at_the_cut_are_redacted() {
        let r = Redactor {
            keys: vec![],
            patterns: vec![Regex::new(r"\b(?:\d[ -]?){13,19}\b").unwrap()],
            max_bytes: 24,
        };
        // Found by the normalizer fuzz target: an integer attribute stored as a JSON number.
        assert_eq!(r.redact(&json!(543258799679471615_i64)), "\"[REDACTED]\"");
        assert_eq!(
            r.redact(&json!({"4111111111111111": 1})),
            "{\"[REDACTED]\":1}"
        );
        // 22 digits match nothing; cut to 16 after `{"q":"` they would.
        let out = r.redact(&json!({"q": "4111111111111111111111"}));
        assert!(!r.matches(out.trim_end_matches('…')), "{out}");
        assert!(out.ends_with('…') && out.len() <= 24 + 3, "{out}");
    }
}
