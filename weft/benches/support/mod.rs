//! What the benchmarks share (`mesh`, `waypoint`): the cluster guard and signal handling, the
//! stale-binary warning, waiting for a quiet machine, processes' CPU and RSS from /proc, a
//! keep-alive HTTP/1.1 connection from a pod, the fixed-rate latency generator (no coordinated
//! omission) and the statistics. Each bench includes it with `mod support;`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{ensure, Context};
use weft::cluster;
use weft::up::Mesh;

/// A 1-minute load average above this means others' work shares the cores with the bench.
pub const BUSY_LOAD: f64 = 1.0;
/// A response later than this fails the request (and the connection).
pub const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often RSS is sampled during a latency run.
const RSS_SAMPLE: Duration = Duration::from_millis(200);

/// Where `cargo bench` put weft-app, and so the workspace's other release binaries; a warning
/// for each of `binaries` (name, crates it is built from) older than its sources.
pub fn bin_dir(binaries: &[(&str, &[&str])], build: &str) -> anyhow::Result<PathBuf> {
    let dir = Path::new(env!("CARGO_BIN_EXE_weft-app")).parent().unwrap().to_path_buf();
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    for (binary, crates) in binaries {
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
pub fn newest_source(dir: &Path) -> Option<(SystemTime, PathBuf)> {
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
pub fn wait_for_quiet() {
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
pub struct Guard {
    pub mesh: Mesh,
}

impl Drop for Guard {
    fn drop(&mut self) {
        let name = self.mesh.name().to_owned();
        eprintln!("removing cluster {name:?}...");
        if let Err(e) = cluster::destroy(&name) {
            eprintln!("removing cluster {name:?}: {e} (run `weft down --name {name}`)");
        }
    }
}

/// On Ctrl-C or SIGTERM: remove cluster `name` and exit (no destructor runs on a signal).
pub fn watch_signals(name: &'static str) {
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).unwrap();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        });
        eprintln!("interrupted: removing cluster {name:?}");
        let _ = cluster::destroy(name);
        std::process::exit(130);
    });
}

/// A process the bench started in a pod's namespace, killed when dropped.
pub struct Server(pub Child);

impl Server {
    /// Runs `args` inside `netns`, its output discarded.
    pub fn spawn(netns: &str, args: &[&str]) -> anyhow::Result<Server> {
        let child = Command::new("ip")
            .args(["netns", "exec", netns])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {args:?} in {netns}"))?;
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
pub fn wait_listening(netns: &str, port: u16) -> anyhow::Result<()> {
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

// ---- /proc ----

/// Processes measured together (the ztunnels, a proxy).
#[derive(Debug, Clone)]
pub struct Procs {
    pub pids: Vec<u32>,
}

impl Procs {
    /// The one process called `comm` in `netns` (`weft up` starts them through `nsenter`,
    /// which execs them).
    pub fn find(netns: &str, comm: &str) -> anyhow::Result<u32> {
        let out = Command::new("ip").args(["netns", "pids", netns]).output()?;
        let found: Vec<u32> = String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .filter_map(|p| p.parse().ok())
            .filter(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == comm))
            .collect();
        ensure!(found.len() == 1, "expected one {comm} process in {netns}, found {found:?}");
        Ok(found[0])
    }

    /// utime + stime of each, and of its children that were waited for, in seconds.
    pub fn cpu(&self) -> anyhow::Result<Cpu> {
        let mut seconds = Vec::with_capacity(self.pids.len());
        for pid in &self.pids {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .with_context(|| format!("process {pid} is gone"))?;
            // Fields after the command (which may hold spaces) start at `state`, field 3.
            let after = stat.rsplit_once(')').context("bad /proc/pid/stat")?.1;
            let fields: Vec<&str> = after.split_whitespace().collect();
            let ticks = |field: usize| fields[field - 3].parse::<f64>().unwrap_or(0.0);
            seconds.push((ticks(14) + ticks(15)) / clock_ticks());
        }
        Ok(Cpu { seconds })
    }

    /// VmRSS of each, in bytes.
    pub fn rss(&self) -> anyhow::Result<Rss> {
        let mut bytes = Vec::with_capacity(self.pids.len());
        for pid in &self.pids {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
                .with_context(|| format!("process {pid} is gone"))?;
            bytes.push(status_kib(&status, "VmRSS:") * 1024);
        }
        Ok(Rss { bytes })
    }
}

pub fn status_kib(status: &str, field: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Kernel clock ticks per second (`getconf CLK_TCK`; 100 on Linux here).
pub fn clock_ticks() -> f64 {
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

/// CPU-seconds of each of a [`Procs`].
#[derive(Debug, Clone, Default)]
pub struct Cpu {
    pub seconds: Vec<f64>,
}

impl Cpu {
    pub fn since(&self, before: &Cpu) -> Cpu {
        Cpu { seconds: self.seconds.iter().zip(&before.seconds).map(|(a, b)| a - b).collect() }
    }

    pub fn total(&self) -> f64 {
        self.seconds.iter().sum()
    }
}

/// VmRSS of each of a [`Procs`], bytes.
#[derive(Debug, Clone, Default)]
pub struct Rss {
    pub bytes: Vec<u64>,
}

impl Rss {
    pub fn max(self, other: &Rss) -> Rss {
        if self.bytes.is_empty() {
            return other.clone();
        }
        Rss { bytes: self.bytes.iter().zip(&other.bytes).map(|(a, b)| *a.max(b)).collect() }
    }

    pub fn mb(&self, i: usize) -> f64 {
        self.bytes.get(i).copied().unwrap_or(0) as f64 / 1e6
    }
}

/// The machine's CPU time from /proc/stat: busy and total ticks over all cores.
#[derive(Debug, Clone, Copy)]
pub struct MachineTicks {
    busy: u64,
    total: u64,
}

impl MachineTicks {
    pub fn busy_since(&self, before: &MachineTicks) -> f64 {
        let total = self.total.saturating_sub(before.total);
        if total == 0 {
            return 0.0;
        }
        self.busy.saturating_sub(before.busy) as f64 / total as f64
    }
}

pub fn machine_ticks() -> anyhow::Result<MachineTicks> {
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
pub struct LoadAvg {
    pub one: f64,
    pub five: f64,
    pub fifteen: f64,
}

impl LoadAvg {
    pub fn shown(&self) -> String {
        let busy = if self.one > BUSY_LOAD { " (BUSY: others' work shares the cores)" } else { "" };
        format!("{:.2} {:.2} {:.2}{busy}", self.one, self.five, self.fifteen)
    }
}

pub fn loadavg() -> LoadAvg {
    let text = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let v: Vec<f64> = text.split_whitespace().take(3).filter_map(|s| s.parse().ok()).collect();
    match v[..] {
        [one, five, fifteen] => LoadAvg { one, five, fifteen },
        _ => LoadAvg::default(),
    }
}

// ---- latency ----

/// A keep-alive HTTP/1.1 connection from a client pod (the socket was made inside its network
/// namespace and stays there).
pub struct Connection {
    pub stream: TcpStream,
    pub reader: BufReader<TcpStream>,
    pub host: String,
    /// Further header lines every request carries (each ending in CRLF).
    pub extra: String,
}

impl Connection {
    /// Connects from inside `netns` to `addr`; requests carry `Host: <host>`.
    pub fn open(netns: &str, addr: SocketAddr, host: &str) -> anyhow::Result<Connection> {
        let stream = cluster::in_netns(netns, || TcpStream::connect_timeout(&addr, Duration::from_secs(5)))?
            .with_context(|| format!("connecting to {addr} from {netns}"))?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(RESPONSE_TIMEOUT))?;
        let reader = BufReader::with_capacity(64 * 1024, stream.try_clone()?);
        Ok(Connection { stream, reader, host: host.to_owned(), extra: String::new() })
    }

    /// The same connection, its requests also carrying `name: value`.
    pub fn with_header(mut self, name: &str, value: &str) -> Connection {
        self.extra.push_str(&format!("{name}: {value}\r\n"));
        self
    }

    pub fn request(&self, path: &str) -> Vec<u8> {
        format!("GET {path} HTTP/1.1\r\nHost: {}\r\n{}\r\n", self.host, self.extra).into_bytes()
    }

    /// One request, then its response (status, body length).
    pub fn get(&mut self, path: &str) -> anyhow::Result<(u16, usize)> {
        self.stream.write_all(&self.request(path))?;
        read_response(&mut self.reader)
    }
}

/// Reads one HTTP/1.1 response with a Content-Length body: its status and body length.
pub fn read_response(reader: &mut impl BufRead) -> anyhow::Result<(u16, usize)> {
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
pub struct LatencyRun {
    /// Scheduled send → last byte of the response, per measured request.
    pub latencies: Vec<Duration>,
    /// Actual send − scheduled send: the generator's own timer and scheduling error, plus any
    /// wait for the connection's previous response.
    pub lateness: Vec<Duration>,
    /// Requests that failed (error, timeout, wrong status or length), over the whole run.
    pub errors: usize,
    /// The measured window: from the first measured request's schedule to the last response.
    pub window: Duration,
    /// The measured processes over the window.
    pub cpu: Cpu,
    /// Their VmRSS, sampled during the window: the highest sample.
    pub rss_max: Rss,
    /// The whole machine over the window: busy fraction of all cores (/proc/stat).
    pub machine_busy: f64,
}

impl LatencyRun {
    pub fn requests(&self) -> usize {
        self.latencies.len()
    }

    pub fn rate(&self) -> f64 {
        self.requests() as f64 / self.window.as_secs_f64()
    }
}

/// The schedule of a fixed-rate run.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    /// Requests per second, across all connections.
    pub rate: u32,
    pub connections: usize,
    /// Sent at the full rate and thrown away, then measured.
    pub warmup: Duration,
    pub measure: Duration,
    /// `GET /bytes/<body>`: the response body's size.
    pub body: usize,
}

/// Sends `GET /bytes/<body>` at the schedule's rate over its connections on a fixed schedule:
/// request `i` is due at `start + i / RATE` on connection `i % CONNECTIONS`, and its latency runs
/// from that due time to the last byte of its response, whenever it was actually sent. Each
/// connection is one thread that sleeps until a request is due, writes it and reads the response
/// (as wrk2 does): a response slower than the time between a connection's requests delays that
/// connection's next request, and the delay is counted in that request's latency (no coordinated
/// omission). Not pipelined from a separate writer thread: on this VM's kernel a thread blocked
/// reading a socket was not woken by a response that arrived after another thread wrote the
/// request; it saw the response only when the next request was written on that socket (~4 ms
/// later here; reproduced with Python on loopback, outside Weft).
pub fn fixed_rate(
    schedule: Schedule,
    connect: impl Fn() -> anyhow::Result<Connection>,
    procs: &Procs,
) -> anyhow::Result<LatencyRun> {
    let Schedule { rate, connections, warmup: warmup_time, measure, body } = schedule;
    let interval = Duration::from_secs(1) / rate;
    let warmup = (warmup_time.as_secs_f64() * f64::from(rate)) as usize;
    let total = warmup + (measure.as_secs_f64() * f64::from(rate)) as usize;
    let start = Instant::now() + Duration::from_millis(50);
    let due = move |i: usize| start + interval * u32::try_from(i).unwrap_or(u32::MAX);

    /// What one connection measured: (response done, latency) and lateness of measured
    /// requests, and failures.
    type LaneResult = (Vec<(Instant, Duration)>, Vec<Duration>, usize);
    let mut lanes = Vec::new();
    for lane in 0..connections {
        let mut conn = connect()?;
        let request = conn.request(&format!("/bytes/{body}"));
        lanes.push(std::thread::spawn(move || -> LaneResult {
            // Timer slack (50 µs by default) would make every send late by up to that much.
            let _ = nix::sys::prctl::set_timerslack(1);
            let (mut measured, mut lateness, mut errors) = (Vec::new(), Vec::new(), 0usize);
            let mut broken = false;
            for i in (lane..total).step_by(connections) {
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
                    Ok((200, n)) if n == body && i >= warmup => {
                        measured.push((Instant::now(), due.elapsed()));
                        lateness.push(sent - due);
                    }
                    Ok((200, n)) if n == body => {}
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
    let (cpu_before, machine_before) = (procs.cpu()?, machine_ticks()?);
    let stop_sampling = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (stop, z) = (stop_sampling.clone(), procs.clone());
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
    let cpu = procs.cpu()?.since(&cpu_before);
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
        cpu,
        rss_max,
        machine_busy: machine.busy_since(&machine_before),
    })
}

pub fn median(mut v: Vec<f64>) -> f64 {
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
pub fn quantile_us(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1e6
}

pub fn mean_us(v: &[Duration]) -> f64 {
    v.iter().map(Duration::as_secs_f64).sum::<f64>() / v.len().max(1) as f64 * 1e6
}
