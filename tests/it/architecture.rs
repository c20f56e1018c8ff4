//! The invariants of ARCHITECTURE.md that a plain scan of the sources can check.

use std::path::{Path, PathBuf};

fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Source text without `//` comments and without `#[cfg(test)] mod tests;` files.
fn code(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| l.split("//").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn only_store_contains_sql() {
    let store = src().join("store");
    let sql = [
        "SELECT ",
        "INSERT INTO",
        "UPDATE ",
        "DELETE FROM",
        "CREATE TABLE",
        "sqlx::query",
        "sqlx::raw_sql",
        "copy_in_raw",
    ];
    for file in rust_files(&src()) {
        if file.starts_with(&store) {
            continue;
        }
        let text = code(&file);
        for needle in sql {
            assert!(
                !text.contains(needle),
                "{} contains {needle:?}: SQL belongs in src/store/",
                file.display()
            );
        }
    }
}

#[test]
fn pure_modules_do_no_io_and_read_no_clock() {
    let forbidden = [
        "std::fs",
        "std::net",
        "std::io",
        "std::process",
        "std::env",
        "tokio",
        "sqlx",
        "reqwest",
        "SystemTime::now",
        "Instant::now",
        "Utc::now",
        "println!",
        "tracing::",
    ];
    let mut files = rust_files(&src().join("normalize"));
    files.push(src().join("evaluate").join("state.rs"));
    for pure in ["route.rs", "group.rs", "payload.rs"] {
        files.push(src().join("notify").join(pure));
    }
    for file in files {
        if file.ends_with("tests.rs") {
            continue;
        }
        let text = code(&file);
        let text = text.split("#[cfg(test)]").next().unwrap();
        for needle in forbidden {
            assert!(
                !text.contains(needle),
                "{} uses {needle:?}: it must stay pure",
                file.display()
            );
        }
    }
}

#[test]
fn no_unbounded_queues() {
    for file in rust_files(&src()) {
        let text = code(&file);
        for needle in [
            "unbounded_channel",
            "unbounded()",
            "UnboundedSender",
            "Vec<Job>::new",
        ] {
            assert!(
                !text.contains(needle),
                "{} uses {needle:?}: every queue must be bounded",
                file.display()
            );
        }
    }
}

/// Stored rows are not the API: no type under `src/store/` is serialized to clients (the API's
/// shapes are `admin`'s own). Only the configuration sections kept there derive `Serialize`, to
/// print the effective configuration.
#[test]
fn store_rows_are_not_api_responses() {
    let sections = [
        "pub struct Database",
        "pub enum Embedded",
        "pub struct Ingest",
        "pub struct Retention",
    ];
    for file in rust_files(&src().join("store")) {
        let text = code(&file);
        let mut rest = text.as_str();
        while let Some(i) = rest.find("Serialize") {
            let after = &rest[i..];
            let item = after
                .find("pub struct ")
                .into_iter()
                .chain(after.find("pub enum "))
                .min()
                .map(|j| {
                    after[j..]
                        .split(['{', '(', '\n'])
                        .next()
                        .unwrap_or_default()
                        .trim()
                })
                .unwrap_or_default();
            assert!(
                sections.contains(&item),
                "{}: `{item}` derives Serialize; give the API a type of its own in admin",
                file.display()
            );
            rest = &after["Serialize".len()..];
        }
    }
}

/// ARCHITECTURE.md's codemap names every source file: by its path, or (a module folder with its
/// files listed) the folder's path and the file's name in the same row.
#[test]
fn the_codemap_names_every_source_file() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("ARCHITECTURE.md")).unwrap();
    let map = &doc[doc.find("## Codemap").unwrap()..doc.find("## Invariants").unwrap()];
    let rows: Vec<&str> = map.lines().filter(|l| l.starts_with("| `")).collect();
    let mut missing = Vec::new();
    for file in rust_files(&src()) {
        let rel = file
            .strip_prefix(root)
            .unwrap()
            .to_string_lossy()
            .into_owned();
        let folder = format!("{}/", rel.rsplit_once('/').unwrap().0);
        let name = rel.rsplit('/').next().unwrap();
        let named = rows.iter().any(|r| {
            r.contains(&format!("`{rel}`"))
                || (r.contains(&format!("`{folder}`"))
                    && (name == "mod.rs" || r.contains(&format!("`{name}`"))))
                || (r.contains(&format!("`{folder}")) && r.contains(&format!(", `{name}`")))
        });
        if !named {
            missing.push(rel);
        }
    }
    assert!(
        missing.is_empty(),
        "not in the ARCHITECTURE.md codemap: {missing:?}"
    );
}

/// The rules and the backtest read rollups and the rules' per-minute state, never the raw
/// tables: their cost must not grow with the calls a window holds. The one raw-row text there is
/// `LOOP_CALLS`, the retry-loop rule's definition the tests check the state against.
#[test]
fn rules_never_read_raw_rows() {
    let raw = ["tool_calls", "mcp_requests", "llm_calls", "upstream_calls"];
    for file in ["alerts.rs", "window.rs", "history.rs"] {
        let text = code(&src().join("store").join(file));
        let text = match text.find("pub const LOOP_CALLS") {
            Some(at) => {
                let end = at + text[at..].find("\";").unwrap();
                format!("{}{}", &text[..at], &text[end..])
            }
            None => text,
        };
        for table in raw {
            for verb in ["FROM", "JOIN"] {
                let pattern = format!("{verb} {table}");
                assert!(
                    !text.contains(&pattern),
                    "src/store/{file} reads a raw table ({pattern}): rules read rollups and their per-minute state"
                );
            }
        }
    }
}
