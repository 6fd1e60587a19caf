// SPDX-License-Identifier: Apache-2.0
//
// Weft traffic capture: tc ingress programs that steer pod TCP traffic into the node proxy
// (ztunnel) with bpf_sk_assign. Built by ebpf/build.rs with `clang -O2 -g -target bpf` and
// loaded by ebpf/src/capture.rs. The routing half lives in the node's netns: the programs set
// skb->mark and `ip rule fwmark <mark> lookup <table>` + `local default dev lo table <table>`
// make the packet local, so the kernel delivers it to the assigned socket.
//
// weft_pod_in    on every pod's host-side veth (ingress = traffic leaving the pod)
// weft_pod_out   on every pod's host-side veth (egress = traffic the node sends to the pod)
// weft_uplink_in on the node's uplink (ingress = traffic from other nodes)
// weft_listener_lookup  on the node's netns (sk_lookup): a SYN reusing the ports of a connection
//                ztunnel closed first (its socket in TIME_WAIT) reaches ztunnel's listener
//
// Attached as TCX links (Linux 6.6+) or as direct-action filters on a clsact qdisc (older
// kernels); the return codes mean the same in both.
// Return codes: TC_ACT_UNSPEC ("not ours", the next tcx program or filter, or the default action runs,
// i.e. the packet passes untouched), TC_ACT_OK (assigned, deliver), TC_ACT_SHOT (fail closed).

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/pkt_cls.h>
#include <linux/tcp.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

// Value flag in weft_enrolled: the address's TCP traffic is captured. An entry without it is a
// local pod that is not captured (never enrolled, or unenrolled): connections ztunnel already
// holds for it keep reaching their sockets, nothing new is captured.
#define ENROLLED_CAPTURE 1u

#define AF_INET 2
#define AF_INET6 10

#define IP_MF 0x2000
#define IP_OFFSET 0x1fff

// An address: IPv6 as is, IPv4 as an IPv4-mapped IPv6 address (::ffff:a.b.c.d).
struct addr_key {
	__u8 addr[16];
};

// Indices into the one weft_config value (native-endian u32s, written by the loader).
enum {
	CFG_MARK = 0,
	CFG_OUTBOUND_PORT = 1,
	CFG_HBONE_PORT = 2,
	CFG_PLAIN_PORT = 3,
	CFG_SOCKET_MARK = 4, // on ztunnel's own sockets: their packets pass weft_pod_out
	CFG_PAUSED = 5,      // non-zero: new connections (SYNs) are dropped, not given to a listener
	CFG_LEN = 6,
};

struct config {
	__u32 v[CFG_LEN];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct addr_key);
	__type(value, __u32);
} weft_enrolled SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 1);
	__type(key, __u32);
	__type(value, struct config);
} weft_config SEC(".maps");

// A TCP connection as its SYN went: client address and port, then server's.
struct flow_key {
	__u8 client[16];
	__u8 server[16];
	__be16 client_port;
	__be16 server_port;
};

// Connections whose SYN passed uncaptured (their pods were not enrolled then). After an
// enrollment their packets match no socket of ztunnel; they pass untouched until the connection
// ends, so enrolling a pod does not reset what it already has open. Only a SYN seen passing
// puts a flow here: a packet of a connection nobody saw start still meets ztunnel's listener
// (a reset), so nothing new gets past the mesh. Least recently used flows make room.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct flow_key);
	__type(value, __u8);
} weft_direct_flows SEC(".maps");

// ztunnel's listeners by port (written by ztunnel): where weft_listener_lookup steers.
struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 8);
	__type(key, __u32);
	__type(value, __u32); // a socket's fd, when written
} weft_listeners SEC(".maps");

// New connections (SYNs) that reuse the 4-tuple of a connection ztunnel closed first, whose
// socket is in TIME_WAIT, with the listener port each was captured for. Such a SYN is given to
// the TIME_WAIT socket, as the kernel would: the kernel ends the TIME_WAIT and asks for a
// listener of the SYN's own address and port, which ztunnel has none of (its listeners take
// captured SYNs on other ports); weft_listener_lookup answers with the one recorded here.
// Without it the kernel answers the SYN with a stale ACK and the client sends its SYN again.
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 4096);
	__type(key, struct flow_key);
	__type(value, __u32);
} weft_time_wait_syns SEC(".maps");

enum parse_result {
	PARSE_OTHER,   // not IP, or IP but not TCP: pass
	PARSE_TCP,     // TCP with a parsed header
	PARSE_OPAQUE,  // IP whose TCP header we cannot see (fragment, IPv6 extension header)
};

struct packet {
	struct bpf_sock_tuple tuple; // as seen by the packet: saddr/sport -> daddr/dport
	__u32 tuple_len;
	struct addr_key src;
	struct addr_key dst;
	__be16 sport;
	__be16 dport;
	int syn; // opens a connection: SYN without ACK
	int time_wait; // a SYN whose 4-tuple is a socket of this node in TIME_WAIT
};

static __always_inline void key_from_v4(struct addr_key *key, __be32 addr)
{
	__builtin_memset(key, 0, sizeof(*key));
	key->addr[10] = 0xff;
	key->addr[11] = 0xff;
	__builtin_memcpy(&key->addr[12], &addr, 4);
}

static __always_inline int parse(struct __sk_buff *skb, struct packet *pkt)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct tcphdr *tcp;

	if ((void *)(eth + 1) > data_end)
		return PARSE_OTHER;

	if (eth->h_proto == bpf_htons(ETH_P_IP)) {
		struct iphdr *ip = (void *)(eth + 1);

		if ((void *)(ip + 1) > data_end || ip->ihl < 5)
			return PARSE_OTHER;
		key_from_v4(&pkt->src, ip->saddr);
		key_from_v4(&pkt->dst, ip->daddr);
		if (ip->protocol != IPPROTO_TCP)
			return PARSE_OTHER;
		if (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET))
			return PARSE_OPAQUE;
		tcp = (void *)ip + ip->ihl * 4;
		if ((void *)(tcp + 1) > data_end)
			return PARSE_OPAQUE;
		pkt->tuple.ipv4.saddr = ip->saddr;
		pkt->tuple.ipv4.daddr = ip->daddr;
		pkt->tuple.ipv4.sport = tcp->source;
		pkt->tuple.ipv4.dport = tcp->dest;
		pkt->tuple_len = sizeof(pkt->tuple.ipv4);
	} else if (eth->h_proto == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr *ip6 = (void *)(eth + 1);

		if ((void *)(ip6 + 1) > data_end)
			return PARSE_OTHER;
		__builtin_memcpy(pkt->src.addr, &ip6->saddr, 16);
		__builtin_memcpy(pkt->dst.addr, &ip6->daddr, 16);
		switch (ip6->nexthdr) {
		case IPPROTO_TCP:
			break;
		case IPPROTO_HOPOPTS:
		case IPPROTO_ROUTING:
		case IPPROTO_FRAGMENT:
		case IPPROTO_DSTOPTS:
		case IPPROTO_AH:
		case IPPROTO_ESP:
		case 135: // mobility header
		case 139: // HIP
		case 140: // shim6
			// A TCP header may hide behind these; callers fail closed for enrolled addresses.
			return PARSE_OPAQUE;
		default:
			return PARSE_OTHER;
		}
		tcp = (void *)(ip6 + 1);
		if ((void *)(tcp + 1) > data_end)
			return PARSE_OPAQUE;
		__builtin_memcpy(pkt->tuple.ipv6.saddr, &ip6->saddr, 16);
		__builtin_memcpy(pkt->tuple.ipv6.daddr, &ip6->daddr, 16);
		pkt->tuple.ipv6.sport = tcp->source;
		pkt->tuple.ipv6.dport = tcp->dest;
		pkt->tuple_len = sizeof(pkt->tuple.ipv6);
	} else {
		return PARSE_OTHER;
	}
	pkt->sport = tcp->source;
	pkt->dport = tcp->dest;
	pkt->syn = tcp->syn && !tcp->ack;
	return PARSE_TCP;
}

// The verifier needs a constant tuple size, so each family has its own call.
static __always_inline struct bpf_sock *lookup(struct __sk_buff *skb, struct packet *pkt,
					       struct bpf_sock_tuple *tuple)
{
	if (pkt->tuple_len == sizeof(tuple->ipv4))
		return bpf_skc_lookup_tcp(skb, tuple, sizeof(tuple->ipv4), BPF_F_CURRENT_NETNS, 0);
	return bpf_skc_lookup_tcp(skb, tuple, sizeof(tuple->ipv6), BPF_F_CURRENT_NETNS, 0);
}

static __always_inline int is_enrolled(struct addr_key *key)
{
	__u32 *flags = bpf_map_lookup_elem(&weft_enrolled, key);

	return flags && (*flags & ENROLLED_CAPTURE);
}

// A local pod address ztunnel knows, captured or not.
static __always_inline int is_local_pod(struct addr_key *key)
{
	return bpf_map_lookup_elem(&weft_enrolled, key) != 0;
}

// The flow a packet belongs to, as if it came from the client.
static __always_inline void flow_of(struct packet *pkt, struct flow_key *key)
{
	__builtin_memcpy(key->client, pkt->src.addr, 16);
	__builtin_memcpy(key->server, pkt->dst.addr, 16);
	key->client_port = pkt->sport;
	key->server_port = pkt->dport;
}

// Remembers a connection whose SYN passes uncaptured.
static __always_inline void remember_direct(struct packet *pkt)
{
	struct flow_key key = {};
	__u8 seen = 1;

	if (!pkt->syn)
		return;
	flow_of(pkt, &key);
	bpf_map_update_elem(&weft_direct_flows, &key, &seen, BPF_ANY);
}

// Whether the packet belongs to a connection that started uncaptured (either direction).
static __always_inline int is_direct(struct packet *pkt)
{
	struct flow_key key = {};

	if (pkt->syn)
		return 0;
	flow_of(pkt, &key);
	if (bpf_map_lookup_elem(&weft_direct_flows, &key))
		return 1;
	__builtin_memcpy(key.client, pkt->dst.addr, 16);
	__builtin_memcpy(key.server, pkt->src.addr, 16);
	key.client_port = pkt->dport;
	key.server_port = pkt->sport;
	return bpf_map_lookup_elem(&weft_direct_flows, &key) != 0;
}

// Assign the packet to an existing, non-listening socket of its 4-tuple: an established
// connection, a request socket (handshake in progress) or ztunnel's own transparent
// connecting socket. Listening sockets are skipped: a node listener bound to a wildcard address
// would otherwise catch a pod's connection to any address on that port. A SYN that meets a
// socket in TIME_WAIT opens a new connection: it is left to the caller, as any new connection,
// with `time_wait` set (see assign_listener).
// Returns 1 when assigned (the caller returns TC_ACT_OK).
static __always_inline int assign_existing(struct __sk_buff *skb, struct packet *pkt, __u32 mark)
{
	struct bpf_sock *sk;
	long err;

	sk = lookup(skb, pkt, &pkt->tuple);
	if (!sk)
		return 0;
	if (sk->state == BPF_TCP_LISTEN || (pkt->syn && sk->state == BPF_TCP_TIME_WAIT)) {
		pkt->time_wait = sk->state == BPF_TCP_TIME_WAIT;
		bpf_sk_release(sk);
		return 0;
	}
	err = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	if (err)
		return 0;
	skb->mark = mark;
	return 1;
}

// Whether an existing, non-listening socket of this node matches the packet's 4-tuple (what
// weft_pod_in's assign_existing would find once the packet is turned around).
static __always_inline int owned_by_ztunnel(struct __sk_buff *skb, struct packet *pkt)
{
	struct bpf_sock *sk = lookup(skb, pkt, &pkt->tuple);
	int owned;

	if (!sk)
		return 0;
	owned = sk->state != BPF_TCP_LISTEN;
	bpf_sk_release(sk);
	return owned;
}

// Assign the packet to ztunnel's listener on `port` (bound to the wildcard address with
// IP_TRANSPARENT in the node netns). Without one, drop: an enrolled pod's traffic must never
// bypass the mesh.
static __always_inline int assign_listener(struct __sk_buff *skb, struct packet *pkt, __u32 port,
					   struct config *cfg)
{
	struct bpf_sock_tuple tuple = pkt->tuple;
	struct bpf_sock *sk;
	long err;

	// A ztunnel about to stop takes what its listeners already queued and no more: the SYN is
	// dropped, sent again by the client, and meets the next ztunnel.
	if (pkt->syn && cfg->v[CFG_PAUSED])
		return TC_ACT_SHOT;

	// The 4-tuple is a connection ztunnel closed, in TIME_WAIT: only that socket can end the
	// TIME_WAIT and take the SYN (a request socket beside it would be refused as a duplicate),
	// so the SYN goes to it and weft_listener_lookup gives it on to the listener recorded here.
	if (pkt->time_wait) {
		struct flow_key key = {};

		flow_of(pkt, &key);
		if (bpf_map_update_elem(&weft_time_wait_syns, &key, &port, BPF_ANY) == 0) {
			sk = lookup(skb, pkt, &pkt->tuple);
			if (sk) {
				err = sk->state == BPF_TCP_TIME_WAIT ? bpf_sk_assign(skb, sk, 0) : -1;
				bpf_sk_release(sk);
				if (!err) {
					skb->mark = cfg->v[CFG_MARK];
					return TC_ACT_OK;
				}
			}
		}
		// The TIME_WAIT ended meanwhile: the listener takes the SYN as any other.
	}

	if (pkt->tuple_len == sizeof(tuple.ipv4))
		tuple.ipv4.dport = bpf_htons((__u16)port);
	else
		tuple.ipv6.dport = bpf_htons((__u16)port);

	sk = lookup(skb, pkt, &tuple);
	if (!sk)
		return TC_ACT_SHOT;
	if (sk->state != BPF_TCP_LISTEN) {
		bpf_sk_release(sk);
		return TC_ACT_SHOT;
	}
	err = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	if (err)
		return TC_ACT_SHOT;
	skb->mark = cfg->v[CFG_MARK];
	return TC_ACT_OK;
}

// Traffic to an enrolled destination that matches no socket: HBONE port -> ztunnel's HBONE
// listener, any other port -> ztunnel's plaintext inbound listener.
static __always_inline int steer_inbound(struct __sk_buff *skb, struct packet *pkt,
					 struct config *cfg)
{
	__u32 port = cfg->v[CFG_PLAIN_PORT];

	if (pkt->dport == bpf_htons((__u16)cfg->v[CFG_HBONE_PORT]))
		port = cfg->v[CFG_HBONE_PORT];
	return assign_listener(skb, pkt, port, cfg);
}

// Host side of a pod's veth: ingress carries what the pod sends.
// aya names the tc program section "classifier".
SEC("classifier")
int weft_pod_in(struct __sk_buff *skb)
{
	struct packet pkt = {};
	__u32 zero = 0;
	struct config *cfg;
	int kind, src_enrolled, dst_enrolled;

	kind = parse(skb, &pkt);
	if (kind == PARSE_OTHER)
		return TC_ACT_UNSPEC; // non-TCP (DNS/UDP, ICMP, ARP) is out of scope: passes

	src_enrolled = is_enrolled(&pkt.src);
	dst_enrolled = is_enrolled(&pkt.dst);
	if (kind == PARSE_OPAQUE)
		return (src_enrolled || dst_enrolled) ? TC_ACT_SHOT : TC_ACT_UNSPEC;

	cfg = bpf_map_lookup_elem(&weft_config, &zero);
	if (!cfg)
		return (src_enrolled || dst_enrolled) ? TC_ACT_SHOT : TC_ACT_UNSPEC;

	// Replies to ztunnel's transparent upstream connections, and the rest of connections
	// ztunnel already accepted, belong to their socket whatever the pod's enrollment.
	if (assign_existing(skb, &pkt, cfg->v[CFG_MARK]))
		return TC_ACT_OK;

	if ((src_enrolled || dst_enrolled) && is_direct(&pkt))
		// A connection from before enrollment: it goes on as it started, until it ends.
		return TC_ACT_UNSPEC;
	if (src_enrolled)
		// New (SYN) or unknown (e.g. a SYN-cookie ACK): the outbound listener accepts it or
		// answers with a reset; never forwarded in plaintext.
		return assign_listener(skb, &pkt, cfg->v[CFG_OUTBOUND_PORT], cfg);
	if (dst_enrolled)
		// A pod that is not in the mesh calls an enrolled pod on the same node: inbound.
		return steer_inbound(skb, &pkt, cfg);
	remember_direct(&pkt);
	return TC_ACT_UNSPEC;
}

// The node's uplink: ingress carries what other nodes send.
// aya names the tc program section "classifier".
SEC("classifier")
int weft_uplink_in(struct __sk_buff *skb)
{
	struct packet pkt = {};
	__u32 zero = 0;
	struct config *cfg;
	int kind, enrolled;

	kind = parse(skb, &pkt);
	if (kind == PARSE_OTHER || !is_local_pod(&pkt.dst))
		return TC_ACT_UNSPEC;
	enrolled = is_enrolled(&pkt.dst);
	if (kind == PARSE_OPAQUE)
		return enrolled ? TC_ACT_SHOT : TC_ACT_UNSPEC;

	cfg = bpf_map_lookup_elem(&weft_config, &zero);
	if (!cfg)
		return enrolled ? TC_ACT_SHOT : TC_ACT_UNSPEC;
	// Connections ztunnel holds (HBONE to :15008, plaintext inbound, replies to its
	// transparent sockets) stay with it, also after their pod is unenrolled.
	if (assign_existing(skb, &pkt, cfg->v[CFG_MARK]))
		return TC_ACT_OK;
	if (!enrolled) {
		remember_direct(&pkt);
		return TC_ACT_UNSPEC;
	}
	if (is_direct(&pkt))
		return TC_ACT_UNSPEC;
	return steer_inbound(skb, &pkt, cfg);
}

// Istio's source address for kubelet's probes (169.254.7.127 and
// fd16:9254:7127:1337:ffff:ffff:ffff:ffff): node traffic from it reaches pods uncaptured.
static __always_inline int is_probe_source(struct addr_key *key)
{
	const __u8 *a = key->addr;
	int v4 = a[10] == 0xff && a[11] == 0xff && a[12] == 169 && a[13] == 254 && a[14] == 7 &&
		 a[15] == 127;
	int v6 = a[0] == 0xfd && a[1] == 0x16 && a[2] == 0x92 && a[3] == 0x54 && a[4] == 0x71 &&
		 a[5] == 0x27 && a[6] == 0x13 && a[7] == 0x37;

#pragma unroll
	for (int i = 0; i < 10; i++)
		v4 = v4 && a[i] == 0;
#pragma unroll
	for (int i = 8; i < 16; i++)
		v6 = v6 && a[i] == 0xff;
	return v4 || v6;
}

// Host side of a pod's veth: egress carries what the node sends to the pod: ztunnel's own
// connections (marked), replies routed to the pod, and connections from the node itself
// (hostNetwork pods, node daemons). The last must meet the pod's inbound policy like any other
// caller, so a packet to an enrolled pod that is not ztunnel's is turned around: its MAC
// addresses swapped, it re-enters the node on this veth's ingress, where weft_pod_in assigns it
// to its socket (a reply to ztunnel's transparent socket) or steers it to ztunnel's inbound
// listeners (a new connection from the node). What passes: the node's own probes, from the
// probe source (a pod cannot send from it here: whatever a pod sends meets weft_pod_in first),
// and connections that started before the pod was enrolled. To a pod that is not captured,
// only connections ztunnel already holds (the node called it while it was enrolled) are turned
// around.
// aya names the tc program section "classifier".
SEC("classifier")
int weft_pod_out(struct __sk_buff *skb)
{
	void *data, *data_end;
	struct packet pkt = {};
	struct ethhdr *eth;
	__u8 mac[ETH_ALEN];
	__u32 zero = 0;
	struct config *cfg;
	__u32 *flags;
	int kind, enrolled;

	kind = parse(skb, &pkt);
	if (kind == PARSE_OTHER)
		return TC_ACT_UNSPEC;
	flags = bpf_map_lookup_elem(&weft_enrolled, &pkt.dst);
	if (!flags) {
		remember_direct(&pkt);
		return TC_ACT_UNSPEC;
	}
	enrolled = *flags & ENROLLED_CAPTURE;
	cfg = bpf_map_lookup_elem(&weft_config, &zero);
	if (!cfg)
		return enrolled ? TC_ACT_SHOT : TC_ACT_UNSPEC;
	if (skb->mark == cfg->v[CFG_SOCKET_MARK])
		return TC_ACT_UNSPEC;
	if (kind == PARSE_OPAQUE)
		return enrolled ? TC_ACT_SHOT : TC_ACT_UNSPEC;
	if (!enrolled) {
		// Only the node's own sockets (skb->sk) can be in a connection ztunnel holds: routed
		// traffic and new connections skip the lookup.
		if (pkt.syn || !skb->sk || !owned_by_ztunnel(skb, &pkt)) {
			remember_direct(&pkt);
			return TC_ACT_UNSPEC;
		}
	} else if (is_direct(&pkt) || (skb->sk && is_probe_source(&pkt.src))) {
		return TC_ACT_UNSPEC;
	}

	data = (void *)(long)skb->data;
	data_end = (void *)(long)skb->data_end;
	eth = data;
	if ((void *)(eth + 1) > data_end)
		return TC_ACT_SHOT;
#pragma unroll
	for (int i = 0; i < ETH_ALEN; i++) {
		mac[i] = eth->h_dest[i];
		eth->h_dest[i] = eth->h_source[i];
		eth->h_source[i] = mac[i];
	}
	return bpf_redirect(skb->ifindex, BPF_F_INGRESS);
}

// Listener lookups in the node's netns, i.e. for a packet delivered locally that no connected
// socket took. The capture assigns the packets it steers to their sockets itself; the one case
// it cannot is a SYN that ends a TIME_WAIT (see weft_time_wait_syns): the listener it was
// captured for takes it. Every other lookup goes on as if this program were not there. Should
// that listener be missing, the lookup fails (the kernel answers as before, with a stale ACK):
// a node service listening on the port must never get a captured connection.
SEC("sk_lookup")
int weft_listener_lookup(struct bpf_sk_lookup *ctx)
{
	struct flow_key key = {};
	struct bpf_sock *sk;
	__u32 *recorded;
	__u32 port;
	long err;

	if (ctx->protocol != IPPROTO_TCP)
		return SK_PASS;
	if (ctx->family == AF_INET) {
		key_from_v4((struct addr_key *)key.client, ctx->remote_ip4);
		key_from_v4((struct addr_key *)key.server, ctx->local_ip4);
	} else if (ctx->family == AF_INET6) {
		__u32 *client = (__u32 *)key.client, *server = (__u32 *)key.server;

		client[0] = ctx->remote_ip6[0];
		client[1] = ctx->remote_ip6[1];
		client[2] = ctx->remote_ip6[2];
		client[3] = ctx->remote_ip6[3];
		server[0] = ctx->local_ip6[0];
		server[1] = ctx->local_ip6[1];
		server[2] = ctx->local_ip6[2];
		server[3] = ctx->local_ip6[3];
	} else {
		return SK_PASS;
	}
	key.client_port = ctx->remote_port;
	key.server_port = bpf_htons((__u16)ctx->local_port);
	recorded = bpf_map_lookup_elem(&weft_time_wait_syns, &key);
	if (!recorded)
		return SK_PASS;
	port = *recorded;
	bpf_map_delete_elem(&weft_time_wait_syns, &key);
	sk = bpf_map_lookup_elem(&weft_listeners, &port);
	if (!sk)
		return SK_DROP;
	err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	return err ? SK_DROP : SK_PASS;
}

// No GPL-only helper is used, so the workspace licence applies.
char LICENSE[] SEC("license") = "Apache-2.0";
