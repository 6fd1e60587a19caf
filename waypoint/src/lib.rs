//! Weft's waypoint: the per-namespace L7 proxy that terminates HBONE and applies JWT checks, L7
//! authorization, routing and resilience to the traffic of the services and workloads bound to
//! it. A library the thin `main.rs` runs (and tests run in-process).
//!
//! - [`config`]: every flag and environment variable, parsed and checked once.
//! - [`app`]: builds and runs the whole waypoint from a [`config::Config`].
//! - [`xds`]: what it subscribes to (its own Waypoint resource and the mesh).
//! - [`model`]: the Waypoint resource as typed values, converted where it enters.
//! - [`proxy`]: the HBONE listener, each CONNECT stream, protocol detection ([`sniff`]) and TCP.
//! - [`authz`]: Istio's AuthorizationPolicy applied to one request (pure): CUSTOM, DENY, ALLOW, AUDIT.
//! - [`http`]: one request: [`security`] ([`jwt`] with keys from [`jwks`], then [`authz`],
//!   both pure), [`normalize`], [`route`] (pure), [`fault`] (pure), then [`send`].
//! - [`send`]: attempts upstream under the route's retries and timeouts, each to an endpoint
//!   [`balance`] (pure) picks, with [`mirror`]ed copies; request bodies kept for replay by
//!   [`replay`]; per-cluster limits, counters and outlier state in [`cluster`].
//! - [`outlier`]: outlier detection, the endpoints of a cluster ejected for consecutive failures
//!   (pure, per cluster).
//! - [`retry`]: whether a failed attempt is retried, the backoff, the retry budget (pure).
//! - [`upstream`]: HBONE tunnels and pooled HTTP/1.1 and HTTP/2 connections to endpoints.
//! - [`jwt`]: RequestAuthentication, Envoy's `jwt_authn` (pure), with keys from [`jwks`].
//! - [`metrics`] and [`body`]: Istio's request metrics and the access log, recorded as each
//!   response ends.

pub mod app;
pub mod authz;
pub mod balance;
pub mod body;
pub mod cluster;
pub mod config;
pub mod fault;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod jwks;
pub mod jwt;
pub mod metrics;
pub mod mirror;
pub mod model;
pub mod normalize;
pub mod outlier;
pub mod proxy;
pub mod replay;
pub mod retry;
pub mod route;
pub mod security;
pub mod send;
pub mod sniff;
pub mod upstream;
pub mod xds;

#[cfg(test)]
mod testing;
