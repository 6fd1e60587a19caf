//! Weft's waypoint: the per-namespace L7 proxy that terminates HBONE and applies routing,
//! resilience, L7 authorization and JWT checks to the traffic of the services bound to it.
//!
//! Today the crate owns the pure parts, and does no I/O:
//! - [`model`]: the controller's `weft.waypoint.v1.Waypoint` resource as typed values, converted
//!   where it enters (regexes compiled, every problem reported together).
//! - [`route`]: the routing decision over it (pure [`route::route`]).
//! - [`balance`]: the upstream endpoint of a forwarded request (pure [`balance::choose`]).
//!
//! The proxy (the HBONE listener, HTTP/1.1 and HTTP/2, the stages around routing, the upstream
//! HBONE client, the xDS client) and the binary with its `config.rs` of flags come later; they
//! use these without reaching into generated protobuf types.

pub mod balance;
pub mod model;
pub mod route;

#[cfg(test)]
mod testing;
