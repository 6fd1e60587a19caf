#![allow(clippy::unwrap_used, clippy::expect_used)]
//! End to end: a Service whose `targetPort` names a container port (`targetPort: http`, as most
//! Helm charts write it) is reachable through its virtual IP, and only pods that name the port
//! serve it, each on the number its container gives the name (as Kubernetes and Istio resolve
//! it). The local mesh as `weft up` runs it, called with curl from a mesh pod.
//!
//! Needs what `e2e.rs` needs (root, `ip netns`, the workspace's binaries); without it the test
//! prints why and passes, unless `CI=true`.

mod e2e_support;

use e2e_support::*;
use weft::up;

const VIP: &str = "10.96.0.40";
const SERVICE_KEY: &str = "shop/api.shop.svc.cluster.local";

/// A Pod of the `api` Service running weft-app on 8080, whose container names that port `port_name`.
fn api_pod(name: &str, node: &str, port_name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: shop\n  labels:\n    app: api\n\
         spec:\n  nodeName: {node}\n  serviceAccountName: {name}\n  containers:\n  - name: main\n    \
         command: [weft-app, --http, \"8080\"]\n    ports:\n    - name: {port_name}\n      containerPort: 8080\n      \
         protocol: TCP\n---\n"
    )
}

#[test]
fn a_named_target_port_reaches_only_the_pods_that_name_it() {
    if !usable("named") {
        return;
    }
    // Both pods listen on 8080, so a call sent to the pod that names its port `web` would be
    // answered too: only the answering pod's name tells the two apart.
    let service = format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: api\n  namespace: shop\nspec:\n  clusterIP: {VIP}\n  \
         selector:\n    app: api\n  ports:\n  - name: http\n    port: 80\n    targetPort: http\n---\n"
    );
    let yaml = namespace("shop", true)
        + &pod("shop", "client", "node-a")
        + &api_pod("api-http", "node-b", "http")
        + &api_pod("api-web", "node-a", "web")
        + &service;
    let t = TestMesh::up("named", &[("mesh.yaml", yaml)]);
    let client_ns = t.netns("shop", "client");

    // What the client's ztunnel was told: api-http serves port 80 on 8080, api-web does not
    // serve it; the Service itself keeps target port 0 (named).
    let (status, dump) = t.mesh.ztunnel_get("node-a", up::ADMIN_PORT, "/config_dump").unwrap();
    assert_eq!(status, 200, "node-a /config_dump: {dump}");
    let dump: serde_json::Value = serde_json::from_str(&dump).unwrap();
    let workload = |name: &str| {
        dump["workloads"]
            .as_array()
            .unwrap()
            .iter()
            .find(|w| w["name"] == name)
            .unwrap_or_else(|| panic!("node-a's ztunnel does not know {name}: {dump}"))
            .clone()
    };
    assert_eq!(workload("api-http")["services"][SERVICE_KEY]["80"], 8080, "{dump}");
    let web_ports = &workload("api-web")["services"][SERVICE_KEY];
    assert!(web_ports.is_object() && web_ports.get("80").is_none(), "api-web must not serve port 80: {dump}");
    let api = dump["services"].as_array().unwrap().iter().find(|s| s["name"] == "api").unwrap();
    assert_eq!(api["ports"]["80"], 0, "{dump}");

    // Every call through the VIP succeeds, and only api-http answers.
    let url = format!("http://{VIP}/named");
    for i in 0..30 {
        let reply = get_json(&client_ns, &url);
        assert_eq!(reply["pod"], "api-http", "call {i} through {url} was answered by another pod: {reply}");
        assert_eq!(peer_ip(&reply), t.ip("shop", "client"), "{reply}");
    }
}
