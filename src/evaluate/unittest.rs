//! `toolsight rules test`: unit tests for rules, in the spirit of `promtool test rules`.
//!
//! A test file names rule files and gives, per alert and key, the value each evaluation sees
//! (`"0.01x4 0.2x8"`: 0.01 four times, then 0.2 eight times), and the alerts expected to be
//! firing at given times. The rules' thresholds, hysteresis, `for`, `keep_firing_for` and
//! `min_samples` run through the same engine and state machine as the live evaluator; the
//! window aggregation (the SQL over the rollups) is replaced by the given values.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use super::engine::{self, Alerts};
use super::rules::{self, Problem, RuleFile};
use super::state::Phase;
use crate::evaluate::engine::Observation;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestFile {
    /// Rule files, relative to the test file.
    pub rule_files: Vec<String>,
    pub tests: Vec<TestCase>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestCase {
    pub name: String,
    /// Time between evaluations.
    #[serde(default = "default_interval", with = "humantime_serde")]
    pub interval: Duration,
    pub input: Vec<Input>,
    pub expect: Vec<Expect>,
}

fn default_interval() -> Duration {
    Duration::from_secs(60)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Input {
    pub alert: String,
    /// The key labels.
    pub labels: BTreeMap<String, String>,
    /// One value per evaluation: `V`, `VxN` (N times), `_` (no data).
    pub values: String,
    /// Baseline values, same notation (latency regression, empty-result baselines).
    pub baseline: Option<String>,
    /// The second value some kinds read (share of 429s, median session tokens), same notation.
    pub extra: Option<String>,
    /// Samples behind each value.
    #[serde(default = "default_samples")]
    pub samples: i64,
}

fn default_samples() -> i64 {
    1000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    #[serde(with = "humantime_serde")]
    pub at: Duration,
    /// Each entry: labels a firing alert must have (`alertname` and any key or rule labels).
    pub firing: Vec<BTreeMap<String, String>>,
}

/// Expands `"1 2x3 _ 4"` into `[Some(1), Some(2), Some(2), Some(2), None, Some(4)]`.
pub fn expand(series: &str) -> Result<Vec<Option<f64>>, String> {
    let mut out = Vec::new();
    for tok in series.split_whitespace() {
        let (v, n) = match tok.split_once('x') {
            Some((v, n)) => (
                v,
                n.parse::<usize>()
                    .map_err(|_| format!("bad repeat in {tok:?}"))?,
            ),
            None => (tok, 1),
        };
        let v = if v == "_" {
            None
        } else {
            Some(
                v.parse::<f64>()
                    .map_err(|_| format!("bad value in {tok:?}"))?,
            )
        };
        out.extend(std::iter::repeat_n(v, n));
    }
    Ok(out)
}

/// Runs one test case against loaded rules; returns the failures (empty when it passes).
pub fn run_case(files: &[(String, RuleFile)], case: &TestCase) -> Result<Vec<String>, String> {
    let mut series = Vec::new();
    for i in &case.input {
        let rule_known = files
            .iter()
            .flat_map(|(_, f)| &f.groups)
            .flat_map(|g| &g.rules)
            .any(|r| r.alert == i.alert);
        if !rule_known {
            return Err(format!("input for unknown alert {:?}", i.alert));
        }
        let values = expand(&i.values)?;
        let baseline = i.baseline.as_deref().map(expand).transpose()?;
        let extra = i.extra.as_deref().map(expand).transpose()?;
        series.push((i, values, baseline, extra));
    }
    let step = case.interval.as_millis().max(1) as i64;
    let last = case
        .expect
        .iter()
        .map(|e| e.at.as_millis() as i64)
        .max()
        .unwrap_or(0);
    let mut alerts = Alerts::default();
    let mut failures = Vec::new();
    let mut t = 0i64;
    let mut idx = 0usize;
    while t <= last {
        for (_, f) in files {
            for g in &f.groups {
                for rule in &g.rules {
                    let obs: Vec<Observation> = series
                        .iter()
                        .filter(|(i, ..)| i.alert == rule.alert)
                        .filter_map(|(i, v, b, x)| {
                            let value = v.get(idx).copied().flatten()?;
                            Some(Observation {
                                labels: i.labels.clone(),
                                value,
                                samples: i.samples,
                                baseline: b.as_ref().and_then(|b| b.get(idx).copied().flatten()),
                                extra: x.as_ref().and_then(|x| x.get(idx).copied().flatten()),
                            })
                        })
                        .collect();
                    engine::apply(rule, &g.name, &obs, &mut alerts, t, &mut Vec::new());
                }
            }
        }
        for e in case.expect.iter().filter(|e| e.at.as_millis() as i64 == t) {
            let firing: Vec<BTreeMap<String, String>> = alerts
                .map
                .iter()
                .filter(|(_, a)| a.state.phase == Phase::Firing)
                .map(|((name, _), a)| {
                    let mut l = a.labels.clone();
                    l.insert("alertname".into(), name.clone());
                    if let Some(r) = files
                        .iter()
                        .flat_map(|(_, f)| &f.groups)
                        .flat_map(|g| &g.rules)
                        .find(|r| &r.alert == name)
                    {
                        l.extend(r.labels.clone());
                    }
                    l
                })
                .collect();
            let matches = |want: &BTreeMap<String, String>, got: &BTreeMap<String, String>| {
                want.iter().all(|(k, v)| got.get(k) == Some(v))
            };
            let missing: Vec<_> = e
                .firing
                .iter()
                .filter(|w| !firing.iter().any(|g| matches(w, g)))
                .collect();
            let unexpected: Vec<_> = firing
                .iter()
                .filter(|g| !e.firing.iter().any(|w| matches(w, g)))
                .collect();
            if !missing.is_empty() || !unexpected.is_empty() {
                let at = humantime::format_duration(e.at);
                failures.push(format!("at {at}: expected firing {missing:?} not firing; firing {unexpected:?} not expected"));
            }
        }
        t += step;
        idx += 1;
    }
    Ok(failures)
}

/// Loads and runs a test file; returns (passed, failed) and prints a line per case.
pub fn run_file(path: &Path) -> Result<Vec<CaseResult>, Vec<Problem>> {
    let shown = path.display().to_string();
    let problem = |message: String| {
        vec![Problem {
            file: shown.clone(),
            line: None,
            message,
        }]
    };
    let text = std::fs::read_to_string(path).map_err(|e| problem(format!("cannot read: {e}")))?;
    let tf: TestFile = serde_yaml_ng::from_str(&text).map_err(|e| {
        vec![Problem {
            file: shown.clone(),
            line: e.location().map(|l| l.line()),
            message: e.to_string(),
        }]
    })?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let rule_paths: Vec<_> = tf.rule_files.iter().map(|f| dir.join(f)).collect();
    let files = rules::load(&rule_paths).map_err(|rules::RulesError::Invalid(p)| p)?;
    Ok(tf
        .tests
        .iter()
        .map(|case| CaseResult {
            file: shown.clone(),
            name: case.name.clone(),
            failures: run_case(&files, case).unwrap_or_else(|e| vec![e]),
        })
        .collect())
}

/// One test case's outcome: it passed when nothing failed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CaseResult {
    pub file: String,
    pub name: String,
    /// What differed from the expectation (empty: passed).
    pub failures: Vec<String>,
}

impl CaseResult {
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_notation() {
        assert_eq!(
            expand("1 2x3 _ 4").unwrap(),
            vec![Some(1.0), Some(2.0), Some(2.0), Some(2.0), None, Some(4.0)]
        );
        assert!(expand("1xq").is_err());
        assert!(expand("abc").is_err());
    }

    #[test]
    fn the_shipped_rule_tests_pass_and_a_wrong_expectation_fails() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("alerts/default.test.yaml");
        let cases = run_file(&path).unwrap_or_else(|p| panic!("{p:?}"));
        let failed: Vec<_> = cases.iter().filter(|c| !c.passed()).collect();
        assert!(failed.is_empty(), "{failed:?}");
        assert!(cases.len() >= 5, "{}", cases.len());

        let files = vec![(
            "d".to_string(),
            rules::parse("d", include_str!("../../alerts/default.yaml")).unwrap(),
        )];
        let case: TestCase = serde_yaml_ng::from_str(
            "name: wrong\ninput:\n  - alert: ToolErrorRate\n    labels: {service: s, tool: t, side: server}\n    values: 0.2x3\nexpect:\n  - at: 1m\n    firing: [{alertname: ToolErrorRate}]\n",
        )
        .unwrap();
        let failures = run_case(&files, &case).unwrap();
        assert_eq!(
            failures.len(),
            1,
            "`for: 5m` has not elapsed at 2m: {failures:?}"
        );
    }
}
