#![allow(clippy::unwrap_used)]
//! The local cluster on real network namespaces (needs root): pods on two nodes reach each
//! other with their own source IPs, destroy leaves the root namespace as it was, and a cluster
//! left behind by a crash is replaced and removed by name.
//!
//! Without root or `ip netns` these tests print why and pass, unless `CI=true`: then they fail.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use weft::cluster::{self, Cluster, ClusterSpec};

const APP: &str = env!("CARGO_BIN_EXE_weft-app");

/// A cluster name no other test (or test run) uses at the same time.
fn unique_name() -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!("t{}x{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

use weft_core::testing::netns_usable;

/// Destroys the cluster when the test ends, also on panic.
struct Guard(String);

impl Drop for Guard {
    fn drop(&mut self) {
        if let Err(e) = cluster::destroy(&self.0) {
            eprintln!("cleaning up cluster {}: {e}", self.0);
        }
    }
}

/// Starts weft-app (HTTP 8080, TCP echo 9000) in a pod and waits for its `ready` line.
async fn start_app(cluster: &Cluster, namespace: &str, name: &str) -> tokio::process::Child {
    let mut cmd = Command::new(APP);
    cmd.args(["--http", "8080", "--tcp-echo", "9000"]).env("POD_NAME", name).env("POD_NAMESPACE", namespace);
    let mut child = cluster::spawn_in(cluster.pod_netns(namespace, name).unwrap(), &cmd).unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let ready = async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line == "ready" {
                return;
            }
        }
        panic!("weft-app in {namespace}/{name} exited before it was ready");
    };
    tokio::time::timeout(Duration::from_secs(10), ready).await.unwrap();
    child
}

/// `curl` from inside `netns`; the body, or the status code with `-w`.
fn curl(netns: &str, args: &[&str]) -> String {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "curl", "-sS", "--max-time", "5"])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "curl {args:?} in {netns}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn get_json(netns: &str, url: &str) -> serde_json::Value {
    serde_json::from_str(&curl(netns, &[url])).unwrap()
}

fn peer_ip(reply: &serde_json::Value) -> IpAddr {
    reply["peer"].as_str().unwrap().parse::<SocketAddr>().unwrap().ip()
}

/// A TCP echo round trip from inside `netns`.
fn tcp_echo(cluster_netns: &str, to: IpAddr, message: &[u8]) -> Vec<u8> {
    cluster::in_netns(cluster_netns, || {
        let mut stream =
            TcpStream::connect_timeout(&SocketAddr::new(to, 9000), Duration::from_secs(5)).unwrap();
        stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        stream.write_all(message).unwrap();
        stream.shutdown(std::net::Shutdown::Write).unwrap();
        let mut back = Vec::new();
        stream.read_to_end(&mut back).unwrap();
        back
    })
    .unwrap()
}

/// What must be the same before create and after destroy: the root namespace's interfaces,
/// rules and routes, both families.
fn root_snapshot() -> Vec<(String, String)> {
    [
        vec!["link"],
        vec!["addr"],
        vec!["rule"],
        vec!["route", "show", "table", "all"],
        vec!["-6", "rule"],
        vec!["-6", "route", "show", "table", "all"],
    ]
    .into_iter()
    .map(|args| (args.join(" "), cluster::ip(&args).unwrap()))
    .collect()
}

fn namespaces() -> BTreeSet<String> {
    cluster::list_netns().unwrap().into_iter().collect()
}

fn ours(prefix: &str) -> BTreeSet<String> {
    namespaces().into_iter().filter(|n| n.starts_with(prefix)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_on_two_nodes_reach_each_other_with_their_own_ips() {
    if !netns_usable("pods_on_two_nodes_reach_each_other_with_their_own_ips") {
        return;
    }
    let name = unique_name();
    let _guard = Guard(name.clone());
    let spec = ClusterSpec::new(&name)
        .pod("default", "client", "node-a")
        .pod("default", "neighbour", "node-a")
        .pod("default", "remote", "node-b")
        .pod("shop", "cart", "node-b");
    let cluster = Cluster::create(spec.plan().unwrap()).unwrap();

    let mut apps = Vec::new();
    for pod in cluster.plan().pods.clone() {
        apps.push(start_app(&cluster, &pod.namespace, &pod.name).await);
    }
    let client_ns = cluster.pod_netns("default", "client").unwrap().to_string();
    let client_ip = cluster.pod_ip("default", "client").unwrap();

    for (namespace, pod) in [("default", "remote"), ("default", "neighbour"), ("shop", "cart")] {
        let ip = cluster.pod_ip(namespace, pod).unwrap();
        let reply = get_json(&client_ns, &format!("http://{ip}:8080/hello?x=1"));
        assert_eq!(reply["pod"], pod, "{reply}");
        assert_eq!(reply["namespace"], namespace, "{reply}");
        assert_eq!(reply["path"], "/hello?x=1", "{reply}");
        assert_eq!(reply["local"], format!("{ip}:8080"), "{reply}");
        assert_eq!(peer_ip(&reply), client_ip, "{namespace}/{pod} saw another caller: {reply}");
        assert_eq!(tcp_echo(&client_ns, ip, b"ping through the node"), b"ping through the node");
    }
    // And the other way round, from node-b to node-a.
    let remote_ns = cluster.pod_netns("default", "remote").unwrap().to_string();
    let reply = get_json(&remote_ns, &format!("http://{client_ip}:8080/"));
    assert_eq!(peer_ip(&reply), cluster.pod_ip("default", "remote").unwrap());

    let remote_ip = cluster.pod_ip("default", "remote").unwrap();
    let code = curl(
        &client_ns,
        &["-o", "/dev/null", "-w", "%{http_code}", &format!("http://{remote_ip}:8080/status/418")],
    );
    assert_eq!(code, "418");

    // The node reaches its pods too (where ztunnel will run), from its link address.
    let node_a = cluster.node("node-a").unwrap().clone();
    let reply =
        get_json(&node_a.netns, &format!("http://{}:8080/", cluster.pod_ip("default", "neighbour").unwrap()));
    assert_eq!(peer_ip(&reply), IpAddr::V4(node_a.link_ipv4().unwrap()));

    // weft-app exits cleanly on SIGTERM.
    let app = apps.pop().unwrap();
    let pid = nix::unistd::Pid::from_raw(i32::try_from(app.id().unwrap()).unwrap());
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = tokio::time::timeout(Duration::from_secs(5), app.wait_with_output()).await.unwrap().unwrap();
    assert!(status.status.success(), "{status:?}");

    cluster.destroy().unwrap();
    assert!(ours(&format!("weft-{name}-")).is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_leaves_the_root_namespace_as_it_was() {
    if !netns_usable("destroy_leaves_the_root_namespace_as_it_was") {
        return;
    }
    let name = unique_name();
    let prefix = format!("weft-{name}-");
    let _guard = Guard(name.clone());
    let root_before = root_snapshot();
    let netns_before = namespaces();

    // Three nodes: the bridge in the fabric namespace, not just a veth.
    let mut spec = ClusterSpec::new(&name).pod("default", "a", "n1").pod("default", "c", "n3");
    spec.nodes = vec!["n1".into(), "n2".into(), "n3".into()];
    let cluster = Cluster::create(spec.plan().unwrap()).unwrap();
    let made: BTreeSet<String> = cluster.plan().netns_names().into_iter().collect();
    assert_eq!(ours(&prefix), made);
    assert!(made.contains(&format!("{prefix}fabric")));
    assert!(cluster::state_dir(&name).join("cluster.json").exists());
    assert_eq!(Cluster::load(&name).unwrap().plan(), cluster.plan());
    assert_eq!(root_snapshot(), root_before, "create changed the root namespace");

    // Across the bridge, and a process left running that destroy must stop.
    let mut app = start_app(&cluster, "default", "c").await;
    let reply = get_json(
        cluster.pod_netns("default", "a").unwrap(),
        &format!("http://{}:8080/", cluster.pod_ip("default", "c").unwrap()),
    );
    assert_eq!(peer_ip(&reply), cluster.pod_ip("default", "a").unwrap());

    let before_destroy = namespaces();
    cluster.destroy().unwrap();
    let exited = tokio::time::timeout(Duration::from_secs(5), app.wait()).await;
    assert!(exited.is_ok(), "destroy left weft-app running in its pod");

    assert_eq!(root_snapshot(), root_before, "destroy did not restore the root namespace");
    assert!(ours(&prefix).is_empty());
    assert!(netns_before.iter().all(|n| !n.starts_with(&prefix)));
    // Every other namespace was left alone (but those of tests running beside this one, which
    // come and go by themselves).
    let siblings = format!("weft-t{}x", std::process::id());
    let after = namespaces();
    let removed: Vec<_> = before_destroy
        .iter()
        .filter(|n| !made.contains(*n) && !n.starts_with(&siblings) && !after.contains(*n))
        .collect();
    assert!(removed.is_empty(), "destroy removed namespaces that were not its own: {removed:?}");
    assert!(!cluster::state_dir(&name).exists());
}

#[test]
fn a_crashed_cluster_is_replaced_and_removed_by_name() {
    if !netns_usable("a_crashed_cluster_is_replaced_and_removed_by_name") {
        return;
    }
    let name = unique_name();
    let prefix = format!("weft-{name}-");
    let _guard = Guard(name.clone());
    let spec = ClusterSpec::new(&name).pod("default", "p", "node-a").pod("default", "q", "node-b");

    // A first run "crashes": the handle is forgotten and a process stays in a pod.
    let first = Cluster::create(spec.plan().unwrap()).unwrap();
    let mut orphan = Command::new("ip")
        .args(["netns", "exec", first.pod_netns("default", "p").unwrap(), "sleep", "600"])
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    std::mem::forget(first);

    let second = Cluster::create(spec.plan().unwrap()).unwrap();
    let wait_exit = (0..250).find_map(|_| {
        std::thread::sleep(Duration::from_millis(20));
        orphan.try_wait().unwrap()
    });
    assert!(wait_exit.is_some(), "create did not stop the process the crashed cluster left");
    let made: BTreeSet<String> = second.plan().netns_names().into_iter().collect();
    assert_eq!(ours(&prefix), made);
    let q = second.pod_ip("default", "q").unwrap();
    let reply = {
        let mut app = Command::new(APP);
        app.args(["--tcp-echo", "9000"]);
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let mut child = cluster::spawn_in(second.pod_netns("default", "q").unwrap(), &app).unwrap();
            let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
            while lines.next_line().await.unwrap().is_some_and(|l| l != "ready") {}
            let reply = tcp_echo(second.pod_netns("default", "p").unwrap(), q, b"again");
            drop(child);
            reply
        })
    };
    assert_eq!(reply, b"again");

    // `weft down` needs nothing but the name; a second time is a no-op.
    for _ in 0..2 {
        let out = Command::new(env!("CARGO_BIN_EXE_weft")).args(["down", "--name", &name]).output().unwrap();
        assert!(out.status.success(), "weft down: {}", String::from_utf8_lossy(&out.stderr));
    }
    assert!(ours(&prefix).is_empty());
    assert!(!cluster::state_dir(&name).exists());
    // A name that could reach other clusters' namespaces is refused before anything is removed.
    let out = Command::new(env!("CARGO_BIN_EXE_weft")).args(["down", "--name", "t-"]).output().unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("cluster name"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dual_stack_pods_reach_each_other_over_both_families() {
    if !netns_usable("dual_stack_pods_reach_each_other_over_both_families") {
        return;
    }
    let name = unique_name();
    let _guard = Guard(name.clone());
    let spec = ClusterSpec::new(&name)
        .dual_stack()
        .pod("default", "client", "node-a")
        .pod("default", "neighbour", "node-a")
        .pod("default", "server", "node-b");
    let cluster = Cluster::create(spec.plan().unwrap()).unwrap();
    let client = cluster.pod("default", "client").unwrap().clone();
    let mut apps = Vec::new();
    for pod in ["neighbour", "server"] {
        apps.push(start_app(&cluster, "default", pod).await);
    }
    for pod in ["neighbour", "server"] {
        let server = cluster.pod("default", pod).unwrap();
        for (ip, own) in server.ips.iter().zip(&client.ips) {
            let reply = get_json(&client.netns, &format!("http://{}/", SocketAddr::new(*ip, 8080)));
            assert_eq!(reply["pod"], pod, "{reply}");
            assert_eq!(peer_ip(&reply), *own, "{reply}");
            assert_eq!(tcp_echo(&client.netns, *ip, b"both families"), b"both families");
        }
    }
    drop(apps);
    cluster.destroy().unwrap();
}
