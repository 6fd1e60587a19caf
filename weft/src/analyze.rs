//! `weft analyze`: loads YAML manifests from files, directories or standard input, runs
//! `weft_config`'s analysis over all of them together, and prints one line per finding.
//! It only reads files; the checks themselves live in `weft_config::analyze`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use weft_config::{analyze, load_yaml_bytes, DecodeOptions, LoadedDoc, Object, Severity};

/// What names standard input in messages.
pub const STDIN_NAME: &str = "<stdin>";

/// Analyzes `paths` (`-` is standard input; none means the current directory), prints the
/// findings and a summary to `out`, and returns 1 when there is any error, else 0.
pub fn run(paths: &[PathBuf], namespace: Option<String>, out: &mut impl Write) -> anyhow::Result<ExitCode> {
    let options = DecodeOptions { default_namespace: namespace };
    let default = [PathBuf::from(".")];
    let paths = if paths.is_empty() { &default[..] } else { paths };

    let mut docs: Vec<LoadedDoc> = Vec::new();
    let mut unreadable = 0;
    let mut files = 0;
    for path in paths {
        let inputs = match inputs(path) {
            Ok(inputs) => inputs,
            Err(e) => {
                writeln!(out, "{}: error: cannot read: {e}", path.display())?;
                unreadable += 1;
                continue;
            }
        };
        for (name, bytes) in inputs {
            match bytes {
                Ok(bytes) => {
                    files += 1;
                    docs.extend(load_yaml_bytes(&bytes, &name, &options));
                }
                Err(e) => {
                    writeln!(out, "{name}: error: cannot read: {e}")?;
                    unreadable += 1;
                }
            }
        }
    }

    let findings = analyze(&docs);
    for finding in &findings {
        writeln!(out, "{finding}")?;
    }
    let errors = unreadable + findings.iter().filter(|f| f.severity == Severity::Error).count();
    let warnings = findings.iter().filter(|f| f.severity == Severity::Warning).count();
    let objects = docs
        .iter()
        .filter(|d| d.result.as_ref().is_ok_and(|d| !matches!(d.object, Object::Ignored(_))))
        .count();
    writeln!(
        out,
        "{} {}, {} {} in {} {} from {} {}",
        errors,
        plural(errors, "error", "errors"),
        warnings,
        plural(warnings, "warning", "warnings"),
        objects,
        plural(objects, "object", "objects"),
        files,
        plural(files, "file", "files"),
    )?;
    Ok(if errors > 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS })
}

fn plural<'a>(n: usize, one: &'a str, many: &'a str) -> &'a str {
    if n == 1 {
        one
    } else {
        many
    }
}

/// The named inputs behind one argument: standard input, a file, or a directory's YAML files.
type Input = (String, std::io::Result<Vec<u8>>);

fn inputs(path: &Path) -> std::io::Result<Vec<Input>> {
    if path == Path::new("-") {
        let mut bytes = Vec::new();
        std::io::stdin().read_to_end(&mut bytes)?;
        return Ok(vec![(STDIN_NAME.to_owned(), Ok(bytes))]);
    }
    if !std::fs::metadata(path)?.is_dir() {
        return Ok(vec![(path.display().to_string(), std::fs::read(path))]);
    }
    let mut files = Vec::new();
    yaml_files(path, &mut files)?;
    files.sort();
    Ok(files.into_iter().map(|f| (f.display().to_string(), std::fs::read(&f))).collect())
}

/// Every `*.yaml`/`*.yml` file below `dir`, skipping hidden files and directories.
fn yaml_files(dir: &Path, files: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        let hidden = entry.file_name().to_str().is_some_and(|n| n.starts_with('.'));
        if hidden {
            continue;
        }
        if entry.file_type()?.is_dir() {
            yaml_files(&path, files)?;
        } else if matches!(path.extension().and_then(|e| e.to_str()), Some("yaml" | "yml")) {
            files.push(path);
        }
    }
    Ok(())
}
