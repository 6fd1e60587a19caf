//! HBONE on loopback beside plain TCP: single-stream throughput, 1 KiB request/response latency,
//! and new connections per second with a full mutual-TLS handshake each. One command, no harness:
//! `cargo bench -p weft-core --bench hbone`. Real sockets, real rustls, real HTTP/2; everything
//! (client, HBONE server, upstream) shares one tokio runtime of two worker threads.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use weft_core::drain;
use weft_core::hbone::{ClientSettings, ConnectRequest, H2Stream, Pool, Server, ServerSettings};
use weft_core::identity::Identity;
use weft_core::testing::{echo_server, identity, serve_each, ForwardInbound, TestCa};
use weft_core::tls::WorkloadCertificate;

/// jemalloc, as Weft's binaries will use: glibc's malloc hands h2's 1 MiB frame buffers back to
/// the kernel and faults them in again, which costs HBONE about a fifth of its throughput.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Worker threads of the runtime that runs both ends (the machine has two cores).
const WORKER_THREADS: usize = 2;

/// Single-stream throughput is measured in rounds, alternating direct and HBONE, each on a new
/// connection (HBONE: a new stream on the pooled connection). Direct TCP varies from round to
/// round by up to 2x on two cores (most likely with where the scheduler puts the two ends), so the
/// median is reported with the range.
const THROUGHPUT_ROUNDS: usize = 5;
const THROUGHPUT_TIME: Duration = Duration::from_secs(1);
/// What the client hands to each write (iperf3's default for TCP), and what the sink reads at
/// once. Direct TCP on loopback is syscall-bound, so its figure grows with this size (~19 Gbit/s
/// at 16 KiB, ~60 at 256 KiB on the reference machine) while HBONE's barely moves: the ratio
/// depends on it.
const WRITE_CHUNK: usize = 128 * 1024;
const SINK_BUFFER: usize = 256 * 1024;

/// Request and response size of the latency test, and how many round trips it times.
const MESSAGE: usize = 1024;
const WARMUP_ROUND_TRIPS: usize = 2_000;
const ROUND_TRIPS: usize = 20_000;

/// Connection-rate runs: how long each lasts, at most how many connections it opens (each
/// leaves a socket in TIME_WAIT, and loopback has ~28k ephemeral ports per destination), and
/// the concurrency of the parallel run.
const HBONE_CONNECT_TIME: Duration = Duration::from_secs(3);
const HBONE_CONNECT_MAX: u64 = 12_000;
const TCP_CONNECT_TIME: Duration = Duration::from_secs(1);
const TCP_CONNECT_MAX: u64 = 20_000;
const CONCURRENCY: usize = 8;

fn main() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(WORKER_THREADS)
        .enable_all()
        .build()
        .context("building the tokio runtime")?;
    // Spawned rather than run in block_on, so the client side runs on the two workers too and
    // the main thread only waits.
    runtime.block_on(async { tokio::spawn(run()).await.context("benchmark task panicked")? })
}

async fn run() -> anyhow::Result<()> {
    let started = Instant::now();

    eprintln!("throughput: {THROUGHPUT_ROUNDS} rounds of {THROUGHPUT_TIME:?} each, direct TCP and HBONE...");
    let sink = serve_each(count_bytes).await;
    let mesh = Mesh::start().await?;
    let (mut direct_tput, mut hbone_tput) = (Throughput::default(), Throughput::default());
    for _ in 0..THROUGHPUT_ROUNDS {
        direct_tput.add(push(&mut tcp_connect(sink).await?, THROUGHPUT_TIME).await?);
        hbone_tput.add(push(&mut mesh.stream(sink).await?, THROUGHPUT_TIME).await?);
    }

    eprintln!("latency: {ROUND_TRIPS} round trips of {MESSAGE} bytes, direct TCP and HBONE...");
    let echo = serve_each(echo_messages).await;
    let direct_rtt = Latency::of(round_trips(&mut tcp_connect(echo).await?).await?);
    let hbone_rtt = Latency::of(round_trips(&mut mesh.stream(echo).await?).await?);
    drop(mesh);

    eprintln!("connections: direct TCP connect + 1-byte echo...");
    let echo = echo_server().await;
    let tcp_seq = rate(TCP_CONNECT_TIME, TCP_CONNECT_MAX, 1, move || tcp_one_shot(echo)).await?;
    let echo = echo_server().await;
    let tcp_par = rate(TCP_CONNECT_TIME, TCP_CONNECT_MAX, CONCURRENCY, move || tcp_one_shot(echo)).await?;

    eprintln!("connections: HBONE full handshake + CONNECT + 1-byte echo...");
    let hbone_seq = handshakes(1).await?;
    let hbone_par = handshakes(CONCURRENCY).await?;

    Report { direct_tput, hbone_tput, direct_rtt, hbone_rtt, tcp_seq, tcp_par, hbone_seq, hbone_par }.print();
    eprintln!("done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// Everything one run measured.
struct Report {
    direct_tput: Throughput,
    hbone_tput: Throughput,
    direct_rtt: Latency,
    hbone_rtt: Latency,
    tcp_seq: Rate,
    tcp_par: Rate,
    hbone_seq: Rate,
    hbone_par: Rate,
}

impl Report {
    /// A table for people, then one JSON line per figure.
    fn print(&self) {
        println!();
        println!(
            "HBONE on loopback: {WORKER_THREADS} tokio worker threads shared by client, server and upstream"
        );
        println!("{:<44} {:>12} {:>12} {:>14}", "", "direct TCP", "HBONE", "HBONE/direct");
        let gbps = |t: &Throughput| t.median();
        println!(
            "{:<44} {:>12.2} {:>12.2} {:>14.2}",
            "Throughput, 1 stream, median (Gbit/s)",
            gbps(&self.direct_tput),
            gbps(&self.hbone_tput),
            gbps(&self.hbone_tput) / gbps(&self.direct_tput)
        );
        let range = |t: &Throughput| format!("{:.1}-{:.1}", t.min(), t.max());
        println!(
            "{:<44} {:>12} {:>12}",
            format!("  range over {THROUGHPUT_ROUNDS} rounds (Gbit/s)"),
            range(&self.direct_tput),
            range(&self.hbone_tput)
        );
        println!(
            "{:<44} {:>12.2} {:>12.2}",
            "  bytes moved (GiB)",
            self.direct_tput.bytes as f64 / GIB,
            self.hbone_tput.bytes as f64 / GIB
        );
        println!("{:<44} {:>12} {:>12} {:>14}", "", "", "", "added (us)");
        let row = |what: &str, direct: Duration, hbone: Duration| {
            println!(
                "{:<44} {:>12.1} {:>12.1} {:>+14.1}",
                what,
                micros(direct),
                micros(hbone),
                micros(hbone) - micros(direct)
            )
        };
        row("1 KiB round trip, mean (us)", self.direct_rtt.mean, self.hbone_rtt.mean);
        row("1 KiB round trip, p50 (us)", self.direct_rtt.p50, self.hbone_rtt.p50);
        row("1 KiB round trip, p99 (us)", self.direct_rtt.p99, self.hbone_rtt.p99);
        // The maximum is one sample, mostly scheduling noise: no difference is printed for it.
        println!(
            "{:<44} {:>12.1} {:>12.1}",
            "1 KiB round trip, max (us)",
            micros(self.direct_rtt.max),
            micros(self.hbone_rtt.max)
        );
        println!("{:<44} {:>12} {:>12} {:>14}", "", "", "", "HBONE/direct");
        for (what, direct, hbone) in [
            ("New connections/s, sequential".to_owned(), &self.tcp_seq, &self.hbone_seq),
            (format!("New connections/s, {CONCURRENCY} concurrent"), &self.tcp_par, &self.hbone_par),
        ] {
            println!(
                "{:<44} {:>12.0} {:>12.0} {:>14.3}",
                what,
                direct.per_second(),
                hbone.per_second(),
                hbone.per_second() / direct.per_second()
            );
        }
        let per_connection = |what: &str, direct: Duration, hbone: Duration| {
            println!("{:<44} {:>12.1} {:>12.1}", what, micros(direct), micros(hbone))
        };
        per_connection(
            "  time per connection, sequential, p50 (us)",
            self.tcp_seq.latency.p50,
            self.hbone_seq.latency.p50,
        );
        per_connection(
            "  time per connection, sequential, p99 (us)",
            self.tcp_seq.latency.p99,
            self.hbone_seq.latency.p99,
        );
        println!(
            "  (connections opened: direct {} + {}, HBONE {} + {}; every HBONE one a full mTLS handshake)",
            self.tcp_seq.count, self.tcp_par.count, self.hbone_seq.count, self.hbone_par.count
        );
        println!();

        let figures = [
            ("throughput_direct_median", gbps(&self.direct_tput), "Gbit/s"),
            ("throughput_direct_min", self.direct_tput.min(), "Gbit/s"),
            ("throughput_direct_max", self.direct_tput.max(), "Gbit/s"),
            ("throughput_hbone_median", gbps(&self.hbone_tput), "Gbit/s"),
            ("throughput_hbone_min", self.hbone_tput.min(), "Gbit/s"),
            ("throughput_hbone_max", self.hbone_tput.max(), "Gbit/s"),
            ("throughput_ratio", gbps(&self.hbone_tput) / gbps(&self.direct_tput), "ratio"),
            ("rtt_1k_direct_mean", micros(self.direct_rtt.mean), "us"),
            ("rtt_1k_direct_p50", micros(self.direct_rtt.p50), "us"),
            ("rtt_1k_direct_p99", micros(self.direct_rtt.p99), "us"),
            ("rtt_1k_hbone_mean", micros(self.hbone_rtt.mean), "us"),
            ("rtt_1k_hbone_p50", micros(self.hbone_rtt.p50), "us"),
            ("rtt_1k_hbone_p99", micros(self.hbone_rtt.p99), "us"),
            ("rtt_1k_added_p50", micros(self.hbone_rtt.p50) - micros(self.direct_rtt.p50), "us"),
            ("rtt_1k_added_p99", micros(self.hbone_rtt.p99) - micros(self.direct_rtt.p99), "us"),
            ("connections_direct_seq", self.tcp_seq.per_second(), "1/s"),
            ("connections_direct_c8", self.tcp_par.per_second(), "1/s"),
            ("connections_hbone_seq", self.hbone_seq.per_second(), "1/s"),
            ("connections_hbone_c8", self.hbone_par.per_second(), "1/s"),
        ];
        for (name, value, unit) in figures {
            println!(
                "{{\"bench\":\"hbone\",\"metric\":\"{name}\",\"value\":{value:.3},\"unit\":\"{unit}\"}}"
            );
        }
    }
}

const GIB: f64 = (1u64 << 30) as f64;

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// An HBONE server on loopback that forwards each CONNECT to its `:authority`, and a client pool.
struct Mesh {
    pool: Pool,
    client: Arc<WorkloadCertificate>,
    server_id: Identity,
    hbone_addr: SocketAddr,
    inbound: Arc<ForwardInbound>,
    _drain: drain::Trigger,
}

impl Mesh {
    async fn start() -> anyhow::Result<Self> {
        let ca = TestCa::new();
        let server_id = identity("server-ns", "server");
        let inbound = ForwardInbound::new(ca.cert(&server_id));
        let listener = TcpListener::bind("127.0.0.1:0").await.context("binding the HBONE listener")?;
        let server = Server::new(listener, ServerSettings::default(), inbound.clone());
        let hbone_addr = server.local_addr()?;
        let (trigger, watch) = drain::channel();
        tokio::spawn(server.run(watch));
        Ok(Mesh {
            pool: Pool::new(ClientSettings::default()),
            client: ca.cert(&identity("client-ns", "client")),
            server_id,
            hbone_addr,
            inbound,
            _drain: trigger,
        })
    }

    fn request(&self, authority: SocketAddr) -> ConnectRequest {
        ConnectRequest {
            certificate: self.client.clone(),
            expected: vec![self.server_id.clone()],
            source_ip: None,
            hbone_addr: self.hbone_addr,
            authority,
            forwarded: weft_core::hbone::Forwarded {
                for_addr: Some("10.1.2.3:4567".parse().expect("a valid address")),
                host: None,
            },
            baggage: None,
            traceparent: None,
        }
    }

    /// A stream on the shared pool (one TLS connection carries them all).
    async fn stream(&self, authority: SocketAddr) -> anyhow::Result<H2Stream> {
        Ok(self.pool.connect(self.request(authority)).await?)
    }
}

/// Upstream for throughput: counts what arrives, answers the count (u64, big-endian) after EOF.
async fn count_bytes(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut buf = vec![0u8; SINK_BUFFER];
    let mut total: u64 = 0;
    loop {
        match stream.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(_) => return,
        }
    }
    let _ = stream.write_all(&total.to_be_bytes()).await;
    let _ = stream.shutdown().await;
}

/// Upstream for latency: answers each MESSAGE-byte message with the same bytes.
async fn echo_messages(mut stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let mut buf = [0u8; MESSAGE];
    while stream.read_exact(&mut buf).await.is_ok() {
        if stream.write_all(&buf).await.is_err() {
            return;
        }
    }
}

async fn tcp_connect(addr: SocketAddr) -> anyhow::Result<TcpStream> {
    let stream = TcpStream::connect(addr).await.with_context(|| format!("connecting to {addr}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// One transfer: bytes counted at the far end, and how long until they were.
struct Transfer {
    bytes: u64,
    elapsed: Duration,
}

/// The rounds of one path.
#[derive(Default)]
struct Throughput {
    /// Gbit/s of each round, sorted.
    rounds: Vec<f64>,
    bytes: u64,
}

impl Throughput {
    fn add(&mut self, transfer: Transfer) {
        self.bytes += transfer.bytes;
        self.rounds.push(transfer.bytes as f64 * 8.0 / transfer.elapsed.as_secs_f64() / 1e9);
        self.rounds.sort_by(f64::total_cmp);
    }

    fn median(&self) -> f64 {
        match self.rounds.len() {
            0 => 0.0,
            n if n % 2 == 1 => self.rounds[n / 2],
            n => (self.rounds[n / 2 - 1] + self.rounds[n / 2]) / 2.0,
        }
    }

    fn min(&self) -> f64 {
        self.rounds.first().copied().unwrap_or_default()
    }

    fn max(&self) -> f64 {
        self.rounds.last().copied().unwrap_or_default()
    }
}

/// Writes for `time`, half-closes, and waits for the sink's count: the clock stops when the
/// last byte has been counted at the far end, not when it left the client.
async fn push<S>(stream: &mut S, time: Duration) -> anyhow::Result<Transfer>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let chunk = vec![0xA5u8; WRITE_CHUNK];
    let started = Instant::now();
    let deadline = started + time;
    let mut sent: u64 = 0;
    while Instant::now() < deadline {
        stream.write_all(&chunk).await.context("writing the payload")?;
        sent += chunk.len() as u64;
    }
    stream.shutdown().await.context("half-closing")?;
    let mut count = [0u8; 8];
    stream.read_exact(&mut count).await.context("reading the sink's count")?;
    let elapsed = started.elapsed();
    let bytes = u64::from_be_bytes(count);
    ensure!(bytes == sent, "sink counted {bytes} bytes, {sent} were sent");
    Ok(Transfer { bytes, elapsed })
}

/// Times ROUND_TRIPS exchanges of one MESSAGE each way on one stream, after a warm-up.
async fn round_trips<S>(stream: &mut S) -> anyhow::Result<Vec<Duration>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut out = [0u8; MESSAGE];
    let mut back = [0u8; MESSAGE];
    let mut times = Vec::with_capacity(ROUND_TRIPS);
    for i in 0..WARMUP_ROUND_TRIPS + ROUND_TRIPS {
        out[..8].copy_from_slice(&(i as u64).to_be_bytes());
        let sent = Instant::now();
        stream.write_all(&out).await.context("writing a request")?;
        stream.read_exact(&mut back).await.context("reading a response")?;
        let elapsed = sent.elapsed();
        ensure!(back == out, "response {i} differs from its request");
        if i >= WARMUP_ROUND_TRIPS {
            times.push(elapsed);
        }
    }
    Ok(times)
}

#[derive(Clone, Copy)]
struct Latency {
    mean: Duration,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

impl Latency {
    fn of(mut times: Vec<Duration>) -> Self {
        times.sort_unstable();
        let n = times.len().max(1);
        // Nearest rank: the smallest sample with at least q of them at or below it.
        let rank = |q: f64| times.get(((q * n as f64).ceil() as usize).clamp(1, n) - 1).copied();
        let total: Duration = times.iter().sum();
        Latency {
            mean: total / n as u32,
            p50: rank(0.50).unwrap_or_default(),
            p99: rank(0.99).unwrap_or_default(),
            max: times.last().copied().unwrap_or_default(),
        }
    }
}

struct Rate {
    count: u64,
    elapsed: Duration,
    latency: Latency,
}

impl Rate {
    fn per_second(&self) -> f64 {
        self.count as f64 / self.elapsed.as_secs_f64()
    }
}

/// Runs `open` back to back in `concurrency` tasks until `time` has passed or `max` have been
/// started; the clock stops when the last one has finished.
async fn rate<F, Fut>(time: Duration, max: u64, concurrency: usize, open: F) -> anyhow::Result<Rate>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let started = Instant::now();
    let deadline = started + time;
    let budget = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..concurrency {
        let (open, budget) = (open.clone(), budget.clone());
        tasks.spawn(async move {
            let mut times = Vec::new();
            while Instant::now() < deadline && budget.fetch_add(1, Ordering::Relaxed) < max {
                let one = Instant::now();
                open().await?;
                times.push(one.elapsed());
            }
            anyhow::Ok(times)
        });
    }
    let mut times = Vec::new();
    while let Some(done) = tasks.join_next().await {
        times.extend(done.context("connection task panicked")??);
    }
    let elapsed = started.elapsed();
    Ok(Rate { count: times.len() as u64, elapsed, latency: Latency::of(times) })
}

/// Direct TCP: connect, one byte there and back, close.
async fn tcp_one_shot(echo: SocketAddr) -> anyhow::Result<()> {
    let mut stream = tcp_connect(echo).await?;
    one_byte_echo(&mut stream).await
}

async fn one_byte_echo<S>(stream: &mut S) -> anyhow::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream.write_all(b"x").await.context("writing one byte")?;
    let mut byte = [0u8; 1];
    stream.read_exact(&mut byte).await.context("reading one byte back")?;
    ensure!(&byte == b"x", "echo answered {byte:?}");
    Ok(())
}

/// HBONE connections per second: each a new pool, so a new TCP connection, a full TLS 1.3
/// handshake with certificates both ways (the client disables resumption and the server sends
/// no tickets), the HTTP/2 handshake, one CONNECT (for which the server dials the upstream), and
/// one byte there and back. A fresh server and upstream per run keep TIME_WAIT sockets apart.
async fn handshakes(concurrency: usize) -> anyhow::Result<Rate> {
    let mesh = Arc::new(Mesh::start().await?);
    let echo = echo_server().await;
    let one = {
        let mesh = mesh.clone();
        move || {
            let mesh = mesh.clone();
            async move {
                let pool = Pool::new(ClientSettings::default());
                let mut stream = pool.connect(mesh.request(echo)).await?;
                one_byte_echo(&mut stream).await
            }
        }
    };
    let rate = rate(HBONE_CONNECT_TIME, HBONE_CONNECT_MAX, concurrency, one).await?;
    let handshakes = mesh.inbound.tls_handshakes.load(Ordering::SeqCst) as u64;
    if handshakes != rate.count {
        bail!("{} connections but the server saw {handshakes} TLS handshakes", rate.count);
    }
    Ok(rate)
}
