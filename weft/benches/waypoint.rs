#![allow(clippy::unwrap_used)]
//! The waypoint on the local two-node cluster, against the paths without it and against haproxy
//! and nginx as plain reverse proxies. One command, as root: `cargo bench -p weft --bench
//! waypoint` (after `scripts/release.sh`, in the same `CARGO_TARGET_DIR`: `source scripts/env.sh`).
//!
//! One cluster (`weft::up` on `examples/bench-waypoint/`, name [`CLUSTER`]) holds the paths, all
//! from a client pod on node-a to a weft-app server pod on node-b:
//! - direct: `plain`, not in the mesh;
//! - L4 mesh: `mesh`, ambient, the Service VIP (client → ztunnel → HBONE → ztunnel → server);
//! - waypoint: `l7`, ambient and bound to a waypoint (client → ztunnel → waypoint (on node-a) →
//!   ztunnel → server);
//! - waypoint+policy: `l7p`, as `l7` with a retry policy, a route timeout, a connection pool and
//!   outlier detection in place (generous limits: the cost of applying them, issue 12);
//! - waypoint+authz: `l7s`, as `l7` with a RequestAuthentication (an ES256 token checked on
//!   every request) and an ALLOW policy of 10 rules, the last one allowing the bench's requests
//!   (issue 13);
//! - haproxy, nginx: `plain`, through the proxy in plain/proxy on node-a (Debian's packages, one
//!   thread / one worker, HTTP/1.1 keep-alive to the server), as the waypoint is placed.
//!
//! Figures, every path in the same run:
//! - 1 KB GET at a fixed [`RATE`]/s over [`CONNECTIONS`] keep-alive connections (the mesh
//!   bench's generator: latency from each request's scheduled time, no coordinated omission):
//!   p50/p99, and the proxy's CPU and highest RSS in the window.
//! - Max requests/s: `wrk` ([`WRK_CONNECTIONS`] connections, [`WRK_SECONDS`] s) through each
//!   proxy, and the proxy's CPU over it: requests/s per core of the proxy.
//! - HTTP/2: `h2load` (prior knowledge, [`H2_CONNECTIONS`] connections × [`H2_STREAMS`]
//!   streams) through the waypoint and the peers, same per-core figure.
//!
//! Everything shares the machine's cores (two here): absolute requests/s are the machine's; the
//! per-core figures compare the proxies.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use weft::up::{self, Mesh, UpOptions};

mod support;
use support::*;

const CLUSTER: &str = "wpbench";
/// The `l7s` path's token: ES256, issuer `bench@weft.local`, audience `server`, valid until 2100,
/// signed with the key whose public half is the RequestAuthentication's inline JWKS in
/// `examples/bench-waypoint/mesh.yaml` (a key of the bench's own, protecting nothing).
const BENCH_TOKEN: &str = "eyJhbGciOiJFUzI1NiIsImtpZCI6ImJlbmNoIiwidHlwIjoiSldUIn0.eyJpc3MiOiJiZW5jaEB3ZWZ0LmxvY2FsIiwic3ViIjoiY2xpZW50IiwiYXVkIjoic2VydmVyIiwiZXhwIjo0MTAyNDQ0ODAwLCJpYXQiOjE3NjQ3MDAwMDB9.MM5qgdf12feRbpbJKUAsL9HtlcxEp7atfsQ92lHKO8IJz3K8o2Nj9NbA0YcjGms6y72NV2NtXdKCXa8XuUSrbQ";
const LOCK: &str = "/run/lock/weft-bench-waypoint.lock";

const HTTP_PORT: u16 = 8080;
/// The Services' port (to 8080).
const SERVICE_PORT: u16 = 80;
const HAPROXY_PORT: u16 = 8081;
const NGINX_PORT: u16 = 8082;
const HAPROXY_H2_PORT: u16 = 8083;
const NGINX_H2_PORT: u16 = 8084;
const BODY_BYTES: usize = 1024;
const RATE: u32 = 1_000;
const CONNECTIONS: usize = 4;
const WARMUP: Duration = Duration::from_secs(3);
const MEASURE: Duration = Duration::from_secs(15);
const WRK_CONNECTIONS: usize = 16;
const WRK_SECONDS: u32 = 10;
const H2_CONNECTIONS: usize = 4;
const H2_STREAMS: usize = 16;
const H2_REQUESTS: usize = 40_000;

/// Issue 11's targets.
const TARGET_VCPU_PER_KRPS: f64 = 0.10;
const TARGET_RSS_MB_PER_KRPS: f64 = 20.0;
const TARGET_ADDED_P99_US: f64 = 300.0;

/// One way from a client to the server.
#[derive(Clone)]
struct Route {
    name: &'static str,
    client_netns: String,
    /// Where the client connects.
    addr: SocketAddr,
    /// The Host it sends.
    host: String,
    /// A header every request on this path carries (the token on the authz path).
    header: Option<(&'static str, String)>,
    /// The proxy measured on this path, if any.
    proxy: Option<Procs>,
    /// Where an HTTP/2 client connects, when the path is measured over HTTP/2.
    h2_addr: Option<SocketAddr>,
}

impl Route {
    /// A keep-alive connection on this path, its requests carrying the path's header.
    fn connect(&self) -> anyhow::Result<Connection> {
        let conn = Connection::open(&self.client_netns, self.addr, &self.host)?;
        Ok(match &self.header {
            Some((name, value)) => conn.with_header(name, value),
            None => conn,
        })
    }
}

/// What was measured on one route.
struct Measured {
    route: Route,
    latency: LatencyRun,
    wrk: Option<Load>,
    h2: Option<Load>,
}

/// A maximum-rate run: requests/s and the proxy's CPU over it.
struct Load {
    rps: f64,
    proxy_cores: f64,
    errors: u64,
}

fn main() -> anyhow::Result<()> {
    if !std::env::args().any(|a| a == "--bench") {
        eprintln!("the waypoint bench runs only under `cargo bench -p weft --bench waypoint`; skipped");
        return Ok(());
    }
    let started = Instant::now();
    weft::cluster::check_environment()
        .context("the waypoint bench builds network namespaces: run it as root")?;
    for tool in ["wrk", "h2load", "haproxy", "nginx", "ss"] {
        let found = Command::new("sh").args(["-c", &format!("command -v {tool}")]).output()?;
        ensure!(found.status.success(), "{tool} is not installed (scripts/setup.sh installs it)");
    }
    let bin_dir = bin_dir(
        &[
            ("ztunnel", &["ztunnel", "weft-core", "ebpf"]),
            ("controller", &["controller", "weft-core", "weft-config"]),
            ("waypoint", &["waypoint", "weft-core"]),
        ],
        "source scripts/env.sh && scripts/release.sh",
    )?;
    let lock = std::fs::File::create(LOCK).with_context(|| format!("creating {LOCK}"))?;
    let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusiveNonblock).map_err(
        |(_, errno)| anyhow::anyhow!("another waypoint bench holds {LOCK} ({errno}): wait for it"),
    )?;
    wait_for_quiet();
    let load_start = loadavg();
    eprintln!("load average at start: {}", load_start.shown());
    let manifests = Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/bench-waypoint");
    watch_signals(CLUSTER);
    let up_started = Instant::now();
    let guard = Guard { mesh: up::up(&UpOptions::new(&manifests, CLUSTER, &bin_dir)).context("weft up")? };
    eprintln!("up in {:.1} s", up_started.elapsed().as_secs_f64());
    let measured = measure(&guard.mesh)?;
    let load_end = loadavg();
    drop(guard);
    print(&measured, &load_start, &load_end);
    eprintln!("done in {:.0} s", started.elapsed().as_secs_f64());
    // Weft's paths must not fail; a peer's failures are shown in the table (nginx's, seen in
    // every run here and not understood yet, make its figures unreliable).
    let errors: usize = measured
        .iter()
        .filter(|m| !["haproxy", "nginx"].contains(&m.route.name))
        .map(|m| m.latency.errors)
        .sum();
    ensure!(errors == 0, "{errors} requests failed on Weft's paths (see the table)");
    Ok(())
}

fn measure(mesh: &Mesh) -> anyhow::Result<Vec<Measured>> {
    let c = mesh.cluster();
    let proxy_netns = c.pod_netns("plain", "proxy")?.to_string();
    let proxy_ip = c.pod_ip("plain", "proxy")?;
    let plain_server = c.pod_ip("plain", "server")?;
    let dir = tempfile::tempdir()?;
    let _haproxy = haproxy(&proxy_netns, proxy_ip, plain_server, dir.path())?;
    let _nginx = nginx(&proxy_netns, proxy_ip, plain_server, dir.path())?;
    for port in [HAPROXY_PORT, NGINX_PORT, HAPROXY_H2_PORT, NGINX_H2_PORT] {
        wait_listening(&proxy_netns, port)?;
    }
    let waypoint = Procs { pids: vec![Procs::find(c.pod_netns("l7", "waypoint-0")?, "waypoint")?] };
    let waypoint_policy = Procs { pids: vec![Procs::find(c.pod_netns("l7p", "waypoint-0")?, "waypoint")?] };
    let waypoint_authz = Procs { pids: vec![Procs::find(c.pod_netns("l7s", "waypoint-0")?, "waypoint")?] };
    let haproxy_procs = Procs { pids: vec![Procs::find(&proxy_netns, "haproxy")?] };
    let nginx_procs = Procs { pids: all(&proxy_netns, "nginx")? };
    let vip = |ns: &str| -> anyhow::Result<IpAddr> {
        Ok(match ns {
            "mesh" => "10.96.0.20".parse()?,
            "l7" => "10.96.0.21".parse()?,
            "l7p" => "10.96.0.22".parse()?,
            _ => "10.96.0.23".parse()?,
        })
    };
    let route = |name,
                 ns: &str,
                 addr: SocketAddr,
                 proxy: Option<Procs>,
                 h2: Option<SocketAddr>|
     -> anyhow::Result<Route> {
        Ok(Route {
            name,
            client_netns: c.pod_netns(ns, "client")?.to_string(),
            addr,
            host: if addr.port() == SERVICE_PORT {
                format!("server.{ns}.svc.cluster.local")
            } else {
                addr.to_string()
            },
            header: (ns == "l7s").then(|| ("authorization", format!("Bearer {BENCH_TOKEN}"))),
            proxy,
            h2_addr: h2,
        })
    };
    let routes = vec![
        route("direct", "plain", SocketAddr::new(plain_server, HTTP_PORT), None, None)?,
        route("L4 mesh", "mesh", SocketAddr::new(vip("mesh")?, SERVICE_PORT), None, None)?,
        route(
            "waypoint",
            "l7",
            SocketAddr::new(vip("l7")?, SERVICE_PORT),
            Some(waypoint),
            Some(SocketAddr::new(vip("l7")?, SERVICE_PORT)),
        )?,
        route(
            "waypoint+policy",
            "l7p",
            SocketAddr::new(vip("l7p")?, SERVICE_PORT),
            Some(waypoint_policy),
            Some(SocketAddr::new(vip("l7p")?, SERVICE_PORT)),
        )?,
        route(
            "waypoint+authz",
            "l7s",
            SocketAddr::new(vip("l7s")?, SERVICE_PORT),
            Some(waypoint_authz),
            Some(SocketAddr::new(vip("l7s")?, SERVICE_PORT)),
        )?,
        route(
            "haproxy",
            "plain",
            SocketAddr::new(proxy_ip, HAPROXY_PORT),
            Some(haproxy_procs),
            Some(SocketAddr::new(proxy_ip, HAPROXY_H2_PORT)),
        )?,
        route(
            "nginx",
            "plain",
            SocketAddr::new(proxy_ip, NGINX_PORT),
            Some(nginx_procs),
            Some(SocketAddr::new(proxy_ip, NGINX_H2_PORT)),
        )?,
    ];
    // One request on each first: tunnels, certificates and upstream connections are made
    // before anything is timed.
    for r in &routes {
        let mut conn = r.connect()?;
        let (status, body) = conn.get(&format!("/bytes/{BODY_BYTES}"))?;
        ensure!(
            status == 200 && body == BODY_BYTES,
            "{}: GET /bytes answered {status}, {body} bytes",
            r.name
        );
    }
    std::thread::sleep(Duration::from_secs(1));
    let schedule =
        Schedule { rate: RATE, connections: CONNECTIONS, warmup: WARMUP, measure: MEASURE, body: BODY_BYTES };
    let mut measured = Vec::new();
    for r in routes {
        eprintln!("{}: {RATE} requests/s over {CONNECTIONS} connections...", r.name);
        let none = Procs { pids: Vec::new() };
        let procs = r.proxy.as_ref().unwrap_or(&none);
        let latency = fixed_rate(schedule, || r.connect(), procs)?;
        let (wrk, h2) = match &r.proxy {
            Some(p) => {
                eprintln!("{}: wrk -c{WRK_CONNECTIONS} -d{WRK_SECONDS}s...", r.name);
                let wrk = wrk(&r, p)?;
                eprintln!("{}: h2load -c{H2_CONNECTIONS} -m{H2_STREAMS} -n{H2_REQUESTS}...", r.name);
                let h2 = r.h2_addr.map(|a| h2load(&r, a, p)).transpose()?;
                (Some(wrk), h2)
            }
            None => (None, None),
        };
        measured.push(Measured { route: r, latency, wrk, h2 });
    }
    Ok(measured)
}

/// Every process called `comm` in `netns` (nginx's master and worker).
fn all(netns: &str, comm: &str) -> anyhow::Result<Vec<u32>> {
    let out = Command::new("ip").args(["netns", "pids", netns]).output()?;
    let pids: Vec<u32> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .filter(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == comm))
        .collect();
    ensure!(!pids.is_empty(), "no {comm} process in {netns}");
    Ok(pids)
}

fn haproxy(netns: &str, ip: IpAddr, server: IpAddr, dir: &Path) -> anyhow::Result<Server> {
    let config = dir.join("haproxy.cfg");
    std::fs::write(
        &config,
        format!(
            "global\n  nbthread 1\n  maxconn 4000\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  \
             timeout server 30s\nfrontend h1\n  bind {ip}:{HAPROXY_PORT}\n  default_backend server\nfrontend h2\n  \
             bind {ip}:{HAPROXY_H2_PORT} proto h2\n  default_backend server\nbackend server\n  http-reuse always\n  \
             server s1 {server}:{HTTP_PORT}\n"
        ),
    )?;
    Server::spawn(netns, &["haproxy", "-db", "-f", &config.display().to_string()])
}

fn nginx(netns: &str, ip: IpAddr, server: IpAddr, dir: &Path) -> anyhow::Result<Server> {
    let config = dir.join("nginx.conf");
    let d = dir.display();
    std::fs::write(
        &config,
        format!(
            "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log stderr;\nevents {{ worker_connections 4096; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d};\n  proxy_temp_path {d};\n  fastcgi_temp_path {d};\n  \
             uwsgi_temp_path {d};\n  scgi_temp_path {d};\n  upstream server {{ server {server}:{HTTP_PORT}; keepalive 64; }}\n  \
             server {{\n    listen {ip}:{NGINX_PORT};\n    listen {ip}:{NGINX_H2_PORT} http2;\n    location / {{\n      \
             proxy_pass http://server;\n      proxy_http_version 1.1;\n      proxy_set_header Connection \"\";\n    }}\n  }}\n}}\n"
        ),
    )?;
    Server::spawn(netns, &["nginx", "-c", &config.display().to_string(), "-p", &d.to_string()])
}

/// `wrk` through the route at its maximum rate, and the proxy's CPU over the run.
fn wrk(route: &Route, proxy: &Procs) -> anyhow::Result<Load> {
    let url = format!("http://{}/bytes/{BODY_BYTES}", route.addr);
    let before = proxy.cpu()?;
    let started = Instant::now();
    let out = Command::new("ip")
        .args(["netns", "exec", &route.client_netns, "wrk", "-t1"])
        .args([format!("-c{WRK_CONNECTIONS}"), format!("-d{WRK_SECONDS}s")])
        .args(["-H", &format!("Host: {}", route.host)])
        .args(route.header.iter().flat_map(|(n, v)| ["-H".to_owned(), format!("{n}: {v}")]))
        .arg(&url)
        .output()
        .context("running wrk")?;
    let cores = proxy.cpu()?.since(&before).total() / started.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&out.stdout);
    let rps = text
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .with_context(|| {
            format!("wrk printed no Requests/sec: {text}{}", String::from_utf8_lossy(&out.stderr))
        })?;
    let errors = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    Ok(Load { rps, proxy_cores: cores, errors })
}

/// `h2load` (HTTP/2 with prior knowledge) to `addr`, and the proxy's CPU over the run.
fn h2load(route: &Route, addr: SocketAddr, proxy: &Procs) -> anyhow::Result<Load> {
    let url = format!("http://{addr}/bytes/{BODY_BYTES}");
    let before = proxy.cpu()?;
    let started = Instant::now();
    let out = Command::new("ip")
        .args(["netns", "exec", &route.client_netns, "h2load"])
        .args([format!("-n{H2_REQUESTS}"), format!("-c{H2_CONNECTIONS}"), format!("-m{H2_STREAMS}")])
        .args(["-H", &format!(":authority: {}", route.host)])
        .args(route.header.iter().flat_map(|(n, v)| ["-H".to_owned(), format!("{n}: {v}")]))
        .arg(&url)
        .output()
        .context("running h2load")?;
    let cores = proxy.cpu()?.since(&before).total() / started.elapsed().as_secs_f64();
    let text = String::from_utf8_lossy(&out.stdout);
    // "finished in 1.23s, 32520.33 req/s, 35.2MB/s" and "requests: ... 40000 succeeded, 0 failed, 0 errored"
    let rps = text
        .lines()
        .find(|l| l.starts_with("finished in"))
        .and_then(|l| l.split(", ").nth(1))
        .and_then(|v| v.trim_end_matches(" req/s").parse::<f64>().ok())
        .with_context(|| format!("h2load printed no rate: {text}{}", String::from_utf8_lossy(&out.stderr)))?;
    let status_2xx = text
        .lines()
        .find(|l| l.starts_with("status codes:"))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0);
    Ok(Load { rps, proxy_cores: cores, errors: (H2_REQUESTS as u64).saturating_sub(status_2xx) })
}

fn print(measured: &[Measured], load_start: &LoadAvg, load_end: &LoadAvg) {
    let q = |m: &Measured, q: f64| quantile_us(&m.latency.latencies, q);
    let find = |name: &str| measured.iter().find(|m| m.route.name == name);
    println!();
    println!(
        "Waypoint, two nodes on one machine ({} cores shared by everything)",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!("load average: start {}, end {}", load_start.shown(), load_end.shown());
    println!(
        "{:<15} {:>9} {:>9} {:>9} {:>10} {:>10} {:>10} {:>11} {:>10} {:>11}",
        "path",
        "p50 us",
        "p99 us",
        "failed",
        "vCPU/krps",
        "RSS MB",
        "wrk rps",
        "rps/core",
        "h2 rps",
        "h2 rps/core"
    );
    let mut figures = Vec::new();
    for m in measured {
        let l = &m.latency;
        let krps = l.rate() / 1000.0;
        let vcpu = l.cpu.total() / l.window.as_secs_f64() / krps;
        let rss = l.rss_max.bytes.iter().sum::<u64>() as f64 / 1e6;
        let per_core =
            |load: &Option<Load>| load.as_ref().map_or(f64::NAN, |w| w.rps / w.proxy_cores.max(1e-9));
        let rps = |load: &Option<Load>| load.as_ref().map_or(f64::NAN, |w| w.rps);
        println!(
            "{:<15} {:>9.0} {:>9.0} {:>9} {:>10.4} {:>10.1} {:>10.0} {:>11.0} {:>10.0} {:>11.0}",
            m.route.name,
            q(m, 0.5),
            q(m, 0.99),
            l.errors
                + m.wrk.as_ref().map_or(0, |w| w.errors as usize)
                + m.h2.as_ref().map_or(0, |w| w.errors as usize),
            if m.route.proxy.is_some() { vcpu } else { f64::NAN },
            if m.route.proxy.is_some() { rss } else { f64::NAN },
            rps(&m.wrk),
            per_core(&m.wrk),
            rps(&m.h2),
            per_core(&m.h2),
        );
        let key = m.route.name.replace([' ', '+'], "_").to_lowercase();
        figures.push((format!("{key}_p50"), q(m, 0.5), "us"));
        figures.push((format!("{key}_p99"), q(m, 0.99), "us"));
        if m.route.proxy.is_some() {
            figures.push((format!("{key}_vcpu_per_krps"), vcpu, "vCPU"));
            figures.push((format!("{key}_rss_under_1krps"), rss, "MB"));
            figures.push((format!("{key}_wrk_rps"), rps(&m.wrk), "1/s"));
            figures.push((format!("{key}_wrk_rps_per_core"), per_core(&m.wrk), "1/s/core"));
            figures.push((format!("{key}_h2_rps"), rps(&m.h2), "1/s"));
            figures.push((format!("{key}_h2_rps_per_core"), per_core(&m.h2), "1/s/core"));
        }
    }
    if let (Some(w), Some(l4), Some(h)) = (find("waypoint"), find("L4 mesh"), find("haproxy")) {
        let added_p99 = q(w, 0.99) - q(l4, 0.99);
        let l = &w.latency;
        let vcpu = l.cpu.total() / l.window.as_secs_f64() / (l.rate() / 1000.0);
        let rss = l.rss_max.bytes.iter().sum::<u64>() as f64 / 1e6 / (l.rate() / 1000.0);
        let per_core = |m: &Measured| m.wrk.as_ref().map_or(f64::NAN, |x| x.rps / x.proxy_cores.max(1e-9));
        let ratio = per_core(w) / per_core(h);
        let verdict = |ok: bool| if ok { "meets" } else { "MISSES" };
        println!();
        println!(
            "targets: waypoint rps/core vs haproxy {ratio:.2} (>= 1): {}; vCPU/1k rps {vcpu:.4} (<= {TARGET_VCPU_PER_KRPS}): {}; \
             RSS/1k rps {rss:.1} MB (<= {TARGET_RSS_MB_PER_KRPS}): {}; added p99 over the L4 mesh {added_p99:.0} us (<= {TARGET_ADDED_P99_US}): {}",
            verdict(ratio >= 1.0),
            verdict(vcpu <= TARGET_VCPU_PER_KRPS),
            verdict(rss <= TARGET_RSS_MB_PER_KRPS),
            verdict(added_p99 <= TARGET_ADDED_P99_US),
        );
        figures.push(("waypoint_added_p99_over_l4".into(), added_p99, "us"));
        figures.push(("waypoint_vs_haproxy_rps_per_core".into(), ratio, "ratio"));
    }
    if let (Some(w), Some(p)) = (find("waypoint"), find("waypoint+policy")) {
        let per_core =
            |load: &Option<Load>| load.as_ref().map_or(f64::NAN, |x| x.rps / x.proxy_cores.max(1e-9));
        let (h1, h2) = (per_core(&p.wrk) / per_core(&w.wrk), per_core(&p.h2) / per_core(&w.h2));
        let verdict = |ok: bool| if ok { "meets" } else { "MISSES" };
        println!(
            "issue 12: with retries and a DestinationRule, rps/core {h1:.2}x (HTTP/1.1) and {h2:.2}x (HTTP/2) of the plain waypoint (>= 0.90): {}",
            verdict(h1 >= 0.9 && h2 >= 0.9)
        );
        figures.push(("policy_vs_plain_waypoint_rps_per_core".into(), h1, "ratio"));
        figures.push(("policy_vs_plain_waypoint_h2_rps_per_core".into(), h2, "ratio"));
    }
    if let (Some(w), Some(a)) = (find("waypoint"), find("waypoint+authz")) {
        let per_core =
            |load: &Option<Load>| load.as_ref().map_or(f64::NAN, |x| x.rps / x.proxy_cores.max(1e-9));
        let (h1, h2) = (per_core(&a.wrk) / per_core(&w.wrk), per_core(&a.h2) / per_core(&w.h2));
        let added_p99 = q(a, 0.99) - q(w, 0.99);
        println!(
            "issue 13: with JWT validation and an ALLOW policy of 10 rules, rps/core {h1:.2}x (HTTP/1.1) and {h2:.2}x (HTTP/2) of the plain waypoint; p99 {added_p99:+.0} us"
        );
        figures.push(("authz_vs_plain_waypoint_rps_per_core".into(), h1, "ratio"));
        figures.push(("authz_vs_plain_waypoint_h2_rps_per_core".into(), h2, "ratio"));
        figures.push(("authz_added_p99".into(), added_p99, "us"));
    }
    figures.push(("loadavg_start_1m".into(), load_start.one, "load"));
    figures.push(("loadavg_end_1m".into(), load_end.one, "load"));
    println!();
    for (name, value, unit) in figures {
        println!("{{\"bench\":\"waypoint\",\"metric\":\"{name}\",\"value\":{value:.3},\"unit\":\"{unit}\"}}");
    }
}
