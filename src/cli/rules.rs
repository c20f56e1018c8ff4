//! `toolsight rules`: `check` and `test` (which read only their files) and the backtest's time
//! arguments and report.

use std::path::PathBuf;

/// An instant given as RFC 3339, `now`, or a duration before `now` (`24h`, `7d`).
pub(super) fn parse_instant(
    s: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<chrono::DateTime<chrono::Utc>> {
    if s == "now" {
        return Ok(now);
    }
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&chrono::Utc));
    }
    match humantime::parse_duration(s) {
        Ok(d) => Ok(now - chrono::Duration::from_std(d)?),
        Err(_) => anyhow::bail!(
            "{s:?} is neither an RFC 3339 time (2026-11-20T08:00:00Z), `now`, nor a duration ago (24h)"
        ),
    }
}

pub(super) fn print_backtest(r: &toolsight::evaluate::backtest::Report) {
    let fmt = |t: chrono::DateTime<chrono::Utc>| t.format("%Y-%m-%d %H:%M:%S").to_string();
    println!(
        "replayed {} rules over {} .. {} ({} evaluations, {} rows of history)",
        r.rules.len(),
        fmt(r.from),
        fmt(r.to),
        r.evaluations,
        r.rows
    );
    if r.episodes.is_empty() {
        println!("no alert would have fired");
        return;
    }
    let mut t = comfy_table::Table::new();
    t.load_preset(comfy_table::presets::UTF8_BORDERS_ONLY)
        .set_header([
            "alert",
            "key",
            "pending since",
            "fired",
            "resolved",
            "firing for",
            "value",
        ]);
    for e in &r.episodes {
        let end = e.resolved_at.unwrap_or(r.to);
        let firing = humantime::format_duration(std::time::Duration::from_secs(
            (end - e.fired_at).num_seconds().max(0) as u64,
        ));
        t.add_row([
            e.alert.clone(),
            e.key.clone(),
            fmt(e.pending_since),
            fmt(e.fired_at),
            e.resolved_at.map_or("still firing".into(), fmt),
            firing.to_string(),
            e.value.map_or("-".into(), |v| format!("{v:.3}")),
        ]);
    }
    println!("{t}");
    let mut per_rule: std::collections::BTreeMap<&str, usize> = Default::default();
    for e in &r.episodes {
        *per_rule.entry(e.alert.as_str()).or_default() += 1;
    }
    let quiet: Vec<&str> = r
        .rules
        .iter()
        .map(String::as_str)
        .filter(|a| !per_rule.contains_key(a))
        .collect();
    for (alert, n) in &per_rule {
        println!("{alert}: fired {n} time(s)");
    }
    if !quiet.is_empty() {
        println!("never fired: {}", quiet.join(", "));
    }
}

/// `toolsight rules check`: every file on its own line, every problem at its own line, like
/// `promtool check rules`; rule unit-test files (`alerts/*.yaml` matches them) are named, not
/// failed. With `json`, one object: the files, the unit-test files, the problems.
pub(super) fn check(files: Vec<PathBuf>, json: bool) -> anyhow::Result<()> {
    use toolsight::evaluate::rules::{RulesError, is_test_file, load};
    let (tests, files): (Vec<PathBuf>, Vec<PathBuf>) =
        files.into_iter().partition(|f| is_test_file(f));
    let mut checked = Vec::new();
    let mut problems = Vec::new();
    for file in &files {
        match load(std::slice::from_ref(file)) {
            Ok(loaded) => {
                for (file, f) in loaded {
                    let rules: usize = f.groups.iter().map(|g| g.rules.len()).sum();
                    checked.push(CheckedFile {
                        file,
                        groups: f.groups.len(),
                        rules,
                    });
                }
            }
            Err(RulesError::Invalid(p)) => problems.extend(p),
        }
    }
    // Names that clash across files.
    if problems.is_empty()
        && let Err(RulesError::Invalid(p)) = load(&files)
    {
        problems.extend(p);
    }
    if json {
        let report = serde_json::json!({
            "files": checked,
            "unitTestFiles": tests,
            "problems": problems.iter().map(|p| serde_json::json!({
                "file": p.file, "line": p.line, "message": p.message,
            })).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for t in &tests {
            println!(
                "{}: rule unit tests, not rules (run them with `toolsight rules test {}`)",
                t.display(),
                t.display()
            );
        }
        for f in &checked {
            println!("{}: ok ({} groups, {} rules)", f.file, f.groups, f.rules);
        }
        problems.iter().for_each(|p| println!("{p}"));
    }
    if !problems.is_empty() {
        anyhow::bail!("{} problem(s) in rule files", problems.len());
    }
    Ok(())
}

#[derive(serde::Serialize)]
struct CheckedFile {
    file: String,
    groups: usize,
    rules: usize,
}

/// `toolsight rules test`: each case PASS or FAIL with what differed, then the counts; with
/// `json`, every case and the counts as one object.
pub(super) fn test(files: &[PathBuf], json: bool) -> anyhow::Result<()> {
    let mut cases = Vec::new();
    for f in files {
        cases.extend(
            toolsight::evaluate::unittest::run_file(f)
                .map_err(toolsight::evaluate::rules::RulesError::Invalid)?,
        );
    }
    let failed = cases.iter().filter(|c| !c.passed()).count();
    let passed = cases.len() - failed;
    if json {
        let report = serde_json::json!({"passed": passed, "failed": failed, "cases": cases});
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for c in &cases {
            if c.passed() {
                println!("PASS {}: {}", c.file, c.name);
            } else {
                println!("FAIL {}: {}\n  {}", c.file, c.name, c.failures.join("\n  "));
            }
        }
        println!("{passed} passed, {failed} failed");
    }
    if failed > 0 {
        anyhow::bail!("{failed} rule test(s) failed");
    }
    Ok(())
}
