//! The node proxy's core: what it knows of the mesh and the pure decisions it makes on it. The
//! network listeners, the xDS client and the binary build on this; nothing here does I/O.
//!
//! - [`state`]: workloads, services and policies from the controller's delta xDS, indexed.
//! - [`outbound`]: where a captured outbound connection goes (HBONE, waypoint, passthrough).
//! - [`policy`]: whether an inbound connection is allowed (Istio's L4 AuthorizationPolicy).
//! - [`metrics`]: Istio's L4 connection metrics and their exposition.
//! - [`proxy`]: the listeners (:15001 outbound, :15006 plaintext inbound, :15008 HBONE) and the
//!   proxying between them and the pods.
//! - [`xds`]: the delta ADS client that fills the state; [`capture`]: the eBPF capture and the
//!   certificates kept in step with this node's pods; [`admin`]: config dump, metrics, readiness.

pub mod admin;
pub mod capture;
pub mod metrics;
pub mod outbound;
pub mod policy;
pub mod proxy;
pub mod state;
pub mod xds;

pub use outbound::{decide, Outbound, OutboundError, RoundRobin, Tunnel};
pub use policy::{authorize, Connection, Verdict};
pub use state::{ConfigDump, ProxyState, StateError};

#[cfg(test)]
mod test_support;
