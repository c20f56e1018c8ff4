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
    assert!(out.contains("7 passed, 0 failed"), "{out}");

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
