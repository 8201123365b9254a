//! The source tree's import rule: a module may use its own layer and the layers below it,
//! never a layer above (docs/architecture.md). Test code (`tests.rs` files and everything
//! after a `#[cfg(test)]`) may reach upward, e.g. to simulate mock data.

use std::path::{Path, PathBuf};

/// The layers from the bottom up; a layer may import those with a lower or equal rank.
const LAYERS: &[(&str, u32)] = &[
    ("base", 0),
    ("sphere", 1),
    ("num", 2),
    ("data", 2),
    ("prior", 3),
    ("likelihood", 4),
    ("backend", 5),
    ("inference", 6),
    ("products", 7),
    ("app", 8),
    ("cli", 9),
];

fn rank(layer: &str) -> Option<u32> {
    LAYERS.iter().find(|(n, _)| *n == layer).map(|(_, r)| *r)
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
}

/// `crate::<layer>` paths used in the non-test code of `text`, with their line numbers.
fn crate_paths(text: &str) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let code = line.trim_start();
        if code.starts_with("#[cfg(test)]") {
            break;
        }
        if code.starts_with("//") {
            continue;
        }
        let mut rest = line;
        while let Some(i) = rest.find("crate::") {
            let after = &rest[i + 7..];
            let name: String = after
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            out.push((n + 1, name));
            rest = after;
        }
    }
    out
}

#[test]
fn no_module_imports_a_layer_above_its_own() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut violations = Vec::new();
    let mut layered = 0;
    for f in &files {
        let rel = f.strip_prefix(&src).unwrap();
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_str()
            .unwrap();
        if rel.file_name().is_some_and(|n| n == "tests.rs") {
            continue;
        }
        let Some(own) = rank(top) else {
            // lib.rs and main.rs sit above every layer
            assert!(
                top == "lib.rs" || top == "main.rs",
                "{} is in no layer: add its folder to LAYERS and docs/architecture.md",
                rel.display()
            );
            continue;
        };
        layered += 1;
        let text = std::fs::read_to_string(f).unwrap();
        for (line, target) in crate_paths(&text) {
            match rank(&target) {
                Some(r) if r > own => violations.push(format!(
                    "src/{}:{line}: layer `{top}` imports `{target}` above it",
                    rel.display()
                )),
                Some(_) => {}
                None => violations.push(format!(
                    "src/{}:{line}: `crate::{target}` is not a layer",
                    rel.display()
                )),
            }
        }
    }
    assert!(layered > 40, "only {layered} files found under src/");
    assert!(
        violations.is_empty(),
        "upward imports:\n{}",
        violations.join("\n")
    );
}

#[test]
fn the_checker_sees_an_upward_import() {
    let text = "use crate::sphere::grid;\nfn f() { crate::app::config::Config::default(); }\n\
                #[cfg(test)]\nmod tests { use crate::cli; }\n";
    let found: Vec<String> = crate_paths(text).into_iter().map(|(_, n)| n).collect();
    assert_eq!(found, ["sphere", "app"]);
}
