//! Rule files: YAML groups of typed, MCP-specific rules (no query language).
//!
//! ```yaml
//! groups:
//!   - name: tools
//!     interval: 1m
//!     rules:
//!       - alert: ToolErrorRate
//!         kind: error_rate
//!         window: 5m
//!         fire_above: 0.05
//!         for: 5m
//! ```
//!
//! Loading reports every problem of every file with its file and line, not just the first.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

/// A rule file: groups evaluated on their own interval.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFile {
    pub groups: Vec<Group>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Group {
    pub name: String,
    /// How often the group is evaluated (aligned to multiples of it).
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
    pub rules: Vec<Rule>,
}

fn default_interval() -> Duration {
    Duration::from_secs(60)
}

/// One alerting rule: what every kind shares, and the kind's own settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// The alert name (the `alertname` label).
    pub alert: String,
    pub kind: Kind,
    pub common: Common,
}

impl std::ops::Deref for Rule {
    type Target = Common;
    fn deref(&self) -> &Common {
        &self.common
    }
}

/// The keys of a rule that are not the kind's own.
const COMMON_KEYS: &[&str] = &[
    "alert",
    "window",
    "for",
    "keep_firing_for",
    "min_samples",
    "confidence",
    "match",
    "ignore",
    "labels",
    "annotations",
];

impl<'de> Deserialize<'de> for Rule {
    /// Splits the mapping into the common keys and the kind's keys, each checked strictly, so an
    /// unknown key is an error wherever it is.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        use serde_yaml_ng::{Mapping, Value};
        let map = Mapping::deserialize(d)?;
        let (mut common, mut kind) = (Mapping::new(), Mapping::new());
        for (k, v) in map {
            let is_common = k.as_str().is_some_and(|k| COMMON_KEYS.contains(&k));
            if is_common {
                common.insert(k, v)
            } else {
                kind.insert(k, v)
            };
        }
        let alert = common
            .remove("alert")
            .and_then(|v| v.as_str().map(str::to_owned))
            .ok_or_else(|| D::Error::custom("a rule needs `alert: NAME`"))?;
        let ctx = |e: serde_yaml_ng::Error| D::Error::custom(format!("rule {alert:?}: {e}"));
        Ok(Rule {
            kind: Kind::deserialize(Value::Mapping(kind)).map_err(ctx)?,
            common: Common::deserialize(Value::Mapping(common)).map_err(ctx)?,
            alert,
        })
    }
}

/// Settings every rule kind has.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Common {
    /// Window the value is computed over.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// How long the condition must hold before the alert fires (pending until then).
    #[serde(rename = "for", default, with = "humantime_serde")]
    pub for_: Duration,
    /// How long a firing alert stays firing after its condition clears.
    #[serde(default, with = "humantime_serde")]
    pub keep_firing_for: Duration,
    /// Fewer samples than this in the window: no verdict (never fires, resolves a firing alert).
    #[serde(default = "default_min_samples")]
    pub min_samples: u64,
    /// Fire only when the value is above its threshold with this confidence, from the sample
    /// count: for rates (`error_rate`, `empty_results`) the Wilson score lower bound, for a
    /// `latency` quantile the sample quantile at the lower rank `q - z·sqrt(q(1-q)/n)`.
    /// None: the value itself.
    #[serde(default)]
    pub confidence: Option<f64>,
    /// Only keys whose labels equal these (e.g. `service: search-mcp`).
    #[serde(default, rename = "match")]
    pub matchers: BTreeMap<String, String>,
    /// Keys whose labels equal any of these are left out (e.g. `- {tool: job_status}` for a
    /// tool that is polled on purpose).
    #[serde(default)]
    pub ignore: Vec<BTreeMap<String, String>>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Templated with `{{ $labels.NAME }}`, `{{ $value }}` and `{{ $threshold }}`.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

fn default_min_samples() -> u64 {
    20
}

/// The rule kinds and their settings. Each is evaluated per the key it names.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Kind {
    /// A latency quantile per (service, tool, side): above an absolute threshold and/or
    /// regressed against a baseline (ratio plus a minimum absolute change, with hysteresis).
    Latency(Latency),
    /// errors / calls per (service, tool, side).
    ErrorRate(Threshold),
    /// The share of empty results per (service, tool, side), or its rise against the tool's
    /// own baseline ("zero rows where it usually returns 10-50").
    EmptyResults(EmptyResults),
    /// The same call (session key, tool, arguments hash when present) repeated in a window.
    RetryLoop(RetryLoop),
    /// Tokens per session against the typical session, or an absolute budget.
    TokenBurn(TokenBurn),
    /// remaining / limit per upstream (`server.address`), and the share of 429 responses.
    RateLimitHeadroom(RateLimitHeadroom),
}

impl Kind {
    pub fn name(&self) -> &'static str {
        match self {
            Kind::Latency(_) => "latency",
            Kind::ErrorRate(_) => "error_rate",
            Kind::EmptyResults(_) => "empty_results",
            Kind::RetryLoop(_) => "retry_loop",
            Kind::TokenBurn(_) => "token_burn",
            Kind::RateLimitHeadroom(_) => "rate_limit_headroom",
        }
    }
}

/// Fire above `fire_above`; once firing, clear only below `clear_below` (hysteresis).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Threshold {
    pub fire_above: f64,
    /// Defaults to `fire_above` (no hysteresis).
    pub clear_below: Option<f64>,
}

impl Threshold {
    pub fn clear(&self) -> f64 {
        self.clear_below.unwrap_or(self.fire_above)
    }
}

/// Which baseline a regression is measured against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Baseline {
    /// The window just before the evaluated one.
    PreviousWindow,
    /// The same window one week earlier.
    WeekAgo,
    /// The larger of the two (fires only when worse than both).
    Both,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Latency {
    /// The quantile, 0 < q < 1.
    #[serde(default = "default_quantile")]
    pub quantile: f64,
    /// Absolute threshold: fire when the quantile is above it.
    #[serde(default, with = "humantime_serde::option")]
    pub above: Option<Duration>,
    /// Regression against a baseline.
    pub regression: Option<Regression>,
}

fn default_quantile() -> f64 {
    0.95
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Regression {
    #[serde(default = "default_baseline")]
    pub baseline: Baseline,
    /// Fire when current ≥ baseline × `fire_ratio` …
    pub fire_ratio: f64,
    /// … and current − baseline ≥ `min_increase`.
    #[serde(with = "humantime_serde")]
    pub min_increase: Duration,
    /// Once firing, clear when current < baseline × `clear_ratio` (defaults to `fire_ratio`).
    pub clear_ratio: Option<f64>,
}

fn default_baseline() -> Baseline {
    Baseline::PreviousWindow
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmptyResults {
    /// Fire when the share of empty results (of calls with captured content) is above this …
    pub fire_above: f64,
    /// … once firing, clear below this (defaults to `fire_above`) …
    pub clear_below: Option<f64>,
    /// … and, when set, only when the tool's baseline share was below this (it usually returns
    /// rows): a tool that is always empty does not page.
    pub baseline_below: Option<f64>,
    #[serde(default = "default_baseline")]
    pub baseline: Baseline,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryLoop {
    /// Fire when one call is repeated at least this many times within the window.
    pub min_repeats: u64,
    /// Count only repeats that follow an error of the same call.
    #[serde(default)]
    pub after_errors_only: bool,
    /// Repeats of one call that all succeeded with content, spaced this far apart or more on
    /// average, are polling (a job-status tool asked every 45 s), not a loop. A loop is the
    /// same call failing or coming back empty, or repeated faster than this.
    #[serde(default = "default_polling_interval", with = "humantime_serde")]
    pub polling_interval: Duration,
}

fn default_polling_interval() -> Duration {
    Duration::from_secs(30)
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBurn {
    /// Fire when a session's tokens in the window exceed the median session's × this …
    pub ratio_to_median: Option<f64>,
    /// … or this absolute number of tokens.
    pub budget: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitHeadroom {
    /// Fire when the lowest remaining / limit in the window is below this (0.1 = 10%) …
    #[serde(default = "default_headroom")]
    pub remaining_below: f64,
    /// … once firing, clear at or above this (defaults to `remaining_below`) …
    pub clear_at: Option<f64>,
    /// … or when the share of 429 responses is above this.
    pub rate_limited_above: Option<f64>,
}

fn default_headroom() -> f64 {
    0.1
}

/// A problem in a rule file, with where it is.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    pub file: String,
    pub line: Option<usize>,
    pub message: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.line {
            Some(l) => write!(f, "{}:{l}: {}", self.file, self.message),
            None => write!(f, "{}: {}", self.file, self.message),
        }
    }
}

/// Why rule files could not be loaded. Never retryable: the files must be fixed.
#[derive(Debug, thiserror::Error)]
pub enum RulesError {
    #[error("{} problem(s) in rule files:\n  {}", .0.len(), .0.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n  "))]
    Invalid(Vec<Problem>),
}

impl RulesError {
    pub fn is_retryable(&self) -> bool {
        false
    }
}

/// Parses and validates one rule file's text. `file` names it in problems.
pub fn parse(file: &str, text: &str) -> Result<RuleFile, Vec<Problem>> {
    let yaml_problem = |e: serde_yaml_ng::Error, line: Option<usize>| Problem {
        file: file.to_owned(),
        line: e.location().map(|l| l.line()).or(line),
        message: e
            .to_string()
            .split(" at line ")
            .next()
            .unwrap_or_default()
            .to_owned(),
    };
    let doc: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(text).map_err(|e| vec![yaml_problem(e, None)])?;
    let structural = structure(file, text, &doc);
    if !structural.is_empty() {
        return Err(structural);
    }
    let parsed: RuleFile =
        serde_yaml_ng::from_value(doc).map_err(|e| vec![yaml_problem(e, Some(1))])?;
    let problems = validate(file, text, &parsed);
    if problems.is_empty() {
        Ok(parsed)
    } else {
        Err(problems)
    }
}

/// Whether `path` holds rule unit tests (`rule_files:` / `tests:`) rather than rules.
pub fn is_test_file(path: &Path) -> bool {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_yaml_ng::from_str::<serde_yaml_ng::Value>(&t).ok())
        .and_then(|v| v.as_mapping().cloned())
        .is_some_and(|m| m.contains_key("tests") && !m.contains_key("groups"))
}

/// Loads every file, reporting the problems of all of them.
pub fn load(paths: &[impl AsRef<Path>]) -> Result<Vec<(String, RuleFile)>, RulesError> {
    let mut out = Vec::new();
    let mut problems = Vec::new();
    let mut names = HashSet::new();
    for path in paths {
        let shown = path.as_ref().display().to_string();
        match std::fs::read_to_string(path) {
            Err(e) => problems.push(Problem {
                file: shown,
                line: None,
                message: format!("cannot read: {e}"),
            }),
            Ok(text) => match parse(&shown, &text) {
                Err(p) => problems.extend(p),
                Ok(f) => {
                    for g in &f.groups {
                        if !names.insert(g.name.clone()) {
                            problems.push(Problem {
                                file: shown.clone(),
                                line: line_of(&text, &format!("name: {}", g.name)),
                                message: format!(
                                    "group {:?} is also defined in another file",
                                    g.name
                                ),
                            });
                        }
                    }
                    out.push((shown, f));
                }
            },
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(RulesError::Invalid(problems))
    }
}

/// The 1-based line of the first line containing `needle` after `from_line`.
/// Every structural problem (unknown key, wrong type, unknown kind, missing field), each at the
/// line of its own group or rule: every rule is read on its own, so one bad rule hides nothing.
fn structure(file: &str, text: &str, doc: &serde_yaml_ng::Value) -> Vec<Problem> {
    use serde_yaml_ng::Value;
    let mut problems = Vec::new();
    let mut push = |line: Option<usize>, message: String| {
        problems.push(Problem {
            file: file.to_owned(),
            line,
            message,
        })
    };
    let Some(top) = doc.as_mapping() else {
        push(Some(1), "a rule file is a mapping with `groups:`".into());
        return problems;
    };
    for k in top.keys() {
        if k.as_str() != Some("groups") {
            let name = k.as_str().unwrap_or("?");
            push(
                line_of(text, &format!("{name}:")),
                format!("unknown key {name:?} (a rule file has only `groups:`)"),
            );
        }
    }
    let Some(groups) = top.get("groups") else {
        push(Some(1), "missing `groups:`".into());
        return problems;
    };
    let Some(groups) = groups.as_sequence() else {
        push(line_of(text, "groups:"), "`groups` must be a list".into());
        return problems;
    };
    let mut cursor = 0;
    for g in groups {
        let name = g.get("name").and_then(Value::as_str).unwrap_or("");
        let gline = if name.is_empty() {
            line_of_from(text, "- ", cursor + 1)
        } else {
            line_of_from(text, name, cursor + 1)
        };
        cursor = gline.unwrap_or(cursor);
        // The group without its rules, then each rule on its own.
        let mut shell = g.clone();
        let rules = shell
            .as_mapping_mut()
            .and_then(|m| m.insert("rules".into(), Value::Sequence(Vec::new())));
        if let Err(e) = serde_yaml_ng::from_value::<Group>(shell) {
            push(gline, format!("group {name:?}: {e}"));
        }
        let rules = match rules {
            Some(Value::Sequence(rules)) => rules,
            Some(_) => {
                push(gline, format!("group {name:?}: `rules` must be a list"));
                continue;
            }
            None => {
                push(gline, format!("group {name:?}: missing field `rules`"));
                continue;
            }
        };
        for r in rules {
            let alert = r.get("alert").and_then(Value::as_str).unwrap_or("");
            let rline = if alert.is_empty() {
                line_of_from(text, "- ", cursor + 1)
            } else {
                line_of_from(text, &format!("alert: {alert}"), cursor + 1)
            };
            cursor = rline.unwrap_or(cursor);
            if let Err(e) = serde_yaml_ng::from_value::<Rule>(r) {
                let message = e.to_string();
                let message = message.split(" at line ").next().unwrap_or_default();
                push(rline, format!("group {name:?}: {message}"));
            }
        }
    }
    problems
}

fn line_of_from(text: &str, needle: &str, from_line: usize) -> Option<usize> {
    text.lines()
        .enumerate()
        .skip(from_line.saturating_sub(1))
        .find(|(_, l)| l.contains(needle))
        .map(|(i, _)| i + 1)
}

fn line_of(text: &str, needle: &str) -> Option<usize> {
    line_of_from(text, needle, 1)
}

fn validate(file: &str, text: &str, f: &RuleFile) -> Vec<Problem> {
    let mut problems = Vec::new();
    let mut groups = HashSet::new();
    // The line of the last group or rule found: the next one is searched after it, so a
    // duplicate is blamed on its own line.
    let mut cursor = 0;
    for g in &f.groups {
        let gline = line_of_from(text, &g.name, cursor + 1);
        cursor = gline.unwrap_or(cursor);
        let mut push = |line: Option<usize>, message: String| {
            problems.push(Problem {
                file: file.to_owned(),
                line,
                message,
            })
        };
        if !groups.insert(g.name.as_str()) {
            push(gline, format!("group {:?} is defined twice", g.name));
        }
        if g.interval < Duration::from_secs(1) {
            push(
                gline,
                format!("group {:?}: interval must be at least 1s", g.name),
            );
        }
        if g.rules.is_empty() {
            push(gline, format!("group {:?} has no rules", g.name));
        }
        let mut alerts = HashSet::new();
        for r in &g.rules {
            let rline = line_of_from(text, &format!("alert: {}", r.alert), cursor + 1);
            cursor = rline.unwrap_or(cursor);
            let ctx = format!("rule {:?}", r.alert);
            if r.alert.is_empty()
                || !r
                    .alert
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_')
            {
                push(
                    rline,
                    format!("{ctx}: the alert name must be letters, digits and underscores"),
                );
            }
            if !alerts.insert(r.alert.as_str()) {
                push(
                    rline,
                    format!("{ctx} is defined twice in group {:?}", g.name),
                );
            }
            if r.window < g.interval {
                push(
                    rline,
                    format!(
                        "{ctx}: window ({}) is shorter than the group interval ({})",
                        fmt(r.window),
                        fmt(g.interval)
                    ),
                );
            }
            if r.min_samples == 0 {
                push(rline, format!("{ctx}: min_samples must be at least 1"));
            }
            if let Some(c) = r.confidence {
                if !(0.5..1.0).contains(&c) {
                    push(
                        rline,
                        format!(
                            "{ctx}: confidence must be at least 0.5 and below 1 (0.95 is usual)"
                        ),
                    );
                }
                if !matches!(
                    r.kind,
                    Kind::ErrorRate(_) | Kind::EmptyResults(_) | Kind::Latency(_)
                ) {
                    push(
                        rline,
                        format!(
                            "{ctx}: confidence applies to error_rate, empty_results and latency rules"
                        ),
                    );
                }
            }
            for (k, _) in r.labels.iter().filter(|(k, _)| k.as_str() == "alertname") {
                push(rline, format!("{ctx}: label {k:?} is reserved"));
            }
            for k in r
                .matchers
                .keys()
                .chain(r.ignore.iter().flat_map(|m| m.keys()))
            {
                if !key_labels(&r.kind).contains(&k.as_str()) {
                    push(
                        rline,
                        format!(
                            "{ctx}: cannot match on {k:?}; {} rules are keyed by {:?}",
                            r.kind.name(),
                            key_labels(&r.kind)
                        ),
                    );
                }
            }
            for (name, tmpl) in &r.annotations {
                for var in template_vars(tmpl) {
                    let ok = var == "$value"
                        || var == "$threshold"
                        || var == "$reason"
                        || var.strip_prefix("$labels.").is_some_and(|l| {
                            key_labels(&r.kind).contains(&l) || r.labels.contains_key(l)
                        });
                    if !ok {
                        push(
                            rline,
                            format!(
                                "{ctx}: annotation {name:?} uses {{{{ {var} }}}}, which this rule does not have"
                            ),
                        );
                    }
                }
            }
            for m in check_kind(&r.kind) {
                push(rline, format!("{ctx}: {m}"));
            }
        }
    }
    problems
}

fn fmt(d: Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// The labels that identify one alert of a rule of this kind.
pub fn key_labels(kind: &Kind) -> &'static [&'static str] {
    match kind {
        Kind::Latency(_) | Kind::ErrorRate(_) | Kind::EmptyResults(_) => {
            &["service", "tool", "side"]
        }
        Kind::RetryLoop(_) => &["service", "tool", "session"],
        Kind::TokenBurn(_) => &["service", "session"],
        Kind::RateLimitHeadroom(_) => &["service", "upstream"],
    }
}

/// `{{ $labels.tool }}` → `$labels.tool`.
fn template_vars(t: &str) -> Vec<&str> {
    t.split("{{")
        .skip(1)
        .filter_map(|s| s.split("}}").next())
        .map(str::trim)
        .collect()
}

fn ratio_ok(name: &str, v: f64, out: &mut Vec<String>) {
    if !(0.0..=1.0).contains(&v) {
        out.push(format!("{name} must be between 0 and 1, not {v}"));
    }
}

fn check_kind(kind: &Kind) -> Vec<String> {
    let mut out = Vec::new();
    match kind {
        Kind::Latency(l) => {
            if !(l.quantile > 0.0 && l.quantile < 1.0) {
                out.push(format!(
                    "quantile must be between 0 and 1 (exclusive), not {}",
                    l.quantile
                ));
            }
            if l.above.is_none() && l.regression.is_none() {
                out.push("a latency rule needs `above` and/or `regression`".into());
            }
            if let Some(r) = &l.regression {
                if r.fire_ratio <= 1.0 {
                    out.push(format!(
                        "regression.fire_ratio must be above 1, not {}",
                        r.fire_ratio
                    ));
                }
                if let Some(c) = r.clear_ratio
                    && (c > r.fire_ratio || c < 1.0)
                {
                    out.push(format!(
                        "regression.clear_ratio must be between 1 and fire_ratio ({}), not {c}",
                        r.fire_ratio
                    ));
                }
            }
        }
        Kind::ErrorRate(t) => {
            ratio_ok("fire_above", t.fire_above, &mut out);
            if t.clear() > t.fire_above {
                out.push(format!(
                    "clear_below ({}) must not be above fire_above ({})",
                    t.clear(),
                    t.fire_above
                ));
            }
        }
        Kind::EmptyResults(e) => {
            ratio_ok("fire_above", e.fire_above, &mut out);
            if let Some(c) = e.clear_below {
                ratio_ok("clear_below", c, &mut out);
                if c > e.fire_above {
                    out.push(format!(
                        "clear_below ({c}) must not be above fire_above ({})",
                        e.fire_above
                    ));
                }
            }
            if let Some(b) = e.baseline_below {
                ratio_ok("baseline_below", b, &mut out);
            }
        }
        Kind::RetryLoop(r) => {
            if r.min_repeats < 2 {
                out.push(format!(
                    "min_repeats must be at least 2, not {}",
                    r.min_repeats
                ));
            }
        }
        Kind::TokenBurn(t) => {
            if t.ratio_to_median.is_none() && t.budget.is_none() {
                out.push("a token_burn rule needs `ratio_to_median` and/or `budget`".into());
            }
            if t.ratio_to_median.is_some_and(|r| r <= 1.0) {
                out.push("ratio_to_median must be above 1".into());
            }
        }
        Kind::RateLimitHeadroom(h) => {
            ratio_ok("remaining_below", h.remaining_below, &mut out);
            if let Some(c) = h.clear_at {
                ratio_ok("clear_at", c, &mut out);
                if c < h.remaining_below {
                    out.push(format!(
                        "clear_at ({c}) must not be below remaining_below ({})",
                        h.remaining_below
                    ));
                }
            }
            if let Some(r) = h.rate_limited_above {
                ratio_ok("rate_limited_above", r, &mut out);
            }
        }
    }
    out
}

/// Renders an annotation template.
pub fn render(
    template: &str,
    labels: &BTreeMap<String, String>,
    value: f64,
    threshold: f64,
    reason: &str,
) -> String {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let Some(end) = rest[start..].find("}}") else {
            out.push_str(&rest[start..]);
            return out;
        };
        let var = rest[start + 2..start + end].trim();
        match var {
            "$value" => out.push_str(&format_value(value)),
            "$threshold" => out.push_str(&format_value(threshold)),
            "$reason" => out.push_str(reason),
            v => out.push_str(
                v.strip_prefix("$labels.")
                    .and_then(|l| labels.get(l))
                    .map_or("", String::as_str),
            ),
        }
        rest = &rest[start + end + 2..];
    }
    out.push_str(rest);
    out
}

pub fn format_value(v: f64) -> String {
    if v.fract() == 0.0 && v.abs() < 1e15 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_rules_are_valid_and_cover_every_kind() {
        let text = include_str!("../../alerts/default.yaml");
        let f = parse("alerts/default.yaml", text).unwrap_or_else(|p| panic!("{p:?}"));
        let kinds: HashSet<&str> = f
            .groups
            .iter()
            .flat_map(|g| &g.rules)
            .map(|r| r.kind.name())
            .collect();
        assert_eq!(kinds.len(), 6, "{kinds:?}");
        let error_rate = f
            .groups
            .iter()
            .flat_map(|g| &g.rules)
            .find(|r| r.alert == "ToolErrorRate")
            .unwrap();
        assert_eq!(
            error_rate.kind,
            Kind::ErrorRate(Threshold {
                fire_above: 0.05,
                clear_below: Some(0.03)
            })
        );
        assert_eq!(error_rate.for_, Duration::from_secs(120));
        assert_eq!(error_rate.confidence, Some(0.999));
    }

    #[test]
    fn every_problem_is_reported_with_its_line() {
        let text = "\
groups:
  - name: g
    interval: 1m
    rules:
      - alert: Slow
        kind: latency
        window: 10s
        quantile: 1.5
      - alert: Errors
        kind: error_rate
        window: 5m
        fire_above: 0.05
        clear_below: 0.2
        match: {model: x}
        annotations: {summary: '{{ $labels.nope }} at {{ $value }}'}
";
        let problems = parse("r.yaml", text).unwrap_err();
        let shown: Vec<String> = problems.iter().map(|p| p.to_string()).collect();
        let has = |needle: &str, line: usize| {
            assert!(
                problems
                    .iter()
                    .any(|p| p.message.contains(needle) && p.line == Some(line)),
                "{needle} at {line}: {shown:#?}"
            )
        };
        has("shorter than the group interval", 5);
        has("quantile must be between 0 and 1", 5);
        has("needs `above` and/or `regression`", 5);
        has("clear_below (0.2) must not be above", 9);
        has("cannot match on \"model\"", 9);
        has("$labels.nope", 9);
        assert_eq!(problems.len(), 6, "{shown:#?}");
    }

    #[test]
    fn syntax_and_schema_errors_have_lines() {
        let p = parse("r.yaml", "groups:\n  - name: g\n    rules:\n      - alert: A\n        kind: nonsense\n        window: 1m\n").unwrap_err();
        assert_eq!(p.len(), 1);
        assert!(p[0].line.is_some(), "{p:?}");
        assert!(
            p[0].message.contains("nonsense") || p[0].message.contains("variant"),
            "{p:?}"
        );
        let p = parse("r.yaml", "groups:\n  - name: g\n    rules:\n      - alert: A\n        kind: error_rate\n        window: 1m\n        fire_above: 0.1\n        severity: high\n").unwrap_err();
        assert!(p[0].to_string().contains("severity"), "{p:?}");
    }

    #[test]
    fn annotations_render_labels_value_and_threshold() {
        let labels: BTreeMap<String, String> = [("tool".to_string(), "search".to_string())].into();
        assert_eq!(
            render(
                "{{ $labels.tool }}: {{$value}} > {{ $threshold }}",
                &labels,
                0.0712,
                0.05,
                ""
            ),
            "search: 0.071 > 0.050"
        );
        assert_eq!(
            render("{{ $labels.missing }}x {{ $value }}", &labels, 3.0, 0.0, ""),
            "x 3"
        );
        assert_eq!(
            render(
                "{{ $labels.tool }} {{ $reason }}",
                &labels,
                0.3,
                0.05,
                "answered 429"
            ),
            "search answered 429"
        );
    }
}
