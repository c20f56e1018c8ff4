//! Stored keys: every string a record is keyed or grouped on (service, instance, tool, method,
//! model, provider, operation, upstream, error type, session key, request id) takes its stored
//! form here, once, before the cardinality guard, the rollups and the COPY see it. Two spans
//! whose keys are stored equal are therefore counted in one rollup row, and no key can cost more
//! than its bound in memory or on disk.
//!
//! The stored form: NUL, which PostgreSQL text cannot hold, becomes U+FFFD; a key longer than its
//! bound is cut at a character boundary and ends in `~` and 16 hex digits of a hash of the whole
//! key, so two long keys that share a prefix stay apart. The form is idempotent.

use sha2::Digest;

use super::Normalized;

/// Bound of a name-like key (service, instance, tool, method, model, upstream, error type, …).
pub(crate) const MAX_NAME_BYTES: usize = 256;
/// Bound of a session key (a trace id is 32 hex digits; a UUID 36 characters).
pub(crate) const MAX_SESSION_BYTES: usize = 128;

/// Length of the `~` + hex hash suffix of a cut key.
const SUFFIX_BYTES: usize = 17;

/// Puts `s` in its stored form (see the module docs); true when it had to be cut.
pub(crate) fn canonicalize(s: &mut String, max: usize) -> bool {
    debug_assert!(max > SUFFIX_BYTES);
    if s.contains('\0') {
        *s = s.replace('\0', "\u{FFFD}");
    }
    if s.len() <= max {
        return false;
    }
    let digest = sha2::Sha256::digest(s.as_bytes());
    let mut end = max - SUFFIX_BYTES;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s.push('~');
    s.push_str(&hex::encode(&digest[..8]));
    true
}

/// The stored form of `s`, as a new string.
#[cfg(test)]
pub(crate) fn canonical(s: &str, max: usize) -> String {
    let mut s = s.to_owned();
    canonicalize(&mut s, max);
    s
}

/// Puts every key of `records` in its stored form; returns how many had to be cut.
pub(crate) fn canonicalize_records(records: &mut Normalized) -> u64 {
    let mut cut = 0u64;
    let mut name = |s: &mut String| cut += u64::from(canonicalize(s, MAX_NAME_BYTES));
    let span = |s: &mut super::SpanRef, name: &mut dyn FnMut(&mut String)| {
        name(&mut s.service);
        if let Some(i) = s.service_instance.as_mut() {
            name(i);
        }
    };
    let mut sessions = Vec::new();
    for t in &mut records.tool_calls {
        span(&mut t.span, &mut name);
        name(&mut t.tool);
        if let Some(e) = t.error_type.as_mut() {
            name(e);
        }
        if let Some(r) = t.request_id.as_mut() {
            name(r);
        }
        sessions.push(&mut t.session_key);
    }
    for m in &mut records.mcp_requests {
        span(&mut m.span, &mut name);
        name(&mut m.method);
    }
    for l in &mut records.llm_calls {
        span(&mut l.span, &mut name);
        name(&mut l.model);
        name(&mut l.operation);
        if let Some(p) = l.provider.as_mut() {
            name(p);
        }
        sessions.push(&mut l.session_key);
    }
    for u in &mut records.upstream_calls {
        span(&mut u.span, &mut name);
        name(&mut u.server_address);
        if let Some(m) = u.method.as_mut() {
            name(m);
        }
    }
    for s in sessions {
        cut += u64::from(canonicalize(s, MAX_SESSION_BYTES));
    }
    cut
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nul_and_replacement_character_store_alike() {
        assert_eq!(canonical("x\0", 256), canonical("x\u{FFFD}", 256));
    }

    #[test]
    fn long_keys_are_cut_with_a_hash_and_stay_apart() {
        let a = format!("{}a", "p".repeat(600));
        let b = format!("{}b", "p".repeat(600));
        let (ca, cb) = (canonical(&a, 256), canonical(&b, 256));
        assert!(ca.len() <= 256 && cb.len() <= 256);
        assert_ne!(ca, cb, "a shared prefix does not merge two keys");
        assert!(ca.starts_with("ppp") && ca.contains('~'));
        // Idempotent: a stored key is stored as it is.
        assert_eq!(canonical(&ca, 256), ca);
    }

    #[test]
    fn cut_at_a_character_boundary() {
        let s = "é".repeat(300);
        let c = canonical(&s, 256);
        assert!(c.len() <= 256);
        assert!(c.starts_with('é'));
    }

    #[test]
    fn short_keys_are_unchanged() {
        let mut s = "query_database".to_owned();
        assert!(!canonicalize(&mut s, 256));
        assert_eq!(s, "query_database");
    }
}
