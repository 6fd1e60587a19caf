//! Traffic capture for the node proxy: the tc programs that steer pod TCP traffic into ztunnel
//! and their aya loader. Knows nothing of xDS or Kubernetes: the caller says which interfaces
//! to watch and which pod addresses are in the mesh.
//!
//! # What the programs do
//!
//! Three tc programs, compiled from `src/bpf/capture.c` by `build.rs` with clang and embedded
//! (how they are attached is [Attachment](#attachment)):
//!
//! - `weft_pod_in`, on every pod's host-side veth (attach it to all pods of the node; the
//!   enrolled map decides what is captured). A TCP packet that belongs to an existing
//!   non-listening socket of the node (an established or half-open connection, ztunnel's own
//!   transparent upstream socket) is assigned to it. Otherwise, from an enrolled source it goes
//!   to ztunnel's outbound listener ([`CaptureConfig::outbound_port`], 15001), and to an
//!   enrolled destination (a same-node caller outside the mesh) to the inbound listeners.
//! - `weft_pod_out`, on the same veths' egress: what the node sends to an enrolled pod that is
//!   not ztunnel's own (its sockets carry [`SOCKET_MARK`]) is turned back into the veth's ingress
//!   with its MAC addresses swapped, where `weft_pod_in` assigns it to its socket or steers it
//!   to ztunnel's inbound listeners: connections from the node itself (hostNetwork pods, node
//!   daemons) meet the pod's inbound policy, and replies to ztunnel's transparent sockets reach
//!   them. Node traffic from Istio's probe source ([`PROBE_SOURCE_V4`], [`PROBE_SOURCE_V6`])
//!   passes uncaptured, so kubelet's probes work under STRICT as in Istio.
//! - `weft_uplink_in`, on the node's uplink: TCP to an enrolled pod goes to its existing
//!   socket, else to ztunnel's HBONE listener (destination port 15008) or its plaintext inbound
//!   listener (any other port, 15006).
//!
//! Fail closed: when the listener is missing, or a TCP header is hidden (IP fragment, IPv6
//! extension header), a packet from or to an enrolled address is dropped. Non-TCP traffic
//! (UDP, DNS, ICMP) passes untouched, as does everything of addresses that are not enrolled.
//!
//! ztunnel's listeners must be bound to the wildcard address (`0.0.0.0` or a dual-stack `[::]`)
//! in the node's network namespace with `IP_TRANSPARENT`, else SYN-ACKs from the original
//! destination address do not route. Its listeners and its upstream connections carry
//! [`SOCKET_MARK`]: its connections to local pods (transparent, from the client's address) and
//! the replies of the connections it accepted leave through the veth's egress and are not
//! captured again; the pods' replies are matched by the existing-socket lookup.
//!
//! # Routing
//!
//! `bpf_sk_assign` only takes effect when the packet is delivered locally, so the programs set
//! `skb->mark` to [`CaptureConfig::mark`] and [`Capture::open`] adds, in the network namespace
//! of the calling thread (the node's), idempotently, for IPv4 and IPv6:
//!
//! ```text
//! ip rule add fwmark <mark> lookup <table>
//! ip route replace local default dev lo table <table>
//! ```
//!
//! The rule and route are made with iproute2's `ip`, which must be installed; [`remove`] deletes
//! them.
//!
//! # Pins
//!
//! Everything is pinned under [`CaptureConfig::pin_dir`], so capture outlives the loader (a
//! ztunnel crash keeps it in place, failing closed) and the next [`Capture::open`] takes the
//! pinned objects over instead of loading duplicates:
//!
//! ```text
//! <pin_dir>/prog_pod          the weft_pod_in program
//! <pin_dir>/prog_pod_out      the weft_pod_out program
//! <pin_dir>/prog_uplink       the weft_uplink_in program
//! <pin_dir>/map_enrolled      hash: 16-byte address (IPv4 as ::ffff:a.b.c.d) -> u32 flags (1 = capture)
//! <pin_dir>/map_config        array[1]: [mark, outbound port, HBONE port, plaintext port, socket mark] (u32s)
//! <pin_dir>/links/pod_<if>       TCX mode: ingress link of weft_pod_in on pod veth <if>
//! <pin_dir>/links/podout_<if>    TCX mode: egress link of weft_pod_out on pod veth <if>
//! <pin_dir>/links/uplink_<if>    TCX mode: ingress link of weft_uplink_in on uplink <if>
//! <pin_dir>/links/tc_pod_<if>    tc mode: empty directory, weft_pod_in is a filter on <if>'s clsact ingress
//! <pin_dir>/links/tc_podout_<if> tc mode: likewise for weft_pod_out on <if>'s clsact egress
//! <pin_dir>/links/tc_uplink_<if> tc mode: likewise for weft_uplink_in on uplink <if>'s clsact ingress
//! ```
//!
//! A restarted loader keeps the pinned programs as they are; to install new programs, call
//! [`remove`] and open again. [`remove`] undoes everything.
//!
//! # Attachment
//!
//! [`AttachMode`] says how the programs meet an interface; [`CaptureConfig::attach`] picks it,
//! by default [`AttachMode::detect`] (TCX where the kernel has it, probed; tc before):
//!
//! - [`AttachMode::Tcx`] (Linux 6.6+): TCX links, first in the chain, pinned in bpffs.
//! - [`AttachMode::Tc`] (Linux 5.10+; what 5.10 to 6.5 get, e.g. Debian 11 and 12, Ubuntu 22.04,
//!   RHEL 9): a `clsact` qdisc (added when missing, never removed: other tools may use it) and a
//!   direct-action `bpf` filter made over netlink at priority [`TC_PRIORITY`] (1, first) and
//!   handle [`TC_HANDLE`] (`0x5745`), which are Weft's. A filter is no link and cannot be pinned;
//!   it stays on the qdisc until deleted, so it outlives the loader as a pinned link does, and a
//!   marker directory in `links/` records it. A restarted loader replaces the filter's program in
//!   place (atomically); detaching deletes only the filter at Weft's priority and handle.
//!
//! Attaching in one mode where the other mode's attachment is recorded (a loader of the other
//! mode made it) puts the new attachment in place, then removes the old one.
//!
//! Below Linux 5.10, [`Capture::open`] fails with [`Error::Unsupported`].

mod attach;
mod bpffs;
mod capture;
mod error;
mod routing;

pub use attach::{AttachMode, TC_HANDLE, TC_PRIORITY};
pub use capture::{
    pinned_current, pinned_program_ids, remove, wait_unloaded, Capture, CaptureConfig, PROBE_SOURCE_V4,
    PROBE_SOURCE_V6, SOCKET_MARK,
};
pub use error::Error;

/// Whether this kernel loads tc (`sched_cls`) programs, the kind the capture is made of (a
/// pre-flight check; needs the privileges the capture needs, CAP_BPF or root). `Err` says why it
/// could not be told.
pub fn tc_programs_supported() -> Result<bool, String> {
    aya::sys::is_program_supported(aya::programs::ProgramType::SchedClassifier).map_err(|e| e.to_string())
}
