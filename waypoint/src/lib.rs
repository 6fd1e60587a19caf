//! The per-namespace L7 proxy (to be built by the waypoint issue): terminates HBONE, applies
//! routing, resilience, L7 authorization and JWT checks. Today it holds nothing.
