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

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, ensure, Context};
use weft::cluster;
use weft::up::{self, Mesh, UpOptions};

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
/// A response later than this fails the request (and the connection).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often ztunnel RSS is sampled during the mesh latency run.
const RSS_SAMPLE: Duration = Duration::from_millis(200);

/// The targets of issue 4, per 1,000 requests/s for the ztunnel figures (each ztunnel).
const TARGET_RATIO: f64 = 0.6;
const TARGET_ADDED_P99_US: f64 = 100.0;
const TARGET_VCPU_PER_KRPS: f64 = 0.03;
const TARGET_RSS_MB_PER_KRPS: f64 = 8.0;
/// A 1-minute load average above this means others' work shares the cores with the bench.
const BUSY_LOAD: f64 = 1.0;

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
    let bin_dir = bin_dir()?;
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
    watch_signals();
    let up_started = Instant::now();
    let guard = Guard::new(up::up(&UpOptions::new(&manifests, CLUSTER, &bin_dir)).context("weft up")?);
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
    let ztunnels = Ztunnels::find(mesh)?;
    let paths = [Pair::new(mesh, PLAIN)?, Pair::new(mesh, MESH)?];
    let _iperf_servers: Vec<Server> =
        paths.iter().map(|p| Server::iperf(&p.server_netns)).collect::<anyhow::Result<_>>()?;
    for path in &paths {
        wait_listening(&path.server_netns, IPERF_PORT)?;
    }
    // One request each way first: the mesh path's HBONE connection (TLS handshake, certificates)
    // is made before anything is timed.
    for path in &paths {
        let mut conn = Connection::open(path)?;
        let (status, body) = conn.get(&format!("/bytes/{BODY_BYTES}"))?;
        ensure!(
            status == 200 && body == BODY_BYTES,
            "{}: GET /bytes answered {status}, {body} bytes",
            path.ns
        );
    }
    std::thread::sleep(Duration::from_secs(1));
    let rss_idle = ztunnels.rss()?;

    let mut latency = Vec::new();
    for path in &paths {
        eprintln!(
            "latency {}: {RATE} requests/s over {CONNECTIONS} connections, {WARMUP:?} warm-up + {MEASURE:?}...",
            path.ns
        );
        latency.push(fixed_rate(path, &ztunnels)?);
    }
    let opened = mesh_connections(mesh)?;
    ensure!(
        opened >= CONNECTIONS as f64,
        "node-b's ztunnel counted {opened} connections to the mesh server: the mesh path was not captured"
    );

    let mut throughput = [Vec::new(), Vec::new()];
    for round in 0..THROUGHPUT_ROUNDS {
        for (i, path) in paths.iter().enumerate() {
            eprintln!(
                "throughput {} round {}/{THROUGHPUT_ROUNDS}: iperf3 -t {IPERF_SECONDS}...",
                path.ns,
                round + 1
            );
            let before = ztunnels.cpu()?;
            let run = iperf(path)?;
            let cpu = ztunnels.cpu()?.since(&before);
            throughput[i].push(Iperf { ztunnel_cpu: cpu, ..run });
        }
    }
    let rss_after_throughput = ztunnels.rss()?;
    let [plain_tput, mesh_tput] = throughput;
    let mesh_lat = latency.pop().unwrap();
    let plain_lat = latency.pop().unwrap();
    Ok(Report { plain_tput, mesh_tput, plain_lat, mesh_lat, rss_idle, rss_after_throughput })
}

/// Where `cargo bench` put weft-app, and so the workspace's other release binaries (built by
/// `cargo build --release -p ztunnel -p controller`); a warning when older than their sources.
fn bin_dir() -> anyhow::Result<PathBuf> {
    let dir = Path::new(env!("CARGO_BIN_EXE_weft-app")).parent().unwrap().to_path_buf();
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let build = "cargo build --release -p ztunnel -p controller";
    for (binary, crates) in [
        ("ztunnel", &["ztunnel", "weft-core", "ebpf"][..]),
        ("controller", &["controller", "weft-core", "weft-config"]),
    ] {
        let path = dir.join(binary);
        let built = std::fs::metadata(&path)
            .and_then(|m| m.modified())
            .with_context(|| format!("{} is missing: build it first with `{build}`", path.display()))?;
        let newest = crates.iter().filter_map(|c| newest_source(&workspace.join(c))).max();
        if let Some((source, modified)) = newest.filter(|(m, _)| *m > built).map(|(m, p)| (p, m)) {
            // A warning, not an error: others' uncommitted edits make the binaries look stale
            // all the time on a shared tree. The output says so, next to the figures.
            eprintln!(
                "WARNING: {} is older than {} (modified {:.0} s later): the figures are for the \
                 binary, not the working tree; rebuild with `{build}`",
                path.display(),
                source.display(),
                modified.duration_since(built).unwrap_or_default().as_secs_f64()
            );
        }
    }
    Ok(dir)
}

/// The newest modification time of a crate's sources (`src/`, `build.rs`, `Cargo.toml`, C
/// programs), and which file it is.
fn newest_source(dir: &Path) -> Option<(SystemTime, PathBuf)> {
    let mut newest: Option<(SystemTime, PathBuf)> = None;
    let mut stack = vec![dir.join("src"), dir.join("build.rs"), dir.join("Cargo.toml"), dir.join("c")];
    while let Some(path) = stack.pop() {
        let Ok(meta) = std::fs::metadata(&path) else { continue };
        if meta.is_dir() {
            for entry in std::fs::read_dir(&path).into_iter().flatten().flatten() {
                stack.push(entry.path());
            }
        } else if let Ok(modified) = meta.modified() {
            if newest.as_ref().is_none_or(|(m, _)| modified > *m) {
                newest = Some((modified, path));
            }
        }
    }
    newest
}

/// Waits up to `WEFT_BENCH_QUIET_WAIT` seconds (default 0) for the 1-minute load average to drop
/// to [`BUSY_LOAD`], so recorded numbers can be taken on a quiet machine.
fn wait_for_quiet() {
    let wait: u64 = std::env::var("WEFT_BENCH_QUIET_WAIT").ok().and_then(|s| s.parse().ok()).unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(wait);
    loop {
        let load = loadavg();
        if load.one <= BUSY_LOAD || Instant::now() >= deadline {
            return;
        }
        eprintln!(
            "load average {}: waiting for a quieter machine (until {wait} s have passed)...",
            load.shown()
        );
        std::thread::sleep(Duration::from_secs(10));
    }
}

/// The mesh, removed when dropped (also on panic).
struct Guard {
    mesh: Mesh,
}

impl Guard {
    fn new(mesh: Mesh) -> Guard {
        Guard { mesh }
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        eprintln!("removing cluster {CLUSTER:?}...");
        if let Err(e) = cluster::destroy(self.mesh.name()) {
            eprintln!("removing cluster {CLUSTER:?}: {e} (run `weft down --name {CLUSTER}`)");
        }
    }
}

/// On Ctrl-C or SIGTERM: remove the cluster and exit (no destructor runs on a signal).
fn watch_signals() {
    std::thread::spawn(|| {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        });
        eprintln!("interrupted: removing cluster {CLUSTER:?}");
        let _ = cluster::destroy(CLUSTER);
        std::process::exit(130);
    });
}

/// One client → server pair: the namespace, the client's and the server's network namespace.
struct Pair {
    ns: &'static str,
    client_netns: String,
    server_netns: String,
    server: IpAddr,
}

impl Pair {
    fn new(mesh: &Mesh, ns: &'static str) -> anyhow::Result<Pair> {
        let c = mesh.cluster();
        Ok(Pair {
            ns,
            client_netns: c.pod_netns(ns, "client")?.to_string(),
            server_netns: c.pod_netns(ns, "server")?.to_string(),
            server: c.pod_ip(ns, "server")?,
        })
    }
}

/// A process the bench started in a pod's namespace, killed when dropped.
struct Server(Child);

impl Server {
    fn iperf(netns: &str) -> anyhow::Result<Server> {
        let child = Command::new("ip")
            .args(["netns", "exec", netns, "iperf3", "-s", "-p", &IPERF_PORT.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting iperf3 -s")?;
        Ok(Server(child))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Polls `ss` in `netns` until something listens on `port` (bounded).
fn wait_listening(netns: &str, port: u16) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = Command::new("ip")
            .args(["netns", "exec", netns, "ss", "-Hltn", &format!("sport = :{port}")])
            .output()?;
        if !String::from_utf8_lossy(&out.stdout).trim().is_empty() {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "nothing listens on port {port} in {netns} after 10 s");
        std::thread::sleep(Duration::from_millis(50));
    }
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
#[derive(Debug, Clone, Copy, Default)]
struct Iperf {
    /// Received by the server, bits per second.
    bits_per_second: f64,
    retransmits: f64,
    /// iperf3's own CPU, percent of one core: client and server processes.
    client_cpu: f64,
    server_cpu: f64,
    /// Both ztunnels' CPU-seconds over the run.
    ztunnel_cpu: Cpu,
}

fn iperf(path: &Pair) -> anyhow::Result<Iperf> {
    let out = Command::new("ip")
        .args(["netns", "exec", &path.client_netns, "iperf3", "-c", &path.server.to_string()])
        .args(["-p", &IPERF_PORT.to_string(), "-t", &IPERF_SECONDS.to_string(), "-J"])
        .output()
        .context("running iperf3 -c")?;
    let json: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("iperf3 -c printed no JSON: {}", String::from_utf8_lossy(&out.stderr)))?;
    if let Some(error) = json.get("error") {
        bail!("iperf3 -c {} ({}): {error}", path.server, path.ns);
    }
    let number = |pointer: &str| json.pointer(pointer).and_then(serde_json::Value::as_f64);
    Ok(Iperf {
        bits_per_second: number("/end/sum_received/bits_per_second")
            .context("iperf3 JSON without end.sum_received")?,
        retransmits: number("/end/sum_sent/retransmits").unwrap_or(0.0),
        client_cpu: number("/end/cpu_utilization_percent/host_total").unwrap_or(0.0),
        server_cpu: number("/end/cpu_utilization_percent/remote_total").unwrap_or(0.0),
        ztunnel_cpu: Cpu::default(),
    })
}

// ---- latency ----

/// A keep-alive HTTP/1.1 connection from a client pod (the socket was made inside its network
/// namespace and stays there).
struct Connection {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
    host: String,
}

impl Connection {
    fn open(path: &Pair) -> anyhow::Result<Connection> {
        let addr = SocketAddr::new(path.server, HTTP_PORT);
        let stream = cluster::in_netns(&path.client_netns, || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        })?
        .with_context(|| format!("connecting to {addr} from {}", path.client_netns))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(RESPONSE_TIMEOUT))?;
        let reader = BufReader::with_capacity(64 * 1024, stream.try_clone()?);
        Ok(Connection { stream, reader, host: addr.to_string() })
    }

    fn request(&self, path: &str) -> Vec<u8> {
        format!("GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", self.host).into_bytes()
    }

    /// One request, then its response (status, body length).
    fn get(&mut self, path: &str) -> anyhow::Result<(u16, usize)> {
        self.stream.write_all(&self.request(path))?;
        read_response(&mut self.reader)
    }
}

/// Reads one HTTP/1.1 response with a Content-Length body: its status and body length.
fn read_response(reader: &mut impl BufRead) -> anyhow::Result<(u16, usize)> {
    let mut line = String::new();
    ensure!(reader.read_line(&mut line)? > 0, "connection closed before a response");
    let status = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("bad status line")?;
    let mut length = None;
    loop {
        line.clear();
        ensure!(reader.read_line(&mut line)? > 0, "connection closed in the response headers");
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse::<usize>().ok();
            }
        }
    }
    let length = length.context("response without Content-Length")?;
    let mut left = length;
    while left > 0 {
        let buf = reader.fill_buf()?;
        ensure!(!buf.is_empty(), "connection closed in the response body");
        let n = buf.len().min(left);
        reader.consume(n);
        left -= n;
    }
    Ok((status, length))
}

/// What one fixed-rate run measured (the window after the warm-up).
#[derive(Debug, Clone, Default)]
struct LatencyRun {
    /// Scheduled send → last byte of the response, per measured request.
    latencies: Vec<Duration>,
    /// Actual send − scheduled send: the generator's own timer and scheduling error, plus any
    /// wait for the connection's previous response.
    lateness: Vec<Duration>,
    /// Requests that failed (error, timeout, wrong status or length), over the whole run.
    errors: usize,
    /// The measured window: from the first measured request's schedule to the last response.
    window: Duration,
    /// Both ztunnels over the window.
    ztunnel_cpu: Cpu,
    /// Both ztunnels' VmRSS, sampled during the window: the highest sample.
    rss_max: Rss,
    /// The whole machine over the window: busy fraction of all cores (/proc/stat).
    machine_busy: f64,
}

impl LatencyRun {
    fn requests(&self) -> usize {
        self.latencies.len()
    }

    fn rate(&self) -> f64 {
        self.requests() as f64 / self.window.as_secs_f64()
    }
}

/// Sends `GET /bytes/1024` at [`RATE`]/s over [`CONNECTIONS`] connections on a fixed schedule:
/// request `i` is due at `start + i / RATE` on connection `i % CONNECTIONS`, and its latency runs
/// from that due time to the last byte of its response, whenever it was actually sent. Each
/// connection is one thread that sleeps until a request is due, writes it and reads the response
/// (as wrk2 does): a response slower than the 4 ms between a connection's requests delays that
/// connection's next request, and the delay is counted in that request's latency (no coordinated
/// omission). Not pipelined from a separate writer thread: on this VM's kernel a thread blocked
/// reading a socket was not woken by a response that arrived after another thread wrote the
/// request; it saw the response only when the next request was written on that socket (~4 ms
/// later here; reproduced with Python on loopback, outside Weft).
fn fixed_rate(path: &Pair, ztunnels: &Ztunnels) -> anyhow::Result<LatencyRun> {
    let interval = Duration::from_secs(1) / RATE;
    let warmup = (WARMUP.as_secs_f64() * f64::from(RATE)) as usize;
    let total = warmup + (MEASURE.as_secs_f64() * f64::from(RATE)) as usize;
    let start = Instant::now() + Duration::from_millis(50);
    let due = move |i: usize| start + interval * u32::try_from(i).unwrap_or(u32::MAX);

    /// What one connection measured: (response done, latency) and lateness of measured
    /// requests, and failures.
    type LaneResult = (Vec<(Instant, Duration)>, Vec<Duration>, usize);
    let mut lanes = Vec::new();
    for lane in 0..CONNECTIONS {
        let mut conn = Connection::open(path)?;
        let request = conn.request(&format!("/bytes/{BODY_BYTES}"));
        lanes.push(std::thread::spawn(move || -> LaneResult {
            // Timer slack (50 µs by default) would make every send late by up to that much.
            let _ = nix::sys::prctl::set_timerslack(1);
            let (mut measured, mut lateness, mut errors) = (Vec::new(), Vec::new(), 0usize);
            let mut broken = false;
            for i in (lane..total).step_by(CONNECTIONS) {
                if broken {
                    errors += 1;
                    continue;
                }
                let due = due(i);
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
                let sent = Instant::now();
                let result = conn.stream.write_all(&request).map_err(anyhow::Error::from);
                match result.and_then(|()| read_response(&mut conn.reader)) {
                    Ok((200, BODY_BYTES)) if i >= warmup => {
                        measured.push((Instant::now(), due.elapsed()));
                        lateness.push(sent - due);
                    }
                    Ok((200, BODY_BYTES)) => {}
                    Ok(_) => errors += 1,
                    Err(_) => {
                        errors += 1;
                        broken = true;
                    }
                }
            }
            (measured, lateness, errors)
        }));
    }

    // The measured window starts with request `warmup`: snapshot the ztunnels and the machine
    // then, and sample RSS until the end.
    let window_due = due(warmup);
    std::thread::sleep(window_due.saturating_duration_since(Instant::now()));
    let (cpu_before, machine_before) = (ztunnels.cpu()?, machine_ticks()?);
    let stop_sampling = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (stop, z) = (stop_sampling.clone(), ztunnels.clone());
        std::thread::spawn(move || {
            let mut highest = Rss::default();
            while !stop.load(Ordering::Relaxed) {
                if let Ok(rss) = z.rss() {
                    highest = highest.max(&rss);
                }
                std::thread::sleep(RSS_SAMPLE);
            }
            highest
        })
    };
    let (mut latencies, mut lateness, mut errors) = (Vec::new(), Vec::new(), 0);
    let mut last = window_due;
    for lane in lanes {
        let (measured, late, failed) = lane.join().unwrap();
        errors += failed;
        lateness.extend(late);
        for (at, latency) in measured {
            last = last.max(at);
            latencies.push(latency);
        }
    }
    let cpu = ztunnels.cpu()?.since(&cpu_before);
    let machine = machine_ticks()?;
    stop_sampling.store(true, Ordering::Relaxed);
    let rss_max = sampler.join().unwrap();
    latencies.sort_unstable();
    lateness.sort_unstable();
    Ok(LatencyRun {
        latencies,
        lateness,
        errors,
        window: last.saturating_duration_since(window_due),
        ztunnel_cpu: cpu,
        rss_max,
        machine_busy: machine.busy_since(&machine_before),
    })
}

// ---- /proc ----

/// The two ztunnel processes.
#[derive(Debug, Clone)]
struct Ztunnels {
    pids: Vec<u32>,
}

impl Ztunnels {
    fn find(mesh: &Mesh) -> anyhow::Result<Ztunnels> {
        // The one process named `ztunnel` in each node's namespace (`weft up` starts it through
        // `nsenter`, which execs it).
        let mut pids = Vec::new();
        for node in NODES {
            let netns = mesh.cluster().node_netns(node)?.to_string();
            let out = Command::new("ip").args(["netns", "pids", &netns]).output()?;
            let found: Vec<u32> = String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .filter(|p| {
                    std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "ztunnel")
                })
                .collect();
            ensure!(found.len() == 1, "expected one ztunnel process in {netns}, found {found:?}");
            pids.push(found[0]);
        }
        Ok(Ztunnels { pids })
    }

    /// utime + stime of each, in seconds.
    fn cpu(&self) -> anyhow::Result<Cpu> {
        let mut seconds = [0.0; 2];
        for (i, pid) in self.pids.iter().enumerate() {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .with_context(|| format!("ztunnel {pid} is gone"))?;
            // Fields after the command (which may hold spaces) start at `state`, field 3.
            let after = stat.rsplit_once(')').context("bad /proc/pid/stat")?.1;
            let fields: Vec<&str> = after.split_whitespace().collect();
            let ticks = |field: usize| fields[field - 3].parse::<f64>().unwrap_or(0.0);
            seconds[i] = (ticks(14) + ticks(15)) / clock_ticks();
        }
        Ok(Cpu { seconds })
    }

    /// VmRSS of each, in bytes.
    fn rss(&self) -> anyhow::Result<Rss> {
        let mut bytes = [0u64; 2];
        for (i, pid) in self.pids.iter().enumerate() {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
                .with_context(|| format!("ztunnel {pid} is gone"))?;
            bytes[i] = status_kib(&status, "VmRSS:") * 1024;
        }
        Ok(Rss { bytes })
    }
}

fn status_kib(status: &str, field: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Kernel clock ticks per second (`getconf CLK_TCK`; 100 on Linux here).
fn clock_ticks() -> f64 {
    static TICKS: std::sync::OnceLock<f64> = std::sync::OnceLock::new();
    *TICKS.get_or_init(|| {
        Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
            .unwrap_or(100.0)
    })
}

/// CPU-seconds of node-a's and node-b's ztunnel.
#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    seconds: [f64; 2],
}

impl Cpu {
    fn since(&self, before: &Cpu) -> Cpu {
        Cpu { seconds: [self.seconds[0] - before.seconds[0], self.seconds[1] - before.seconds[1]] }
    }

    fn total(&self) -> f64 {
        self.seconds.iter().sum()
    }
}

/// VmRSS of node-a's and node-b's ztunnel, bytes.
#[derive(Debug, Clone, Copy, Default)]
struct Rss {
    bytes: [u64; 2],
}

impl Rss {
    fn max(self, other: &Rss) -> Rss {
        Rss { bytes: [self.bytes[0].max(other.bytes[0]), self.bytes[1].max(other.bytes[1])] }
    }

    fn mb(&self, i: usize) -> f64 {
        self.bytes[i] as f64 / 1e6
    }
}

/// The machine's CPU time from /proc/stat: busy and total ticks over all cores.
#[derive(Debug, Clone, Copy)]
struct MachineTicks {
    busy: u64,
    total: u64,
}

impl MachineTicks {
    fn busy_since(&self, before: &MachineTicks) -> f64 {
        let total = self.total.saturating_sub(before.total);
        if total == 0 {
            return 0.0;
        }
        self.busy.saturating_sub(before.busy) as f64 / total as f64
    }
}

fn machine_ticks() -> anyhow::Result<MachineTicks> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    let cpu = stat.lines().next().context("empty /proc/stat")?;
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let values: Vec<u64> = cpu.split_whitespace().skip(1).take(8).filter_map(|v| v.parse().ok()).collect();
    ensure!(values.len() == 8, "unexpected /proc/stat: {cpu}");
    let total: u64 = values.iter().sum();
    Ok(MachineTicks { busy: total - values[3] - values[4], total })
}

/// /proc/loadavg: 1, 5 and 15 minutes.
#[derive(Debug, Clone, Copy, Default)]
struct LoadAvg {
    one: f64,
    five: f64,
    fifteen: f64,
}

impl LoadAvg {
    fn shown(&self) -> String {
        let busy = if self.one > BUSY_LOAD { " (BUSY: others' work shares the cores)" } else { "" };
        format!("{:.2} {:.2} {:.2}{busy}", self.one, self.five, self.fifteen)
    }
}

fn loadavg() -> LoadAvg {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let v: Vec<f64> = text.split_whitespace().take(3).filter_map(|s| s.parse().ok()).collect();
    match v[..] {
        [one, five, fifteen] => LoadAvg { one, five, fifteen },
        _ => LoadAvg::default(),
    }
}

// ---- report ----

struct Report {
    plain_tput: Vec<Iperf>,
    mesh_tput: Vec<Iperf>,
    plain_lat: LatencyRun,
    mesh_lat: LatencyRun,
    rss_idle: Rss,
    rss_after_throughput: Rss,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// The `q` quantile of sorted durations, in µs (nearest rank).
fn quantile_us(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1e6
}

fn mean_us(v: &[Duration]) -> f64 {
    v.iter().map(Duration::as_secs_f64).sum::<f64>() / v.len().max(1) as f64 * 1e6
}

impl Report {
    fn errors(&self) -> usize {
        self.plain_lat.errors + self.mesh_lat.errors
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
        let vcpu = |i: usize| ml.ztunnel_cpu.seconds[i] / ml.window.as_secs_f64() / krps;
        let plain_vcpu = pl.ztunnel_cpu.total() / pl.window.as_secs_f64();
        let rss_load = |i: usize| ml.rss_max.mb(i) / krps;
        let worst_vcpu = vcpu(0).max(vcpu(1));
        let worst_rss = rss_load(0).max(rss_load(1));
        let verdict = |ok: bool| if ok { "meets" } else { "MISSES" };
        let mesh_cpu_per_gbit = median(
            self.mesh_tput
                .iter()
                .map(|r| r.ztunnel_cpu.total() / f64::from(IPERF_SECONDS) / (r.bits_per_second / 1e9))
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
            median(
                self.plain_tput.iter().map(|r| r.ztunnel_cpu.total() / f64::from(IPERF_SECONDS)).collect()
            ),
            median(self.mesh_tput.iter().map(|r| r.ztunnel_cpu.total() / f64::from(IPERF_SECONDS)).collect())
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
        println!();
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
    }
}
