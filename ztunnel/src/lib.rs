//! The node proxy's core: what it knows of the mesh and the pure decisions it makes on it. The
//! network listeners, the xDS client and the binary build on this; nothing here does I/O.
//!
//! - [`state`]: workloads, services and policies from the controller's delta xDS, indexed.
//! - [`outbound`]: where a captured outbound connection goes (HBONE, waypoint, passthrough).
//! - [`policy`]: whether an inbound connection is allowed (Istio's L4 AuthorizationPolicy).
//! - [`metrics`]: Istio's L4 connection metrics and their exposition.

pub mod metrics;
pub mod outbound;
pub mod policy;
pub mod state;

pub use outbound::{decide, Outbound, OutboundError, RoundRobin, Tunnel};
pub use policy::{authorize, Connection, Verdict};
pub use state::{ConfigDump, ProxyState, StateError};

#[cfg(test)]
mod test_support;
