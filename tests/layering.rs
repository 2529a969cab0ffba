//! The layering rule of the README's Architecture section, checked against the code:
//! every `crate::module` path in `src/` must be one the table allows, the table must
//! be in layer order (so it has no cycle), and every module must be in it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// What the README allows: each module, in table order, with what it may use.
struct Table {
    order: Vec<String>,
    may_use: BTreeMap<String, BTreeSet<String>>,
}

/// Reads the module table under `## Architecture`.
fn table(readme: &str) -> Table {
    let section = readme
        .split("\n## Architecture\n")
        .nth(1)
        .expect("README has an Architecture section")
        .split("\n## ")
        .next()
        .unwrap();
    let mut order: Vec<String> = Vec::new();
    let mut may_use = BTreeMap::new();
    for row in section.lines().filter(|l| l.starts_with("| `")) {
        let cells: Vec<&str> = row.trim_matches('|').split('|').map(str::trim).collect();
        let module = cells[0].trim_matches('`').to_string();
        let uses = cells.get(2).copied().unwrap_or("");
        let allowed: BTreeSet<String> = if uses == "every module above" {
            order.iter().cloned().collect()
        } else {
            uses.split(',')
                .map(|u| u.trim().trim_matches('`').to_string())
                .filter(|u| !u.is_empty())
                .collect()
        };
        may_use.insert(module.clone(), allowed);
        order.push(module);
    }
    Table { order, may_use }
}

/// The top-level module a file of `src/` belongs to (`src/proxy/relay.rs` → `proxy`).
fn module_of(src: &Path, file: &Path) -> String {
    let relative = file.strip_prefix(src).unwrap();
    let first = relative.components().next().unwrap().as_os_str();
    first.to_string_lossy().trim_end_matches(".rs").to_string()
}

/// The modules a file names as `crate::name`, in `use` lines and paths alike
/// (`use crate::{a::X, b}` included); comments are skipped.
fn uses_of(text: &str) -> BTreeSet<String> {
    let mut used = BTreeSet::new();
    for line in text.lines() {
        let code = line.split("//").next().unwrap_or("");
        for (at, _) in code.match_indices("crate::") {
            let rest = &code[at + "crate::".len()..];
            let names: Vec<&str> = match rest.strip_prefix('{') {
                Some(group) => group.split('}').next().unwrap().split(',').collect(),
                None => vec![rest],
            };
            for name in names {
                let name: String = name
                    .trim()
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    used.insert(name);
                }
            }
        }
    }
    used
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every use in `src/` that the table does not allow, as `file: module -> used`.
fn violations(src: &Path, table: &Table) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let mut found = Vec::new();
    for file in files {
        let module = module_of(src, &file);
        if module == "main" || module == "lib" {
            continue; // the binary and the module list, outside the layers
        }
        let Some(allowed) = table.may_use.get(&module) else {
            found.push(format!(
                "{}: module `{module}` is not in the table",
                file.display()
            ));
            continue;
        };
        let text = std::fs::read_to_string(&file).unwrap();
        for used in uses_of(&text) {
            if used != module && !allowed.contains(&used) {
                found.push(format!("{}: {module} -> {used}", file.display()));
            }
        }
    }
    found
}

/// Rows that may use a module listed after them (which is how a cycle shows).
fn upward_rows(table: &Table) -> Vec<String> {
    let position: BTreeMap<&str, usize> = table
        .order
        .iter()
        .enumerate()
        .map(|(i, m)| (m.as_str(), i))
        .collect();
    let mut found = Vec::new();
    for (i, module) in table.order.iter().enumerate() {
        for used in &table.may_use[module] {
            match position.get(used.as_str()) {
                Some(&j) if j < i => {}
                Some(_) => found.push(format!("{module} may use {used}, listed after it")),
                None => found.push(format!(
                    "{module} may use {used}, which is not in the table"
                )),
            }
        }
    }
    found
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn src_uses_only_what_the_architecture_table_allows() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let table = table(&readme);
    assert!(table.order.len() > 10, "the table was not read");
    let upward = upward_rows(&table);
    assert!(
        upward.is_empty(),
        "the table is not layered:\n{}",
        upward.join("\n")
    );
    let found = violations(&root().join("src"), &table);
    assert!(
        found.is_empty(),
        "uses the table does not allow:\n{}",
        found.join("\n")
    );
}

/// The checker itself catches what it is for: an upward use, a cycle in the table,
/// a module the table does not place, and grouped `use crate::{…}` lines.
#[test]
fn the_checker_catches_upward_uses_cycles_and_unplaced_modules() {
    let readme = "\n## Architecture\n\n| module | owns | may use |\n|---|---|---|\n\
                  | `low` | x | |\n| `high` | y | `low` |\n\n## Next\n";
    let table = table(readme);
    assert_eq!(table.order, ["low", "high"]);
    assert!(upward_rows(&table).is_empty());
    let cyclic = "\n## Architecture\n\n| `low` | x | `high` |\n| `high` | y | `low` |\n";
    assert_eq!(upward_rows(&self::table(cyclic)).len(), 1);

    let dir = tempfile::tempdir().unwrap();
    let src = dir.path();
    std::fs::create_dir(src.join("high")).unwrap();
    std::fs::write(src.join("high/mod.rs"), "use crate::low::Thing;\n").unwrap();
    std::fs::write(src.join("low.rs"), "use crate::{high::X, low};\n").unwrap();
    std::fs::write(src.join("stray.rs"), "// use crate::high;\n").unwrap();
    let mut found = violations(src, &table);
    found.sort();
    assert_eq!(found.len(), 2, "{found:?}");
    assert!(found[0].ends_with("low -> high"), "{found:?}");
    assert!(
        found[1].contains("`stray` is not in the table"),
        "{found:?}"
    );
}
