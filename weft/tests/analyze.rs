//! `weft analyze` as a user runs it: the real binary over the manifests in `tests/analyze/`.
//! Every `bad/` file fails (exit 1) with the messages its `# expect:` lines give; every `good/`
//! file (Istio's documented examples) passes alone and all together, warning exactly what its
//! `# expect:` lines say Weft does not enforce; `warn/` files print their warnings and pass; and
//! `examples/unenforced` warns once for each object it holds that Weft does not enforce.

#![allow(clippy::unwrap_used)] // helpers outside #[test] functions unwrap too

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The manifests of `tests/analyze/<dir>`, as paths relative to `tests/analyze`.
fn corpus(dir: &str) -> Vec<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/analyze");
    let mut files: Vec<PathBuf> = std::fs::read_dir(root.join(dir))
        .unwrap()
        .map(|e| Path::new(dir).join(e.unwrap().file_name()))
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in {dir}");
    files
}

/// Runs `weft` in `tests/analyze`, so that corpus paths print as `bad/name.yaml`.
fn weft(args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_weft"))
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/analyze"))
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(text) = stdin {
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    }
    child.wait_with_output().unwrap()
}

fn analyze(path: &Path) -> (i32, String) {
    let out = weft(&["analyze", path.to_str().unwrap()], None);
    (out.status.code().unwrap_or(-1), String::from_utf8(out.stdout).unwrap())
}

/// The `# expect: <substring>` lines of a manifest.
fn expectations(path: &Path) -> Vec<String> {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/analyze").join(path))
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("# expect: "))
        .map(str::to_owned)
        .collect()
}

fn check_expectations(path: &Path, stdout: &str) {
    let expected = expectations(path);
    assert!(!expected.is_empty(), "{} has no `# expect:` line", path.display());
    for e in expected {
        assert!(stdout.contains(&e), "{}: expected\n  {e}\nin\n{stdout}", path.display());
    }
}

#[test]
fn every_bad_manifest_fails_with_its_messages() {
    for path in corpus("bad") {
        let (code, stdout) = analyze(&path);
        assert_eq!(code, 1, "{}:\n{stdout}", path.display());
        check_expectations(&path, &stdout);
        let last = stdout.lines().last().unwrap_or_default();
        assert!(last.contains(" error") && last.contains("from 1 file"), "summary: {last}");
    }
}

/// Each warning line matches one `# expect:` line of `path`, and each of those one warning.
fn check_warnings_exactly(path: &Path, stdout: &str) {
    let expected = expectations(path);
    let warnings: Vec<&str> = stdout.lines().filter(|l| l.contains(": warning: ")).collect();
    assert_eq!(warnings.len(), expected.len(), "{}:\n{stdout}", path.display());
    for e in &expected {
        let hits = warnings.iter().filter(|w| w.contains(e.as_str())).count();
        assert_eq!(hits, 1, "{}: expected once\n  {e}\nin\n{stdout}", path.display());
    }
}

#[test]
fn istios_documented_examples_pass_alone_and_together_warning_what_is_not_enforced() {
    for path in corpus("good") {
        let (code, stdout) = analyze(&path);
        assert_eq!(code, 0, "{}:\n{stdout}", path.display());
        assert!(stdout.lines().last().unwrap().starts_with("0 errors, "), "{stdout}");
        check_warnings_exactly(&path, &stdout);
    }
    let (code, stdout) = analyze(Path::new("good"));
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.lines().last().unwrap().starts_with("0 errors, "), "{stdout}");
}

#[test]
fn the_unenforced_example_warns_once_per_object_with_the_fix() {
    let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/unenforced");
    let (code, stdout) = analyze(&example);
    assert_eq!(code, 0, "{stdout}");
    assert!(stdout.ends_with("0 errors, 6 warnings in 13 objects from 1 file\n"), "{stdout}");
    let expected = [
        "warning: AuthorizationPolicy shop/product-service-authz spec.rules[0].to[0].operation.methods: ztunnel \
         enforces this policy and cannot check L7 fields (rules[0].to[0].operation.methods, \
         rules[0].to[0].operation.paths), so it drops that rule and no rule is left: the policy allows nothing, so \
         the workloads it selects (app=products) will refuse every connection that no other ALLOW policy allows \
         (fix: check requests in a waypoint instead: target the Service (or its waypoint Gateway) with targetRefs \
         in place of a selector, and bind the Service to the waypoint with the istio.io/use-waypoint label",
        "warning: RequestAuthentication shop/products-jwt spec.selector: ",
        "warning: Gateway shop/shop-gateway: Istio Gateway is not enforced",
        "warning: VirtualService shop/shop spec.gateways: routes for gateway shop-gateway are not enforced",
        "warning: ServiceEntry shop/payments-api: ServiceEntry is not enforced",
        "warning: Telemetry istio-system/mesh-default: Telemetry is not enforced",
    ];
    for e in expected {
        assert_eq!(stdout.lines().filter(|l| l.contains(e)).count(), 1, "expected once\n  {e}\nin\n{stdout}");
        assert!(stdout
            .lines()
            .any(|l| l.contains(e) && l.starts_with(&format!("{}/mesh.yaml:", example.display()))));
    }
    for clean in ["products-l4", "PeerAuthentication", "Namespace shop", "Deployment"] {
        assert!(!stdout.contains(clean), "{clean} warns:\n{stdout}");
    }
}

#[test]
fn warnings_alone_do_not_fail() {
    for path in corpus("warn") {
        let (code, stdout) = analyze(&path);
        assert_eq!(code, 0, "{}:\n{stdout}", path.display());
        check_expectations(&path, &stdout);
        assert!(stdout.lines().last().unwrap().starts_with("0 errors, "), "{stdout}");
    }
}

#[test]
fn a_dash_reads_standard_input() {
    let manifest =
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: r}\nspec: {}\n";
    let out = weft(&["analyze", "-", "-n", "shop"], Some(manifest));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("<stdin>:4: error: DestinationRule shop/r spec.host: missing required field"),
        "{stdout}"
    );

    let out = weft(&["analyze", "-"], Some("apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n"));
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(String::from_utf8(out.stdout).unwrap(), "0 errors, 0 warnings in 1 object from 1 file\n");
}

#[test]
fn directories_are_read_recursively_in_name_order() {
    let dir = tempfile::tempdir().unwrap();
    let bad = "apiVersion: v1\nkind: Nope\nmetadata: {name: x}\n";
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    std::fs::write(dir.path().join("b.yaml"), bad).unwrap();
    std::fs::write(dir.path().join("a.yml"), bad).unwrap();
    std::fs::write(dir.path().join("sub/c.yaml"), bad).unwrap();
    std::fs::write(dir.path().join("notes.txt"), bad).unwrap();
    std::fs::write(dir.path().join(".hidden.yaml"), bad).unwrap();
    let (code, stdout) = analyze(dir.path());
    assert_eq!(code, 1);
    let files: Vec<&str> = stdout.lines().filter_map(|l| l.split(':').next()).collect();
    let root = dir.path().display().to_string();
    assert_eq!(
        files[..3],
        [format!("{root}/a.yml"), format!("{root}/b.yaml"), format!("{root}/sub/c.yaml")],
        "{stdout}"
    );
    assert!(stdout.ends_with("3 errors, 0 warnings in 0 objects from 3 files\n"), "{stdout}");
}

#[test]
fn a_missing_path_is_an_error() {
    let (code, stdout) = analyze(Path::new("/nonexistent/weft-analyze"));
    assert_eq!(code, 1);
    assert!(stdout.starts_with("/nonexistent/weft-analyze: error: cannot read: "), "{stdout}");
}
