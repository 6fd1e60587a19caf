//! The node proxy (to be built by the L4-mesh issue): captures pod traffic, carries it in HBONE
//! tunnels with each workload's identity, and applies L4 policy. Today it holds nothing; the
//! HBONE client and server, identities and certificates it will use live in `weft-core`.
