//! Weft's node proxy, as a library the thin `main.rs` runs (and tests run in-process): what it
//! decides and how it carries connections. The mesh state, the xDS client, the authorization
//! engine, telemetry and the admin server are the platform's (`weft_core`); this crate adds the
//! node's part.
//!
//! - [`config`]: every flag and environment variable, parsed and checked once.
//! - [`app`]: builds and runs the whole proxy from a [`config::Config`].
//! - [`outbound`]: where a captured outbound connection goes (pure [`outbound::route`]).
//! - [`inbound`]: whether an inbound connection may reach a pod of this node (pure).
//! - [`proxy`]: the listeners (:15001 outbound, :15006 plaintext inbound, :15008 HBONE) and the
//!   proxying between them and the pods.
//! - [`capture`]: the eBPF capture and the certificates kept in step with this node's pods.
//! - [`handover`]: an upgrade's hand-over of the listening sockets from the running ztunnel.

pub mod app;
pub mod capture;
pub mod config;
pub mod handover;
pub mod inbound;
pub mod outbound;
pub mod proxy;

pub use outbound::{route, Carry, OutboundError, Plan, Refused, RoundRobin, RouteError, Tunnel};
