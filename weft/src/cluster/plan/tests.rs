#![allow(clippy::unwrap_used)]

use super::*;

fn two_by_two() -> ClusterSpec {
    ClusterSpec::new("dev")
        .pod("default", "client", "node-a")
        .pod("default", "server", "node-b")
        .pod("shop", "cart", "node-a")
        .pod("shop", "pay", "node-b")
}

fn err(spec: &ClusterSpec) -> String {
    spec.plan().unwrap_err().to_string()
}

#[test]
fn default_two_nodes_share_one_veth_and_pods_get_addresses_from_their_node() {
    let plan = two_by_two().plan().unwrap();
    assert_eq!(plan.netns_prefix, "weft-dev-");
    assert!(plan.fabric.is_none());
    let a = plan.node("node-a").unwrap();
    let b = plan.node("node-b").unwrap();
    assert_eq!(a.netns, "weft-dev-node-a");
    assert_eq!(a.uplink, "eth0");
    assert_eq!(a.link_addrs[0].to_string(), "172.30.0.1/24");
    assert_eq!(b.link_addrs[0].to_string(), "172.30.0.2/24");
    assert_eq!(a.pod_cidrs[0].to_string(), "10.10.1.0/24");
    assert_eq!(b.pod_cidrs[0].to_string(), "10.10.2.0/24");
    assert_eq!(plan.gateways, vec!["169.254.1.1".parse::<IpAddr>().unwrap()]);

    let client = plan.pod("default", "client").unwrap();
    assert_eq!(client.netns, "weft-dev-pod-default-client");
    assert_eq!(client.iface, "eth0");
    assert_eq!(client.ips, vec!["10.10.1.2".parse::<IpAddr>().unwrap()]);
    assert_eq!(plan.pod("shop", "cart").unwrap().ips[0].to_string(), "10.10.1.3");
    assert_eq!(plan.pod("default", "server").unwrap().ips[0].to_string(), "10.10.2.2");
    assert_eq!(plan.pod("shop", "pay").unwrap().ipv4().unwrap().to_string(), "10.10.2.3");

    for pod in &plan.pods {
        assert!(pod.host_veth.len() <= 15, "{}", pod.host_veth);
        assert!(pod.host_veth.starts_with("wf") && pod.host_veth.len() == 10, "{}", pod.host_veth);
        let node = plan.node(&pod.node).unwrap();
        assert!(node.pod_cidrs[0].contains(pod.ips[0]));
    }
    assert_eq!(plan.netns_names().len(), 6);
    assert!(plan.netns_names().iter().all(|n| n.starts_with("weft-dev-")));
}

#[test]
fn the_same_pods_in_any_order_get_the_same_plan() {
    let plan = two_by_two().plan().unwrap();
    let mut reversed = two_by_two();
    reversed.pods.reverse();
    assert_eq!(reversed.plan().unwrap(), plan);
    assert_eq!(two_by_two().plan().unwrap(), plan);
    // Another cluster name gives other veth names (they never meet, but stay recognisable).
    let mut other = two_by_two();
    other.name = "dev2".into();
    assert_ne!(other.plan().unwrap().pods[0].host_veth, plan.pods[0].host_veth);
}

#[test]
fn one_or_three_nodes_use_a_fabric_bridge() {
    let mut spec = ClusterSpec::new("big");
    spec.nodes = vec!["n1".into(), "n2".into(), "n3".into()];
    let plan = spec.clone().pod("default", "x", "n3").plan().unwrap();
    let fabric = plan.fabric.as_ref().unwrap();
    assert_eq!(fabric.netns, "weft-big-fabric");
    assert_eq!(fabric.bridge, "br0");
    assert_eq!(fabric.ports.len(), 3);
    assert_eq!(plan.node("n3").unwrap().link_addrs[0].to_string(), "172.30.0.3/24");
    assert_eq!(plan.pod("default", "x").unwrap().ips[0].to_string(), "10.10.3.2");
    assert_eq!(plan.netns_names()[0], "weft-big-fabric");

    spec.nodes = vec!["solo".into()];
    assert_eq!(spec.plan().unwrap().fabric.unwrap().ports.len(), 1);
}

#[test]
fn bad_input_is_refused_with_a_reason() {
    for name in ["", "Dev", "my-cluster", "a/b", "a.b", "x".repeat(17).as_str()] {
        let mut spec = two_by_two();
        spec.name = name.into();
        assert!(err(&spec).contains("cluster name"), "{name:?}: {}", err(&spec));
    }
    assert!(err(&ClusterSpec::new("c").pod("default", "p", "node-z"))
        .contains("placed on node \"node-z\", which is not one of the cluster's nodes (node-a, node-b)"));
    assert_eq!(
        err(&ClusterSpec::new("c").pod("default", "p", "node-a").pod("default", "p", "node-b")),
        "pod default/p is listed twice"
    );
    assert!(err(&ClusterSpec::new("c").pod("Default", "p", "node-a")).contains("namespace name \"Default\""));
    assert!(err(&ClusterSpec::new("c").pod("default", "p_1", "node-a")).contains("pod name \"p_1\""));
    assert!(err(&ClusterSpec::new("c").pod("a-b", "c", "node-a").pod("a", "b-c", "node-b"))
        .contains("would share the network namespace \"weft-c-pod-a-b-c\""));

    let mut spec = ClusterSpec::new("c");
    spec.nodes = vec!["node-a".into(), "node-a".into()];
    assert_eq!(err(&spec), "node \"node-a\" is listed twice");
    spec.nodes = vec!["fabric".into()];
    assert!(err(&spec).contains("reserved"));
    spec.nodes = vec!["pod-1".into()];
    assert!(err(&spec).contains("reserved"));
    spec.nodes = vec![];
    assert_eq!(err(&spec), "a cluster needs at least one node");
    spec.nodes = (0..255).map(|i| format!("n{i}")).collect();
    assert!(err(&spec).starts_with("255 nodes do not fit"), "{}", err(&spec));
    spec.nodes.pop();
    assert!(spec.plan().is_ok());
}

#[test]
fn too_many_pods_for_a_node_cidr_is_refused() {
    let mut spec = ClusterSpec::new("c");
    spec.pods = (0..253)
        .map(|i| PodSpec { name: format!("p{i}"), namespace: "d".into(), node: "node-a".into() })
        .collect();
    let plan = spec.plan().unwrap();
    // Numbered in name order: p0, p1, p10, p100, ..., p99.
    assert_eq!(plan.pod("d", "p0").unwrap().ips[0].to_string(), "10.10.1.2");
    assert_eq!(plan.pod("d", "p10").unwrap().ips[0].to_string(), "10.10.1.4");
    assert_eq!(plan.pod("d", "p99").unwrap().ips[0].to_string(), "10.10.1.254");
    // Every veth on a node has its own name.
    let veths: BTreeSet<_> = plan.pods.iter().map(|p| &p.host_veth).collect();
    assert_eq!(veths.len(), 253);
    let ips: BTreeSet<_> = plan.pods.iter().map(|p| p.ips[0]).collect();
    assert_eq!(ips.len(), 253);
    assert!(!ips.contains(&"10.10.1.255".parse::<IpAddr>().unwrap()));

    spec.pods.push(PodSpec { name: "one-more".into(), namespace: "d".into(), node: "node-a".into() });
    assert_eq!(err(&spec), "node \"node-a\" has 254 pods but its pod CIDR 10.10.1.0/24 holds only 253");
}

#[test]
fn cidr_arithmetic_works_for_both_families() {
    let v4: Cidr = "10.10.0.0/16".parse().unwrap();
    assert_eq!(v4.subnet(24, 3).unwrap().to_string(), "10.10.3.0/24");
    assert_eq!(v4.subnet(24, 256), None);
    assert_eq!(v4.nth(258).unwrap().to_string(), "10.10.1.2");
    assert!(v4.contains("10.10.255.255".parse().unwrap()));
    assert!(!v4.contains("10.11.0.0".parse().unwrap()));
    assert!(!v4.contains("::1".parse().unwrap()));
    assert_eq!("10.10.7.9/16".parse::<Cidr>().unwrap().network().to_string(), "10.10.0.0");

    let v6: Cidr = "fd00:10::/48".parse().unwrap();
    assert_eq!(v6.subnet(64, 2).unwrap().to_string(), "fd00:10:0:2::/64");
    assert_eq!(v6.subnet(64, 2).unwrap().nth(2).unwrap().to_string(), "fd00:10:0:2::2");
    assert_eq!(Cidr::host("fd00::2".parse().unwrap()).to_string(), "fd00::2/128");

    for bad in ["10.0.0.0", "10.0.0.0/33", "x/8", "::/129"] {
        assert!(bad.parse::<Cidr>().is_err(), "{bad}");
    }
    let json = serde_json::to_string(&v6).unwrap();
    assert_eq!(json, "\"fd00:10::/48\"");
    assert_eq!(serde_json::from_str::<Cidr>(&json).unwrap(), v6);
}

#[test]
fn dual_stack_gives_every_node_and_pod_an_ipv6_address_too() {
    let plan = two_by_two().dual_stack().plan().unwrap();
    let b = plan.node("node-b").unwrap();
    assert_eq!(
        b.link_addrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
        ["172.30.0.2/24", "fd30::2/64"]
    );
    assert_eq!(
        b.pod_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>(),
        ["10.10.2.0/24", "fd10:10:0:2::/64"]
    );
    assert_eq!(plan.gateways.iter().map(ToString::to_string).collect::<Vec<_>>(), ["169.254.1.1", "fe80::1"]);
    let pay = plan.pod("shop", "pay").unwrap();
    assert_eq!(pay.ips.iter().map(ToString::to_string).collect::<Vec<_>>(), ["10.10.2.3", "fd10:10:0:2::3"]);
    assert_eq!(pay.ipv6().unwrap().to_string(), "fd10:10:0:2::3");
    // The IPv4 half is the same plan as without IPv6.
    let v4 = two_by_two().plan().unwrap();
    assert_eq!(
        v4.pods.iter().map(|p| p.ips[0]).collect::<Vec<_>>(),
        plan.pods.iter().map(|p| p.ips[0]).collect::<Vec<_>>()
    );
    assert_eq!(v4.pod("shop", "pay").unwrap().ipv6(), None);

    let mut spec = two_by_two().dual_stack();
    spec.ipv6.as_mut().unwrap().gateway = "fd00::1".parse().unwrap();
    assert!(err(&spec).contains("must be link-local"), "{}", err(&spec));
    let mut spec = two_by_two();
    spec.ipv6 = Some(Addressing::default());
    assert!(err(&spec).contains("must be IPv4 and `ipv6` IPv6"), "{}", err(&spec));
}

#[test]
fn the_plan_round_trips_through_json() {
    let plan = two_by_two().plan().unwrap();
    let text = serde_json::to_string(&plan).unwrap();
    assert_eq!(serde_json::from_str::<Plan>(&text).unwrap(), plan);
}
