#![allow(clippy::unwrap_used)]
//! The L4 mesh on the local two-node cluster: single-stream TCP throughput, 1 KB request/response
//! latency at a fixed 1,000 requests/s, and what the two ztunnels spend on it (CPU-seconds, RSS).
//! One command, no harness, as root: `cargo bench -p weft --bench mesh`.
//!
//! One cluster (`weft::up` on `examples/bench/`, name [`CLUSTER`]) holds the same client (node-a)
//! and server (node-b) pair twice: in namespace `plain`, not in the mesh (client → server over the
//! link between the nodes), and in namespace `mesh`, ambient (client → node-a's ztunnel → HBONE,
//! mutual TLS → node-b's ztunnel → server). Every figure is taken for both, on the same cluster,
//! in the same run, so the difference is the mesh. Real processes, real eBPF capture, real kernel
//! networking; everything shares the machine's cores.
//!
//! - Throughput: `iperf3 -c <server> -t 10 -J` inside the client pod's namespace against
//!   `iperf3 -s` in the server pod's, [`THROUGHPUT_ROUNDS`] rounds alternating plain and mesh.
//! - Latency: a fixed-rate generator (below) sends `GET /bytes/1024` to weft-app at [`RATE`]
//!   requests/s over [`CONNECTIONS`] keep-alive HTTP/1.1 connections, on a schedule that does not
//!   wait for the server; each latency runs from the request's *scheduled* send time to the last
//!   byte of its response, so a stall counts for every request it delays (no coordinated
//!   omission).
//! - ztunnel cost: utime+stime from `/proc/<pid>/stat` of both ztunnels over the measured window
//!   of the mesh latency run, and VmRSS sampled during it, next to the idle baseline.
//!
//! The cluster is removed on every path: a guard on return and panic, a signal thread on
//! Ctrl-C/SIGTERM, and `weft up` itself removes a leftover cluster of the same name first.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use weft::cluster;
use weft::up::{self, Mesh, UpOptions};

mod support;
use support::*;

/// The cluster's name (its namespaces are `weft-bench-*`; nothing else is touched).
const CLUSTER: &str = "bench";
const NODES: [&str; 2] = ["node-a", "node-b"];
const LOCK: &str = "/run/lock/weft-bench-mesh.lock";
/// The two namespaces of `examples/bench/mesh.yaml`, in the order they are measured.
const PLAIN: &str = "plain";
const MESH: &str = "mesh";

const IPERF_PORT: u16 = 5201;
/// `iperf3 -t`: seconds per throughput round.
const IPERF_SECONDS: u32 = 10;
/// Rounds per path, alternating plain and mesh; the median is reported with the range.
const THROUGHPUT_ROUNDS: usize = 3;

const HTTP_PORT: u16 = 8080;
/// The response body of the latency test.
const BODY_BYTES: usize = 1024;
/// Requests per second, across all connections.
const RATE: u32 = 1_000;
const CONNECTIONS: usize = 4;
/// Sent at the full rate and thrown away, then measured.
const WARMUP: Duration = Duration::from_secs(3);
const MEASURE: Duration = Duration::from_secs(15);

/// The targets of issue 4, per 1,000 requests/s for the ztunnel figures (each ztunnel).
const TARGET_RATIO: f64 = 0.6;
const TARGET_ADDED_P99_US: f64 = 100.0;
const TARGET_VCPU_PER_KRPS: f64 = 0.03;
const TARGET_RSS_MB_PER_KRPS: f64 = 8.0;
/// Issue 16's: both ztunnels' CPU-seconds per GB carried, new HBONE connections/s per core.
const TARGET_CPU_S_PER_GB: f64 = 1.0;
const TARGET_NEW_HBONE_PER_CORE: f64 = 4000.0;

fn main() -> anyhow::Result<()> {
    // `cargo test --all-targets` runs bench targets too, without `--bench`: building a cluster
    // as root for two and a half minutes is not a test.
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("the mesh bench runs only under `cargo bench -p weft --bench mesh`; skipped");
        return Ok(());
    }
    let started = Instant::now();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    cluster::check_environment().context("the mesh bench builds network namespaces: run it as root")?;
    for tool in ["iperf3", "ip", "ss"] {
        let found = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output()?;
        ensure!(found.status.success(), "{tool} is not installed (the bench needs iperf3 and iproute2)");
    }
    let bin_dir = bin_dir(
        &[
            ("ztunnel", &["ztunnel", "weft-core", "ebpf"]),
            ("controller", &["controller", "weft-core", "weft-config"]),
        ],
        "source scripts/env.sh && scripts/release.sh",
    )?;
    // One run at a time: a second run's `weft up` would remove the first one's cluster.
    let lock = std::fs::File::create(LOCK).with_context(|| format!("creating {LOCK}"))?;
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock)
        .map_err(|(_, errno)| anyhow::anyhow!("another mesh bench holds {LOCK} ({errno}): wait for it"))?;
    wait_for_quiet();
    let load_start = loadavg();
    eprintln!("load average at start: {}", load_start.shown());

    let manifests = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/bench");
    eprintln!(
        "weft up {} (cluster {CLUSTER:?}, binaries from {})...",
        manifests.display(),
        bin_dir.display()
    );
    watch_signals(CLUSTER);
    let up_started = Instant::now();
    let guard = Guard { mesh: up::up(&UpOptions::new(&manifests, CLUSTER, &bin_dir)).context("weft up")? };
    eprintln!("up in {:.1} s", up_started.elapsed().as_secs_f64());
    let report = measure(&guard.mesh)?;
    let load_end = loadavg();
    drop(guard);
    report.print(&load_start, &load_end);
    eprintln!("done in {:.0} s", started.elapsed().as_secs_f64());
    ensure!(report.errors() == 0, "{} requests failed (see the table)", report.errors());
    Ok(())
}

fn measure(mesh: &Mesh) -> anyhow::Result<Report> {
    let ztunnels = ztunnels(mesh)?;
    let dir = tempfile::tempdir()?;
    let (haproxy_pair, relay_pair, _haproxies) = haproxy_pair(mesh, dir.path())?;
    let paths = [
        Pair::new(mesh, PLAIN, &ztunnels)?,
        Pair::new(mesh, MESH, &ztunnels)?,
        Pair::new(mesh, PLAIN, &ztunnels)?.through(HAPROXY, haproxy_pair),
    ];
    // The same haproxy pair relaying without TLS: the kernel's share of the work, a floor.
    let relay = Pair::new(mesh, PLAIN, &ztunnels)?.through(HAPROXY_RELAY, relay_pair);
    let _iperf_servers: Vec<Server> =
        paths[..2].iter().map(|p| iperf_server(&p.server_netns)).collect::<anyhow::Result<_>>()?;
    for path in &paths[..2] {
        wait_listening(&path.server_netns, IPERF_PORT)?;
    }
    // One request each way first: the mesh path's HBONE connection (TLS handshake, certificates)
    // is made before anything is timed.
    for path in paths.iter().chain([&relay]) {
        let mut conn = Connection::open(&path.client_netns, path.http, &path.http.to_string())?;
        let (status, body) = conn.get(&format!("/bytes/{BODY_BYTES}"))?;
        ensure!(
            status == 200 && body == BODY_BYTES,
            "{}: GET /bytes answered {status}, {body} bytes",
            path.name
        );
    }
    std::thread::sleep(Duration::from_secs(1));
    let rss_idle = ztunnels.rss()?;

    let mut latency = Vec::new();
    for path in paths.iter().chain([&relay]) {
        eprintln!(
            "latency {}: {RATE} requests/s over {CONNECTIONS} connections, {WARMUP:?} warm-up + {MEASURE:?}...",
            path.name
        );
        latency.push(fixed_rate(path)?);
    }
    let opened = mesh_connections(mesh)?;
    ensure!(
        opened >= CONNECTIONS as f64,
        "node-b's ztunnel counted {opened} connections to the mesh server: the mesh path was not captured"
    );

    let mut throughput = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    for round in 0..THROUGHPUT_ROUNDS {
        for (i, path) in paths.iter().chain([&relay]).enumerate() {
            eprintln!(
                "throughput {} round {}/{THROUGHPUT_ROUNDS}: iperf3 -t {IPERF_SECONDS}...",
                path.name,
                round + 1
            );
            let before = path.proxies.cpu()?;
            let run = iperf(path)?;
            let cpu = path.proxies.cpu()?.since(&before);
            throughput[i].push(Iperf { proxy_cpu: cpu, ..run });
        }
    }
    let rss_after_throughput = ztunnels.rss()?;

    let request = hbone_request(mesh, &paths[1])?;
    let mut connects = Vec::new();
    for concurrency in [1, CONNECT_CONCURRENCY] {
        for (path, kind) in
            paths.iter().zip([ConnectKind::Direct, ConnectKind::PooledHbone, ConnectKind::Haproxy])
        {
            eprintln!("new connections {}, {concurrency} at a time, {CONNECT_TIME:?}...", path.name);
            let addr = path.http;
            connects.push(new_connections(kind, concurrency, &path.client_netns, &path.proxies, || {
                Ok(fresh_requests(addr))
            })?);
        }
        eprintln!("new HBONE connections to node-b's ztunnel, {concurrency} at a time, {CONNECT_TIME:?}...");
        let node_a = mesh.cluster().node_netns(NODES[0])?;
        connects.push(new_connections(ConnectKind::NewHbone, concurrency, node_a, &ztunnels, || {
            new_hbone_requests(&request)
        })?);
    }

    let [plain_tput, mesh_tput, peer_tput, relay_tput] = throughput;
    let relay_lat = latency.pop().unwrap();
    let peer_lat = latency.pop().unwrap();
    let mesh_lat = latency.pop().unwrap();
    let plain_lat = latency.pop().unwrap();
    Ok(Report {
        plain_tput,
        mesh_tput,
        peer_tput,
        relay_tput,
        plain_lat,
        mesh_lat,
        peer_lat,
        relay_lat,
        rss_idle,
        rss_after_throughput,
        connects,
    })
}

/// One client → server route: the client's and the server's network namespace, the addresses
/// the client calls, and the proxies on the way whose CPU is measured.
struct Pair {
    name: &'static str,
    client_netns: String,
    server_netns: String,
    /// Where the client sends iperf3 and HTTP.
    iperf: SocketAddr,
    http: SocketAddr,
    proxies: Procs,
}

impl Pair {
    /// Namespace `ns`'s client calling its server directly (the capture decides the rest).
    fn new(mesh: &Mesh, ns: &'static str, ztunnels: &Procs) -> anyhow::Result<Pair> {
        let c = mesh.cluster();
        let server = c.pod_ip(ns, "server")?;
        Ok(Pair {
            name: ns,
            client_netns: c.pod_netns(ns, "client")?.to_string(),
            server_netns: c.pod_netns(ns, "server")?.to_string(),
            iperf: SocketAddr::new(server, IPERF_PORT),
            http: SocketAddr::new(server, HTTP_PORT),
            proxies: ztunnels.clone(),
        })
    }

    /// The same client and server, through another proxy pair.
    fn through(self, name: &'static str, proxies: ProxyPair) -> Pair {
        Pair { name, iperf: proxies.iperf, http: proxies.http, proxies: proxies.procs, ..self }
    }
}

// ---- the peer: haproxy ----

const HAPROXY: &str = "haproxy";
const HAPROXY_RELAY: &str = "haproxy, no TLS";
/// node-a's haproxy listens on these (plain TCP from the client), node-b's on the same ports
/// plus 100 (TLS from node-a's).
const HAPROXY_IPERF_PORT: u16 = 15101;
const HAPROXY_HTTP_PORT: u16 = 15102;
/// The same pair relaying iperf3 and HTTP in plain TCP between the nodes.
const HAPROXY_RELAY_PORT: u16 = 15103;
const HAPROXY_RELAY_HTTP_PORT: u16 = 15104;

/// A proxy pair in the ztunnels' places: where the client calls it, and its processes.
struct ProxyPair {
    iperf: SocketAddr,
    http: SocketAddr,
    procs: Procs,
}

/// Two haproxy processes (Debian's, TCP mode, one thread each) doing what the ztunnels do: one
/// on node-a takes the plain client's connections, one on node-b hands them to the plain server,
/// and between the nodes they speak TLS 1.3 (AES-256-GCM, ECDSA P-256 certificates verified both
/// ways, a full handshake per connection). The same hops as the mesh path; no HTTP/2 tunnel, no
/// identity, no policy.
/// The same processes also relay without TLS: the second pair returned.
fn haproxy_pair(mesh: &Mesh, dir: &Path) -> anyhow::Result<(ProxyPair, ProxyPair, Vec<Server>)> {
    let c = mesh.cluster();
    let (node_a, node_b) = (mesh.node_ip(NODES[0])?, mesh.node_ip(NODES[1])?);
    let server = c.pod_ip(PLAIN, "server")?;
    let openssl = |args: &[&str]| -> anyhow::Result<()> {
        let out = Command::new("openssl").args(args).current_dir(dir).output().context("running openssl")?;
        ensure!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        Ok(())
    };
    openssl(&["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca.key"])?;
    openssl(&[
        "req",
        "-x509",
        "-new",
        "-key",
        "ca.key",
        "-subj",
        "/CN=bench CA",
        "-days",
        "1",
        "-out",
        "ca.pem",
    ])?;
    for name in NODES {
        let (key, csr, crt) = (format!("{name}.key"), format!("{name}.csr"), format!("{name}.crt"));
        openssl(&["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", &key])?;
        openssl(&["req", "-new", "-key", &key, "-subj", &format!("/CN={name}"), "-out", &csr])?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-out",
            &crt,
        ])?;
        let pem = std::fs::read_to_string(dir.join(&crt))? + &std::fs::read_to_string(dir.join(&key))?;
        std::fs::write(dir.join(format!("{name}.pem")), pem)?;
    }
    let d = dir.display();
    let global =
        "global\n  nbthread 1\n  maxconn 4000\n  ssl-default-bind-ciphersuites TLS_AES_256_GCM_SHA384\n  \
                  ssl-default-server-ciphersuites TLS_AES_256_GCM_SHA384\ndefaults\n  mode tcp\n  \
                  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n";
    let (mut a, mut b) = (global.to_owned(), global.to_owned());
    for (port, target) in [(HAPROXY_IPERF_PORT, IPERF_PORT), (HAPROXY_HTTP_PORT, HTTP_PORT)] {
        a += &format!(
            "listen p{port}\n  bind {node_a}:{port}\n  server b {node_b}:{} ssl crt {d}/node-a.pem ca-file {d}/ca.pem \
             verify required verifyhost node-b ssl-min-ver TLSv1.3 no-ssl-reuse\n",
            port + 100
        );
        b += &format!(
            "listen p{port}\n  bind {node_b}:{} ssl crt {d}/node-b.pem ca-file {d}/ca.pem verify required \
             ssl-min-ver TLSv1.3\n  server s {server}:{target}\n",
            port + 100
        );
    }
    for (port, target) in [(HAPROXY_RELAY_PORT, IPERF_PORT), (HAPROXY_RELAY_HTTP_PORT, HTTP_PORT)] {
        a += &format!("listen p{port}\n  bind {node_a}:{port}\n  server b {node_b}:{}\n", port + 100);
        b += &format!("listen p{port}\n  bind {node_b}:{}\n  server s {server}:{target}\n", port + 100);
    }
    let mut servers = Vec::new();
    let mut pids = Vec::new();
    for (node, config, port) in [(NODES[0], a, HAPROXY_HTTP_PORT), (NODES[1], b, HAPROXY_HTTP_PORT + 100)] {
        let netns = c.node_netns(node)?;
        let file = dir.join(format!("haproxy-{node}.cfg"));
        std::fs::write(&file, config)?;
        servers.push(Server::spawn(netns, &["haproxy", "-db", "-f", &file.display().to_string()])?);
        wait_listening(netns, port)?;
        pids.push(Procs::find(netns, "haproxy")?);
    }
    let procs = Procs { pids };
    let http = SocketAddr::new(node_a, HAPROXY_HTTP_PORT);
    let tls = ProxyPair { iperf: SocketAddr::new(node_a, HAPROXY_IPERF_PORT), http, procs: procs.clone() };
    let relay = ProxyPair {
        iperf: SocketAddr::new(node_a, HAPROXY_RELAY_PORT),
        http: SocketAddr::new(node_a, HAPROXY_RELAY_HTTP_PORT),
        procs,
    };
    Ok((tls, relay, servers))
}

/// Connections to node-b's mesh server that node-b's ztunnel counted (proof of capture).
fn mesh_connections(mesh: &Mesh) -> anyhow::Result<f64> {
    let (status, body) = mesh.ztunnel_get("node-b", up::METRICS_PORT, "/metrics")?;
    ensure!(status == 200, "node-b /metrics answered {status}");
    Ok(body
        .lines()
        .filter(|l| l.starts_with("istio_tcp_connections_opened_total{"))
        .filter(|l| {
            l.contains("reporter=\"destination\"")
                && l.contains(&format!("destination_workload_namespace=\"{MESH}\""))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

// ---- throughput ----

/// One `iperf3 -c` run.
#[derive(Debug, Clone, Default)]
struct Iperf {
    /// Received by the server, bits per second.
    bits_per_second: f64,
    /// Received by the server.
    bytes: f64,
    retransmits: f64,
    /// iperf3's own CPU, percent of one core: client and server processes.
    client_cpu: f64,
    server_cpu: f64,
    /// The path's proxies' CPU-seconds over the run (both ztunnels, both haproxys).
    proxy_cpu: Cpu,
}

fn iperf_server(netns: &str) -> anyhow::Result<Server> {
    Server::spawn(netns, &["iperf3", "-s", "-p", &IPERF_PORT.to_string()])
}

fn iperf(path: &Pair) -> anyhow::Result<Iperf> {
    let out = Command::new("ip")
        .args(["netns", "exec", &path.client_netns, "iperf3", "-c", &path.iperf.ip().to_string()])
        .args(["-p", &path.iperf.port().to_string(), "-t", &IPERF_SECONDS.to_string(), "-J"])
        .output()
        .context("running iperf3 -c")?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 -c printed no JSON: {}", String::from_utf8_lossy(&out.stderr)))?;
    if let Some(error) = json.get("error") {
        bail!("iperf3 -c {} ({}): {error}", path.iperf, path.name);
    }
    let number = |pointer: &str| json.pointer(pointer).and_then(serde_json::Value::as_f64);
    Ok(Iperf {
        bits_per_second: number("/end/sum_received/bits_per_second")
            .context("iperf3 JSON without end.sum_received")?,
        bytes: number("/end/sum_received/bytes").context("iperf3 JSON without end.sum_received.bytes")?,
        retransmits: number("/end/sum_sent/retransmits").unwrap_or(0.0),
        client_cpu: number("/end/cpu_utilization_percent/host_total").unwrap_or(0.0),
        server_cpu: number("/end/cpu_utilization_percent/remote_total").unwrap_or(0.0),
        proxy_cpu: Cpu::default(),
    })
}

// ---- latency ----

/// The fixed-rate latency run of `path` (see `support::fixed_rate`), its proxies measured.
fn fixed_rate(path: &Pair) -> anyhow::Result<LatencyRun> {
    let schedule =
        Schedule { rate: RATE, connections: CONNECTIONS, warmup: WARMUP, measure: MEASURE, body: BODY_BYTES };
    support::fixed_rate(
        schedule,
        || Connection::open(&path.client_netns, path.http, &path.http.to_string()),
        &path.proxies,
    )
}

// ---- new connections ----

/// How long each connection-rate run lasts, and the concurrency of the parallel one.
const CONNECT_TIME: Duration = Duration::from_secs(5);
const CONNECT_CONCURRENCY: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConnectKind {
    /// A fresh TCP connection from the plain client to the plain server.
    Direct,
    /// A fresh TCP connection from the mesh client through both ztunnels: a new CONNECT stream on
    /// node-a's pooled HBONE connection.
    PooledHbone,
    /// A new HBONE connection per request to node-b's ztunnel (TCP, a full mutual-TLS handshake,
    /// HTTP/2, one CONNECT), dialed from node-a as node-a's ztunnel dials it.
    NewHbone,
    /// A fresh TCP connection from the plain client through the haproxy pair (a full TLS
    /// handshake between them each time).
    Haproxy,
}

impl ConnectKind {
    fn name(self) -> &'static str {
        match self {
            ConnectKind::Direct => "direct TCP (plain)",
            ConnectKind::PooledHbone => "through the mesh, pooled HBONE",
            ConnectKind::NewHbone => "new HBONE connection each",
            ConnectKind::Haproxy => "through the haproxy pair, new TLS each",
        }
    }
}

struct ConnectRun {
    kind: ConnectKind,
    concurrency: usize,
    done: u64,
    failed: u64,
    elapsed: Duration,
    proxy_cpu: Cpu,
}

impl ConnectRun {
    fn rate(&self) -> f64 {
        self.done as f64 / self.elapsed.as_secs_f64()
    }

    /// CPU-milliseconds per connection of node-a's and node-b's ztunnel.
    fn cpu_ms(&self, i: usize) -> f64 {
        self.proxy_cpu.seconds[i] * 1000.0 / self.done.max(1) as f64
    }
}

/// One worker's connector: called again and again, each call one request on a fresh connection.
type Connector = Box<dyn FnMut() -> anyhow::Result<()>>;

/// Runs `concurrency` workers inside `netns` for [`CONNECT_TIME`], each with its own connector
/// from `connector`, taking both ztunnels' CPU over the run.
fn new_connections(
    kind: ConnectKind,
    concurrency: usize,
    netns: &str,
    ztunnels: &Procs,
    connector: impl Fn() -> anyhow::Result<Connector> + Sync,
) -> anyhow::Result<ConnectRun> {
    let before = ztunnels.cpu()?;
    let started = Instant::now();
    let counts: Vec<anyhow::Result<(u64, u64)>> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..concurrency)
            .map(|_| {
                scope.spawn(|| {
                    cluster::in_netns(netns, || -> anyhow::Result<(u64, u64)> {
                        let mut connect = connector()?;
                        let (mut done, mut failed) = (0, 0);
                        while started.elapsed() < CONNECT_TIME {
                            match connect() {
                                Ok(()) => done += 1,
                                Err(e) => {
                                    failed += 1;
                                    if failed <= 3 {
                                        eprintln!("  {}: {e:#}", kind.name());
                                    }
                                }
                            }
                        }
                        Ok((done, failed))
                    })?
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let elapsed = started.elapsed();
    let proxy_cpu = ztunnels.cpu()?.since(&before);
    let (mut done, mut failed) = (0, 0);
    for count in counts {
        let (d, f) = count?;
        (done, failed) = (done + d, failed + f);
    }
    Ok(ConnectRun { kind, concurrency, done, failed, elapsed, proxy_cpu })
}

/// A request that closes its connection, for [`new_connections`]: `GET /bytes/1`.
const FRESH_REQUEST: &str = "GET /bytes/1 HTTP/1.1\r\nHost: server\r\nConnection: close\r\n\r\n";

fn check_fresh_response(response: &[u8]) -> anyhow::Result<()> {
    ensure!(response.starts_with(b"HTTP/1.1 200"), "answered {:?}", String::from_utf8_lossy(response));
    Ok(())
}

/// Fresh TCP connections to `addr`, each carrying [`FRESH_REQUEST`] (run inside the client's
/// network namespace).
fn fresh_requests(addr: SocketAddr) -> Connector {
    Box::new(move || {
        let mut stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        std::io::Write::write_all(&mut stream, FRESH_REQUEST.as_bytes())?;
        let mut response = Vec::new();
        std::io::Read::read_to_end(&mut stream, &mut response)?;
        check_fresh_response(&response)
    })
}

/// New HBONE connections to node-b's ztunnel as node-a's ztunnel dials them for the mesh client
/// (run inside node-a's network namespace): from the client pod's address (IP_TRANSPARENT, the
/// capture's socket mark), with a certificate for the client's identity from the cluster's CA,
/// and a new [`weft_core::hbone::Pool`] each time, so each is a new TCP connection and a full
/// mutual-TLS handshake. The certificate is made once (ztunnel caches it too).
fn new_hbone_requests(request: &weft_core::hbone::ConnectRequest) -> anyhow::Result<Connector> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let request = request.clone();
    Ok(Box::new(move || {
        runtime.block_on(async {
            let pool = weft_core::hbone::Pool::new(weft_core::hbone::ClientSettings {
                transparent: true,
                mark: Some(ebpf::SOCKET_MARK),
                ..Default::default()
            });
            let mut stream = pool.connect(request.clone()).await?;
            stream.write_all(FRESH_REQUEST.as_bytes()).await?;
            let mut response = Vec::new();
            stream.read_to_end(&mut response).await?;
            ensure!(
                pool.connections_opened() == 1,
                "the pool opened {} connections",
                pool.connections_opened()
            );
            check_fresh_response(&response)
        })
    }))
}

/// What node-a's ztunnel would send node-b's for the mesh client's connection to the server.
fn hbone_request(mesh: &Mesh, path: &Pair) -> anyhow::Result<weft_core::hbone::ConnectRequest> {
    let ca_dir = cluster::state_dir(CLUSTER).join("ca");
    let read = |file: &str| {
        std::fs::read_to_string(ca_dir.join(file))
            .with_context(|| format!("reading {file} in {}", ca_dir.display()))
    };
    let ca = weft_core::tls::CertificateAuthority::from_pem(
        up::TRUST_DOMAIN,
        &read("root-cert.pem")?,
        &read("root-key.pem")?,
    )?;
    let identity = |sa: &str| -> anyhow::Result<weft_core::identity::Identity> {
        Ok(format!("spiffe://{}/ns/{MESH}/sa/{sa}", up::TRUST_DOMAIN).parse()?)
    };
    let now = std::time::SystemTime::now();
    let certificate =
        ca.issue(&identity("client")?, now - Duration::from_secs(60), now + Duration::from_secs(3600))?;
    Ok(weft_core::hbone::ConnectRequest {
        certificate: std::sync::Arc::new(certificate),
        expected: vec![identity("server")?],
        source_ip: Some(mesh.cluster().pod_ip(MESH, "client")?),
        hbone_addr: SocketAddr::new(path.http.ip(), weft_core::hbone::HBONE_PORT),
        authority: path.http,
        forwarded: Default::default(),
        baggage: None,
        traceparent: None,
    })
}

// ---- /proc ----

/// The two ztunnel processes, node-a's then node-b's.
fn ztunnels(mesh: &Mesh) -> anyhow::Result<Procs> {
    let mut pids = Vec::new();
    for node in NODES {
        pids.push(Procs::find(mesh.cluster().node_netns(node)?, "ztunnel")?);
    }
    Ok(Procs { pids })
}

// ---- report ----

struct Report {
    plain_tput: Vec<Iperf>,
    mesh_tput: Vec<Iperf>,
    plain_lat: LatencyRun,
    mesh_lat: LatencyRun,
    /// The same client and server through the haproxy pair.
    peer_tput: Vec<Iperf>,
    /// The same haproxy pair relaying without TLS.
    relay_tput: Vec<Iperf>,
    peer_lat: LatencyRun,
    /// The same haproxy pair relaying without TLS.
    relay_lat: LatencyRun,
    rss_idle: Rss,
    rss_after_throughput: Rss,
    connects: Vec<ConnectRun>,
}

impl Report {
    fn errors(&self) -> usize {
        self.plain_lat.errors
            + self.mesh_lat.errors
            + self.peer_lat.errors
            + self.relay_lat.errors
            + self.connects.iter().map(|c| c.failed as usize).sum::<usize>()
    }

    /// Both ztunnels' CPU-seconds per GB (10^9 bytes) carried in the mesh rounds, median.
    fn cpu_per_gb(&self) -> f64 {
        Self::proxy_cpu_per_gb(&self.mesh_tput)
    }

    /// The proxies' CPU-seconds per GB carried, median of the rounds.
    fn proxy_cpu_per_gb(runs: &[Iperf]) -> f64 {
        median(runs.iter().map(|r| r.proxy_cpu.total() / (r.bytes / 1e9)).collect())
    }

    fn connect_run(&self, kind: ConnectKind, concurrency: usize) -> Option<&ConnectRun> {
        self.connects.iter().find(|c| c.kind == kind && c.concurrency == concurrency)
    }

    /// New HBONE connections per second per core of node-b's ztunnel (the accepting side).
    fn new_hbone_per_core(&self) -> f64 {
        self.connect_run(ConnectKind::NewHbone, CONNECT_CONCURRENCY).map_or(0.0, |c| 1000.0 / c.cpu_ms(1))
    }

    fn gbps(runs: &[Iperf]) -> f64 {
        median(runs.iter().map(|r| r.bits_per_second / 1e9).collect())
    }

    /// A table for people, then one JSON line per figure.
    fn print(&self, load_start: &LoadAvg, load_end: &LoadAvg) {
        let (plain_g, mesh_g) = (Self::gbps(&self.plain_tput), Self::gbps(&self.mesh_tput));
        let ratio = mesh_g / plain_g;
        let range = |runs: &[Iperf]| {
            let v: Vec<f64> = runs.iter().map(|r| r.bits_per_second / 1e9).collect();
            format!(
                "{:.2}-{:.2}",
                v.iter().copied().fold(f64::INFINITY, f64::min),
                v.iter().copied().fold(0.0, f64::max)
            )
        };
        let (pl, ml) = (&self.plain_lat, &self.mesh_lat);
        let q = |run: &LatencyRun, q: f64| quantile_us(&run.latencies, q);
        let added_p50 = q(ml, 0.5) - q(pl, 0.5);
        let added_p99 = q(ml, 0.99) - q(pl, 0.99);
        // Per ztunnel, per 1,000 requests/s actually carried in the window.
        let krps = ml.rate() / 1000.0;
        let vcpu = |i: usize| ml.cpu.seconds[i] / ml.window.as_secs_f64() / krps;
        let plain_vcpu = pl.cpu.total() / pl.window.as_secs_f64();
        let rss_load = |i: usize| ml.rss_max.mb(i) / krps;
        let worst_vcpu = vcpu(0).max(vcpu(1));
        let worst_rss = rss_load(0).max(rss_load(1));
        let verdict = |ok: bool| if ok { "meets" } else { "MISSES" };
        let mesh_cpu_per_gbit = median(
            self.mesh_tput
                .iter()
                .map(|r| r.proxy_cpu.total() / f64::from(IPERF_SECONDS) / (r.bits_per_second / 1e9))
                .collect(),
        );

        println!();
        println!(
            "L4 mesh, two nodes on one machine ({} cores shared by both nodes, both ztunnels, client and server)",
            std::thread::available_parallelism().map_or(0, |n| n.get())
        );
        println!("load average: start {}, end {}", load_start.shown(), load_end.shown());
        println!("{:<50} {:>12} {:>12} {:>14}", "", "plain", "mesh", "mesh/plain");
        println!(
            "{:<50} {:>12.2} {:>12.2} {:>14.2}",
            format!("Throughput, 1 stream, median of {THROUGHPUT_ROUNDS} (Gbit/s)"),
            plain_g,
            mesh_g,
            ratio
        );
        println!("{:<50} {:>12} {:>12}", "  range (Gbit/s)", range(&self.plain_tput), range(&self.mesh_tput));
        println!(
            "{:<50} {:>12.0} {:>12.0}",
            "  retransmits (median)",
            median(self.plain_tput.iter().map(|r| r.retransmits).collect()),
            median(self.mesh_tput.iter().map(|r| r.retransmits).collect())
        );
        println!(
            "{:<50} {:>12.2} {:>12.2}",
            "  ztunnels' CPU (cores, both, median)",
            median(self.plain_tput.iter().map(|r| r.proxy_cpu.total() / f64::from(IPERF_SECONDS)).collect()),
            median(self.mesh_tput.iter().map(|r| r.proxy_cpu.total() / f64::from(IPERF_SECONDS)).collect())
        );
        println!(
            "{:<50} {:>12} {:>12.2} {:>14}",
            "  ztunnels' CPU-seconds per GB carried (both)",
            "",
            self.cpu_per_gb(),
            format!("<= {TARGET_CPU_S_PER_GB}")
        );
        println!(
            "{:<50} {:>12.0} {:>12.0}",
            "  iperf3 client + server CPU (% of a core, median)",
            median(self.plain_tput.iter().map(|r| r.client_cpu + r.server_cpu).collect()),
            median(self.mesh_tput.iter().map(|r| r.client_cpu + r.server_cpu).collect())
        );
        println!("{:<50} {:>12} {:>12} {:>14}", "", "", "", "added (us)");
        // Latencies are from each request's scheduled send time (see `fixed_rate`).
        for (what, quant) in [("p50", 0.5), ("p90", 0.9), ("p99", 0.99), ("p99.9", 0.999)] {
            println!(
                "{:<50} {:>12.1} {:>12.1} {:>+14.1}",
                format!("1 KB GET at {RATE}/s, {what} (us)"),
                q(pl, quant),
                q(ml, quant),
                q(ml, quant) - q(pl, quant)
            );
        }
        println!("{:<50} {:>12.1} {:>12.1}", "  mean (us)", mean_us(&pl.latencies), mean_us(&ml.latencies));
        // The maximum is one sample, mostly scheduling noise: no difference is printed for it.
        println!("{:<50} {:>12.1} {:>12.1}", "  max (us)", q(pl, 1.0), q(ml, 1.0));
        for (what, quant) in [("p50", 0.5), ("p99", 0.99)] {
            println!(
                "{:<50} {:>12.1} {:>12.1}",
                format!("  generator's own lateness at send, {what} (us)"),
                quantile_us(&pl.lateness, quant),
                quantile_us(&ml.lateness, quant)
            );
        }
        println!(
            "{:<50} {:>12} {:>12}",
            "  requests measured / failed",
            format!("{} / {}", pl.requests(), pl.errors),
            format!("{} / {}", ml.requests(), ml.errors)
        );
        println!("{:<50} {:>12.0} {:>12.0}", "  achieved rate (requests/s)", pl.rate(), ml.rate());
        println!(
            "{:<50} {:>11.0}% {:>11.0}%",
            "  machine CPU busy during the run (all cores)",
            pl.machine_busy * 100.0,
            ml.machine_busy * 100.0
        );
        println!();
        println!("{:<50} {:>12} {:>12} {:>14}", "ztunnel (each)", "node-a", "node-b", "target");
        println!(
            "{:<50} {:>12.4} {:>12.4} {:>14}",
            "vCPU per 1,000 requests/s",
            vcpu(0),
            vcpu(1),
            format!("<= {TARGET_VCPU_PER_KRPS}")
        );
        println!(
            "{:<50} {:>12.1} {:>12.1} {:>14}",
            "RSS under 1,000 requests/s, highest sample (MB)",
            ml.rss_max.mb(0),
            ml.rss_max.mb(1),
            format!("<= {TARGET_RSS_MB_PER_KRPS}")
        );
        println!(
            "{:<50} {:>12.1} {:>12.1}",
            "RSS idle, before any load (MB)",
            self.rss_idle.mb(0),
            self.rss_idle.mb(1)
        );
        println!(
            "{:<50} {:>12.1} {:>12.1}",
            "RSS after the throughput runs (MB)",
            self.rss_after_throughput.mb(0),
            self.rss_after_throughput.mb(1)
        );
        println!(
            "{:<50} {:>12.3} {:>12}",
            "  (both ztunnels' CPU during the plain run, cores)", plain_vcpu, ""
        );
        // The peer: the same client and server through a haproxy pair with TLS between the nodes.
        let (peer, peer_g) = (&self.peer_lat, Self::gbps(&self.peer_tput));
        let relay = &self.relay_lat;
        let run_vcpu = |run: &LatencyRun, i: usize| {
            run.cpu.seconds[i] / run.window.as_secs_f64() / (run.rate() / 1000.0)
        };
        println!();
        println!(
            "{:<50} {:>12} {:>12} {:>14}",
            "the same work, Weft vs the haproxy pair", "mesh", "haproxy", "mesh/haproxy"
        );
        println!(
            "{:<50} {:>12.2} {:>12.2} {:>14.2}",
            "Throughput, 1 stream, median (Gbit/s)",
            mesh_g,
            peer_g,
            mesh_g / peer_g
        );
        let (mesh_gb, peer_gb) = (self.cpu_per_gb(), Self::proxy_cpu_per_gb(&self.peer_tput));
        println!(
            "{:<50} {:>12.2} {:>12.2} {:>14.2}",
            "  proxies' CPU-seconds per GB carried (both)",
            mesh_gb,
            peer_gb,
            mesh_gb / peer_gb
        );
        let relay_gb = Self::proxy_cpu_per_gb(&self.relay_tput);
        println!(
            "{:<50} {:>12} {:>12.2} {:>14.2}",
            "  the haproxy pair without TLS: Gbit/s, CPU-s per GB",
            "",
            Self::gbps(&self.relay_tput),
            relay_gb
        );
        // The third column: the haproxy pair relaying without TLS, what two relays cost here.
        println!("{:<50} {:>12} {:>12} {:>14}", "", "", "", "haproxy, no TLS");
        for (what, quant) in [("p50", 0.5), ("p99", 0.99)] {
            println!(
                "{:<50} {:>+12.1} {:>+12.1} {:>+14.1}",
                format!("1 KB GET at {RATE}/s, added {what} (us)"),
                q(ml, quant) - q(pl, quant),
                q(peer, quant) - q(pl, quant),
                q(relay, quant) - q(pl, quant)
            );
        }
        let vcpus = |run: &LatencyRun| format!("{:.4} / {:.4}", run_vcpu(run, 0), run_vcpu(run, 1));
        println!(
            "{:<50} {:>12} {:>12} {:>14}",
            "vCPU per 1,000 requests/s, node-a / node-b",
            vcpus(ml),
            vcpus(peer),
            vcpus(relay)
        );
        println!(
            "{:<50} {:>12} {:>12} {:>14}",
            "  requests measured / failed",
            format!("{} / {}", ml.requests(), ml.errors),
            format!("{} / {}", peer.requests(), peer.errors),
            format!("{} / {}", relay.requests(), relay.errors)
        );
        println!();
        println!(
            "{:<50} {:>12} {:>12} {:>14}",
            format!("New connections, GET /bytes/1 each, {CONNECT_TIME:?}"),
            "per second",
            "failed",
            "ztunnel CPU-ms a / b per connection"
        );
        for c in &self.connects {
            println!(
                "{:<50} {:>12.0} {:>12} {:>14}",
                format!("  {}, {} at a time", c.kind.name(), c.concurrency),
                c.rate(),
                c.failed,
                format!("{:.3} / {:.3}", c.cpu_ms(0), c.cpu_ms(1))
            );
        }
        println!(
            "{:<50} {:>12.0} {:>12} {:>14}",
            "  new HBONE per core of node-b's ztunnel",
            self.new_hbone_per_core(),
            "",
            format!(">= {TARGET_NEW_HBONE_PER_CORE}")
        );
        println!();
        println!(
            "targets: CPU-s/GB {:.2} vs <= {TARGET_CPU_S_PER_GB}: {}; new HBONE/s per core {:.0} vs >= {TARGET_NEW_HBONE_PER_CORE}: {}",
            self.cpu_per_gb(),
            verdict(self.cpu_per_gb() <= TARGET_CPU_S_PER_GB),
            self.new_hbone_per_core(),
            verdict(self.new_hbone_per_core() >= TARGET_NEW_HBONE_PER_CORE),
        );
        println!(
            "targets: throughput ratio {ratio:.2} vs >= {TARGET_RATIO}: {}; added p99 {added_p99:.1} us vs <= {TARGET_ADDED_P99_US}: {}; \
             vCPU/1k rps {worst_vcpu:.4} vs <= {TARGET_VCPU_PER_KRPS}: {}; RSS/1k rps {worst_rss:.1} MB vs <= {TARGET_RSS_MB_PER_KRPS}: {}",
            verdict(ratio >= TARGET_RATIO),
            verdict(added_p99 <= TARGET_ADDED_P99_US),
            verdict(worst_vcpu <= TARGET_VCPU_PER_KRPS),
            verdict(worst_rss <= TARGET_RSS_MB_PER_KRPS),
        );
        println!();

        let figures = [
            ("throughput_plain_median", plain_g, "Gbit/s"),
            ("throughput_mesh_median", mesh_g, "Gbit/s"),
            ("throughput_ratio", ratio, "ratio"),
            ("throughput_mesh_ztunnel_cpu_per_gbit", mesh_cpu_per_gbit, "cores/(Gbit/s)"),
            ("throughput_mesh_ztunnel_cpu_s_per_gb", self.cpu_per_gb(), "CPU-s/GB"),
            ("throughput_haproxy_median", Self::gbps(&self.peer_tput), "Gbit/s"),
            ("throughput_haproxy_cpu_s_per_gb", Self::proxy_cpu_per_gb(&self.peer_tput), "CPU-s/GB"),
            ("throughput_haproxy_relay_median", Self::gbps(&self.relay_tput), "Gbit/s"),
            ("throughput_haproxy_relay_cpu_s_per_gb", Self::proxy_cpu_per_gb(&self.relay_tput), "CPU-s/GB"),
            ("latency_1k_haproxy_added_p99", q(&self.peer_lat, 0.99) - q(pl, 0.99), "us"),
            ("latency_1k_haproxy_relay_added_p99", q(&self.relay_lat, 0.99) - q(pl, 0.99), "us"),
            (
                "haproxy_relay_vcpu_per_krps",
                run_vcpu(&self.relay_lat, 0).max(run_vcpu(&self.relay_lat, 1)),
                "vCPU",
            ),
            ("new_hbone_per_core_node_b", self.new_hbone_per_core(), "1/s"),
            ("latency_1k_plain_p50", q(pl, 0.5), "us"),
            ("latency_1k_plain_p99", q(pl, 0.99), "us"),
            ("latency_1k_mesh_p50", q(ml, 0.5), "us"),
            ("latency_1k_mesh_p99", q(ml, 0.99), "us"),
            ("latency_1k_added_p50", added_p50, "us"),
            ("latency_1k_added_p99", added_p99, "us"),
            ("latency_rate_mesh", ml.rate(), "1/s"),
            ("latency_errors", self.errors() as f64, "requests"),
            ("ztunnel_a_vcpu_per_krps", vcpu(0), "vCPU"),
            ("ztunnel_b_vcpu_per_krps", vcpu(1), "vCPU"),
            ("ztunnel_a_rss_under_load", ml.rss_max.mb(0), "MB"),
            ("ztunnel_b_rss_under_load", ml.rss_max.mb(1), "MB"),
            ("ztunnel_a_rss_idle", self.rss_idle.mb(0), "MB"),
            ("ztunnel_b_rss_idle", self.rss_idle.mb(1), "MB"),
            ("loadavg_start_1m", load_start.one, "load"),
            ("loadavg_end_1m", load_end.one, "load"),
            ("machine_busy_mesh_latency", ml.machine_busy, "fraction"),
        ];
        for (name, value, unit) in figures {
            println!("{{\"bench\":\"mesh\",\"metric\":\"{name}\",\"value\":{value:.3},\"unit\":\"{unit}\"}}");
        }
        for c in &self.connects {
            let name = match c.kind {
                ConnectKind::Direct => "direct",
                ConnectKind::PooledHbone => "pooled_hbone",
                ConnectKind::NewHbone => "new_hbone",
                ConnectKind::Haproxy => "haproxy",
            };
            println!(
                "{{\"bench\":\"mesh\",\"metric\":\"connections_{name}_x{}\",\"value\":{:.1},\"unit\":\"1/s\"}}",
                c.concurrency,
                c.rate()
            );
        }
    }
}
