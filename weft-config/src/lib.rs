//! The mesh's configuration as typed values: the Kubernetes and Istio kinds Weft reads, decoded
//! from YAML or JSON (every version Istio serves, one meaning), with positions for messages, and
//! the offline analysis behind `weft analyze`. Knows nothing of where the configuration comes
//! from (files or the API server) nor of xDS: the controller feeds it and converts from it.
//!
//! The crate owns the typed Istio and Kubernetes configuration, the YAML loader that keeps the
//! position of every node (`yaml`) and the offline analysis (`analyze`). The controller and
//! the CLI use it; the proxies (ztunnel, waypoint) never link it, so they carry no YAML parser.
//! It depends on no other Weft crate.

pub mod analyze;
pub mod decode;
mod fields;
pub mod kube;
pub mod meta;
pub mod networking;
pub mod security;
pub mod telemetry;
pub mod types;
pub mod yaml;

pub use analyze::unenforced::{not_enforced, NotEnforced};
pub use analyze::{analyze, analyze_with, AnalyzeOptions, Finding, Severity};
pub use decode::{
    decode, decode_with, DecodeError, DecodeOptions, Decoded, FieldWarning, Object, OtherObject,
};
pub use yaml::{load_yaml, load_yaml_bytes, load_yaml_with, LoadError, LoadedDoc, Position, Positions};
