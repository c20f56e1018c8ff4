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

/// The shipped container's environment: listeners on every interface and no tokens (not
/// servable), the admin token for the silence client, the benchmark's server variable, a
/// variable an `env:` secret names, and a configuration file that is not there.
const CONTAINER_ENV: [(&str, &str); 6] = [
    ("TOOLSIGHT_OTLP__HTTP_LISTEN", "0.0.0.0:4318"),
    ("TOOLSIGHT_OTLP__GRPC_LISTEN", "0.0.0.0:4317"),
    ("TOOLSIGHT_ADMIN__LISTEN", "0.0.0.0:9464"),
    ("TOOLSIGHT_ADMIN_TOKEN", "an-admin-token-for-the-client"),
    ("TOOLSIGHT_BENCH_SERVER", "target/release/toolsight"),
    ("TOOLSIGHT_TOKEN_BILLING", "a-token-an-env-secret-names"),
];

fn in_container(args: &[&str], config: Option<&str>) -> std::process::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_toolsight"));
    cmd.args(args)
        .envs(CONTAINER_ENV)
        .env_remove("TOOLSIGHT_CONFIG");
    if let Some(c) = config {
        cmd.env("TOOLSIGHT_CONFIG", c);
    }
    cmd.output().unwrap()
}

#[test]
fn rule_commands_read_no_configuration_and_speak_json() {
    let default = concat!(env!("CARGO_MANIFEST_DIR"), "/alerts/default.yaml");
    let tests = concat!(env!("CARGO_MANIFEST_DIR"), "/alerts/default.test.yaml");
    let missing = Some("/nonexistent/toolsight.toml");
    let out = in_container(&["rules", "check", "--json", default, tests], missing);
    assert!(out.status.success(), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["files"][0]["groups"], 3, "{report}");
    assert_eq!(report["files"][0]["rules"], 7, "{report}");
    assert_eq!(report["unitTestFiles"][0], tests, "{report}");
    assert_eq!(report["problems"], serde_json::json!([]), "{report}");

    let out = in_container(&["rules", "test", "--json", tests], missing);
    assert!(out.status.success(), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (report["passed"].as_u64(), report["failed"].as_u64()),
        (Some(8), Some(0))
    );
    assert_eq!(report["cases"].as_array().unwrap().len(), 8, "{report}");
    assert_eq!(report["cases"][0]["failures"], serde_json::json!([]));

    // A broken file: the problems in the JSON, a failing exit status.
    let dir = std::env::temp_dir().join(format!("toolsight-rules-json-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad = dir.join("bad.yaml");
    std::fs::write(
        &bad,
        "groups:\n  - name: g\n    rules:\n      - alert: X\n        kind: nope\n",
    )
    .unwrap();
    let out = in_container(&["rules", "check", "--json", bad.to_str().unwrap()], None);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(report["problems"][0]["line"], 4, "{report}");
    assert!(
        report["problems"][0]["file"]
            .as_str()
            .unwrap()
            .ends_with("bad.yaml")
    );
}

#[test]
fn only_serving_commands_need_listeners_closed_to_strangers() {
    // `config` checks what `serve` would: the open listeners are refused, by name ...
    let out = in_container(&["config"], None);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("otlp.http_listen: 0.0.0.0:4318 is not a loopback address"),
        "{stderr}"
    );
    // ... and the variables that only share the prefix are not settings.
    assert!(!stderr.contains("unknown setting"), "{stderr}");
    // With tokens the same environment serves; still no "unknown setting".
    let out = Command::new(env!("CARGO_BIN_EXE_toolsight"))
        .arg("config")
        .envs(CONTAINER_ENV)
        .env_remove("TOOLSIGHT_CONFIG")
        .env("TOOLSIGHT_AUTH__ALLOW_UNAUTHENTICATED", "true")
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("http_listen = \"0.0.0.0:4318\""),
        "{out:?}"
    );
    // A command that listens on nothing runs in that environment: a silence client given no
    // server to reach fails on the connection, not on the configuration.
    let out = in_container(
        &["silence", "--url", "http://127.0.0.1:9", "list"],
        Some("/nonexistent/toolsight.toml"),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("reaching the admin API"), "{stderr}");
}
