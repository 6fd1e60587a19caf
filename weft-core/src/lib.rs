//! What Weft's binaries share and nothing else: SPIFFE identity, workload certificates and the
//! manager that keeps them fresh, the HBONE tunnel (client pool and server), and the generated
//! protobuf types of the wire APIs. Depends on no Weft binary.

pub mod identity;
pub mod proto;
pub mod tls;

pub use identity::Identity;
