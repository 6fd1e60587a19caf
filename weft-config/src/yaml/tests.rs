use serde_json::json;

use super::*;
use crate::decode::Object;

const TWO_DOCS: &str = "\
# leading comment
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
spec:
  hosts:
  - reviews
  http:
  - route:
    - destination:
        host: reviews
        subset: v1
---
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews, namespace: shop}
spec:
  host: reviews
";

#[test]
fn documents_carry_their_start_line_and_field_positions() {
    let docs = load_yaml(TWO_DOCS, "a.yaml");
    assert_eq!(docs.len(), 2, "the empty document is skipped");
    assert_eq!(
        (docs[0].index, docs[0].line, docs[0].name.as_str()),
        (0, 2, "VirtualService default/reviews")
    );
    assert_eq!((docs[1].index, docs[1].line, docs[1].name.as_str()), (1, 16, "DestinationRule shop/reviews"));
    assert_eq!(
        docs[0].positions.get("spec.http[0].route[0].destination.subset"),
        Some(Position { line: 13, column: 9 })
    );
    assert_eq!(docs[0].positions.get("spec.hosts[0]"), Some(Position { line: 8, column: 5 }));
    // A field that is not there takes its closest ancestor's line.
    assert_eq!(docs[0].line_of("spec.http[0].route[0].destination.port.number"), 11);
    assert_eq!(docs[0].line_of("nowhere"), 2);
    assert!(docs.iter().all(|d| d.result.is_ok()));
    assert_eq!(docs[1].file, "a.yaml");
}

#[test]
fn invalid_yaml_is_an_error_with_line_and_column_after_the_good_documents() {
    let cases: &[(&str, usize, usize)] = &[
        // (text, line, column) of the error
        ("a: b\n---\nkind: [unclosed\n", 4, 1),
        ("metadata:\n  name: a\n   namespace: b\n", 3, 13),
        ("spec:\n\thosts: [a]\n", 2, 1),
        ("metadata:\n  name: web\n\tnamespace: x\n", 3, 1),
        ("a: 'unterminated\n", 1, 4),
        ("key: value\n- item\n", 2, 3),
        ("a: *nothing\n", 1, 4),
        ("a: 1\na: 2\n", 2, 1),
        ("? [complex]\n: key\n", 1, 3),
    ];
    let mut failures = Vec::new();
    for (text, line, column) in cases {
        let docs = load_yaml(text, "bad.yaml");
        let last = docs.last().expect("an error document");
        match &last.result {
            Err(LoadError::Yaml { line: l, column: c, message }) => {
                if (*l, *c) != (*line, *column) || last.line != *line {
                    failures.push(format!("{text:?}: got {l}:{c} {message}"));
                }
            }
            other => failures.push(format!("{text:?}: {other:?}")),
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    // The document before the error is kept.
    let docs = load_yaml("apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\nkind: [\n", "f");
    assert_eq!(docs.len(), 2);
    assert!(matches!(docs[0].result, Ok(Decoded { object: Object::Namespace(_), .. })));
    let duplicate = load_yaml("a: 1\nb: 2\na: 3\n", "f");
    let Err(LoadError::Yaml { message, .. }) = &duplicate[0].result else { panic!("{duplicate:?}") };
    assert_eq!(message, "duplicate key `a` (first at line 1)");
}

#[test]
fn scalars_follow_the_yaml_1_2_core_schema() {
    let docs = load_yaml(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata:\n  a: 1\n  b: '1'\n  c: yes\n  d: true\n  e: ~\n  f: 1.5\n  g: 0x1F\n  h: -7\n  i: !!str 80\n  j: .inf\n  k: 1e3\n  l: 99999999999999999999\n  m: \"x\"\n",
        "f",
    );
    let raw = parse_documents("a: 1\nb: '1'\nc: yes\nd: true\ne: ~\nf: 1.5\ng: 0x1F\nh: -7\ni: !!str 80\nj: .inf\nk: 1e3\nl: 99999999999999999999\nm:\n")
        .0
        .remove(0)
        .value;
    assert_eq!(
        raw,
        json!({"a": 1, "b": "1", "c": "yes", "d": true, "e": null, "f": 1.5, "g": 31, "h": -7, "i": "80",
               "j": ".inf", "k": 1000.0, "l": 1e20, "m": null})
    );
    assert!(docs[0].result.is_ok());
}

#[test]
fn anchors_expand_within_budget_and_nesting_is_capped() {
    let raw = parse_documents("base: &b {app: web}\ncopy: *b\nlist: [*b, *b]\n").0.remove(0).value;
    assert_eq!(raw["copy"], json!({"app": "web"}));
    assert_eq!(raw["list"][1], json!({"app": "web"}));

    // A billion laughs stops at the budget with an error, quickly.
    let mut bomb = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..12 {
        let p = i - 1;
        bomb.push_str(&format!(
            "a{i}: &a{i} [*a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}, *a{p}]\n"
        ));
    }
    let docs = load_yaml(&bomb, "bomb.yaml");
    let Err(LoadError::Yaml { message, .. }) = &docs[0].result else { panic!("{:?}", docs[0].result) };
    assert!(message.contains("after expanding aliases"), "{message}");

    // Flow nesting is refused by the parser itself, block nesting by the loader.
    let deep = "[".repeat(10_000) + &"]".repeat(10_000);
    let docs = load_yaml(&deep, "deep.yaml");
    assert!(matches!(&docs[0].result, Err(LoadError::Yaml { line: 1, .. })), "{:?}", docs[0].result);
    let deep: String = (0..100).map(|i| format!("{}a:\n", "  ".repeat(i))).collect();
    let docs = load_yaml(&deep, "deep.yaml");
    let Err(LoadError::Yaml { message, line, .. }) = &docs[0].result else { panic!("{:?}", docs[0].result) };
    assert!(message.contains("nesting deeper than 64"), "{message}");
    assert_eq!(*line, 65);
}

#[test]
fn lists_split_into_items_with_their_own_positions() {
    let text = "\
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Namespace
  metadata: {name: a}
- apiVersion: networking.istio.io/v1
  kind: VirtualService
  metadata: {name: r, namespace: a}
  spec:
    hosts: [r]
";
    let docs = load_yaml(text, "list.yaml");
    assert_eq!(docs.len(), 2);
    assert_eq!((docs[0].line, docs[0].name.as_str()), (4, "Namespace a"));
    assert_eq!((docs[1].line, docs[1].name.as_str()), (7, "VirtualService a/r"));
    assert_eq!(docs[1].positions.get("spec.hosts[0]").map(|p| p.line), Some(11));
    assert!(docs.iter().all(|d| d.result.is_ok()));
}

#[test]
fn odd_inputs_load_without_panicking() {
    for text in [
        "",
        "---",
        "...",
        "# only a comment\n",
        "\u{feff}a: b",
        "- a\n- b",
        "just text",
        "{",
        "]",
        "&a",
        "!tag x",
        "%YAML 1.2\n---\na: b",
        "a: !!binary aGVsbG8=",
    ] {
        let _ = load_yaml(text, "odd.yaml");
    }
    let docs = load_yaml_bytes(b"a: b\nc: \xff\xfe\n", "bin.yaml", &DecodeOptions::default());
    assert!(matches!(&docs[0].result, Err(LoadError::Yaml { line: 2, column: 4, .. })), "{docs:?}");
    let docs = load_yaml("just text", "t.yaml");
    assert!(matches!(
        &docs[0].result,
        Err(LoadError::Decode(DecodeError::NotAMapping { found: "a string" }))
    ));
}
