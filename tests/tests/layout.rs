//! The repository's shape, as its contributors keep it: no source file over 500 lines outside
//! the tests, and the pure core (definitions, events, replay, decisions, messages, timelines)
//! names no crate or module that does I/O.

use std::path::{Path, PathBuf};

/// The most lines a source file outside the tests may have.
const MOST_LINES: usize = 500;

/// The source trees held to [`MOST_LINES`]; directories named `tests` are left out.
const SOURCES: &[&str] = &[
    "saga-core/src",
    "saga-amqp/src",
    "saga-cli/src",
    "examples/src",
    "examples/examples",
    "tests/src",
];

/// The pure core: files, or directories taken whole.
const PURE: &[&str] = &[
    "saga-core/src/definition.rs",
    "saga-core/src/definition",
    "saga-core/src/event.rs",
    "saga-core/src/state.rs",
    "saga-core/src/state",
    "saga-core/src/decide.rs",
    "saga-core/src/decide",
    "saga-core/src/message.rs",
    "saga-core/src/timeline.rs",
    "saga-core/src/registry.rs",
];

/// What the pure core must not name.
const IO: &[&str] = &[
    "tokio",
    "sqlx",
    "lapin",
    "axum",
    "hyper",
    "reqwest",
    "std::net",
    "std::fs",
    "std::process",
    "std::io",
    "opentelemetry",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace root")
        .to_path_buf()
}

/// The `.rs` files under `path` (or `path` itself), leaving out directories named `tests`.
fn rust_files(path: &Path) -> Vec<PathBuf> {
    if path.is_file() {
        return vec![path.to_path_buf()];
    }
    let mut files = Vec::new();
    let entries = std::fs::read_dir(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    for entry in entries {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n != "tests") {
                files.extend(rust_files(&path));
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}

#[test]
fn no_source_file_outside_the_tests_is_over_500_lines() {
    let root = root();
    let mut checked = 0;
    let mut long = Vec::new();
    for source in SOURCES {
        for file in rust_files(&root.join(source)) {
            let lines = std::fs::read_to_string(&file)
                .expect("a source file")
                .lines()
                .count();
            checked += 1;
            if lines > MOST_LINES {
                long.push(format!("{} ({lines} lines)", file.display()));
            }
        }
    }
    assert!(
        checked > 50,
        "only {checked} files found under {}",
        root.display()
    );
    assert!(long.is_empty(), "over {MOST_LINES} lines: {long:#?}");
}

#[test]
fn the_pure_core_names_no_io_crate() {
    let root = root();
    let mut found = Vec::new();
    for path in PURE {
        let files = rust_files(&root.join(path));
        assert!(!files.is_empty(), "{path} holds no source");
        for file in files {
            let text = std::fs::read_to_string(&file).expect("a source file");
            for (n, line) in text.lines().enumerate() {
                let code = line.split("//").next().unwrap_or_default();
                for io in IO {
                    let named = code
                        .match_indices(io)
                        .any(|(i, _)| is_path_start(code, i, io.len()));
                    if named {
                        found.push(format!("{}:{}: {}", file.display(), n + 1, line.trim()));
                    }
                }
            }
        }
    }
    assert!(found.is_empty(), "the pure core does I/O: {found:#?}");
}

/// Whether the match at `at` (of `len` bytes) in `code` is a path of its own: not part of a
/// longer identifier (`tokio_util` is not `tokio`, `my_tokio` neither).
fn is_path_start(code: &str, at: usize, len: usize) -> bool {
    let ident = |c: char| c.is_alphanumeric() || c == '_';
    let before = code[..at].chars().next_back();
    let after = code[at + len..].chars().next();
    !before.is_some_and(ident) && !after.is_some_and(ident)
}

#[test]
fn the_io_check_tells_a_crate_from_a_longer_name() {
    assert!(is_path_start("use tokio::sync;", 4, 5));
    assert!(!is_path_start("use tokio_util::sync;", 4, 5));
    assert!(!is_path_start("let my_tokio = 1;", 7, 5));
}
