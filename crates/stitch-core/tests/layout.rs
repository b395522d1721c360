//! The workspace's layout rules, checked over the source text of every
//! crate so they stay true (issue 22):
//! - no file-level import cycles inside a crate (a file names a module of
//!   another file — `crate::a::b`, `super::x`, `use crate::{a, b}` — and
//!   that one names it back, directly or around a loop);
//! - `unsafe` only in `stitch-mq/src/raw_sqlite.rs`; every other crate root
//!   forbids it, `stitch-mq` denies it.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn crates_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("crates/")
        .to_path_buf()
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// `src/a/b.rs` and `src/a/b/mod.rs` → `["a", "b"]`; `lib.rs`/`main.rs` → `[]`.
fn module_path(src: &Path, file: &Path) -> Vec<String> {
    let rel = file.strip_prefix(src).unwrap().with_extension("");
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if matches!(
        parts.last().map(String::as_str),
        Some("mod" | "lib" | "main")
    ) {
        parts.pop();
    }
    parts
}

/// The code of a file without comments and without its `#[cfg(test)] mod
/// tests` (a test module may name its parent freely).
fn code_of(text: &str) -> String {
    let text = match text.find("#[cfg(test)]\nmod tests") {
        Some(at) => &text[..at],
        None => text,
    };
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn is_ident(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_'
}

/// Every `crate::…`, `super::…`, `self::…` path in `code`, as segments.
fn paths_in(code: &str) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    let bytes: Vec<char> = code.chars().collect();
    let mut i = 0;
    while i < bytes.len() {
        let starts_word = i == 0 || !is_ident(bytes[i - 1]);
        if starts_word && bytes[i].is_ascii_alphabetic() {
            let mut j = i;
            let mut segs = Vec::new();
            loop {
                let start = j;
                while j < bytes.len() && is_ident(bytes[j]) {
                    j += 1;
                }
                segs.push(bytes[start..j].iter().collect::<String>());
                if j + 2 < bytes.len() && bytes[j] == ':' && bytes[j + 1] == ':' {
                    if bytes[j + 2] == '{' {
                        // `use crate::{a, b::c}`: each name after the brace.
                        let end = (j + 3..bytes.len())
                            .find(|&k| bytes[k] == '}')
                            .unwrap_or(j + 3);
                        let inner: String = bytes[j + 3..end].iter().collect();
                        for name in inner.split(',') {
                            let mut s = segs.clone();
                            s.extend(
                                name.trim()
                                    .split("::")
                                    .map(|x| x.trim().to_string())
                                    .filter(|x| !x.is_empty()),
                            );
                            out.push(s);
                        }
                        j = end;
                        segs.clear();
                        break;
                    }
                    if is_ident(bytes[j + 2]) {
                        j += 2;
                        continue;
                    }
                }
                break;
            }
            if segs.len() > 1 {
                out.push(segs);
            }
            i = j.max(i + 1);
        } else {
            i += 1;
        }
    }
    out.retain(|p| matches!(p[0].as_str(), "crate" | "super" | "self"));
    out
}

/// Per crate: file module → the file modules it names.
fn dependencies(src: &Path) -> BTreeMap<Vec<String>, BTreeSet<Vec<String>>> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    let modules: BTreeMap<Vec<String>, PathBuf> = files
        .iter()
        .map(|f| (module_path(src, f), f.clone()))
        .collect();
    let mut deps = BTreeMap::new();
    for (module, file) in &modules {
        let code = code_of(&std::fs::read_to_string(file).unwrap());
        let mut named = BTreeSet::new();
        for path in paths_in(&code) {
            let (mut base, rest): (Vec<String>, &[String]) = match path[0].as_str() {
                "crate" => (Vec::new(), &path[1..]),
                "self" => (module.clone(), &path[1..]),
                _ => {
                    let supers = path.iter().take_while(|s| *s == "super").count();
                    let keep = module.len().saturating_sub(supers);
                    (module[..keep].to_vec(), &path[supers..])
                }
            };
            // The deepest file module the path reaches.
            let mut target = None;
            for seg in rest {
                base.push(seg.clone());
                if modules.contains_key(&base) {
                    target = Some(base.clone());
                } else {
                    break;
                }
            }
            if let Some(t) = target {
                if &t != module && !t.is_empty() {
                    named.insert(t);
                }
            }
        }
        deps.insert(module.clone(), named);
    }
    deps
}

/// Groups of files that reach each other (Tarjan's strongly connected
/// components with more than one file).
fn cycles(deps: &BTreeMap<Vec<String>, BTreeSet<Vec<String>>>) -> Vec<Vec<Vec<String>>> {
    struct State<'a> {
        deps: &'a BTreeMap<Vec<String>, BTreeSet<Vec<String>>>,
        index: BTreeMap<&'a Vec<String>, usize>,
        low: BTreeMap<&'a Vec<String>, usize>,
        stack: Vec<&'a Vec<String>>,
        on_stack: BTreeSet<&'a Vec<String>>,
        out: Vec<Vec<Vec<String>>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a Vec<String>) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        s.on_stack.insert(v);
        for w in &s.deps[v] {
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if s.on_stack.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut group = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                group.push(w.clone());
                if w == v {
                    break;
                }
            }
            if group.len() > 1 {
                s.out.push(group);
            }
        }
    }
    let mut s = State {
        deps,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in deps.keys() {
        if !s.index.contains_key(v) {
            visit(&mut s, v);
        }
    }
    s.out
}

fn crate_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(crates_dir())
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.join("src").is_dir())
        .collect();
    dirs.sort();
    dirs
}

#[test]
fn no_file_level_import_cycles() {
    let mut found = Vec::new();
    for dir in crate_dirs() {
        for group in cycles(&dependencies(&dir.join("src"))) {
            let names: Vec<String> = group.iter().map(|m| m.join("::")).collect();
            found.push(format!("{}: {}", dir.display(), names.join(" <-> ")));
        }
    }
    assert!(
        found.is_empty(),
        "file-level import cycles:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_checker_sees_a_cycle() {
    let dir = tempfile_dir();
    std::fs::create_dir_all(dir.join("src")).unwrap();
    std::fs::write(dir.join("src/lib.rs"), "mod a;\nmod b;\n").unwrap();
    std::fs::write(dir.join("src/a.rs"), "use crate::b::B;\npub struct A;\n").unwrap();
    std::fs::write(dir.join("src/b.rs"), "use super::{a};\npub struct B;\n").unwrap();
    assert_eq!(cycles(&dependencies(&dir.join("src"))).len(), 1);
    std::fs::write(dir.join("src/b.rs"), "// use super::a;\npub struct B;\n").unwrap();
    assert!(cycles(&dependencies(&dir.join("src"))).is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

fn tempfile_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "stitch-layout-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
fn unsafe_lives_in_one_audited_helper() {
    let helper = Path::new("stitch-mq/src/raw_sqlite.rs");
    for dir in crate_dirs() {
        let src = dir.join("src");
        let root = ["lib.rs", "main.rs"]
            .iter()
            .map(|f| src.join(f))
            .find(|p| p.exists())
            .unwrap();
        let text = std::fs::read_to_string(&root).unwrap();
        let name = dir.file_name().unwrap().to_string_lossy().into_owned();
        let wanted = if name == "stitch-mq" {
            "#![deny(unsafe_code)]"
        } else {
            "#![forbid(unsafe_code)]"
        };
        assert!(text.contains(wanted), "{} lacks {wanted}", root.display());
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        for file in files {
            let code = code_of(&std::fs::read_to_string(&file).unwrap());
            let rel = file.strip_prefix(crates_dir()).unwrap();
            let allowed = rel == helper;
            let uses_unsafe = code.contains("allow(unsafe_code)")
                || code.contains("unsafe {")
                || code.contains("unsafe fn")
                || code.contains("unsafe impl");
            assert!(
                allowed || !uses_unsafe,
                "{}: only the raw-SQLite helper may use unsafe code",
                rel.display()
            );
        }
    }
}
