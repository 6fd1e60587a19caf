#![allow(clippy::unwrap_used, clippy::expect_used)]
//! End to end: the local mesh as `weft up` runs it (controller, a ztunnel per node, weft-app
//! pods, real eBPF capture, real mutual TLS), checked from outside with curl, iperf3, tcpdump
//! on the link between the nodes, the ztunnels' metrics and a real Prometheus server.
//!
//! Needs root, `ip netns`, tcpdump, curl, iperf3, prometheus and bpftool; without them the
//! tests print why and pass, unless `CI=true`: then they fail. Each test has its own cluster
//! (`<tag><pid>`), removed when the test ends, also on panic.

mod e2e_support;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::IpAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use e2e_support::*;
use weft::cluster;
use weft::up;

/// The secret a client sends; it must never cross the link in clear text.
const SECRET: &str = "weft-e2e-secret-payload-4f1c";

#[test]
fn hbone_carries_pod_and_service_traffic_between_nodes_encrypted_with_the_source_ip() {
    if !usable("hbone") {
        return;
    }
    let yaml = namespace("shop", true)
        + &pod("shop", "client", "node-a")
        + &pod("shop", "server", "node-b")
        + &service("shop", "server", "10.96.0.20", "server");
    let t = TestMesh::up("hbone", &[("mesh.yaml", yaml)]);
    let (client_ns, client_ip, server_ip) =
        (t.netns("shop", "client"), t.ip("shop", "client"), t.ip("shop", "server"));

    let capture = Capture::start(&t.node_netns("node-a"), "eth0");
    // Pod to pod: the secret in a header (echoed back in the body) and through the TCP echo.
    let reply = get_json(&client_ns, &format!("http://{server_ip}:8080/pod?q={SECRET}"));
    assert_eq!(reply["pod"], "server", "{reply}");
    assert_eq!(peer_ip(&reply), client_ip, "the server did not see the client's own address: {reply}");
    // Pod to service (virtual IP, port 80 → 8080).
    let reply = get_json(&client_ns, &format!("http://10.96.0.20/service?q={SECRET}"));
    assert_eq!(reply["pod"], "server", "{reply}");
    assert_eq!(peer_ip(&reply), client_ip, "{reply}");
    let echoed = cluster::in_netns(&client_ns, || -> std::io::Result<Vec<u8>> {
        let addr = std::net::SocketAddr::new(server_ip, 9000);
        let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.write_all(SECRET.as_bytes())?;
        stream.shutdown(std::net::Shutdown::Write)?;
        let mut back = Vec::new();
        stream.read_to_end(&mut back)?;
        Ok(back)
    })
    .unwrap();
    let (segments, bytes) = capture.stop();

    let ports = pod_dports(&segments);
    assert!(ports.contains_key(&15008), "no HBONE (port 15008) on the link: {ports:?}\n{}", t.logs());
    assert_eq!(
        ports.keys().copied().collect::<Vec<_>>(),
        vec![15008],
        "pod traffic crossed the link to ports other than 15008: {ports:?}"
    );
    assert!(!contains(&bytes, SECRET.as_bytes()), "the client's payload crossed the link in clear text");
    assert!(!contains(&bytes, b"\"pod\":\"server\""), "the server's reply crossed the link in clear text");
    assert_eq!(echoed.unwrap(), SECRET.as_bytes(), "TCP echo through HBONE");
}

#[test]
fn a_namespace_without_the_label_is_untouched_and_labeling_it_enrolls_within_two_seconds() {
    if !usable("label") {
        return;
    }
    let pods = pod("plain", "a", "node-a") + &pod("plain", "b", "node-b");
    let t = TestMesh::up("label", &[("ns.yaml", namespace("plain", false)), ("pods.yaml", pods)]);
    let (a_ns, a_ip, b_ip) = (t.netns("plain", "a"), t.ip("plain", "a"), t.ip("plain", "b"));
    let url = format!("http://{b_ip}:8080/");

    let capture = Capture::start(&t.node_netns("node-a"), "eth0");
    let reply = get_json(&a_ns, &url);
    assert_eq!(peer_ip(&reply), a_ip);
    let ports = pod_dports(&capture.segments());
    assert!(ports.contains_key(&8080) && !ports.contains_key(&15008), "not direct: {ports:?}");

    // Label it: the next calls go through HBONE.
    let seen = capture.segments().len();
    let labeled = Instant::now();
    t.write_config("ns.yaml", &namespace("plain", true));
    let enrolled = poll(Duration::from_secs(10), || {
        let ok = curl(&a_ns, 1, &[&url]).is_ok();
        let hbone = capture.segments()[seen..].iter().any(|s| s.dst == to_v4(b_ip) && s.dport == 15008);
        (ok && hbone).then(|| labeled.elapsed())
    });
    let enrolled =
        enrolled.unwrap_or_else(|| panic!("labeling did not enroll the pods in 10 s\n{}", t.logs()));
    eprintln!("enrolled {enrolled:?} after the label was written");
    assert!(enrolled <= Duration::from_secs(2), "enrolling took {enrolled:?} (more than 2 s)");
    let reply = get_json(&a_ns, &url);
    assert_eq!(peer_ip(&reply), a_ip, "{reply}");

    // Remove the label: direct again.
    let seen = capture.segments().len();
    let unlabeled = Instant::now();
    t.write_config("ns.yaml", &namespace("plain", false));
    let left = poll(Duration::from_secs(10), || {
        let ok = curl(&a_ns, 1, &[&url]).is_ok();
        let direct = capture.segments()[seen..].iter().any(|s| s.dst == to_v4(b_ip) && s.dport == 8080);
        (ok && direct).then(|| unlabeled.elapsed())
    });
    let left =
        left.unwrap_or_else(|| panic!("removing the label did not unenroll the pods in 10 s\n{}", t.logs()));
    eprintln!("unenrolled {left:?} after the label was removed");
    assert!(left <= Duration::from_secs(2), "unenrolling took {left:?}");
    // And stays direct: a last call with a fresh look at the link.
    let seen = capture.segments().len();
    get_json(&a_ns, &url);
    let ports = pod_dports(&capture.segments()[seen..]);
    assert!(!ports.contains_key(&15008), "still HBONE after unlabeling: {ports:?}");
}

#[test]
fn open_connections_survive_enrollment_and_unenrollment() {
    if !usable("keep") {
        return;
    }
    let pods = pod("plain", "a", "node-a") + &pod("plain", "b", "node-b");
    let t = TestMesh::up("keep", &[("ns.yaml", namespace("plain", false)), ("pods.yaml", pods)]);
    let (a_ns, b_ip) = (t.netns("plain", "a"), t.ip("plain", "b"));
    let url = format!("http://{b_ip}:8080/");
    let echo = std::net::SocketAddr::new(b_ip, 9000);
    let capture = Capture::start(&t.node_netns("node-a"), "eth0");
    // Segments of the client's connection `port` on the link, and of HBONE, after `seen`.
    let on_link = |seen: usize, port: u16| {
        let segments = capture.segments();
        let direct = segments[seen..].iter().filter(|s| s.sport == port && s.dport == 9000).count();
        let hbone = segments[seen..].iter().filter(|s| s.dst == to_v4(b_ip) && s.dport == 15008).count();
        (direct, hbone)
    };

    let mut before = EchoStream::open(&a_ns, echo);
    before.keeps_flowing("before enrollment", 10_000);

    let seen = capture.segments().len();
    t.write_config("ns.yaml", &namespace("plain", true));
    let enrolled = poll(Duration::from_secs(10), || {
        let ok = curl(&a_ns, 1, &[&url]).is_ok();
        (ok && on_link(seen, 0).1 > 0).then_some(())
    });
    enrolled.unwrap_or_else(|| panic!("labeling did not enroll the pods in 10 s\n{}", t.logs()));
    let seen = capture.segments().len();
    before.keeps_flowing("through enrollment", 50_000);
    let (direct, _) = on_link(seen, before.local_port);
    assert!(direct > 0, "the stream opened before enrollment left the direct path");
    let mut during = EchoStream::open(&a_ns, echo);
    during.keeps_flowing("opened while enrolled", 10_000);
    let (direct, _) = on_link(seen, during.local_port);
    assert_eq!(direct, 0, "a stream opened while enrolled went direct, not through HBONE");

    let seen = capture.segments().len();
    t.write_config("ns.yaml", &namespace("plain", false));
    let left = poll(Duration::from_secs(10), || {
        let ok = curl(&a_ns, 1, &[&url]).is_ok();
        let direct = capture.segments()[seen..].iter().any(|s| s.dst == to_v4(b_ip) && s.dport == 8080);
        (ok && direct).then_some(())
    });
    left.unwrap_or_else(|| panic!("removing the label did not unenroll the pods in 10 s\n{}", t.logs()));
    let seen = capture.segments().len();
    before.keeps_flowing("the first stream, through unenrollment", 50_000);
    during.keeps_flowing("the stream opened while enrolled, through unenrollment", 50_000);
    let (direct, hbone) = on_link(seen, during.local_port);
    assert!(
        direct == 0 && hbone > 0,
        "the enrolled stream left HBONE: {direct} direct segments, {hbone} HBONE"
    );
    for (what, stream) in [("before", &mut before), ("during", &mut during)] {
        let result = stream.finish();
        assert!(result.is_ok(), "the stream opened {what} enrollment failed: {result:?}\n{}", t.logs());
    }
    eprintln!("echoed {} and {} bytes", before.echoed(), during.echoed());
}

#[test]
fn strict_peer_authentication_refuses_plaintext_and_permissive_admits_it() {
    if !usable("mtls") {
        return;
    }
    let pods = namespace("mesh", true)
        + &namespace("legacy", false)
        + &pod("mesh", "server", "node-b")
        + &pod("mesh", "client", "node-a")
        + &pod("legacy", "outsider", "node-a");
    let pa = |mode: &str| {
        format!(
            "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata:\n  name: default\n  namespace: mesh\n\
             spec:\n  mtls:\n    mode: {mode}\n"
        )
    };
    let t = TestMesh::up("mtls", &[("pods.yaml", pods), ("pa.yaml", pa("PERMISSIVE"))]);
    let (outsider_ns, outsider_ip, client_ns) =
        (t.netns("legacy", "outsider"), t.ip("legacy", "outsider"), t.netns("mesh", "client"));
    let url = format!("http://{}:8080/", t.ip("mesh", "server"));

    let reply = get_json(&outsider_ns, &url);
    assert_eq!(peer_ip(&reply), outsider_ip, "PERMISSIVE: {reply}");

    t.write_config("pa.yaml", &pa("STRICT"));
    let refused = poll(Duration::from_secs(10), || curl(&outsider_ns, 2, &[&url]).err());
    let refused = refused.unwrap_or_else(|| panic!("STRICT still admits plaintext after 10 s\n{}", t.logs()));
    eprintln!("STRICT refused the outsider: {refused}");
    get_json(&client_ns, &url); // a mesh client still gets in

    t.write_config("pa.yaml", &pa("PERMISSIVE"));
    let back = poll(Duration::from_secs(10), || curl(&outsider_ns, 2, &[&url]).ok());
    assert!(back.is_some(), "PERMISSIVE again did not admit the outsider\n{}", t.logs());
}

#[test]
fn l4_authorization_deny_for_a_principal_and_allow_for_one_namespace() {
    if !usable("authz") {
        return;
    }
    let pods = namespace("shop", true)
        + &namespace("other", true)
        + &pod("shop", "server", "node-b")
        + &pod("shop", "good", "node-a")
        + &pod("shop", "bad", "node-a")
        + &pod("other", "stranger", "node-a");
    let deny = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: policy\n  namespace: shop\n\
                spec:\n  selector:\n    matchLabels:\n      app: server\n  action: DENY\n  rules:\n  - from:\n    - source:\n        \
                principals: [cluster.local/ns/shop/sa/bad]\n";
    let allow = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: policy\n  namespace: shop\n\
                 spec:\n  selector:\n    matchLabels:\n      app: server\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        \
                 namespaces: [shop]\n";
    let t = TestMesh::up("authz", &[("pods.yaml", pods), ("policy.yaml", deny.to_string())]);
    let url = format!("http://{}:8080/", t.ip("shop", "server"));
    let (good, bad, stranger) =
        (t.netns("shop", "good"), t.netns("shop", "bad"), t.netns("other", "stranger"));

    assert_eq!(peer_ip(&get_json(&good, &url)), t.ip("shop", "good"));
    let refused = curl(&bad, 3, &[&url]);
    assert!(refused.is_err(), "DENY let shop/bad in: {refused:?}\n{}", t.logs());
    assert_eq!(peer_ip(&get_json(&stranger, &url)), t.ip("other", "stranger"), "no ALLOW yet: others get in");
    // The refusal shows in node-b's metrics, against the caller's principal.
    let denied = poll(Duration::from_secs(5), || {
        let m = t.metrics("node-b");
        let n = counter(
            &m,
            "istio_tcp_connections_closed_total",
            &["response_flags=\"DENY\"", "source_principal=\"spiffe://cluster.local/ns/shop/sa/bad\""],
        );
        (n >= 1.0).then_some(n)
    });
    assert!(
        denied.is_some(),
        "no closed connection with response_flags=\"DENY\" from shop/bad:\n{}",
        t.metrics("node-b").lines().filter(|l| l.starts_with("istio_tcp")).collect::<Vec<_>>().join("\n")
    );

    // ALLOW only namespace shop: the stranger from `other` is shut out, shop's pods get in.
    t.write_config("policy.yaml", allow);
    let shut = poll(Duration::from_secs(10), || curl(&stranger, 2, &[&url]).err());
    assert!(shut.is_some(), "ALLOW for namespace shop still admits other/stranger\n{}", t.logs());
    assert_eq!(peer_ip(&get_json(&good, &url)), t.ip("shop", "good"));
    assert_eq!(peer_ip(&get_json(&bad, &url)), t.ip("shop", "bad"), "the DENY is gone; shop/bad is in shop");
}

/// A TCP connection from a pod's namespace (the socket stays in it), with a read timeout.
fn connect_in(netns: &str, to: std::net::SocketAddr) -> std::net::TcpStream {
    let stream =
        weft_core::netns::run_in(netns, || std::net::TcpStream::connect_timeout(&to, Duration::from_secs(5)))
            .unwrap()
            .unwrap_or_else(|e| panic!("connect {to} from {netns}: {e}"));
    stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    stream
}

/// Sends `msg` on an open connection to weft-app's TCP echo and reads it back.
fn echo(stream: &mut std::net::TcpStream, msg: &[u8]) -> std::io::Result<()> {
    stream.write_all(msg)?;
    let mut back = vec![0u8; msg.len()];
    stream.read_exact(&mut back)?;
    assert_eq!(back, msg);
    Ok(())
}

#[test]
fn a_deny_written_while_connections_are_open_closes_only_the_denied_ones() {
    if !usable("recheck") {
        return;
    }
    let pods = namespace("shop", true)
        + &pod("shop", "server", "node-b")
        + &pod("shop", "good", "node-a")
        + &pod("shop", "bad", "node-a");
    let t = TestMesh::up("recheck", &[("pods.yaml", pods)]);
    let server = std::net::SocketAddr::new(t.ip("shop", "server"), 9000);
    let mut good = connect_in(&t.netns("shop", "good"), server);
    let mut bad = connect_in(&t.netns("shop", "bad"), server);
    echo(&mut good, b"good, before").unwrap();
    echo(&mut bad, b"bad, before").unwrap();

    // shop/bad's connection, watched until it is closed: when, and how.
    let watcher = {
        let mut bad = bad.try_clone().unwrap();
        bad.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            loop {
                match bad.read(&mut buf) {
                    Ok(0) => return Ok(Instant::now()),
                    Ok(_) => continue,
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(Instant::now()),
                    Err(e) => return Err(e),
                }
            }
        })
    };

    let deny = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-bad\n  namespace: shop\n\
                spec:\n  selector:\n    matchLabels:\n      app: server\n  action: DENY\n  rules:\n  - from:\n    - source:\n        \
                principals: [cluster.local/ns/shop/sa/bad]\n";
    let written = Instant::now();
    t.write_config("policy.yaml", deny);
    // When node-b's ztunnel holds the policy (polled every 10 ms: the bound is one poll late).
    let applied = poll_fast(Duration::from_secs(10), || {
        let (status, dump) = t.mesh.ztunnel_get("node-b", up::ADMIN_PORT, "/config_dump").ok()?;
        (status == 200 && dump.contains("deny-bad")).then(Instant::now)
    })
    .unwrap_or_else(|| panic!("node-b never showed the policy deny-bad\n{}", t.logs()));
    let closed = watcher.join().unwrap().unwrap_or_else(|e| {
        panic!("shop/bad's connection was not closed within 15 s of the DENY ({e})\n{}", t.logs())
    });
    let after_applied = closed.saturating_duration_since(applied);
    eprintln!(
        "shop/bad closed {:?} after node-b showed the policy ({:?} after the write; node-b showed it {:?} after the write)",
        after_applied,
        closed - written,
        applied - written
    );
    assert!(
        after_applied <= Duration::from_secs(1),
        "closed {after_applied:?} after node-b applied the DENY"
    );
    // No bytes pass any more; shop/good's connection carries on.
    assert!(echo(&mut bad, b"bad, after").is_err(), "shop/bad's connection still echoes");
    for i in 0..5 {
        echo(&mut good, format!("good, after {i}").as_bytes())
            .unwrap_or_else(|e| panic!("shop/good's connection broke after the DENY: {e}\n{}", t.logs()));
    }

    let bad_principal = "source_principal=\"spiffe://cluster.local/ns/shop/sa/bad\"";
    let good_principal = "source_principal=\"spiffe://cluster.local/ns/shop/sa/good\"";
    let closed_deny = poll(Duration::from_secs(5), || {
        let m = t.metrics("node-b");
        let n =
            counter(&m, "istio_tcp_connections_closed_total", &["response_flags=\"DENY\"", bad_principal]);
        (n >= 1.0).then_some(m)
    })
    .unwrap_or_else(|| {
        panic!("node-b counted no DENY-flagged closed connection for shop/bad:\n{}", t.metrics("node-b"))
    });
    let good_closed = counter(&closed_deny, "istio_tcp_connections_closed_total", &[good_principal]);
    assert_eq!(good_closed, 0.0, "shop/good's connection counted closed:\n{closed_deny}");
    let log = t.logs();
    assert!(
        log.contains("connection closed: denied by shop/deny-bad after a policy update"),
        "no log of the close naming the policy:\n{log}"
    );
}

/// [`poll`] every 10 ms.
fn poll_fast<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Some(v) = f() {
            return Some(v);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

#[test]
fn prometheus_scrapes_both_ztunnels() {
    if !usable("prom") {
        return;
    }
    let yaml = namespace("shop", true) + &pod("shop", "client", "node-a") + &pod("shop", "server", "node-b");
    let t = TestMesh::up("prom", &[("mesh.yaml", yaml)]);
    let client_ns = t.netns("shop", "client");
    let url = format!("http://{}:8080/", t.ip("shop", "server"));
    for _ in 0..3 {
        get_json(&client_ns, &url);
    }

    let node_a = t.node_netns("node-a");
    let targets: Vec<String> = ["node-a", "node-b"]
        .iter()
        .map(|n| format!("{}:{}", t.mesh.node_ip(n).unwrap(), up::METRICS_PORT))
        .collect();
    let prometheus = Prometheus::start(&node_a, "ztunnel", &targets);
    let query = "istio_tcp_connections_opened_total";
    let found = poll(Duration::from_secs(30), || {
        let result = prometheus.query(query)?;
        let instances: BTreeSet<String> = result
            .iter()
            .filter(|r| r["value"][1].as_str().and_then(|v| v.parse::<f64>().ok()).is_some_and(|v| v > 0.0))
            .filter_map(|r| r["metric"]["instance"].as_str().map(String::from))
            .collect();
        (instances.len() == 2).then_some((instances, result.len()))
    });
    let (instances, series) = found.unwrap_or_else(|| {
        panic!(
            "Prometheus never had non-zero istio_tcp_connections_opened_total from both ztunnels; \
             last answer: {:?}\nprometheus log tail: {}",
            prometheus.query(query),
            prometheus.log_tail()
        )
    });
    eprintln!("Prometheus has {series} series from {instances:?}");
    let up = curl(&node_a, 2, &["http://127.0.0.1:9090/api/v1/query?query=up"]).unwrap();
    assert_eq!(up.matches("\"1\"]").count(), 2, "both targets up: {up}");
}

#[test]
fn controller_and_ztunnel_crashes() {
    if !usable("crash") {
        return;
    }
    let (mut t, client_ns, url, iperf_ip) = client_server_and_iperf("crash");

    // 1. The controller dies while curl and iperf3 run: nothing fails.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(std::sync::Mutex::new(Vec::new())));
    let looper = {
        let (stop, ok, failed, ns, url) =
            (stop.clone(), ok.clone(), failed.clone(), client_ns.clone(), url.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                match curl(&ns, 5, &[&url]) {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(e) => {
                        failed.lock().unwrap().push(e);
                        0
                    }
                };
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let iperf = iperf_client(&client_ns, iperf_ip, &["-t", "5"]);
    std::thread::sleep(Duration::from_secs(1));
    t.mesh.kill("controller").unwrap();
    let iperf = iperf.join().unwrap();
    stop.store(true, Ordering::Relaxed);
    looper.join().unwrap();
    let failed = failed.lock().unwrap().clone();
    assert!(failed.is_empty(), "requests failed while the controller was down: {failed:?}");
    assert!(ok.load(Ordering::Relaxed) >= 10, "too few requests ran: {}", ok.load(Ordering::Relaxed));
    let report: serde_json::Value = serde_json::from_slice(&iperf.stdout).unwrap_or_default();
    assert!(
        iperf.status.success() && report.get("error").is_none(),
        "iperf3 failed while the controller was down: {}{}",
        String::from_utf8_lossy(&iperf.stdout),
        String::from_utf8_lossy(&iperf.stderr)
    );
    let bits = report["end"]["sum_received"]["bits_per_second"].as_f64().unwrap_or(0.0);
    eprintln!("iperf3 through HBONE with the controller down: {:.0} Mbit/s", bits / 1e6);
    assert!(bits > 0.0);
    t.mesh.start_controller().unwrap();

    // 2. node-a's ztunnel dies: new connections from its enrolled pods fail, none in clear text.
    t.mesh.kill(&up::ztunnel_process("node-a")).unwrap();
    let capture = Capture::start(&t.node_netns("node-a"), "eth0");
    for _ in 0..3 {
        let r = curl(&client_ns, 2, &[&url]);
        assert!(r.is_err(), "a new connection got through with node-a's ztunnel down: {r:?}");
    }
    let (segments, _) = capture.stop();
    let ports = pod_dports(&segments);
    assert!(!ports.contains_key(&8080), "pod traffic leaked to the app port in clear text: {ports:?}");

    // 3. Restarted, it takes the capture over and traffic resumes.
    t.mesh.start_ztunnel("node-a").unwrap();
    t.mesh.wait_ztunnel_ready("node-a").unwrap();
    let resumed = poll(Duration::from_secs(15), || curl(&client_ns, 2, &[&url]).ok());
    assert!(resumed.is_some(), "traffic did not resume after ztunnel restarted\n{}", t.logs());
    assert_eq!(peer_ip(&get_json(&client_ns, &url)), t.ip("shop", "client"));
}

#[test]
fn a_ztunnel_upgrade_drops_nothing() {
    if !usable("upgrade") {
        return;
    }
    let (mut t, client_ns, url, iperf_ip) = client_server_and_iperf("upgrade");

    // Load: curl loops, each request on a connection of its own (Connection: close), and an
    // iperf3 stream, all through both ztunnels.
    let stop = Arc::new(AtomicBool::new(false));
    let loops: Vec<_> = (0..3)
        .map(|_| {
            let (stop, ns, url) = (stop.clone(), client_ns.clone(), url.clone());
            std::thread::spawn(move || {
                let mut all = Vec::new();
                while !stop.load(Ordering::Relaxed) {
                    all.extend(replies_n(&ns, 5, &["-H", "Connection: close"], &url, 50));
                }
                all
            })
        })
        .collect();
    let iperf = iperf_client(&client_ns, iperf_ip, &["-t", "10", "-b", "200M"]);
    let started = Instant::now();
    std::thread::sleep(Duration::from_secs(2));
    // Each node in turn, as a rollout goes: the new process takes over, the old one drains.
    for node in ["node-b", "node-a"] {
        t.mesh.upgrade_ztunnel(node).unwrap();
        t.mesh.wait_ztunnel_ready(node).unwrap();
        let old = format!("{}-old", up::ztunnel_process(node));
        assert!(t.mesh.pid(&old).is_some(), "the old ztunnel of {node} exited at once, not draining");
        let took = poll(Duration::from_secs(10), || {
            let log =
                std::fs::read_to_string(t.mesh.log_path(&up::ztunnel_process(node))).unwrap_or_default();
            log.contains("took over the listeners of the ztunnel this one replaces").then_some(())
        });
        assert!(took.is_some(), "{node}'s new ztunnel never took over\n{}", t.logs());
        // As the DaemonSet controller deletes the old pod once the new one is ready.
        t.mesh.terminate(&old).unwrap();
        std::thread::sleep(Duration::from_secs(2));
        assert!(t.mesh.pid(&old).is_some(), "{node}'s old ztunnel exited with the iperf3 stream open");
    }
    let iperf = iperf.join().unwrap();
    let ended = Instant::now();
    // The old processes drain: each exits once its last connection (the iperf3 stream) ends.
    for node in ["node-a", "node-b"] {
        let old = format!("{}-old", up::ztunnel_process(node));
        let exited = poll(Duration::from_secs(20), || t.mesh.pid(&old).is_none().then(|| ended.elapsed()));
        let exited =
            exited.unwrap_or_else(|| panic!("{node}'s old ztunnel still runs 20 s after the stream ended"));
        eprintln!("{node}: the old ztunnel exited {exited:?} after the stream ended");
    }
    stop.store(true, Ordering::Relaxed);
    let replies: Vec<Reply> = loops.into_iter().flat_map(|l| l.join().unwrap()).collect();
    let secs = started.elapsed().as_secs_f64();
    let failed: Vec<&Reply> = replies.iter().filter(|r| r.code != 200).collect();
    eprintln!(
        "{} requests in {secs:.1} s ({:.0}/s), {} failed",
        replies.len(),
        replies.len() as f64 / secs,
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}\n{}",
        failed.len(),
        replies.len(),
        codes(&replies),
        t.logs()
    );
    assert!(replies.len() as f64 / secs >= 200.0, "the load was under 200 requests/s");
    let report: serde_json::Value = serde_json::from_slice(&iperf.stdout).unwrap_or_default();
    assert!(
        iperf.status.success() && report.get("error").is_none(),
        "the iperf3 stream did not survive the upgrade: {}{}",
        String::from_utf8_lossy(&iperf.stdout),
        String::from_utf8_lossy(&iperf.stderr)
    );
    let intervals: Vec<f64> = report["intervals"]
        .as_array()
        .map(|a| a.iter().filter_map(|i| i["sum"]["bits_per_second"].as_f64()).collect())
        .unwrap_or_default();
    eprintln!(
        "iperf3 per second through the upgrades, Mbit/s: {:?}",
        intervals.iter().map(|b| (b / 1e6).round()).collect::<Vec<_>>()
    );
    assert!(intervals.iter().all(|b| *b > 0.0), "the stream stalled for a second: {intervals:?}");
    // After the upgrade the mesh works as before.
    assert_eq!(peer_ip(&get_json(&client_ns, &url)), t.ip("shop", "client"));
}

#[test]
fn weft_down_leaves_the_host_as_before_weft_up() {
    if !usable("down") {
        return;
    }
    let name = cluster_name("down");
    let prefix = format!("weft-{name}-");
    let dir = tempfile::tempdir().unwrap();
    let yaml = namespace("shop", true) + &pod("shop", "client", "node-a") + &pod("shop", "server", "node-b");
    std::fs::write(dir.path().join("mesh.yaml"), yaml).unwrap();
    struct Guard(String);
    impl Drop for Guard {
        fn drop(&mut self) {
            let _ = cluster::destroy(&self.0);
        }
    }
    let _guard = Guard(name.clone());
    let weft = bin_dir().join("weft");
    let bin_dir = bin_dir();

    let host_before = host_snapshot();
    let netns_before = other_netns(&prefix);
    let progs_before = bpf_programs();

    let out = Command::new(&weft)
        .args(["up", dir.path().to_str().unwrap(), "--name", &name, "--bin-dir", bin_dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "weft up: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(summary.contains("shop/client") && summary.contains("weft down --name"), "{summary}");
    // It runs after `weft up` returned: the processes were detached.
    let client_ns = format!("{prefix}pod-shop-client");
    let reply = get_json(&client_ns, "http://10.10.2.2:8080/");
    assert_eq!(reply["pod"], "server");
    // Each node's three tc programs and its listener lookup.
    let ours: BTreeSet<u64> =
        ebpf::pinned_program_ids(&cluster::bpf_pin_dir(&name)).into_iter().map(u64::from).collect();
    assert_eq!(ours.len(), 8, "the ztunnels pinned {ours:?} under {}", cluster::bpf_pin_dir(&name).display());

    let out = Command::new(&weft).args(["down", "--name", &name]).output().unwrap();
    assert!(out.status.success(), "weft down: {}", String::from_utf8_lossy(&out.stderr));

    assert_eq!(host_snapshot(), host_before, "weft down did not restore the root namespace");
    assert!(cluster::list_netns().unwrap().iter().all(|n| !n.starts_with(&prefix)), "namespaces left");
    assert_eq!(other_netns(&prefix), netns_before, "ip netns list changed");
    let progs_after = bpf_programs();
    let left: Vec<_> = progs_after.iter().filter(|(id, _)| ours.contains(id)).collect();
    assert!(left.is_empty(), "eBPF programs of the cluster are still loaded: {left:?}");
    let names = |p: &BTreeSet<(u64, String)>| -> Vec<String> {
        let mut v: Vec<String> =
            p.iter().map(|(_, n)| n.clone()).filter(|n| !n.starts_with("weft_")).collect();
        v.sort();
        v
    };
    assert_eq!(names(&progs_after), names(&progs_before), "bpftool prog show names changed");
    assert!(!cluster::bpf_pin_dir(&name).exists() && !cluster::state_dir(&name).exists());
}

#[test]
fn weft_demo_shows_what_it_promises() {
    if !usable("demo") {
        return;
    }
    let name = cluster_name("demo");
    let out = Command::new(bin_dir().join("weft"))
        .args(["demo", "--name", &name, "--bin-dir", bin_dir().to_str().unwrap()])
        .output()
        .unwrap();
    let _ = cluster::destroy(&name);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "weft demo failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    for expected in [
        "spiffe://cluster.local/ns/demo/sa/client",
        "\"peer\":\"10.10.1.2:",
        "ok: the intruder's connection was refused",
        "response_flags=\"DENY\"",
        "everything behaved as expected",
    ] {
        assert!(stdout.contains(expected), "the demo did not show {expected:?}:\n{stdout}");
    }
    assert!(!cluster::state_dir(&name).exists(), "the demo left its mesh behind");
}

/// The root namespace's interfaces, rules and routes, both families.
/// A mesh with shop/client on node-a, and shop/server and an iperf3 server (shop/iperf, port
/// 5201) on node-b, the server answering the client and iperf3 listening. Returns the mesh, the
/// client's namespace, the server's URL and iperf3's address.
fn client_server_and_iperf(tag: &str) -> (TestMesh, String, String, IpAddr) {
    let yaml = namespace("shop", true)
        + &pod("shop", "client", "node-a")
        + &pod("shop", "server", "node-b")
        + &pod_running("shop", "iperf", "node-b", "[iperf3, -s, -p, \"5201\"]");
    let t = TestMesh::up(tag, &[("mesh.yaml", yaml)]);
    let client_ns = t.netns("shop", "client");
    let url = format!("http://{}:8080/", t.ip("shop", "server"));
    get_json(&client_ns, &url);
    // iperf3 -s needs a moment to listen (it prints no readiness line weft up waits for).
    assert!(poll(Duration::from_secs(10), || {
        Command::new("ip")
            .args(["netns", "exec", &t.netns("shop", "iperf"), "sh", "-c", "ss -ltn | grep -q :5201"])
            .status()
            .ok()?
            .success()
            .then_some(())
    })
    .is_some());
    let iperf_ip = t.ip("shop", "iperf");
    (t, client_ns, url, iperf_ip)
}

/// `iperf3 -c <ip> -p 5201 -J <args>` from `netns`, in a thread; its output.
fn iperf_client(netns: &str, ip: IpAddr, args: &[&str]) -> std::thread::JoinHandle<std::process::Output> {
    let (ns, ip) = (netns.to_owned(), ip.to_string());
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    std::thread::spawn(move || {
        Command::new("ip")
            .args(["netns", "exec", &ns, "iperf3", "-c", &ip, "-p", "5201", "-J"])
            .args(&args)
            .output()
            .unwrap()
    })
}

fn host_snapshot() -> Vec<(String, String)> {
    [vec!["link"], vec!["rule"], vec!["route"], vec!["-6", "rule"], vec!["-6", "route"]]
        .into_iter()
        .map(|args| (args.join(" "), cluster::ip(&args).unwrap()))
        .collect()
}

/// `ip netns list` but the namespaces of other local clusters (other tests running beside this
/// one make and remove theirs) and of this one.
fn other_netns(prefix: &str) -> BTreeSet<String> {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(String::from))
        .filter(|n| !n.starts_with(prefix) && !n.starts_with("weft-"))
        .collect()
}

/// (id, name) of every loaded eBPF program.
fn bpf_programs() -> BTreeSet<(u64, String)> {
    let out = Command::new("bpftool").args(["prog", "show", "-j"]).output().unwrap();
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    list.as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| Some((p["id"].as_u64()?, p["name"].as_str().unwrap_or("").to_string())))
        .collect()
}

fn to_v4(ip: IpAddr) -> std::net::Ipv4Addr {
    match ip {
        IpAddr::V4(v4) => v4,
        IpAddr::V6(_) => panic!("IPv4 expected"),
    }
}
