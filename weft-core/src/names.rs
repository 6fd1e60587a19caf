//! Istio's names and numbers that Weft speaks: the proxies' ports, the labels and annotations
//! that enroll workloads and bind waypoints, the waypoint GatewayClass, the defaults of identity.
//! Every binary uses these constants instead of repeating the literals; nothing here decides
//! anything.

/// ztunnel's transparent listener for captured outbound connections.
pub const OUTBOUND_PORT: u16 = 15001;
/// ztunnel's transparent listener for captured plaintext inbound connections.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// HBONE (HTTP/2 CONNECT over mutual TLS) on ztunnel and on waypoints.
pub const HBONE_PORT: u16 = 15008;
/// The admin endpoint (`/config_dump`, `/logging`, `/quitquitquit`), on localhost.
pub const ADMIN_PORT: u16 = 15000;
/// Prometheus metrics (`/metrics`, `/stats/prometheus`).
pub const METRICS_PORT: u16 = 15020;
/// Readiness (`/healthz/ready`).
pub const READINESS_PORT: u16 = 15021;
/// The control plane's plaintext gRPC port (xDS and CA; local setups only).
pub const XDS_PLAINTEXT_PORT: u16 = 15010;
/// The control plane's gRPC port over TLS (xDS and CA).
pub const XDS_TLS_PORT: u16 = 15012;

/// Namespace or pod label enrolling workloads in the ambient mesh (`ambient`), or opting a pod
/// out (`none`).
pub const DATAPLANE_MODE_LABEL: &str = "istio.io/dataplane-mode";
/// The value of [`DATAPLANE_MODE_LABEL`] that enrolls.
pub const DATAPLANE_MODE_AMBIENT: &str = "ambient";
/// Namespace, service or pod label naming the waypoint that serves it (`none` opts out).
pub const USE_WAYPOINT_LABEL: &str = "istio.io/use-waypoint";
/// The namespace of the waypoint [`USE_WAYPOINT_LABEL`] names, when not the object's own.
pub const USE_WAYPOINT_NAMESPACE_LABEL: &str = "istio.io/use-waypoint-namespace";
/// Gateway label saying which traffic a waypoint serves: `service` (default), `workload`,
/// `all` or `none`.
pub const WAYPOINT_FOR_LABEL: &str = "istio.io/waypoint-for";
/// The GatewayClass of waypoints.
pub const WAYPOINT_GATEWAY_CLASS: &str = "istio-waypoint";

/// The trust domain of an identity that names none.
pub const DEFAULT_TRUST_DOMAIN: &str = "cluster.local";
/// The DNS suffix of services (`<name>.<namespace>.svc.<suffix>`).
pub const DEFAULT_DOMAIN_SUFFIX: &str = "cluster.local";
/// The service account of a workload that names none (Kubernetes' default).
pub const DEFAULT_SERVICE_ACCOUNT: &str = "default";
/// The mesh's root namespace: policies there without a selector apply mesh-wide.
pub const ROOT_NAMESPACE: &str = "istio-system";

/// The node metadata key carrying the Kubernetes node a proxy serves.
pub const NODE_NAME_METADATA: &str = "NODE_NAME";
/// The node metadata key carrying the name of a waypoint's Gateway.
pub const WAYPOINT_NAME_METADATA: &str = "WAYPOINT_NAME";

/// Istio's source address of kubelet's probes to ambient pods: node traffic from it reaches a
/// pod uncaptured (Istio's CNI SNATs kubelet's probes to it); any other traffic from the node
/// meets the pod's inbound policy. The eBPF capture has it built in.
pub const PROBE_SOURCE_V4: std::net::Ipv4Addr = std::net::Ipv4Addr::new(169, 254, 7, 127);
/// The IPv6 counterpart of [`PROBE_SOURCE_V4`] (Istio's).
pub const PROBE_SOURCE_V6: std::net::Ipv6Addr =
    std::net::Ipv6Addr::new(0xfd16, 0x9254, 0x7127, 0x1337, 0xffff, 0xffff, 0xffff, 0xffff);
