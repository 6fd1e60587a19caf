#![allow(clippy::unwrap_used, clippy::expect_used)]
//! End to end: the waypoint on the local mesh. A namespace bound to an `istio-waypoint` Gateway
//! (`weft up` runs the waypoint pod and its Service, as the controller's Deployment does on
//! Kubernetes); its traffic goes client → ztunnel → waypoint → ztunnel → server, and the
//! waypoint applies the VirtualService and DestinationRule: canary split, header match, rewrite,
//! redirect, direct response, header changes, subsets, ROUND_ROBIN, consistent hashing, no route.
//! Real clients: curl (HTTP/1.1 and HTTP/2 with prior knowledge) inside the client pod; the
//! waypoint's `istio_requests_total` read from its :15020.
//!
//! Needs what `e2e.rs` needs (root, `ip netns`, the workspace's binaries); without it the test
//! prints why and passes, unless `CI=true`.

mod e2e_support;

use std::collections::BTreeMap;
use std::time::Duration;

use e2e_support::*;

const ECHO_VIP: &str = "10.96.0.60";
const RR_VIP: &str = "10.96.0.61";
const STICKY_VIP: &str = "10.96.0.62";

/// A weft-app pod with `app` and `version` labels.
fn versioned(name: &str, node: &str, app: &str, version: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: shop\n  labels:\n    app: {app}\n    version: {version}\n\
         spec:\n  nodeName: {node}\n  serviceAccountName: {app}\n  containers:\n  - name: main\n    \
         command: [weft-app, --http, \"8080\"]\n    env:\n    - {{name: SERVICE_VERSION, value: {version}}}\n---\n"
    )
}

fn mesh_yaml() -> String {
    let gateway = "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: waypoint\n  namespace: shop\n  \
         labels:\n    istio.io/waypoint-for: service\nspec:\n  gatewayClassName: istio-waypoint\n  listeners:\n  - name: mesh\n    \
         port: 15008\n    protocol: HBONE\n---\n";
    let namespace = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels:\n    istio.io/dataplane-mode: ambient\n    \
         istio.io/use-waypoint: waypoint\n---\n";
    let rules = r#"apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo, namespace: shop}
spec:
  hosts: [echo.shop.svc.cluster.local]
  http:
  - name: canary-header
    match: [{headers: {x-canary: {exact: always}}}]
    route: [{destination: {host: echo.shop.svc.cluster.local, subset: v2}}]
  - name: rewrite
    match: [{uri: {prefix: /old}}]
    rewrite: {uri: /new}
    route: [{destination: {host: echo.shop.svc.cluster.local, subset: v1}}]
  - name: redirect
    match: [{uri: {exact: /moved}}]
    redirect: {uri: /elsewhere, redirectCode: 301}
  - name: direct
    match: [{uri: {exact: /teapot}}]
    directResponse: {status: 418, body: {string: "short and stout"}}
  - name: headers
    match: [{uri: {prefix: /headers}}]
    headers:
      request: {set: {x-set: "yes"}, add: {x-added: "1"}, remove: [x-remove]}
      response: {set: {x-response: "r"}, remove: [content-length]}
    route: [{destination: {host: echo.shop.svc.cluster.local, subset: v1}}]
  - name: split
    match: [{uri: {prefix: /api}}]
    route:
    - {destination: {host: echo.shop.svc.cluster.local, subset: v1}, weight: 90}
    - {destination: {host: echo.shop.svc.cluster.local, subset: v2}, weight: 10}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo, namespace: shop}
spec:
  host: echo.shop.svc.cluster.local
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v2, labels: {version: v2}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: rr, namespace: shop}
spec:
  host: rr.shop.svc.cluster.local
  trafficPolicy: {loadBalancer: {simple: ROUND_ROBIN}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: sticky, namespace: shop}
spec:
  host: sticky.shop.svc.cluster.local
  trafficPolicy: {loadBalancer: {consistentHash: {httpHeaderName: x-user}}}
---
"#;
    namespace.to_owned()
        + gateway
        + &pod("shop", "client", "node-a")
        + &versioned("echo-v1", "node-b", "echo", "v1")
        + &versioned("echo-v2", "node-b", "echo", "v2")
        + &versioned("rr-1", "node-b", "rr", "v1")
        + &versioned("rr-2", "node-a", "rr", "v1")
        + &versioned("rr-3", "node-b", "rr", "v1")
        + &service("shop", "echo", ECHO_VIP, "echo")
        + &service("shop", "rr", RR_VIP, "rr")
        + &service("shop", "sticky", STICKY_VIP, "rr")
        + rules
}

/// Pod names answering, counted, over `n` GETs of `url` on one curl (keep-alive) with `extra`
/// arguments.
fn answers(netns: &str, url: &str, n: usize, extra: &[&str]) -> BTreeMap<String, usize> {
    let mut args: Vec<&str> = extra.to_vec();
    args.extend(std::iter::repeat_n(url, n));
    let out = curl(netns, 120, &args).unwrap_or_else(|e| panic!("{n} GETs of {url}: {e}"));
    let mut counts = BTreeMap::new();
    for reply in serde_json::Deserializer::from_str(&out).into_iter::<serde_json::Value>() {
        let reply = reply.unwrap_or_else(|e| panic!("not JSON ({e}): {out}"));
        *counts.entry(reply["pod"].as_str().unwrap_or("?").to_owned()).or_default() += 1;
    }
    assert_eq!(counts.values().sum::<usize>(), n, "{url}: {counts:?}");
    counts
}

#[test]
fn the_waypoint_routes_and_balances_a_namespaces_http_traffic() {
    if !usable("waypoint") {
        return;
    }
    let t = TestMesh::up("waypoint", &[("mesh.yaml", mesh_yaml())]);
    let client = t.netns("shop", "client");
    let echo = format!("http://{ECHO_VIP}");
    let waypoint_metrics = || {
        let (status, body) =
            t.mesh.pod_get("shop", "waypoint-0", weft::up::METRICS_PORT, "/metrics").unwrap();
        assert_eq!(status, 200, "waypoint /metrics: {body}");
        body
    };

    // HTTP/1.1 and HTTP/2 (prior knowledge) through the waypoint; the caller's address is kept.
    let h1 = get_json(&client, &format!("{echo}/headers/echo"));
    assert_eq!(h1["pod"], "echo-v1", "{h1}");
    assert_eq!(peer_ip(&h1), t.ip("shop", "client"), "the server sees the client's own address: {h1}");
    let h2 = curl(&client, 5, &["--http2-prior-knowledge", &format!("{echo}/api")]).unwrap();
    assert!(h2.contains("\"pod\""), "{h2}");

    // Canary 90/10 within ±3 points over 2,000 requests; the header route is 100 % v2.
    let split = answers(&client, &format!("{echo}/api"), 2000, &[]);
    let v2 = *split.get("echo-v2").unwrap_or(&0) as f64 / 2000.0;
    assert!((v2 - 0.10).abs() <= 0.03, "v2 got {:.1} % of the split: {split:?}", v2 * 100.0);
    let canary = answers(&client, &format!("{echo}/api"), 50, &["-H", "x-canary: always"]);
    assert_eq!(canary.get("echo-v2"), Some(&50), "{canary:?}");

    // Rewrite: /old/x reaches the server as /new/x.
    let rewritten = get_json(&client, &format!("{echo}/old/x?q=1"));
    let path = rewritten["path"].as_str().unwrap_or_default();
    let full = match rewritten["query"].as_str() {
        Some(query) if !path.contains('?') => format!("{path}?{query}"),
        _ => path.to_owned(),
    };
    assert_eq!(full, "/new/x?q=1", "{rewritten}");

    // Redirect 301 with Location; direct response.
    let redirect = curl(&client, 5, &["-i", &format!("{echo}/moved")]).unwrap();
    assert!(redirect.starts_with("HTTP/1.1 301"), "{redirect}");
    assert!(
        redirect.to_ascii_lowercase().contains(&format!("location: http://{ECHO_VIP}/elsewhere")),
        "{redirect}"
    );
    let teapot = curl(&client, 5, &["-i", &format!("{echo}/teapot")]).unwrap();
    assert!(teapot.starts_with("HTTP/1.1 418") && teapot.ends_with("short and stout"), "{teapot}");

    // Header set/add/remove, seen by the server and the client.
    let with_headers = curl(
        &client,
        5,
        &["-i", "-H", "x-remove: gone", "-H", "x-added: 0", &format!("{echo}/headers/echo")],
    )
    .unwrap();
    assert!(with_headers.to_ascii_lowercase().contains("x-response: r"), "{with_headers}");
    let body = &with_headers[with_headers.find("\r\n\r\n").unwrap() + 4..];
    let seen: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(seen["headers"]["x-set"], "yes", "{seen}");
    let added: Vec<&str> =
        seen["headers"]["x-added"].as_str().unwrap_or_default().split(',').map(str::trim).collect();
    assert_eq!(added, ["0", "1"], "the client's value and the added one: {seen}");
    assert!(seen["headers"].get("x-remove").is_none(), "{seen}");

    // No matching route: 404 with NR.
    let status =
        curl(&client, 5, &["-o", "/dev/null", "-w", "%{http_code}", &format!("{echo}/nothing-here")])
            .unwrap();
    assert_eq!(status, "404");

    // ROUND_ROBIN within ±5 % over 3 endpoints; consistent hashing sticks to one.
    let rr = answers(&client, &format!("http://{RR_VIP}/"), 300, &[]);
    assert_eq!(rr.len(), 3, "{rr:?}");
    for (pod, n) in &rr {
        assert!((*n as i64 - 100).abs() <= 15, "{pod} got {n} of 300: {rr:?}");
    }
    let sticky = answers(&client, &format!("http://{STICKY_VIP}/"), 200, &["-H", "x-user: alice"]);
    assert_eq!(sticky.len(), 1, "{sticky:?}");

    // Hostile peers. A CONNECT to the waypoint for what is not bound to it (a pod of a
    // service-bound namespace, an address outside the mesh, a port the service lacks) is refused:
    // the waypoint is no relay under its own identity. A bound destination is accepted.
    let cert = certificate(&t, "node-a", "shop", "client");
    let waypoint_id = weft_core::identity::Identity::new("cluster.local", "shop", "waypoint").unwrap();
    let waypoint_ip = t.ip("shop", "waypoint-0");
    let targets: Vec<std::net::SocketAddr> = vec![
        format!("{ECHO_VIP}:80").parse().unwrap(),
        std::net::SocketAddr::new(t.ip("shop", "rr-1"), 8080),
        "8.8.8.8:53".parse().unwrap(),
        format!("{ECHO_VIP}:9999").parse().unwrap(),
    ];
    let results = in_runtime(&t.node_netns("node-a"), {
        let (cert, id) = (cert.clone(), waypoint_id.clone());
        async move {
            let mut out = Vec::new();
            for to in targets {
                out.push(connect(cert.clone(), id.clone(), waypoint_ip, to, None).await);
            }
            out
        }
    });
    let statuses: Vec<_> =
        results.iter().map(|r| if r.is_ok() { Some(200) } else { e2e_support::status(r) }).collect();
    assert_eq!(statuses, [Some(200), Some(400), Some(400), Some(400)], "{results:?}");
    // A request head over the limit (60 KiB) gets 431 and harms nothing else.
    let big = format!("x-big: {}", "a".repeat(70_000));
    let refused =
        curl(&client, 5, &["-o", "/dev/null", "-w", "%{http_code}", "-H", &big, &format!("{echo}/api")])
            .unwrap();
    assert_eq!(refused, "431");
    assert_eq!(get_json(&client, &format!("{echo}/headers/echo"))["pod"], "echo-v1");

    // The waypoint's metrics count it all, with Istio's labels.
    let metrics = waypoint_metrics();
    let requests = |needles: &[&str]| counter(&metrics, "istio_requests_total", needles);
    let v2_count =
        requests(&["reporter=\"waypoint\"", "destination_version=\"v2\"", "response_code=\"200\""]);
    let v1_count = requests(&[
        "reporter=\"waypoint\"",
        "destination_version=\"v1\"",
        "destination_canonical_service=\"echo\"",
    ]);
    assert!(v2_count >= 50.0 + 2000.0 * 0.07, "v2: {v2_count}\n{metrics}");
    assert!(v1_count >= 2000.0 * 0.87, "v1: {v1_count}\n{metrics}");
    assert_eq!(requests(&["response_code=\"404\"", "response_flags=\"NR\""]), 1.0, "{metrics}");
    assert!(
        requests(&[
            "request_protocol=\"http\"",
            "source_principal=\"spiffe://cluster.local/ns/shop/sa/client\""
        ]) > 0.0
    );
    assert!(metrics.contains("istio_request_duration_milliseconds_bucket{"), "{metrics}");

    // A real Prometheus scrapes the waypoint; PromQL by destination_version matches the split.
    let target = format!("{}:{}", t.ip("shop", "waypoint-0"), weft::up::METRICS_PORT);
    let prometheus = Prometheus::start(&t.node_netns("node-a"), "waypoint", &[target]);
    let promql = "sum by (destination_version) (istio_requests_total{reporter=\"waypoint\",destination_service_name=\"echo\"})";
    let by_version = poll(Duration::from_secs(30), || {
        let result = prometheus.query(promql)?;
        let versions: BTreeMap<String, f64> = result
            .iter()
            .filter_map(|r| {
                let version = r["metric"]["destination_version"].as_str()?.to_owned();
                Some((version, r["value"][1].as_str()?.parse::<f64>().ok()?))
            })
            .collect();
        (versions.contains_key("v1") && versions.contains_key("v2")).then_some(versions)
    })
    .unwrap_or_else(|| {
        panic!(
            "Prometheus never had the waypoint's requests: {:?}\n{}",
            prometheus.query(promql),
            prometheus.log_tail()
        )
    });
    // The same numbers as the waypoint's own /metrics (no echo traffic since that read).
    for version in ["v1", "v2"] {
        let own =
            requests(&["destination_service_name=\"echo\"", &format!("destination_version=\"{version}\"")]);
        assert_eq!(by_version[version], own, "{version}: Prometheus {by_version:?}, waypoint {own}");
    }
    let v2_share = by_version["v2"] / (by_version["v1"] + by_version["v2"]);
    assert!(v2_share > 0.07 && v2_share < 0.16, "v2's share per Prometheus: {v2_share}");
}

/// gRPC (Python's grpcio, gRPC's own implementation: health check and a unary call) and a
/// WebSocket upgrade through the waypoint, each counted with its protocol.
#[test]
fn grpc_and_websocket_pass_through_the_waypoint() {
    if !usable("wpgrpc") {
        return;
    }
    let yaml = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels:\n    istio.io/dataplane-mode: ambient\n    \
         istio.io/use-waypoint: waypoint\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: waypoint\n  \
         namespace: shop\nspec:\n  gatewayClassName: istio-waypoint\n---\n"
        .to_owned()
        + &pod("shop", "client", "node-a")
        + &pod_running("shop", "echo", "node-b", r#"[weft-app, --http, "8080", --grpc, "9090"]"#)
        + &format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: echo\n  namespace: shop\nspec:\n  clusterIP: {ECHO_VIP}\n  \
             selector:\n    app: echo\n  ports:\n  - name: http\n    port: 80\n    targetPort: 8080\n  - name: grpc\n    \
             port: 9090\n    targetPort: 9090\n---\n"
        );
    let t = TestMesh::up("wpgrpc", &[("mesh.yaml", yaml)]);
    let client = t.netns("shop", "client");
    let python = |script: &str| {
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &client, "python3", "-c", script])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{script}\n{text}{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            t.logs()
        );
        text
    };

    // gRPC health and a unary call, protobuf written by hand (EchoRequest{message: "hi"}).
    let grpc = python(&format!(
        "import grpc\nfrom grpc_health.v1 import health_pb2, health_pb2_grpc\n\
         ch = grpc.insecure_channel('{ECHO_VIP}:9090')\n\
         r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=''), timeout=5)\n\
         print(health_pb2.HealthCheckResponse.ServingStatus.Name(r.status))\n\
         echo = ch.unary_unary('/weft.echo.v1.Echo/Echo')\n\
         print(echo(b'\\x0a\\x02hi', timeout=5))\n"
    ));
    assert!(grpc.starts_with("SERVING"), "{grpc}");
    assert!(grpc.contains("hi") && grpc.contains("echo"), "the echo answered with its pod: {grpc}");

    // A WebSocket upgrade: 101, then bytes echoed both ways through the spliced connection.
    let ws = python(&format!(
        "import socket\ns = socket.create_connection(('{ECHO_VIP}', 80), timeout=5)\n\
         s.sendall(b'GET /ws HTTP/1.1\\r\\nHost: echo\\r\\nConnection: Upgrade\\r\\nUpgrade: websocket\\r\\n\
         Sec-WebSocket-Version: 13\\r\\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\\r\\n\\r\\n')\n\
         head = b''\nwhile b'\\r\\n\\r\\n' not in head:\n    head += s.recv(4096)\n\
         print(head.split(b'\\r\\n')[0].decode())\n\
         s.sendall(b'\\x81\\x05hello')\nback = b''\nwhile len(back) < 7:\n    back += s.recv(4096)\nprint(back)\n"
    ));
    assert!(ws.starts_with("HTTP/1.1 101"), "{ws}");
    assert!(ws.contains("hello"), "{ws}");

    // The waypoint counted each with its protocol.
    let (status, metrics) = t.mesh.pod_get("shop", "waypoint-0", weft::up::METRICS_PORT, "/metrics").unwrap();
    assert_eq!(status, 200);
    let requests = |needles: &[&str]| counter(&metrics, "istio_requests_total", needles);
    assert!(
        requests(&["request_protocol=\"grpc\"", "grpc_response_status=\"0\"", "response_code=\"200\""])
            >= 2.0,
        "{metrics}"
    );
    assert_eq!(requests(&["request_protocol=\"http\"", "response_code=\"101\""]), 1.0, "{metrics}");
}

/// `weft waypoint apply --local` on a running mesh: within 5 s the namespace's traffic flows
/// through the new waypoint; `weft waypoint delete`: it goes direct again. A caller making a new
/// connection every 50 ms sees no failure throughout.
#[test]
fn a_waypoint_applied_to_a_running_mesh_takes_over_and_gives_back_without_failures() {
    if !usable("wpapply") {
        return;
    }
    let yaml = namespace("shop", true)
        + &pod("shop", "client", "node-a")
        + &pod("shop", "echo", "node-b")
        + &service("shop", "echo", ECHO_VIP, "echo");
    let mut t = TestMesh::up("wpapply", &[("mesh.yaml", yaml)]);
    let client = t.netns("shop", "client");
    let url = format!("http://{ECHO_VIP}/");
    get_json(&client, &url);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let caller = {
        let (stop, client, url) = (stop.clone(), client.clone(), url.clone());
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match curl(&client, 5, &[&url]) {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(e),
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            (ok, failed)
        })
    };

    t.mesh.apply_waypoint("shop", "waypoint").unwrap_or_else(|e| panic!("apply: {e}\n{}", t.logs()));
    let applied = std::time::Instant::now();
    let waypoint_requests = |t: &TestMesh| {
        t.mesh
            .pod_get("shop", "waypoint-0", weft::up::METRICS_PORT, "/metrics")
            .ok()
            .map(|(_, body)| counter(&body, "istio_requests_total", &["destination_service_name=\"echo\""]))
            .unwrap_or(0.0)
    };
    let through = poll(Duration::from_secs(5), || (waypoint_requests(&t) > 0.0).then_some(()));
    assert!(through.is_some(), "no request went through the new waypoint within 5 s\n{}", t.logs());
    eprintln!("traffic through the waypoint {:?} after the label", applied.elapsed());
    std::thread::sleep(Duration::from_millis(500));

    t.mesh.delete_waypoint("shop", "waypoint").unwrap_or_else(|e| panic!("delete: {e}\n{}", t.logs()));
    assert!(
        t.mesh.pod_get("shop", "waypoint-0", weft::up::METRICS_PORT, "/metrics").is_err(),
        "the waypoint is gone"
    );
    let direct = get_json(&client, &url);
    assert_eq!(direct["pod"], "echo", "{direct}");
    std::thread::sleep(Duration::from_millis(500));

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = caller.join().unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} calls failed during the switches: {failed:?}",
        failed.len(),
        ok + failed.len()
    );
    assert!(ok >= 10, "only {ok} calls made");
}
