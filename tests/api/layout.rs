//! The layout of `src/`: its modules depend on each other one way only.
//!
//! The crate documentation (`src/lib.rs`) lists which stage may use which;
//! this test reads every source file, collects the module paths it names
//! (`crate::…` and `super::…`), and checks two things:
//! - between the top-level modules, only the arrows of [`ALLOWED`];
//! - at every level, no cycle between sibling modules (a parent and its own
//!   children are one unit: `http/mod.rs` may merge `http/routes/`'s routers
//!   while those use `http`'s state).
//!
//! Run it alone with `cargo nextest run -E 'test(layout)'`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// What each top-level module of `src/` may use.
const ALLOWED: &[(&str, &[&str])] = &[
    ("clock", &[]),
    ("auth", &[]),
    ("config", &["clock"]),
    ("ops", &["config"]),
    ("log", &["ops", "clock"]),
    ("command", &["log", "ops", "clock"]),
    ("query", &["ops", "log"]),
    ("ratelimit", &["ops", "config", "clock"]),
    ("delivery", &["ops", "config"]),
    ("relay", &["query", "log", "ops", "config"]),
    (
        "projector",
        &[
            "relay", "command", "query", "delivery", "log", "ops", "config", "clock",
        ],
    ),
    (
        "http",
        &[
            "auth",
            "query",
            "command",
            "ratelimit",
            "delivery",
            "ops",
            "config",
            "clock",
        ],
    ),
    (
        "cli",
        &[
            "app",
            "auth",
            "clock",
            "config",
            "ops",
            "log",
            "command",
            "projector",
        ],
    ),
    (
        "app",
        &[
            "auth",
            "clock",
            "config",
            "ops",
            "log",
            "command",
            "query",
            "ratelimit",
            "relay",
            "projector",
            "delivery",
            "http",
        ],
    ),
];

/// Every module of `src/` by path (`http::routes::feed`), with its source.
fn modules() -> BTreeMap<String, String> {
    fn walk(dir: &Path, prefix: &[String], out: &mut BTreeMap<String, String>) {
        for entry in std::fs::read_dir(dir).expect("src/ is readable") {
            let path = entry.expect("a directory entry").path();
            let name = path.file_stem().unwrap().to_string_lossy().to_string();
            let mut module = prefix.to_vec();
            if path.is_dir() {
                module.push(name);
                walk(&path, &module, out);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") {
                continue;
            }
            if !matches!(name.as_str(), "mod" | "lib" | "main") {
                module.push(name);
            }
            if module.is_empty() {
                continue; // the crate root only declares the modules
            }
            let source = std::fs::read_to_string(&path).expect("a readable source file");
            out.insert(module.join("::"), source);
        }
    }
    let mut out = BTreeMap::new();
    walk(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("src"),
        &[],
        &mut out,
    );
    out
}

/// The module paths `source` (of module `at`) names, resolved to modules
/// that exist. Comments (and so doc links) don't count.
fn references(at: &str, source: &str, known: &BTreeSet<String>) -> BTreeSet<String> {
    let at: Vec<&str> = at.split("::").collect();
    let mut found = BTreeSet::new();
    for line in source.lines() {
        let code = line.trim_start();
        if code.starts_with("//") {
            continue;
        }
        let code = code.split(" //").next().unwrap_or(code);
        for (start, _) in code
            .match_indices("crate::")
            .chain(code.match_indices("super::"))
        {
            // `crate::` inside a longer identifier (`podium_crate::`) is not one.
            let before = code[..start].chars().last();
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                continue;
            }
            let mut base: Vec<String> = Vec::new();
            let mut rest = &code[start..];
            if let Some(tail) = rest.strip_prefix("crate::") {
                rest = tail;
            } else {
                base = at.iter().map(|s| s.to_string()).collect();
                while let Some(tail) = rest.strip_prefix("super::") {
                    base.pop();
                    rest = tail;
                }
            }
            for path in expand(rest) {
                let mut full = base.clone();
                full.extend(path);
                // The longest prefix that is a module.
                while !full.is_empty() && !known.contains(&full.join("::")) {
                    full.pop();
                }
                if !full.is_empty() {
                    found.insert(full.join("::"));
                }
            }
        }
    }
    found
}

/// The paths a `use` tail names: `a::b::C`, or `a::{b, c::D}` one level deep.
fn expand(tail: &str) -> Vec<Vec<String>> {
    let ident = |s: &str| -> Vec<String> {
        s.split("::")
            .map(|p| {
                p.chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect::<String>()
            })
            .take_while(|p| !p.is_empty())
            .collect()
    };
    let (head, group) = match tail.find('{') {
        Some(open) if !tail[..open].contains(|c: char| c.is_whitespace() || c == '(') => {
            let close = tail[open..].find('}').map_or(tail.len(), |c| open + c);
            (&tail[..open], Some(&tail[open + 1..close]))
        }
        _ => (tail, None),
    };
    let head = ident(head);
    match group {
        None => vec![head],
        Some(group) => group
            .split(',')
            .map(|item| {
                let mut path = head.clone();
                path.extend(ident(item.trim()));
                path
            })
            .collect(),
    }
}

/// Every edge `from → to` between modules, lifted to the pair of siblings
/// under their closest common parent ("" for the top level); a reference
/// between a module and its own ancestor or descendant is no edge.
fn sibling_edges() -> BTreeSet<(String, String, String)> {
    let modules = modules();
    let known: BTreeSet<String> = modules.keys().cloned().collect();
    let mut edges = BTreeSet::new();
    for (module, source) in &modules {
        for target in references(module, source, &known) {
            let from: Vec<&str> = module.split("::").collect();
            let to: Vec<&str> = target.split("::").collect();
            let common = from.iter().zip(&to).take_while(|(a, b)| a == b).count();
            if common == from.len() || common == to.len() {
                continue;
            }
            edges.insert((
                from[..common].join("::"),
                from[common].to_string(),
                to[common].to_string(),
            ));
        }
    }
    edges
}

#[test]
fn top_level_modules_use_only_what_the_layout_allows() {
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut wrong = Vec::new();
    for (parent, from, to) in sibling_edges() {
        if !parent.is_empty() {
            continue;
        }
        let Some(may) = allowed.get(from.as_str()) else {
            wrong.push(format!("{from} is not in the layout table"));
            continue;
        };
        if !may.contains(&to.as_str()) {
            wrong.push(format!("{from} uses {to}"));
        }
    }
    assert!(wrong.is_empty(), "layout broken: {wrong:#?}");
}

#[test]
fn no_module_cycles_at_any_level() {
    let mut graphs: BTreeMap<String, BTreeMap<String, BTreeSet<String>>> = BTreeMap::new();
    for (parent, from, to) in sibling_edges() {
        graphs
            .entry(parent)
            .or_default()
            .entry(from)
            .or_default()
            .insert(to);
    }
    for (parent, graph) in &graphs {
        if let Some(cycle) = find_cycle(graph) {
            panic!("modules under `{parent}` form a cycle: {cycle:?}");
        }
    }
    // The check itself sees a cycle when there is one.
    let mut looped: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    looped.entry("a".into()).or_default().insert("b".into());
    looped.entry("b".into()).or_default().insert("a".into());
    assert!(find_cycle(&looped).is_some());
}

/// A cycle of `graph`, by depth-first search, if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) -> Option<Vec<String>> {
        if let Some(at) = path.iter().position(|n| n == node) {
            let mut cycle = path[at..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, path, done) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut Vec::new(), &mut done))
}

#[test]
fn every_folder_module_says_what_it_holds() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut silent = Vec::new();
    let mut stack = vec![src];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if !path.is_dir() {
                continue;
            }
            let text = std::fs::read_to_string(path.join("mod.rs")).unwrap_or_default();
            if !text.starts_with("//!") {
                silent.push(path.display().to_string());
            }
            stack.push(path);
        }
    }
    assert!(
        silent.is_empty(),
        "folders without a module doc: {silent:?}"
    );
}
