//! The loader and the analysis never panic: thousands of truncated, spliced and mutated versions
//! of the analyze corpus go through `load_yaml_bytes` + `analyze`, deterministically (a fixed
//! seed), on stable Rust. The fuzz target in `fuzz/` does the same with coverage guidance.
//! A panic hook counts panics, so one swallowed by the loader's own guard still fails the test.

#![allow(clippy::unwrap_used)] // helpers outside #[test] functions unwrap too

use std::panic::{self, AssertUnwindSafe};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use weft_config::{analyze, load_yaml_bytes, DecodeOptions};

/// Mutations per corpus file (on top of every line-boundary truncation).
const MUTATIONS_PER_FILE: usize = 400;

/// xorshift64*: small, deterministic, good enough to pick mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

const TOKENS: &[&[u8]] = &[
    b":",
    b"- ",
    b"[",
    b"]",
    b"{",
    b"}",
    b"&a ",
    b"*a",
    b"<<: *a\n",
    b"!!int ",
    b"!!str ",
    b"!custom ",
    b"---\n",
    b"...\n",
    b"? ",
    b"|\n",
    b">-\n",
    b"'",
    b"\"",
    b"#",
    b"%YAML 1.2\n",
    b"\t",
    b"\n",
    b"  ",
    b"\xff",
    b"\xc3",
    b"~",
    b"null",
    b"-1",
    b"99999999999999999999999",
    b"1e999",
    b".nan",
    b"0x",
    b"apiVersion: ",
    b"kind: List\nitems:\n",
    b"metadata:\n  name: x\n",
    b"spec:\n",
    b"weight: ",
    b"subset: ",
    b"host: *",
    b"istio.io/use-waypoint: ",
];

fn mutate(rng: &mut Rng, input: &[u8], other: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..=rng.below(3) {
        let at = rng.below(out.len() + 1);
        match rng.below(8) {
            0 => out.truncate(at),
            1 if !out.is_empty() => {
                let i = rng.below(out.len());
                out[i] = rng.next() as u8;
            }
            2 => {
                let token = TOKENS[rng.below(TOKENS.len())];
                out.splice(at..at, token.iter().copied());
            }
            3 => {
                // Delete a span.
                let end = (at + rng.below(40)).min(out.len());
                out.drain(at..end);
            }
            4 => {
                // Duplicate a span in place (repeats keys, documents, list items).
                let end = (at + rng.below(200)).min(out.len());
                let span = out[at..end].to_vec();
                out.splice(end..end, span);
            }
            5 => {
                // Shift one line's indentation.
                let line_start = out[..at].iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
                if rng.below(2) == 0 {
                    out.splice(line_start..line_start, b"  ".iter().copied());
                } else if out[line_start..].starts_with(b" ") {
                    out.remove(line_start);
                }
            }
            6 => {
                // Splice in a piece of another manifest.
                let from = rng.below(other.len() + 1);
                let to = (from + rng.below(300)).min(other.len());
                out.splice(at..at, other[from..to].iter().copied());
            }
            _ => {
                // Swap two lines.
                let mut lines: Vec<Vec<u8>> = out.split(|b| *b == b'\n').map(<[u8]>::to_vec).collect();
                let (i, j) = (rng.below(lines.len()), rng.below(lines.len()));
                lines.swap(i, j);
                out = lines.join(&b'\n');
            }
        }
    }
    out
}

fn corpus() -> Vec<Vec<u8>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/analyze");
    let mut files = Vec::new();
    for dir in ["good", "bad", "warn"] {
        let mut paths: Vec<_> =
            std::fs::read_dir(root.join(dir)).unwrap().map(|e| e.unwrap().path()).collect();
        paths.sort();
        files.extend(paths.iter().map(|p| std::fs::read(p).unwrap()));
    }
    files
}

#[test]
fn thousands_of_mutated_manifests_load_and_analyze_without_panicking() {
    let panics = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&panics);
    let default_hook = panic::take_hook();
    panic::set_hook(Box::new(move |info| {
        counter.fetch_add(1, Ordering::SeqCst);
        default_hook(info);
    }));

    let files = corpus();
    let options = DecodeOptions::default();
    let mut rng = Rng(0x5eed_0f3e_f7a1);
    let mut runs = 0;
    let mut check = |input: &[u8]| {
        let result = panic::catch_unwind(AssertUnwindSafe(|| {
            let docs = load_yaml_bytes(input, "mutated.yaml", &options);
            for finding in analyze(&docs) {
                assert!(!finding.to_string().is_empty());
            }
        }));
        assert!(
            result.is_ok() && panics.load(Ordering::SeqCst) == 0,
            "panicked on input:\n{}",
            String::from_utf8_lossy(input)
        );
        runs += 1;
    };
    for (i, file) in files.iter().enumerate() {
        for (at, _) in file.iter().enumerate().filter(|(_, b)| **b == b'\n') {
            check(&file[..at]);
            check(&file[..at + 1]);
        }
        let other = &files[(i + 1) % files.len()];
        for _ in 0..MUTATIONS_PER_FILE {
            let mutated = mutate(&mut rng, file, other);
            check(&mutated);
        }
    }
    let _ = panic::take_hook();
    assert!(runs > 5_000, "only {runs} inputs");
}
