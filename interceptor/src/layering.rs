//! The dependency direction ARCHITECTURE.md states, checked on the sources:
//! the data path never imports the control plane, and the bottom layer
//! imports nothing above it.

use std::path::{Path, PathBuf};

/// The crate's top-level modules a file refers to (`crate::x`, and the
/// first segment of each item of a `use crate::{..}` group), outside
/// comments and its `#[cfg(test)] mod tests`.
fn imports(text: &str) -> Vec<String> {
    let code: String = text
        .split("#[cfg(test)]\nmod tests")
        .next()
        .unwrap_or_default()
        .lines()
        .map(|l| l.split("//").next().unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n");
    let mut out = Vec::new();
    for (i, _) in code.match_indices("crate::") {
        let rest = &code[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut item = String::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        out.push(item.trim().split("::").next().unwrap_or_default().to_string());
                        item.clear();
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
            out.push(item.trim().split("::").next().unwrap_or_default().to_string());
        } else {
            out.push(rest.chars().take_while(|c| c.is_alphanumeric() || *c == '_').collect());
        }
    }
    out
}

/// Every source file of module `name` (`name.rs` and `name/**`),
/// without separate test files.
fn files(name: &str) -> Vec<PathBuf> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut out = vec![];
    let file = src.join(format!("{name}.rs"));
    if file.exists() {
        out.push(file);
    }
    let mut dirs = vec![src.join(name)];
    while let Some(dir) = dirs.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else { continue };
        for entry in entries.flatten() {
            let path = entry.path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") && !path.ends_with("tests.rs") {
                out.push(path);
            }
        }
    }
    assert!(!out.is_empty(), "no module {name}");
    out
}

fn check(modules: &[&str], forbidden: &[&str]) {
    for module in modules {
        for file in files(module) {
            let text = std::fs::read_to_string(&file).unwrap();
            for import in imports(&text) {
                assert!(!forbidden.contains(&import.as_str()), "{} imports crate::{import}", file.display());
            }
        }
    }
}

#[test]
fn the_data_path_never_imports_the_control_plane() {
    check(
        &["proxy", "guardrails", "audit", "metrics", "dns", "ca"],
        &[
            "redirect",
            "control",
            "dataplane",
            "app",
            "admin",
            "privileges",
            "doctor",
            "kubernetes",
            "check_policy",
            "usage_report",
        ],
    );
}

#[test]
fn the_bottom_layer_imports_nothing_above_it() {
    assert_eq!(imports("use crate::{a::b, c::{d, e}};\n// crate::z\nlet x = crate::f::g();"), ["a", "c", "f"]);
    let above = [
        "redirect",
        "control",
        "dataplane",
        "app",
        "admin",
        "privileges",
        "doctor",
        "check_policy",
        "usage_report",
        "proxy",
        "guardrails",
        "audit",
        "metrics",
        "dns",
        "ca",
        "webhook",
        "kubernetes",
    ];
    check(
        &["error", "telemetry", "policy", "targets", "config", "app_name", "cgroup", "process", "workload", "net"],
        &above,
    );
    // The leaves import nothing of the crate at all.
    for leaf in ["error", "telemetry", "targets", "cgroup", "process"] {
        for file in files(leaf) {
            let text = std::fs::read_to_string(&file).unwrap();
            let others: Vec<String> = imports(&text).into_iter().filter(|i| i != leaf).collect();
            assert!(others.is_empty(), "{} imports {others:?}", file.display());
        }
    }
}

#[test]
fn metrics_import_only_the_guardrail_model() {
    // Metric labels are the guardrail model's enums (decision, direction,
    // stage), so labels and audit events agree by construction; nothing
    // else of the crate.
    for file in files("metrics") {
        let text = std::fs::read_to_string(&file).unwrap();
        for import in imports(&text) {
            assert!(import == "guardrails" || import == "metrics", "{} imports crate::{import}", file.display());
        }
        for (i, _) in text.match_indices("crate::guardrails::") {
            assert!(
                text[i..].starts_with("crate::guardrails::model::"),
                "{} imports guardrails beyond the model",
                file.display()
            );
        }
    }
}
