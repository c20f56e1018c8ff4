//! Rate-limit headroom from captured HTTP response headers.
//!
//! Providers disagree on names and units; everything is folded into remaining / limit and an
//! absolute reset time. Header attributes follow the HTTP semantic conventions:
//! `http.response.header.<lowercase name>`, a string array (a plain string is accepted too).
//! The Python HTTP instrumentations (opentelemetry-util-http) write the name with its dashes
//! turned into underscores (`http.response.header.x_ratelimit_remaining`); both are read.

use opentelemetry_proto::tonic::common::v1::KeyValue;

use super::attrs;

const PREFIX: &str = "http.response.header.";

/// Remaining / limit / reset read from one response.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RateLimit {
    pub remaining: Option<f64>,
    pub limit: Option<f64>,
    /// Unix nanoseconds at which the window resets.
    pub reset_at_unix_nanos: Option<i64>,
    /// `Retry-After`, in seconds.
    pub retry_after_s: Option<f64>,
}

impl RateLimit {
    pub fn is_empty(&self) -> bool {
        *self == RateLimit::default()
    }
}

// Header families, most specific first. Request-count windows are preferred over token windows
// (OpenAI and Anthropic send both); the lower headroom of the two would be a later refinement.
const REMAINING: &[&str] = &[
    "x-ratelimit-remaining",
    "x-ratelimit-remaining-requests",
    "anthropic-ratelimit-requests-remaining",
    "ratelimit-remaining",
    "x-rate-limit-remaining",
    "x-ratelimit-remaining-tokens",
    "anthropic-ratelimit-tokens-remaining",
];
const LIMIT: &[&str] = &[
    "x-ratelimit-limit",
    "x-ratelimit-limit-requests",
    "anthropic-ratelimit-requests-limit",
    "ratelimit-limit",
    "x-rate-limit-limit",
    "x-ratelimit-limit-tokens",
    "anthropic-ratelimit-tokens-limit",
];
const RESET: &[&str] = &[
    "x-ratelimit-reset",
    "x-ratelimit-reset-requests",
    "anthropic-ratelimit-requests-reset",
    "ratelimit-reset",
    "x-rate-limit-reset",
    "x-ratelimit-reset-tokens",
    "anthropic-ratelimit-tokens-reset",
];

/// Reads the rate-limit headers of a span that ended at `end_unix_nanos`.
pub fn parse(span_attrs: &[KeyValue], end_unix_nanos: i64) -> RateLimit {
    // The captured headers, found in one pass; most spans have none.
    let captured: Vec<(&str, &[KeyValue])> = span_attrs
        .iter()
        .enumerate()
        .filter_map(|(i, kv)| {
            kv.key
                .strip_prefix(PREFIX)
                .map(|name| (name, &span_attrs[i..=i]))
        })
        .collect();
    if captured.is_empty() {
        return RateLimit::default();
    }
    // Both spellings, `x-ratelimit-remaining` and `x_ratelimit_remaining`; dashes first.
    let same = |captured: &str, name: &str| {
        captured.len() == name.len()
            && captured
                .bytes()
                .zip(name.bytes())
                .all(|(c, n)| c == n || (c == b'_' && n == b'-'))
    };
    let h = |name: &str| {
        captured
            .iter()
            .filter(|(c, _)| same(c, name))
            .min_by_key(|(c, _)| c.contains('_'))
            .and_then(|(_, kv)| attrs::header(kv, &kv[0].key))
    };
    let first = |names: &[&str]| names.iter().find_map(|n| h(n));

    let mut rl = RateLimit {
        remaining: first(REMAINING).and_then(|v| parse_number(&v)),
        limit: first(LIMIT).and_then(|v| parse_number(&v)),
        reset_at_unix_nanos: first(RESET).and_then(|v| parse_reset(&v, end_unix_nanos)),
        retry_after_s: h("retry-after").and_then(|v| parse_retry_after(&v, end_unix_nanos)),
    };

    // IETF draft structured fields: `RateLimit: "default";r=50;t=30` and
    // `RateLimit-Policy: "default";q=100;w=60`.
    if let Some(v) = h("ratelimit") {
        let r = sf_param(&v, "r").or_else(|| sf_param(&v, "remaining"));
        let t = sf_param(&v, "t").or_else(|| sf_param(&v, "reset"));
        if rl.remaining.is_none() {
            rl.remaining = r;
        }
        if rl.reset_at_unix_nanos.is_none() {
            rl.reset_at_unix_nanos = t.map(|s| after(end_unix_nanos, s));
        }
        // The older draft put the limit first: `RateLimit: limit=100, remaining=50, reset=30`.
        if rl.limit.is_none() {
            rl.limit = sf_param(&v, "limit");
        }
    }
    if rl.limit.is_none()
        && let Some(v) = h("ratelimit-policy")
    {
        rl.limit = sf_param(&v, "q").or_else(|| v.split([',', ';']).next().and_then(parse_number));
    }
    if rl.reset_at_unix_nanos.is_none()
        && let Some(ra) = rl.retry_after_s
    {
        rl.reset_at_unix_nanos = Some(after(end_unix_nanos, ra));
    }
    rl
}

/// `secs` after `end_unix_nanos`, saturating: a span may claim to end near the largest time
/// OTLP can carry, and a reset after it must not wrap into the past.
fn after(end_unix_nanos: i64, secs: f64) -> i64 {
    end_unix_nanos.saturating_add(secs_to_nanos(secs))
}

fn secs_to_nanos(s: f64) -> i64 {
    (s * 1e9).clamp(0.0, i64::MAX as f64 / 2.0) as i64
}

fn parse_number(v: &str) -> Option<f64> {
    v.trim()
        .parse::<f64>()
        .ok()
        .filter(|n| n.is_finite() && *n >= 0.0)
}

/// A parameter of a structured-field header: `key=123` among `;` or `,` separated items.
fn sf_param(v: &str, key: &str) -> Option<f64> {
    v.split([';', ','])
        .filter_map(|p| p.trim().split_once('='))
        .find(|(k, _)| k.trim().eq_ignore_ascii_case(key))
        .and_then(|(_, val)| parse_number(val.trim_matches('"')))
}

/// Reset values come as delta seconds (`30`), Unix epoch seconds (`1767225600`, GitHub),
/// Go-style durations (`6m0s`, `1.5s`, `20ms`: OpenAI) or RFC 3339 times (Anthropic).
fn parse_reset(v: &str, end_unix_nanos: i64) -> Option<i64> {
    let v = v.trim();
    if let Some(n) = parse_number(v) {
        // Anything that would be more than ~3 years of delta is an epoch timestamp.
        return Some(if n > 1e8 {
            secs_to_nanos(n)
        } else {
            after(end_unix_nanos, n)
        });
    }
    if let Some(s) = parse_go_duration(v) {
        return Some(after(end_unix_nanos, s));
    }
    chrono::DateTime::parse_from_rfc3339(v)
        .ok()
        .and_then(|t| t.timestamp_nanos_opt())
}

/// `Retry-After`: delta seconds or an HTTP date.
fn parse_retry_after(v: &str, end_unix_nanos: i64) -> Option<f64> {
    let v = v.trim();
    if let Some(n) = parse_number(v) {
        return Some(n);
    }
    let at = chrono::DateTime::parse_from_rfc2822(v)
        .ok()?
        .timestamp_nanos_opt()?;
    // In floating point: a date far in the past minus a far end would overflow i64.
    Some(((at as f64 - end_unix_nanos as f64) / 1e9).max(0.0))
}

fn parse_go_duration(v: &str) -> Option<f64> {
    if v.is_empty() || !v.ends_with(|c: char| c.is_ascii_alphabetic()) {
        return None;
    }
    let mut total = 0.0;
    let mut rest = v;
    while !rest.is_empty() {
        let num_end = rest.find(|c: char| !(c.is_ascii_digit() || c == '.'))?;
        if num_end == 0 {
            return None;
        }
        let n: f64 = rest[..num_end].parse().ok()?;
        let unit_end = rest[num_end..]
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .map_or(rest.len(), |i| num_end + i);
        let mult = match &rest[num_end..unit_end] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        total += n * mult;
        rest = &rest[unit_end..];
    }
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::common::v1::{AnyValue, ArrayValue, any_value::Value};

    fn kv(k: &str, v: &str) -> KeyValue {
        KeyValue {
            key_strindex: 0,
            key: format!("{PREFIX}{k}"),
            value: Some(AnyValue {
                value: Some(Value::ArrayValue(ArrayValue {
                    values: vec![AnyValue {
                        value: Some(Value::StringValue(v.into())),
                    }],
                })),
            }),
        }
    }

    const END: i64 = 1_800_000_000_000_000_000;

    #[test]
    fn github_style_epoch_reset() {
        let rl = parse(
            &[
                kv("x-ratelimit-remaining", "4"),
                kv("x-ratelimit-limit", "5000"),
                kv("x-ratelimit-reset", "1800000060"),
            ],
            END,
        );
        assert_eq!(rl.remaining, Some(4.0));
        assert_eq!(rl.limit, Some(5000.0));
        assert_eq!(rl.reset_at_unix_nanos, Some(END + 60_000_000_000));
    }

    #[test]
    fn openai_style_duration_reset() {
        let rl = parse(
            &[
                kv("x-ratelimit-remaining-requests", "59"),
                kv("x-ratelimit-limit-requests", "60"),
                kv("x-ratelimit-reset-requests", "1m30s"),
            ],
            END,
        );
        assert_eq!((rl.remaining, rl.limit), (Some(59.0), Some(60.0)));
        assert_eq!(rl.reset_at_unix_nanos, Some(END + 90_000_000_000));
    }

    #[test]
    fn anthropic_rfc3339_reset() {
        let rl = parse(
            &[
                kv("anthropic-ratelimit-requests-remaining", "10"),
                kv("anthropic-ratelimit-requests-limit", "50"),
                kv("anthropic-ratelimit-requests-reset", "2027-01-15T08:00:00Z"),
            ],
            END,
        );
        assert_eq!(rl.remaining, Some(10.0));
        assert_eq!(
            rl.reset_at_unix_nanos,
            Some(
                chrono::DateTime::parse_from_rfc3339("2027-01-15T08:00:00Z")
                    .unwrap()
                    .timestamp_nanos_opt()
                    .unwrap()
            )
        );
    }

    #[test]
    fn ietf_structured_fields_and_retry_after() {
        let rl = parse(
            &[
                kv("ratelimit", "\"default\";r=5;t=30"),
                kv("ratelimit-policy", "\"default\";q=100;w=60"),
                kv("retry-after", "12"),
            ],
            END,
        );
        assert_eq!((rl.remaining, rl.limit), (Some(5.0), Some(100.0)));
        assert_eq!(rl.reset_at_unix_nanos, Some(END + 30_000_000_000));
        assert_eq!(rl.retry_after_s, Some(12.0));

        let only_retry = parse(&[kv("retry-after", "Thu, 01 Jan 1970 00:00:00 GMT")], END);
        assert_eq!(only_retry.retry_after_s, Some(0.0));
        assert!(parse(&[], END).is_empty());
    }

    fn kv_plain(k: &str, v: &str) -> KeyValue {
        KeyValue {
            key_strindex: 0,
            key: format!("{PREFIX}{k}"),
            value: Some(AnyValue {
                value: Some(Value::StringValue(v.into())),
            }),
        }
    }

    /// opentelemetry-util-http (the `requests` / `httpx` instrumentations) turns the dashes of a
    /// captured header name into underscores; every family must be read under that spelling,
    /// as a string array and as a plain string.
    #[test]
    fn underscore_spellings_of_every_family() {
        let families: &[(&[(&str, &str)], RateLimit)] = &[
            (
                &[
                    ("x_ratelimit_remaining", "4"),
                    ("x_ratelimit_limit", "5000"),
                    ("x_ratelimit_reset", "1800000060"),
                ],
                RateLimit {
                    remaining: Some(4.0),
                    limit: Some(5000.0),
                    reset_at_unix_nanos: Some(END + 60_000_000_000),
                    retry_after_s: None,
                },
            ),
            (
                &[
                    ("x_ratelimit_remaining_requests", "59"),
                    ("x_ratelimit_limit_requests", "60"),
                    ("x_ratelimit_reset_requests", "1m30s"),
                ],
                RateLimit {
                    remaining: Some(59.0),
                    limit: Some(60.0),
                    reset_at_unix_nanos: Some(END + 90_000_000_000),
                    retry_after_s: None,
                },
            ),
            (
                &[
                    ("anthropic_ratelimit_requests_remaining", "10"),
                    ("anthropic_ratelimit_requests_limit", "50"),
                    ("anthropic_ratelimit_requests_reset", "2027-01-15T08:00:00Z"),
                ],
                RateLimit {
                    remaining: Some(10.0),
                    limit: Some(50.0),
                    reset_at_unix_nanos: chrono::DateTime::parse_from_rfc3339(
                        "2027-01-15T08:00:00Z",
                    )
                    .unwrap()
                    .timestamp_nanos_opt(),
                    retry_after_s: None,
                },
            ),
            (
                &[
                    ("x_rate_limit_remaining", "7"),
                    ("x_rate_limit_limit", "900"),
                    ("x_rate_limit_reset", "30"),
                ],
                RateLimit {
                    remaining: Some(7.0),
                    limit: Some(900.0),
                    reset_at_unix_nanos: Some(END + 30_000_000_000),
                    retry_after_s: None,
                },
            ),
            (
                &[
                    ("ratelimit_remaining", "3"),
                    ("ratelimit_limit", "10"),
                    ("ratelimit_reset", "5"),
                ],
                RateLimit {
                    remaining: Some(3.0),
                    limit: Some(10.0),
                    reset_at_unix_nanos: Some(END + 5_000_000_000),
                    retry_after_s: None,
                },
            ),
            (
                &[
                    ("ratelimit", "\"default\";r=5;t=30"),
                    ("ratelimit_policy", "\"default\";q=100;w=60"),
                ],
                RateLimit {
                    remaining: Some(5.0),
                    limit: Some(100.0),
                    reset_at_unix_nanos: Some(END + 30_000_000_000),
                    retry_after_s: None,
                },
            ),
            (
                &[("retry_after", "12")],
                RateLimit {
                    remaining: None,
                    limit: None,
                    reset_at_unix_nanos: Some(END + 12_000_000_000),
                    retry_after_s: Some(12.0),
                },
            ),
        ];
        for (headers, want) in families {
            let arrays: Vec<_> = headers.iter().map(|(k, v)| kv(k, v)).collect();
            assert_eq!(&parse(&arrays, END), want, "string arrays: {headers:?}");
            let plain: Vec<_> = headers.iter().map(|(k, v)| kv_plain(k, v)).collect();
            assert_eq!(&parse(&plain, END), want, "plain strings: {headers:?}");
        }
    }

    #[test]
    fn resets_after_a_far_end_saturate_instead_of_wrapping() {
        // Found by the normalizer fuzz target: a span ending near i64::MAX with Retry-After.
        let end = i64::MAX - 5;
        let rl = parse(&[kv("retry-after", "60")], end);
        assert_eq!(rl.reset_at_unix_nanos, Some(i64::MAX));
        let rl = parse(&[kv("x-ratelimit-reset", "30")], end);
        assert_eq!(rl.reset_at_unix_nanos, Some(i64::MAX));
        let rl = parse(&[kv("ratelimit", "\"default\";r=1;t=30")], end);
        assert_eq!(rl.reset_at_unix_nanos, Some(i64::MAX));
        let rl = parse(&[kv("x-ratelimit-reset", "1m0s")], end);
        assert_eq!(rl.reset_at_unix_nanos, Some(i64::MAX));
        let rl = parse(&[kv("retry-after", "01 Jan 1700 00:00:00 +0000")], end);
        assert_eq!(rl.retry_after_s, Some(0.0));
    }
}
