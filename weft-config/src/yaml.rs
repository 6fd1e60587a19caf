//! Multi-document YAML to decoded objects, keeping where each document and field starts so
//! that messages can point at a line. Never panics: invalid YAML (including broken indentation)
//! becomes an error with its line and column, and the documents before it are kept.
//!
//! YAML is read as YAML 1.2's core schema (`yes`/`on` are strings, not booleans). Anchors and
//! aliases are expanded within a size budget; nesting is capped; duplicate keys are errors, as
//! kubectl has them. A `kind: List` document (what `kubectl get -o yaml` prints) is split into
//! its items.

use std::collections::{BTreeMap, HashMap};
use std::panic::{catch_unwind, AssertUnwindSafe};

use serde_json::{Map, Number, Value};
use yaml_rust2::parser::{Event, Parser, Tag};
use yaml_rust2::scanner::{Marker, TScalarStyle};

use super::decode::{decode_with, display_name, DecodeError, DecodeOptions, Decoded, DEFAULT_NAMESPACE};

/// Deeper nesting than this is refused (no Istio manifest comes close).
pub const MAX_DEPTH: usize = 64;
/// Values (after alias expansion) one file may hold.
pub const MAX_NODES: usize = 1_000_000;

/// One document (or one item of a `kind: List`) of a YAML file, decoded or not.
#[derive(Clone, Debug)]
pub struct LoadedDoc {
    pub file: String,
    /// The document's index in the file, from 0.
    pub index: usize,
    /// The 1-based line where the document's content starts (for an error, the error's line).
    pub line: usize,
    /// `Kind namespace/name` as far as the manifest tells, even when it does not decode.
    pub name: String,
    pub positions: Positions,
    pub result: Result<Decoded, LoadError>,
}

/// Why a document did not load.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    #[error("invalid YAML at line {line} column {column}: {message}")]
    Yaml { line: usize, column: usize, message: String },
    #[error(transparent)]
    Decode(#[from] DecodeError),
}

/// A 1-based line and column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

/// Where each field of a document is, by path (`spec.http[0].route`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Positions(BTreeMap<String, Position>);

impl Positions {
    pub fn get(&self, path: &str) -> Option<Position> {
        self.0.get(path).copied()
    }

    /// The line of `path`, or of its closest ancestor that has one.
    pub fn line_of(&self, path: &str) -> Option<usize> {
        let mut path = path;
        loop {
            if let Some(p) = self.0.get(path) {
                return Some(p.line);
            }
            path = parent_path(path)?;
        }
    }
}

impl LoadedDoc {
    /// The line of `field` in this document, else the document's line.
    pub fn line_of(&self, field: &str) -> usize {
        self.positions.line_of(field).unwrap_or(self.line)
    }
}

/// `a.b[2]` -> `a.b` -> `a` -> none.
fn parent_path(path: &str) -> Option<&str> {
    if path.is_empty() {
        return None;
    }
    if path.ends_with(']') {
        return path.rfind('[').map(|i| &path[..i]);
    }
    Some(path.rfind('.').map_or("", |i| &path[..i]))
}

/// Loads every document of `text` (named `file` in messages); namespaced objects without a
/// namespace get `default`.
pub fn load_yaml(text: &str, file: &str) -> Vec<LoadedDoc> {
    load_yaml_with(text, file, &DecodeOptions::default())
}

/// Like [`load_yaml`] for bytes that may not be UTF-8 (an error with its position if not).
pub fn load_yaml_bytes(bytes: &[u8], file: &str, options: &DecodeOptions) -> Vec<LoadedDoc> {
    match std::str::from_utf8(bytes) {
        Ok(text) => load_yaml_with(text, file, options),
        Err(e) => {
            let valid = &bytes[..e.valid_up_to()];
            let line = 1 + valid.iter().filter(|b| **b == b'\n').count();
            let column = 1 + valid.iter().rev().take_while(|b| **b != b'\n').count();
            vec![yaml_error(file, 0, line, column, "the file is not UTF-8 text".into())]
        }
    }
}

/// Loads every document of `text` with the given decoding defaults.
pub fn load_yaml_with(text: &str, file: &str, options: &DecodeOptions) -> Vec<LoadedDoc> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    // The parser is not ours: should it ever panic, that is one more YAML error, not a crash.
    let parsed = catch_unwind(AssertUnwindSafe(|| parse_documents(text)));
    let (raw_docs, error) = match parsed {
        Ok(result) => result,
        Err(_) => (Vec::new(), Some((1, 1, "the YAML parser failed on this input".to_owned()))),
    };
    let mut out = Vec::new();
    let mut next_index = 0;
    for raw in raw_docs {
        next_index = raw.index + 1;
        for (line, value, positions) in split_list(raw.line, raw.value, raw.positions) {
            let name = object_name(&value, options);
            let result = decode_with(value, options).map_err(LoadError::from);
            out.push(LoadedDoc { file: file.to_owned(), index: raw.index, line, name, positions, result });
        }
    }
    if let Some((line, column, message)) = error {
        let (line, column) = if message.contains("tab") { first_tab_indent(text, line) } else { None }
            .unwrap_or((line, column));
        out.push(yaml_error(file, next_index, line, column, message));
    }
    out
}

/// The parser reports a tab in indentation at the scalar before it; point at the tab itself.
fn first_tab_indent(text: &str, from_line: usize) -> Option<(usize, usize)> {
    text.lines().enumerate().skip(from_line.saturating_sub(1)).take(3).find_map(|(i, line)| {
        let indent = line.len() - line.trim_start_matches([' ', '\t']).len();
        line[..indent].find('\t').map(|col| (i + 1, col + 1))
    })
}

fn yaml_error(file: &str, index: usize, line: usize, column: usize, message: String) -> LoadedDoc {
    LoadedDoc {
        file: file.to_owned(),
        index,
        line,
        name: String::new(),
        positions: Positions::default(),
        result: Err(LoadError::Yaml { line, column, message }),
    }
}

/// `Kind ns/name` from an undecoded manifest, as far as it has them.
fn object_name(value: &Value, options: &DecodeOptions) -> String {
    let kind = value.get("kind").and_then(Value::as_str).unwrap_or("");
    let meta = value.get("metadata");
    let name = meta.and_then(|m| m.get("name")).and_then(Value::as_str).unwrap_or("");
    if kind.is_empty() && name.is_empty() {
        return String::new();
    }
    let group = value.get("apiVersion").and_then(Value::as_str).and_then(|v| v.rsplit_once('/'));
    let kind = match (kind, group) {
        ("Gateway", Some(("gateway.networking.k8s.io", _))) => super::decode::KUBE_GATEWAY,
        _ => kind,
    };
    let namespace = match meta.and_then(|m| m.get("namespace")).and_then(Value::as_str) {
        Some(ns) => ns.to_owned(),
        None if kind == "Namespace" => String::new(),
        None => options.default_namespace.clone().unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned()),
    };
    display_name(
        if kind.is_empty() { "?" } else { kind },
        &namespace,
        if name.is_empty() { "?" } else { name },
    )
}

/// A `v1` `List` becomes its items, each with its own positions; anything else is itself.
fn split_list(line: usize, value: Value, positions: Positions) -> Vec<(usize, Value, Positions)> {
    let is_list = value.get("kind").and_then(Value::as_str) == Some("List")
        && value.get("apiVersion").and_then(Value::as_str) == Some("v1")
        && value.get("items").is_some_and(Value::is_array);
    if !is_list {
        return vec![(line, value, positions)];
    }
    let Value::Object(mut map) = value else { return Vec::new() };
    let Some(Value::Array(items)) = map.remove("items") else { return Vec::new() };
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let prefix = format!("items[{i}]");
            let item_line = positions.get(&prefix).map_or(line, |p| p.line);
            let dotted = format!("{prefix}.");
            let item_positions = positions
                .0
                .range(dotted.clone()..)
                .take_while(|(k, _)| k.starts_with(&dotted))
                .map(|(k, p)| (k[dotted.len()..].to_owned(), *p))
                .collect();
            (item_line, item, Positions(item_positions))
        })
        .collect()
}

/// One parsed document before decoding.
struct RawDoc {
    index: usize,
    line: usize,
    value: Value,
    positions: Positions,
}

/// A value being built: a sequence or a mapping waiting for its entries.
enum Frame {
    Seq { items: Vec<Value>, path: String, anchor: usize, nodes: usize },
    Map { map: Map<String, Value>, path: String, anchor: usize, nodes: usize, key: Option<String> },
}

/// Builds JSON values from parser events, recording positions.
struct Builder {
    stack: Vec<Frame>,
    /// Anchor id -> (value, node count) of the current document.
    anchors: HashMap<usize, (Value, usize)>,
    positions: BTreeMap<String, Position>,
    root: Option<Value>,
    root_line: Option<usize>,
    nodes: usize,
}

type ParseError = (usize, usize, String);

/// All documents of `text`, and the error that stopped parsing, if any.
fn parse_documents(text: &str) -> (Vec<RawDoc>, Option<ParseError>) {
    let mut parser = Parser::new_from_str(text);
    let mut docs = Vec::new();
    let mut builder: Option<Builder> = None;
    let mut doc_line = 1;
    let mut total_nodes = 0;
    loop {
        let (event, mark) = match parser.next_token() {
            Ok(e) => e,
            Err(e) => {
                let m = e.marker();
                return (docs, Some((m.line(), m.col() + 1, e.info().to_owned())));
            }
        };
        let result = match event {
            Event::StreamStart | Event::Nothing => Ok(()),
            Event::StreamEnd => return (docs, None),
            Event::DocumentStart => {
                doc_line = mark.line();
                builder = Some(Builder::new(total_nodes));
                Ok(())
            }
            Event::DocumentEnd => {
                if let Some(b) = builder.take() {
                    total_nodes = b.nodes;
                    let line = b.root_line.unwrap_or(doc_line);
                    if let Some(value) = b.root.filter(|v| !v.is_null()) {
                        docs.push(RawDoc {
                            index: docs.len(),
                            line,
                            value,
                            positions: Positions(b.positions),
                        });
                    }
                }
                Ok(())
            }
            other => match builder.as_mut() {
                Some(b) => b.event(other, mark),
                None => Err("content outside a document".to_owned()),
            },
        };
        if let Err(message) = result {
            return (docs, Some((mark.line(), mark.col() + 1, message)));
        }
    }
}

impl Builder {
    fn new(nodes: usize) -> Self {
        Builder {
            stack: Vec::new(),
            anchors: HashMap::new(),
            positions: BTreeMap::new(),
            root: None,
            root_line: None,
            nodes,
        }
    }

    /// The path a new node at the current place gets, or `None` when the node is a map key.
    fn child_path(&self) -> Option<String> {
        match self.stack.last() {
            None => Some(String::new()),
            Some(Frame::Seq { items, path, .. }) => Some(format!("{path}[{}]", items.len())),
            Some(Frame::Map { key: None, .. }) => None,
            Some(Frame::Map { key: Some(key), path, .. }) => {
                Some(if path.is_empty() { key.clone() } else { format!("{path}.{key}") })
            }
        }
    }

    fn count(&mut self, n: usize) -> Result<(), String> {
        self.nodes = self.nodes.saturating_add(n);
        if self.nodes > MAX_NODES {
            return Err(format!("more than {MAX_NODES} values (after expanding aliases)"));
        }
        Ok(())
    }

    fn event(&mut self, event: Event, mark: Marker) -> Result<(), String> {
        match event {
            Event::Scalar(text, style, anchor, tag) => {
                self.count(1)?;
                match self.child_path() {
                    // A mapping key.
                    None => self.set_key(text, mark),
                    Some(path) => {
                        let value = resolve_scalar(&text, style, tag.as_ref());
                        self.finish(value, 1, anchor, path, mark)
                    }
                }
            }
            Event::Alias(id) => {
                let Some((value, nodes)) = self.anchors.get(&id).cloned() else {
                    return Err("alias to an unknown anchor".into());
                };
                self.count(nodes)?;
                match self.child_path() {
                    None => match value {
                        Value::String(s) => self.set_key(s, mark),
                        _ => Err("only a text alias can be a mapping key".into()),
                    },
                    Some(path) => self.finish(value, nodes, 0, path, mark),
                }
            }
            Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                let Some(path) = self.child_path() else {
                    return Err("a mapping key must be text, not a list or a mapping".into());
                };
                if self.stack.len() >= MAX_DEPTH {
                    return Err(format!("nesting deeper than {MAX_DEPTH} levels"));
                }
                self.count(1)?;
                self.record(&path, mark);
                if matches!(event, Event::SequenceStart(..)) {
                    self.stack.push(Frame::Seq { items: Vec::new(), path, anchor, nodes: 1 });
                } else {
                    self.stack.push(Frame::Map { map: Map::new(), path, anchor, nodes: 1, key: None });
                }
                Ok(())
            }
            Event::SequenceEnd | Event::MappingEnd => {
                let (value, nodes, anchor) = match self.stack.pop() {
                    Some(Frame::Seq { items, anchor, nodes, .. }) => (Value::Array(items), nodes, anchor),
                    Some(Frame::Map { map, anchor, nodes, key: None, .. }) => {
                        (Value::Object(map), nodes, anchor)
                    }
                    Some(Frame::Map { .. }) => return Err("a mapping key has no value".into()),
                    None => return Err("unbalanced end of a list or mapping".into()),
                };
                self.attach(value, nodes, anchor)
            }
            Event::StreamStart
            | Event::StreamEnd
            | Event::DocumentStart
            | Event::DocumentEnd
            | Event::Nothing => Ok(()),
        }
    }

    fn record(&mut self, path: &str, mark: Marker) {
        if self.stack.is_empty() && self.root_line.is_none() {
            self.root_line = Some(mark.line());
        }
        self.positions
            .entry(path.to_owned())
            .or_insert(Position { line: mark.line(), column: mark.col() + 1 });
    }

    fn set_key(&mut self, key: String, mark: Marker) -> Result<(), String> {
        let Some(Frame::Map { map, path, key: slot, .. }) = self.stack.last_mut() else {
            return Err("a mapping key outside a mapping".into());
        };
        let full = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
        if map.contains_key(&key) {
            let first = self.positions.get(&full).map(|p| format!(" (first at line {})", p.line));
            return Err(format!("duplicate key `{key}`{}", first.unwrap_or_default()));
        }
        *slot = Some(key);
        self.positions.insert(full, Position { line: mark.line(), column: mark.col() + 1 });
        Ok(())
    }

    /// A scalar or alias value is complete.
    fn finish(
        &mut self,
        value: Value,
        nodes: usize,
        anchor: usize,
        path: String,
        mark: Marker,
    ) -> Result<(), String> {
        self.record(&path, mark);
        self.attach(value, nodes, anchor)
    }

    /// Puts a complete value in its parent (or makes it the root).
    fn attach(&mut self, value: Value, nodes: usize, anchor: usize) -> Result<(), String> {
        if anchor > 0 {
            self.anchors.insert(anchor, (value.clone(), nodes));
        }
        match self.stack.last_mut() {
            None => self.root = Some(value),
            Some(Frame::Seq { items, nodes: n, .. }) => {
                items.push(value);
                *n += nodes;
            }
            Some(Frame::Map { map, key, nodes: n, .. }) => {
                let Some(key) = key.take() else {
                    return Err("a value without a key".into());
                };
                map.insert(key, value);
                *n += nodes;
            }
        }
        Ok(())
    }
}

/// A scalar by YAML 1.2's core schema: quoted text is a string; plain text may be null, a
/// boolean, an integer or a float; `!!str`-style tags decide when present.
fn resolve_scalar(text: &str, style: TScalarStyle, tag: Option<&Tag>) -> Value {
    if let Some(tag) = tag.filter(|t| t.handle == "tag:yaml.org,2002:") {
        let typed = match tag.suffix.as_str() {
            "str" | "binary" | "timestamp" => Some(Value::String(text.to_owned())),
            "null" => Some(Value::Null),
            "bool" => parse_bool(text).map(Value::Bool),
            "int" => parse_int(text),
            "float" => parse_float(text).or_else(|| parse_int(text)),
            _ => None,
        };
        return typed.unwrap_or_else(|| Value::String(text.to_owned()));
    }
    if style != TScalarStyle::Plain || tag.is_some() {
        return Value::String(text.to_owned());
    }
    match text {
        "" | "~" | "null" | "Null" | "NULL" => return Value::Null,
        _ => {}
    }
    if let Some(b) = parse_bool(text) {
        return Value::Bool(b);
    }
    parse_int(text).or_else(|| parse_float(text)).unwrap_or_else(|| Value::String(text.to_owned()))
}

fn parse_bool(text: &str) -> Option<bool> {
    match text {
        "true" | "True" | "TRUE" => Some(true),
        "false" | "False" | "FALSE" => Some(false),
        _ => None,
    }
}

fn parse_int(text: &str) -> Option<Value> {
    let (negative, digits) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    let (radix, digits) = if let Some(hex) = digits.strip_prefix("0x") {
        (16, hex)
    } else if let Some(octal) = digits.strip_prefix("0o") {
        (8, octal)
    } else {
        (10, digits)
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return None;
    }
    let magnitude = u64::from_str_radix(digits, radix).ok()?;
    if negative {
        let n = 0i64.checked_sub_unsigned(magnitude)?;
        Some(Value::Number(n.into()))
    } else {
        Some(Value::Number(magnitude.into()))
    }
}

fn parse_float(text: &str) -> Option<Value> {
    let body = text.strip_prefix(['-', '+']).unwrap_or(text);
    let looks_numeric = !body.is_empty()
        && body.chars().all(|c| c.is_ascii_digit() || matches!(c, '.' | 'e' | 'E' | '-' | '+'))
        && body.chars().next().is_some_and(|c| c.is_ascii_digit() || c == '.')
        && body.chars().any(|c| c.is_ascii_digit());
    if !looks_numeric {
        // `.inf` and `.nan` have no JSON form: they stay text.
        return None;
    }
    let f: f64 = text.parse().ok()?;
    Number::from_f64(f).map(Value::Number)
}

#[cfg(test)]
mod tests;
