//! The controller at scale (issue 3): a YAML directory of 10,000 pods, 1,000 services and 500
//! AuthorizationPolicies loaded through the real directory watch, translated into an xDS snapshot,
//! and served over real gRPC on loopback to 100 delta ADS clients (as Istio's ztunnel connects).
//! One command, no harness: `cargo bench -p controller --bench scale`.
//!
//! Reports: (1) the full load (watch start until the model holds every object, then the first
//! snapshot); (2) the delta push of one pod's relabelling, from the file write (and from
//! `XdsServer::update`) until each client received it, p50/p99/max, checking every push carried
//! only that pod's resource; (3) the process's RSS after the load and with the clients connected.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use prost::Message;
use prost_types::value::Kind;
use prost_types::{Struct, Value};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::service::Routes;
use tonic::transport::Channel;
use weft_core::proto::envoy::config::core::v3::Node;
use weft_core::proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use weft_core::proto::envoy::service::discovery::v3::DeltaDiscoveryRequest;

use controller::model::Model;
use controller::sources::dir_model::watch_model;
use controller::translate::{self, DEFAULT_CLUSTER_ID};
use controller::xds::{serve, XdsOptions, XdsServer, ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};

/// The machine has two cores; the controller and the clients share them.
const WORKER_THREADS: usize = 2;
const NAMESPACES: usize = 50;
const PODS: usize = 10_000;
const SERVICES: usize = 1_000;
const POLICIES: usize = 500;
const NODES: usize = 100;
const CLIENTS: usize = 100;
const TRUST_DOMAIN: &str = "cluster.local";
/// Bound on every wait.
const WAIT: Duration = Duration::from_secs(60);
/// After the pushes, how long to watch for unexpected extra responses.
const QUIET: Duration = Duration::from_millis(500);

const PODS_PER_NS: usize = PODS / NAMESPACES;
const SERVICES_PER_NS: usize = SERVICES / NAMESPACES;
const POLICIES_PER_NS: usize = POLICIES / NAMESPACES;

fn main() -> anyhow::Result<()> {
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(WORKER_THREADS).enable_all().build()?;
    runtime.block_on(run())
}

/// What one client reports.
enum Event {
    /// It holds every resource of both types (after ACKing them).
    Full { at: Instant, bytes: usize },
    /// A response after that: its type, the names it carried, the names it removed.
    Delta { client: usize, at: Instant, type_url: String, names: Vec<String>, removed: Vec<String> },
}

async fn run() -> anyhow::Result<()> {
    let rss_start = memory();
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let generated = Instant::now();
    let files = generate(dir)?;
    let generate_time = generated.elapsed();
    let objects = NAMESPACES + PODS + SERVICES + POLICIES;
    println!(
        "generated {objects} objects ({NAMESPACES} namespaces, {PODS} pods on {NODES} nodes, {SERVICES} services, \
         {POLICIES} AuthorizationPolicies) in {files} files, {:.1} MiB, in {:.2} s",
        dir_size(dir)? as f64 / 1048576.0,
        generate_time.as_secs_f64()
    );

    // (1) Full load: watch start until the model holds every object, then the first snapshot.
    let started = Instant::now();
    let mut model = watch_model(dir)?;
    tokio::time::timeout(WAIT, model.wait_for(|m| m.len() == objects))
        .await
        .context("the model did not fill")??;
    let load = started.elapsed();
    let current: Arc<Model> = model.borrow_and_update().clone();
    let computed = Instant::now();
    let snapshot = translate::snapshot(&current, TRUST_DOMAIN, DEFAULT_CLUSTER_ID);
    let snapshot_time = computed.elapsed();
    let addresses = snapshot.resources(ADDRESS_TYPE_URL).count();
    let authorizations = snapshot.resources(AUTHORIZATION_TYPE_URL).count();
    let version = snapshot.version().to_owned();
    ensure!(addresses == PODS + SERVICES, "{addresses} addresses");
    ensure!(authorizations == POLICIES, "{authorizations} authorizations");
    drop(current);
    let rss_loaded = memory();

    // (2) The xDS server with that snapshot and 100 clients.
    let xds = XdsServer::new(translate::view(), XdsOptions::default());
    xds.update(snapshot);
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(serve(
        controller::grpc::Listener::plaintext(listener),
        xds.clone(),
        Routes::default(),
        async {
            let _ = stopped.await;
        },
    ));
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let connecting = Instant::now();
    let mut clients = Vec::new();
    for client in 0..CLIENTS {
        clients.push(tokio::spawn(ztunnel(
            endpoint.clone(),
            client,
            (addresses, authorizations),
            events_tx.clone(),
        )));
    }
    drop(events_tx);
    let mut full_at = Vec::new();
    let mut first_bytes = 0;
    while full_at.len() < CLIENTS {
        match tokio::time::timeout(WAIT, events.recv()).await.context("clients did not fill")? {
            Some(Event::Full { at, bytes }) => {
                full_at.push(at - connecting);
                first_bytes = bytes;
            }
            Some(Event::Delta { client, .. }) => anyhow::bail!("client {client}: a push before the change"),
            None => {
                for c in clients {
                    c.await??;
                }
                anyhow::bail!("the clients ended");
            }
        }
    }
    full_at.sort();
    let all_full = *full_at.last().unwrap_or(&Duration::ZERO);
    // Let the server record the last ACKs.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let acked = xds
        .clients()
        .iter()
        .filter(|c| {
            let held = |t: &str| c.types.get(t).map_or(0, |t| t.acked.len());
            held(ADDRESS_TYPE_URL) == addresses && held(AUTHORIZATION_TYPE_URL) == authorizations
        })
        .count();
    ensure!(xds.clients().len() == CLIENTS, "{} clients connected", xds.clients().len());
    let rss_connected = memory();

    // One pod's label changes: its namespace's file is rewritten (as an editor would).
    let (ns, pod) = (7, 3);
    let uid = format!("{DEFAULT_CLUSTER_ID}//Pod/{}/{}", ns_name(ns), pod_name(ns, pod));
    let rewritten = pods_yaml(ns, Some(pod));
    let written = Instant::now();
    std::fs::write(dir.join(format!("pods-{}.yaml", ns_name(ns))), rewritten)?;
    tokio::time::timeout(WAIT, model.changed()).await.context("the model did not change")??;
    let model_seen = written.elapsed();
    let current = model.borrow_and_update().clone();
    let computed = Instant::now();
    let snapshot = translate::snapshot(&current, TRUST_DOMAIN, DEFAULT_CLUSTER_ID);
    let resnapshot = computed.elapsed();
    let updated = Instant::now();
    xds.update(snapshot);
    let mut push_at = BTreeMap::new();
    let mut extra = Vec::new();
    while push_at.len() < CLIENTS {
        let event = tokio::time::timeout(WAIT, events.recv()).await.context("pushes did not arrive")?;
        let Some(Event::Delta { client, at, type_url, names, removed }) = event else {
            anyhow::bail!("unexpected event while waiting for pushes");
        };
        let only_the_pod = type_url == ADDRESS_TYPE_URL && names == [uid.clone()] && removed.is_empty();
        if only_the_pod && !push_at.contains_key(&client) {
            push_at.insert(client, at);
        } else {
            extra.push(format!(
                "client {client}: {type_url} {} names, {} removed",
                names.len(),
                removed.len()
            ));
        }
    }
    // Anything else pushed shortly after?
    let quiet_until = Instant::now() + QUIET;
    while let Ok(Some(Event::Delta { client, type_url, names, removed, .. })) =
        tokio::time::timeout_at(quiet_until.into(), events.recv()).await
    {
        extra.push(format!("client {client}: {type_url} {} names, {} removed", names.len(), removed.len()));
    }
    let mut from_write: Vec<Duration> = push_at.values().map(|at| *at - written).collect();
    let mut from_update: Vec<Duration> = push_at.values().map(|at| *at - updated).collect();
    from_write.sort();
    from_update.sort();
    let rss_end = memory();

    let _ = stop.send(());
    for c in clients {
        c.abort();
    }
    let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
    drop((xds, model, current));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_stopped = memory();

    // Report.
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let pct = |v: &[Duration], p: f64| v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1];
    let mut out = String::new();
    writeln!(out, "\n== controller at scale ==")?;
    writeln!(out, "full load, watch start -> model holds {objects} objects: {:.0} ms", ms(load))?;
    writeln!(
        out,
        "first snapshot ({addresses} addresses, {authorizations} authorizations, version {version}): {:.0} ms",
        ms(snapshot_time)
    )?;
    writeln!(out, "total load + snapshot: {:.0} ms", ms(load + snapshot_time))?;
    writeln!(
        out,
        "{CLIENTS} clients connected and ACKed the full state (first Address response {first_bytes} bytes \
         each; tonic's default decode limit is 4194304): p50 {:.0} ms, last {:.0} ms after the first connect; \
         {acked} clients with every ACK recorded",
        ms(pct(&full_at, 0.5)),
        ms(all_full)
    )?;
    writeln!(
        out,
        "one pod relabelled: file write -> model {:.0} ms, re-snapshot {:.0} ms",
        ms(model_seen),
        ms(resnapshot)
    )?;
    for (what, v) in [("file write", &from_write), ("XdsServer::update", &from_update)] {
        writeln!(
            out,
            "delta push, {what} -> client received, {CLIENTS} clients: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
            ms(pct(v, 0.5)),
            ms(pct(v, 0.99)),
            ms(*v.last().unwrap_or(&Duration::ZERO))
        )?;
    }
    writeln!(
        out,
        "each push carried only {uid} (1 resource, 0 removed): {} of {CLIENTS} clients; other responses: {}",
        push_at.len(),
        if extra.is_empty() { "none".to_owned() } else { extra.join("; ") }
    )?;
    for (what, m) in [
        ("start", rss_start),
        ("after load + snapshot", rss_loaded),
        ("with 100 clients connected", rss_connected),
        ("after the push", rss_end),
        ("after clients, server and model dropped", rss_stopped),
    ] {
        writeln!(
            out,
            "memory {what}: VmRSS {:.0} MiB, VmHWM {:.0} MiB",
            m.0 as f64 / 1024.0,
            m.1 as f64 / 1024.0
        )?;
    }
    print!("{out}");
    let json = |metric: &str, value: f64, unit: &str| {
        println!(r#"{{"bench":"scale","metric":"{metric}","value":{value:.3},"unit":"{unit}"}}"#);
    };
    json("load_ms", ms(load), "ms");
    json("first_snapshot_ms", ms(snapshot_time), "ms");
    json("clients_full_ms", ms(all_full), "ms");
    json("resnapshot_ms", ms(resnapshot), "ms");
    json("push_from_write_p50_ms", ms(pct(&from_write, 0.5)), "ms");
    json("push_from_write_p99_ms", ms(pct(&from_write, 0.99)), "ms");
    json("push_from_write_max_ms", ms(*from_write.last().unwrap_or(&Duration::ZERO)), "ms");
    json("push_from_update_p50_ms", ms(pct(&from_update, 0.5)), "ms");
    json("push_from_update_p99_ms", ms(pct(&from_update, 0.99)), "ms");
    json("push_from_update_max_ms", ms(*from_update.last().unwrap_or(&Duration::ZERO)), "ms");
    json("rss_loaded_mib", rss_loaded.0 as f64 / 1024.0, "MiB");
    json("rss_connected_mib", rss_connected.0 as f64 / 1024.0, "MiB");
    json("hwm_end_mib", rss_end.1 as f64 / 1024.0, "MiB");
    ensure!(extra.is_empty(), "pushes carried more than the changed pod");
    ensure!(push_at.len() == CLIENTS);
    Ok(())
}

/// One ztunnel: a delta ADS stream on its own connection, wildcard Address and Authorization,
/// every response ACKed. Counts what it holds; once it holds `expected`, reports every further
/// response.
async fn ztunnel(
    endpoint: String,
    client: usize,
    expected: (usize, usize),
    events: mpsc::UnboundedSender<Event>,
) -> anyhow::Result<()> {
    let channel = Channel::from_shared(endpoint)?.connect().await?;
    // gRPC's default 4 MiB message limit: the first push (~6 MiB) must come in several responses.
    let mut ads = AggregatedDiscoveryServiceClient::new(channel);
    let string = |s: &str| Value { kind: Some(Kind::StringValue(s.to_owned())) };
    let node = Node {
        id: format!("ztunnel~10.0.0.{client}~ztunnel-{client}.istio-system~istio-system.svc.cluster.local"),
        metadata: Some(Struct {
            fields: BTreeMap::from([("NODE_NAME".to_owned(), string(&format!("node-{}", client % NODES)))]),
        }),
        ..Default::default()
    };
    let (tx, rx) = mpsc::channel(16);
    let subscribe = |type_url: &str, node: Option<Node>| DeltaDiscoveryRequest {
        node,
        type_url: type_url.to_owned(),
        ..Default::default()
    };
    tx.send(subscribe(ADDRESS_TYPE_URL, Some(node))).await?;
    tx.send(subscribe(AUTHORIZATION_TYPE_URL, None)).await?;
    let mut responses = ads.delta_aggregated_resources(ReceiverStream::new(rx)).await?.into_inner();
    let (mut held_addresses, mut held_authorizations, mut bytes) = (0, 0, 0);
    let mut full = false;
    while let Some(response) = responses.message().await? {
        let at = Instant::now();
        tx.send(DeltaDiscoveryRequest {
            type_url: response.type_url.clone(),
            response_nonce: response.nonce.clone(),
            ..Default::default()
        })
        .await?;
        if full {
            let names = response.resources.iter().map(|r| r.name.clone()).collect();
            let event = Event::Delta {
                client,
                at,
                type_url: response.type_url.clone(),
                names,
                removed: response.removed_resources.clone(),
            };
            if events.send(event).is_err() {
                return Ok(());
            }
            continue;
        }
        if response.type_url == ADDRESS_TYPE_URL {
            held_addresses += response.resources.len();
            bytes = bytes.max(response.encoded_len());
        } else {
            held_authorizations += response.resources.len();
        }
        if (held_addresses, held_authorizations) == expected {
            full = true;
            if events.send(Event::Full { at, bytes }).is_err() {
                return Ok(());
            }
        }
    }
    Ok(())
}

fn ns_name(ns: usize) -> String {
    format!("ns-{ns:02}")
}

fn pod_name(ns: usize, pod: usize) -> String {
    format!("pod-{ns:02}-{pod:03}")
}

/// Namespace `ns`'s pods, one document each; `relabel` gets `version: v2` instead of `v1`.
fn pods_yaml(ns: usize, relabel: Option<usize>) -> String {
    let mut yaml = String::new();
    for pod in 0..PODS_PER_NS {
        let global = ns * PODS_PER_NS + pod;
        let version = if relabel == Some(pod) { "v2" } else { "v1" };
        let _ = write!(
            yaml,
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {}, namespace: {}, labels: {{app: app-{}, version: {version}}}}}\n\
             spec: {{nodeName: node-{}, serviceAccountName: sa-{}}}\nstatus: {{podIP: 10.{}.{}.{}, phase: Running}}\n",
            pod_name(ns, pod),
            ns_name(ns),
            pod % SERVICES_PER_NS,
            global % NODES,
            pod % SERVICES_PER_NS,
            10 + global / 65536,
            (global / 256) % 256,
            global % 256,
        );
    }
    yaml
}

/// Writes the directory: one file of namespaces, and per namespace one file each of pods,
/// services and policies. Even namespaces are ambient. Returns the number of files.
fn generate(dir: &Path) -> anyhow::Result<usize> {
    let mut namespaces = String::new();
    for ns in 0..NAMESPACES {
        let labels = if ns % 2 == 0 { ", labels: {istio.io/dataplane-mode: ambient}" } else { "" };
        let _ = write!(
            namespaces,
            "---\napiVersion: v1\nkind: Namespace\nmetadata: {{name: {}{labels}}}\n",
            ns_name(ns)
        );
    }
    std::fs::write(dir.join("namespaces.yaml"), namespaces)?;
    for ns in 0..NAMESPACES {
        let name = ns_name(ns);
        std::fs::write(dir.join(format!("pods-{name}.yaml")), pods_yaml(ns, None))?;
        let mut services = String::new();
        for svc in 0..SERVICES_PER_NS {
            let global = ns * SERVICES_PER_NS + svc;
            let _ = write!(
                services,
                "---\napiVersion: v1\nkind: Service\nmetadata: {{name: svc-{svc:02}, namespace: {name}}}\n\
                 spec: {{clusterIP: 10.96.{}.{}, selector: {{app: app-{svc}}}, ports: [{{port: 80, targetPort: 8080}}, {{port: 443}}]}}\n",
                global / 256,
                global % 256,
            );
        }
        std::fs::write(dir.join(format!("services-{name}.yaml")), services)?;
        let mut policies = String::new();
        for p in 0..POLICIES_PER_NS {
            // A mix: namespace-wide ALLOW from a namespace, selector ALLOW by service account and
            // port, selector DENY by namespace, namespace-wide DENY by IP block.
            let spec = match p % 4 {
                0 => format!("{{action: ALLOW, rules: [{{from: [{{source: {{namespaces: [{}]}}}}]}}]}}", ns_name((ns + 1) % NAMESPACES)),
                1 => format!(
                    "{{selector: {{matchLabels: {{app: app-{p}}}}}, action: ALLOW, rules: [{{from: [{{source: {{serviceAccounts: [sa-{}]}}}}], to: [{{operation: {{ports: [\"8080\"]}}}}]}}]}}",
                    (p + 1) % SERVICES_PER_NS
                ),
                2 => format!("{{selector: {{matchLabels: {{app: app-{p}}}}}, action: DENY, rules: [{{from: [{{source: {{notNamespaces: [{name}]}}}}]}}]}}"),
                _ => "{action: DENY, rules: [{from: [{source: {ipBlocks: [192.0.2.0/24]}}]}]}".to_owned(),
            };
            let _ = write!(
                policies,
                "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: policy-{p:02}, namespace: {name}}}\nspec: {spec}\n"
            );
        }
        std::fs::write(dir.join(format!("policies-{name}.yaml")), policies)?;
    }
    Ok(1 + 3 * NAMESPACES)
}

fn dir_size(dir: &Path) -> anyhow::Result<u64> {
    let mut size = 0;
    for entry in std::fs::read_dir(dir)? {
        size += entry?.metadata()?.len();
    }
    Ok(size)
}

/// (VmRSS, VmHWM) of this process, KiB.
fn memory() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}
