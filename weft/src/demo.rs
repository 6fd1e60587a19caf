//! `weft demo`: brings up the shipped example (`examples/demo`) as a local two-node mesh, drives
//! traffic between its pods with the real `curl` inside their network namespaces, shows what a
//! user should see (identities, an allowed call that keeps the caller's address, a service call,
//! a call refused by an L4 AuthorizationPolicy, a pod outside the mesh, the ztunnels' metrics),
//! and removes the mesh, also on failure. Every check it prints is also an expectation: one that
//! does not hold makes the command fail.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::Context;
use serde_json::Value;

use crate::up::{self, Mesh, UpOptions};

/// The cluster name the demo uses, apart from a `weft up` cluster (`weft`).
pub const DEMO_CLUSTER: &str = "demo";
/// The example, embedded so that an installed binary runs the demo without the repository.
const EMBEDDED: &str = include_str!("../../examples/demo/mesh.yaml");
/// The example in the repository this binary was built from.
const REPO_EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/demo");
/// The echo service's address in the example.
const SERVICE: &str = "10.96.0.10:80";

/// What the demo found wrong, printed at the end.
#[derive(Default)]
struct Checks {
    failed: Vec<String>,
}

impl Checks {
    fn expect(&mut self, ok: bool, what: impl Into<String>) {
        let what = what.into();
        if ok {
            println!("    ok: {what}");
        } else {
            println!("    FAILED: {what}");
            self.failed.push(what);
        }
    }
}

pub fn run(bin_dir: &Path, dir: Option<PathBuf>, keep: bool, name: &str) -> anyhow::Result<ExitCode> {
    let embedded_copy;
    let dir = match dir {
        Some(dir) => dir,
        None if Path::new(REPO_EXAMPLE).join("mesh.yaml").exists() => PathBuf::from(REPO_EXAMPLE),
        None => {
            embedded_copy = tempfile::tempdir()?;
            std::fs::write(embedded_copy.path().join("mesh.yaml"), EMBEDDED)?;
            embedded_copy.path().to_path_buf()
        }
    };
    println!("Weft demo: a local two-node ambient mesh from {}", dir.display());
    let mesh = up::up(&UpOptions::new(&dir, name, bin_dir))
        .with_context(|| format!("bringing up {}", dir.display()))?;
    print!("{}", mesh.summary());
    let result = scenario(&mesh);
    if !matches!(&result, Ok(checks) if checks.failed.is_empty()) {
        // What the proxies said, before the logs go with the mesh.
        for node in ["node-a", "node-b"] {
            let process = up::ztunnel_process(node);
            println!("--- last lines of {process}'s log ---");
            print!("{}", up::log_tail(&mesh.log_path(&process)));
        }
    }
    if keep {
        println!("The mesh keeps running (--keep); remove it with `weft down --name {name}`.");
    } else {
        let name = mesh.name().to_string();
        mesh.down().with_context(|| format!("removing the demo mesh (try `weft down --name {name}`)"))?;
        println!("Mesh removed: namespaces, processes, eBPF programs and state are gone.");
    }
    let checks = result?;
    if checks.failed.is_empty() {
        println!("Demo finished: everything behaved as expected.");
        Ok(ExitCode::SUCCESS)
    } else {
        println!("Demo finished with {} unexpected result(s):", checks.failed.len());
        for f in &checks.failed {
            println!("  - {f}");
        }
        Ok(ExitCode::FAILURE)
    }
}

fn scenario(mesh: &Mesh) -> anyhow::Result<Checks> {
    let mut checks = Checks::default();
    let cluster = mesh.cluster();
    let client_ns = cluster.pod_netns("demo", "client")?.to_string();
    let client_ip = cluster.pod_ip("demo", "client")?;
    let intruder_ns = cluster.pod_netns("demo", "intruder")?.to_string();
    let outsider_ns = cluster.pod_netns("legacy", "outsider")?.to_string();
    let outsider_ip = cluster.pod_ip("legacy", "outsider")?;
    let echo_ip = cluster.pod_ip("demo", "echo")?;
    let echo = SocketAddr::new(echo_ip, 8080);

    println!();
    println!("1. Identities: each ztunnel's view of the workloads (GET :15000/config_dump)");
    for node in ["node-a", "node-b"] {
        match mesh.ztunnel_get(node, up::ADMIN_PORT, "/config_dump") {
            Ok((200, body)) => match serde_json::from_str::<Value>(&body) {
                Ok(dump) => {
                    let workloads =
                        dump.get("workloads").and_then(Value::as_array).cloned().unwrap_or_default();
                    println!("  {node}'s ztunnel knows {} workloads:", workloads.len());
                    for w in &workloads {
                        let s = |k: &str| w.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
                        let addrs = w.get("addresses").map(Value::to_string).unwrap_or_default();
                        println!(
                            "    {:<18} {:<16} {:<6} {}",
                            format!("{}/{}", s("namespace"), s("name")),
                            addrs,
                            s("protocol"),
                            s("identity")
                        );
                    }
                    let has = |name: &str| {
                        workloads.iter().any(|w| w.get("name").and_then(Value::as_str) == Some(name))
                    };
                    checks.expect(
                        has("client") && has("echo"),
                        format!("{node}'s ztunnel knows demo/client and demo/echo"),
                    );
                }
                Err(e) => checks.expect(false, format!("{node} /config_dump is JSON ({e})")),
            },
            Ok((status, _)) => checks.expect(false, format!("{node} /config_dump answered {status}")),
            Err(e) => checks.expect(false, format!("{node} /config_dump: {e}")),
        }
    }
    for pod in mesh.pods.iter().filter(|p| p.ambient) {
        println!("  {}/{} runs as {}", pod.namespace, pod.name, pod.identity());
    }

    println!();
    println!("2. demo/client (node-a, {client_ip}) -> demo/echo (node-b) at http://{echo}/hello");
    println!(
        "   captured by node-a's ztunnel, carried in mutual TLS to {echo_ip}:15008, delivered by node-b's"
    );
    let reply = curl(&client_ns, &format!("http://{echo}/hello"));
    show_reply(&mut checks, &reply, &["echo"], client_ip);

    println!();
    println!("3. demo/client -> the echo Service at http://{SERVICE}/ (a virtual IP only ztunnel knows)");
    println!("   the Service is bound to demo's waypoint: ztunnel -> waypoint -> ztunnel -> echo");
    let reply = curl(&client_ns, &format!("http://{SERVICE}/"));
    show_reply(&mut checks, &reply, &["echo", "echo-v2"], client_ip);

    println!();
    println!("4. demo/intruder -> demo/echo: AuthorizationPolicy demo/deny-intruder denies");
    println!("   principal cluster.local/ns/demo/sa/intruder");
    match curl(&intruder_ns, &format!("http://{echo}/hello")) {
        Ok(body) => checks.expect(false, format!("the intruder was refused, but it got: {}", body.trim())),
        Err(e) => {
            println!("    {}", e.trim());
            checks.expect(true, "the intruder's connection was refused by node-b's ztunnel");
        }
    }

    println!();
    println!("5. legacy/outsider ({outsider_ip}, namespace not in the mesh) -> demo/echo");
    println!("   plain TCP from outside the mesh; PeerAuthentication is PERMISSIVE (the default)");
    let reply = curl(&outsider_ns, &format!("http://{echo}/hello"));
    show_reply(&mut checks, &reply, &["echo"], outsider_ip);

    println!();
    println!("6. Metrics of node-b's ztunnel (GET :15020/metrics), Istio's names:");
    match mesh.ztunnel_get("node-b", up::METRICS_PORT, "/metrics") {
        Ok((200, text)) => {
            let mut opened = 0.0;
            let mut denied = 0.0;
            println!("    (labels shortened; the series carry all of Istio's labels)");
            for line in text.lines().filter(|l| l.starts_with("istio_tcp_connections_")) {
                println!("    {}", short_series(line));
                let value: f64 = line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
                if line.starts_with("istio_tcp_connections_opened_total") {
                    opened += value;
                }
                if line.starts_with("istio_tcp_connections_closed_total")
                    && line.contains("response_flags=\"DENY\"")
                {
                    denied += value;
                }
            }
            checks.expect(
                opened >= 2.0,
                format!("istio_tcp_connections_opened_total counts the calls ({opened})"),
            );
            checks.expect(
                denied >= 1.0,
                format!("a closed connection carries response_flags=\"DENY\" ({denied})"),
            );
        }
        Ok((status, _)) => checks.expect(false, format!("node-b /metrics answered {status}")),
        Err(e) => checks.expect(false, format!("node-b /metrics: {e}")),
    }
    waypoint(mesh, &mut checks, &client_ns);
    println!();
    Ok(checks)
}

/// Calls the demo makes to show the canary split.
const SPLIT_CALLS: usize = 300;

/// Step 7: the waypoint's routing, measured.
fn waypoint(mesh: &Mesh, checks: &mut Checks, client_ns: &str) {
    println!();
    println!("7. The waypoint (demo/waypoint-0) applies VirtualService demo/echo to the echo Service:");
    println!("   {SPLIT_CALLS} calls of http://{SERVICE}/ split 90/10 between the subsets v1 and v2");
    let url = format!("http://{SERVICE}/");
    let split = answers(client_ns, &url, SPLIT_CALLS, &[]);
    let v2 = split.get("echo-v2").copied().unwrap_or(0);
    let v1 = split.get("echo").copied().unwrap_or(0);
    println!(
        "    v1 (demo/echo): {v1}   v2 (demo/echo-v2): {v2}   ({:.1} % to v2)",
        percent(v2, SPLIT_CALLS)
    );
    checks.expect(v1 + v2 == SPLIT_CALLS, format!("all {SPLIT_CALLS} calls answered by echo or echo-v2"));
    // 10 % of 300 is 30; 4-20 % is well over three standard deviations either side.
    checks.expect(
        (4.0..=20.0).contains(&percent(v2, SPLIT_CALLS)),
        "v2 took about 10 % of the calls (4-20 % over 300)",
    );
    println!("   20 calls with `x-canary: always`");
    let canary = answers(client_ns, &url, 20, &["-H", "x-canary: always"]);
    println!("    {canary:?}");
    checks.expect(canary.get("echo-v2") == Some(&20), "every x-canary call reached v2");
    println!("   the waypoint's istio_requests_total (GET :15020/metrics), by destination_version:");
    match mesh.pod_get("demo", "waypoint-0", up::METRICS_PORT, "/metrics") {
        Ok((200, text)) => {
            let mut by_version = std::collections::BTreeMap::<String, f64>::new();
            for line in text.lines().filter(|l| l.starts_with("istio_requests_total{")) {
                let version = label(line, "destination_version").unwrap_or("unknown").to_owned();
                let value: f64 = line.rsplit(' ').next().and_then(|v| v.parse().ok()).unwrap_or(0.0);
                *by_version.entry(version).or_default() += value;
            }
            for (version, n) in &by_version {
                println!(
                    "    istio_requests_total{{reporter=\"waypoint\",destination_version=\"{version}\"}} {n}"
                );
            }
            let v2_metric = by_version.get("v2").copied().unwrap_or(0.0);
            checks.expect(
                v2_metric >= (v2 + 20) as f64,
                format!("the waypoint counted the v2 calls ({v2_metric} >= {})", v2 + 20),
            );
        }
        Ok((status, _)) => checks.expect(false, format!("the waypoint's /metrics answered {status}")),
        Err(e) => checks.expect(false, format!("the waypoint's /metrics: {e}")),
    }
}

fn percent(n: usize, of: usize) -> f64 {
    n as f64 * 100.0 / of.max(1) as f64
}

/// The value of label `name` in a Prometheus series line.
fn label<'l>(line: &'l str, name: &str) -> Option<&'l str> {
    let start = line.find(&format!("{name}=\""))? + name.len() + 2;
    let len = line[start..].find('"')?;
    Some(&line[start..start + len])
}

/// `n` GETs of `url` on one curl (keep-alive) inside `netns`: the answering pods, counted.
fn answers(netns: &str, url: &str, n: usize, extra: &[&str]) -> std::collections::BTreeMap<String, usize> {
    let mut counts = std::collections::BTreeMap::new();
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "curl", "-sS", "--max-time", "60"])
        .args(extra)
        .args(std::iter::repeat_n(url, n))
        .output();
    let Ok(out) = out else { return counts };
    let text = String::from_utf8_lossy(&out.stdout);
    for reply in serde_json::Deserializer::from_str(&text).into_iter::<Value>().map_while(Result::ok) {
        let pod = reply.get("pod").and_then(Value::as_str).unwrap_or("?").to_owned();
        *counts.entry(pod).or_default() += 1;
    }
    counts
}

fn show_reply(checks: &mut Checks, reply: &Result<String, String>, pods: &[&str], caller: IpAddr) {
    match reply {
        Ok(body) => {
            println!("    {}", body.trim());
            let json: Value = serde_json::from_str(body).unwrap_or(Value::Null);
            let peer = json
                .get("peer")
                .and_then(Value::as_str)
                .and_then(|p| p.parse::<SocketAddr>().ok())
                .map(|p| p.ip());
            let answered = json.get("pod").and_then(Value::as_str).unwrap_or_default();
            checks.expect(pods.contains(&answered), format!("answered by {}", pods.join(" or ")));
            checks.expect(
                peer == Some(caller),
                format!("the server saw the caller's own address {caller} as `peer`"),
            );
        }
        Err(e) => checks.expect(false, format!("the call succeeds (curl: {})", e.trim())),
    }
}

/// A series with only the labels that tell the story: who called whom, and how it ended.
fn short_series(line: &str) -> String {
    const KEEP: [&str; 5] = [
        "reporter",
        "source_principal",
        "destination_workload",
        "response_flags",
        "connection_security_policy",
    ];
    let Some((name, rest)) = line.split_once('{') else { return line.to_string() };
    let Some((labels, value)) = rest.rsplit_once("} ") else { return line.to_string() };
    let kept: Vec<String> = labels
        .split("\",")
        .map(|l| l.trim_end_matches('"'))
        .filter(|l| KEEP.iter().any(|k| l.starts_with(&format!("{k}=\""))))
        .map(|l| format!("{l}\""))
        .collect();
    format!("{name}{{{}}} {value}", kept.join(","))
}

/// `curl` inside `netns`: the body, or curl's error.
fn curl(netns: &str, url: &str) -> Result<String, String> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "curl", "-sS", "--max-time", "5", url])
        .output()
        .map_err(|e| format!("running curl: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("{} ({})", String::from_utf8_lossy(&out.stderr).trim(), out.status))
    }
}
