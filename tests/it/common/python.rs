//! Python environments for tests that need a real peer from PyPI (FastMCP, an SMTP server),
//! created on first use under the cargo target directory.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Runs `cmd` and fails the test with its output when it fails.
pub fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether `python` can run `code`.
pub fn can(python: &Path, code: &str) -> bool {
    Command::new(python)
        .args(["-c", code])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The interpreter of the venv `name`, created (with `install` given a pip command) unless
/// `check` already runs in it. Tests of one binary run at once and several binaries may share a
/// venv, so the creation holds an exclusive lock on a file beside it: the others wait and then
/// find it ready.
pub fn venv(name: &str, check: &str, install: impl Fn(&dyn Fn() -> Command)) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let venv = dir.join(name);
    let python = venv.join("bin/python");
    let lock = std::fs::File::create(dir.join(format!("{name}.lock")))
        .unwrap_or_else(|e| panic!("{name}.lock: {e}"));
    lock.lock()
        .unwrap_or_else(|e| panic!("locking {name}.lock: {e}"));
    if can(&python, check) {
        return python;
    }
    eprintln!("creating the test environment {}", venv.display());
    run(Command::new("python3")
        .args(["-m", "venv", "--clear"])
        .arg(&venv));
    let pip = || {
        let mut c = Command::new(&python);
        c.args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ]);
        c
    };
    install(&pip);
    assert!(can(&python, check), "{name}: `{check}` fails after install");
    python
}
