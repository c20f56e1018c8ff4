//! `toolsight rules check` on the shipped rules and on broken files.

use std::process::Command;

fn check(files: &[&str]) -> (bool, String) {
    rules("check", files)
}

fn rules(verb: &str, files: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_toolsight"))
        .arg("rules")
        .arg(verb)
        .args(files)
        .env_remove("TOOLSIGHT_CONFIG")
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn the_shipped_rules_pass() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/alerts/default.yaml");
    let demo = concat!(env!("CARGO_MANIFEST_DIR"), "/alerts/demo.yaml");
    let (ok, out) = check(&[path, demo]);
    assert!(ok, "{out}");
    assert!(
        out.contains("default.yaml: ok (3 groups, 7 rules)"),
        "{out}"
    );
    assert!(out.contains("demo.yaml: ok (1 groups, 7 rules)"), "{out}");
}

#[test]
fn every_problem_of_every_file_is_listed_with_file_and_line() {
    let dir = std::env::temp_dir().join(format!("toolsight-rules-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let a = dir.join("a.yaml");
    let b = dir.join("b.yaml");
    std::fs::write(&a, "groups:\n  - name: g\n    rules:\n      - alert: Lat\n        kind: latency\n        window: 5m\n      - alert: Err\n        kind: error_rate\n        window: 5m\n        fire_above: 7\n").unwrap();
    std::fs::write(&b, "groups:\n  - name: h\n    rules: [\n").unwrap();
    let (ok, out) = check(&[a.to_str().unwrap(), b.to_str().unwrap()]);
    assert!(!ok, "{out}");
    assert!(out.contains("3 problem(s)"), "{out}");
    assert!(
        out.contains("a.yaml:4: rule \"Lat\": a latency rule needs"),
        "{out}"
    );
    assert!(
        out.contains("a.yaml:7: rule \"Err\": fire_above must be between 0 and 1"),
        "{out}"
    );
    assert!(out.contains("b.yaml:"), "{out}");
}

#[test]
fn rule_unit_tests_pass_and_fail() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/alerts/default.test.yaml");
    let (ok, out) = rules("test", &[path]);
    assert!(ok, "{out}");
    assert!(out.contains("8 passed, 0 failed"), "{out}");

    let dir = std::env::temp_dir().join(format!("toolsight-ruletest-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/alerts/default.yaml"),
        dir.join("default.yaml"),
    )
    .unwrap();
    let bad = dir.join("bad.test.yaml");
    std::fs::write(&bad, "rule_files: [default.yaml]\ntests:\n  - name: wrong\n    input:\n      - alert: ToolErrorRate\n        labels: {service: s, tool: t, side: server}\n        values: 0.01x3\n    expect:\n      - {at: 2m, firing: [{alertname: ToolErrorRate}]}\n").unwrap();
    let (ok, out) = rules("test", &[bad.to_str().unwrap()]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("FAIL") && out.contains("0 passed, 1 failed"),
        "{out}"
    );
}

/// `toolsight rules check alerts/*.yaml`, as the README says: the shipped directory passes
/// (its unit-test file is named as such, not failed), and every valid file says so.
#[test]
fn the_shipped_directory_passes_with_its_test_file() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/alerts");
    let mut files: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path().display().to_string())
        .filter(|p| p.ends_with(".yaml"))
        .collect();
    files.sort();
    let refs: Vec<&str> = files.iter().map(String::as_str).collect();
    let (ok, out) = check(&refs);
    assert!(ok, "{out}");
    assert!(
        out.contains("default.yaml: ok (3 groups, 7 rules)"),
        "{out}"
    );
    assert!(out.contains("demo.yaml: ok"), "{out}");
    assert!(
        out.contains("default.test.yaml: rule unit tests, not rules"),
        "{out}"
    );
}

/// Structural problems (unknown key, misspelled kind, wrong type, missing field) are each
/// reported at their own rule's line, all of them; a duplicate is blamed on the duplicate.
#[test]
fn structural_problems_are_each_reported_at_their_own_line() {
    let dir =
        std::env::temp_dir().join(format!("toolsight-rules-structure-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "groups:
  - name: g
    interval: 1m
    rules:
      - alert: Typo
        kind: eror_rate
        window: 5m
      - alert: Unknown
        kind: error_rate
        window: 5m
        fire_above: 0.1
        severity: high
      - alert: WrongType
        kind: error_rate
        window: 5m
        fire_above: lots
      - alert: NoWindow
        kind: error_rate
        fire_above: 0.1
  - name: h
    colour: blue
    rules:
      - alert: Fine
        kind: error_rate
        window: 5m
        fire_above: 0.1
",
    )
    .unwrap();
    let (ok, out) = check(&[bad.to_str().unwrap()]);
    assert!(!ok, "{out}");
    for (line, what) in [
        (5, "eror_rate"),
        (8, "severity"),
        (13, "lots"),
        (17, "window"),
        (20, "colour"),
    ] {
        assert!(
            out.lines()
                .any(|l| l.contains(&format!("bad.yaml:{line}:")) && l.contains(what)),
            "line {line} ({what}):\n{out}"
        );
    }
    assert!(out.contains("5 problem(s)"), "{out}");

    let dup = dir.join("dup.yaml");
    std::fs::write(
        &dup,
        "groups:
  - name: g
    rules:
      - alert: Same
        kind: error_rate
        window: 5m
        fire_above: 0.1
      - alert: Same
        kind: error_rate
        window: 5m
        fire_above: 0.2
",
    )
    .unwrap();
    let (ok, out) = check(&[dup.to_str().unwrap()]);
    assert!(!ok, "{out}");
    assert!(
        out.contains("dup.yaml:8: rule \"Same\" is defined twice"),
        "{out}"
    );
}
