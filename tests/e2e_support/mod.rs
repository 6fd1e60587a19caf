//! What the end-to-end tests share: the local mesh brought up from YAML written by the test
//! (`weft::up`), a guard that removes it even when the test panics, curl inside pods, tcpdump on
//! a node's link with a small pcap reader, and YAML builders.
#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use std::net::SocketAddr;
use std::sync::Arc;

use weft::cluster;
use weft::up::{self, Mesh, UpOptions};
use weft_core::cert_manager::{CaClient, CertManager, Token};
use weft_core::control::ControlPlane;
use weft_core::hbone::{ClientError, ClientSettings, ConnectRequest, Forwarded, Pool};
use weft_core::identity::Identity;
use weft_core::tls::WorkloadCertificate;

/// Whether the local cluster can run here; under CI=true a "no" is a failure.
pub fn usable(test: &str) -> bool {
    let missing: Vec<&str> = ["tcpdump", "curl", "iperf3", "prometheus", "bpftool"]
        .into_iter()
        .filter(|tool| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {tool} >/dev/null")])
                .status()
                .is_ok_and(|s| s.success())
        })
        .collect();
    let problem = match cluster::check_environment() {
        Err(e) => Some(e.to_string()),
        Ok(()) if !missing.is_empty() => Some(format!("missing tools: {}", missing.join(", "))),
        Ok(()) => None,
    };
    weft_core::testing::prerequisites(test, problem)
}

/// Where the workspace's binaries are: `$WEFT_E2E_BIN_DIR` (e.g. a release build), else beside
/// `weft`, where cargo puts them.
pub fn bin_dir() -> PathBuf {
    let dir = match std::env::var_os("WEFT_E2E_BIN_DIR") {
        Some(dir) => PathBuf::from(dir),
        // target/<profile>/deps/e2e-<hash> -> target/<profile>
        None => std::env::current_exe().unwrap().parent().and_then(Path::parent).unwrap().to_path_buf(),
    };
    for binary in ["weft", "controller", "ztunnel", "weft-app", "waypoint"] {
        assert!(
            dir.join(binary).exists(),
            "{} is missing: the end-to-end tests need every binary of the workspace; build them \
             with `cargo build --workspace --bins` (scripts/test.sh does) before the tests",
            dir.join(binary).display()
        );
    }
    dir
}

/// A cluster name unique to this test and process (a-z0-9, at most 16 characters).
pub fn cluster_name(tag: &str) -> String {
    assert!(tag.len() <= 9);
    format!("{tag}{}", std::process::id() % 1_000_000)
}

/// A mesh for one test; removed on drop, also on panic.
pub struct TestMesh {
    pub mesh: Mesh,
    pub dir: tempfile::TempDir,
}

impl TestMesh {
    /// Writes `files` (name → YAML) to a directory and brings the mesh up from it.
    pub fn up(tag: &str, files: &[(&str, String)]) -> TestMesh {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let name = cluster_name(tag);
        let started = Instant::now();
        let mesh = match up::up(&UpOptions::new(dir.path(), &name, bin_dir())) {
            Ok(mesh) => mesh,
            Err(e) => panic!("weft up {name}: {e}"),
        };
        eprintln!("[{name}] up in {:?}", started.elapsed());
        TestMesh { mesh, dir }
    }

    pub fn netns(&self, namespace: &str, pod: &str) -> String {
        self.mesh.cluster().pod_netns(namespace, pod).unwrap().to_string()
    }

    pub fn ip(&self, namespace: &str, pod: &str) -> IpAddr {
        self.mesh.cluster().pod_ip(namespace, pod).unwrap()
    }

    pub fn node_netns(&self, node: &str) -> String {
        self.mesh.cluster().node_netns(node).unwrap().to_string()
    }

    /// Replaces a file of the controller's watched directory (as an operator editing it).
    pub fn write_config(&self, file: &str, text: &str) {
        let path = self.mesh.config_dir().join(file);
        let tmp = self.mesh.config_dir().join(format!(".{file}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    }

    /// The logs of every process, for a failing assertion's message.
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for entry in std::fs::read_dir(self.mesh.logs_dir()).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().to_string();
            if name.starts_with("ztunnel") || name.starts_with("controller") {
                out.push_str(&format!("--- {name}\n{}\n", up::log_tail(&entry.path())));
            }
        }
        out
    }

    /// The ztunnel's Prometheus text from :15020/metrics.
    pub fn metrics(&self, node: &str) -> String {
        let (status, body) = self.mesh.ztunnel_get(node, up::METRICS_PORT, "/metrics").unwrap();
        assert_eq!(status, 200, "{node} /metrics: {body}");
        body
    }
}

impl Drop for TestMesh {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("logs of {}:\n{}", self.mesh.name(), self.logs());
        }
        if let Err(e) = cluster::destroy(self.mesh.name()) {
            eprintln!("removing cluster {}: {e}", self.mesh.name());
        }
    }
}

/// `curl -sS --max-time <secs> <args>` inside `netns`: the body, or curl's error.
pub fn curl(netns: &str, secs: u32, args: &[&str]) -> Result<String, String> {
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "curl", "-sS", "--max-time", &secs.to_string()])
        .args(args)
        .output()
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!("{} ({})", String::from_utf8_lossy(&out.stderr).trim(), out.status))
    }
}

/// A GET that must succeed; the JSON weft-app answered.
pub fn get_json(netns: &str, url: &str) -> serde_json::Value {
    let body = curl(netns, 5, &[url]).unwrap_or_else(|e| panic!("GET {url} from {netns}: {e}"));
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {url}: not JSON ({e}): {body}"))
}

/// The caller's address as weft-app saw it.
pub fn peer_ip(reply: &serde_json::Value) -> IpAddr {
    reply["peer"].as_str().unwrap().parse::<std::net::SocketAddr>().unwrap().ip()
}

/// Polls `f` every 100 ms until it returns `Some`, for at most `limit`.
pub fn poll<T>(limit: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A real Prometheus server inside a namespace, scraping `targets` (`ip:port`) every second;
/// killed on drop.
pub struct Prometheus {
    child: Child,
    netns: String,
    dir: tempfile::TempDir,
}

impl Prometheus {
    pub fn start(netns: &str, job: &str, targets: &[String]) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        let quoted: Vec<String> = targets.iter().map(|t| format!("'{t}'")).collect();
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n- job_name: {job}\n  \
                 static_configs:\n  - targets: [{}]\n",
                quoted.join(", ")
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", netns, "prometheus"])
            .arg(format!("--config.file={}", config.display()))
            .arg(format!("--storage.tsdb.path={}", dir.path().join("data").display()))
            .args(["--web.listen-address=127.0.0.1:9090"])
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        Prometheus { child, netns: netns.to_owned(), dir }
    }

    /// The `data.result` array of an instant PromQL query, when Prometheus answers.
    pub fn query(&self, promql: &str) -> Option<Vec<serde_json::Value>> {
        let url = format!("http://127.0.0.1:9090/api/v1/query?query={}", url_encode(promql));
        let body = curl(&self.netns, 2, &[&url]).ok()?;
        let json: serde_json::Value = serde_json::from_str(&body).ok()?;
        json["data"]["result"].as_array().cloned()
    }

    /// The last lines of its log, for a failing assertion's message.
    pub fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default();
        log.lines().rev().take(10).collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Percent-encodes everything but unreserved characters (for a query parameter).
pub fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// `tcpdump -i <iface> -U -w <file>` inside a node's namespace.
pub struct Capture {
    child: Child,
    pub file: PathBuf,
    _dir: tempfile::TempDir,
}

/// One captured TCP/IPv4 segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    pub payload_len: usize,
}

impl Capture {
    pub fn start(netns: &str, iface: &str) -> Capture {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("link.pcap");
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                netns,
                "tcpdump",
                "-i",
                iface,
                "--immediate-mode",
                "-U",
                "-n",
                "-s",
                "0",
                "-w",
            ])
            .arg(&file)
            .arg("tcp")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // tcpdump says "listening on ..." once the socket is capturing.
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        loop {
            line.clear();
            let n = stderr.read_line(&mut line).unwrap();
            assert!(n > 0, "tcpdump exited before listening");
            if line.contains("listening on") {
                break;
            }
        }
        // Keep draining stderr so tcpdump never blocks on it.
        std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
        Capture { child, file, _dir: dir }
    }

    /// The bytes captured so far (tcpdump -U writes each packet as it comes).
    pub fn bytes(&self) -> Vec<u8> {
        std::fs::read(&self.file).unwrap_or_default()
    }

    pub fn segments(&self) -> Vec<Segment> {
        parse_pcap(&self.bytes())
    }

    /// Stops tcpdump (SIGINT flushes the file) and returns the segments.
    pub fn stop(mut self) -> (Vec<Segment>, Vec<u8>) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).unwrap());
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
        let _ = self.child.wait();
        let bytes = self.bytes();
        (parse_pcap(&bytes), bytes)
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The TCP/IPv4 segments of a pcap file of Ethernet frames (what tcpdump writes on a veth); a
/// truncated last record is ignored.
pub fn parse_pcap(bytes: &[u8]) -> Vec<Segment> {
    let mut out = Vec::new();
    if bytes.len() < 24 {
        return out;
    }
    let le = match &bytes[0..4] {
        [0xd4, 0xc3, 0xb2, 0xa1] | [0x4d, 0x3c, 0xb2, 0xa1] => true,
        [0xa1, 0xb2, 0xc3, 0xd4] | [0xa1, 0xb2, 0x3c, 0x4d] => false,
        _ => panic!("not a pcap file"),
    };
    let u32_at = |b: &[u8], i: usize| {
        let a = [b[i], b[i + 1], b[i + 2], b[i + 3]];
        if le {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        }
    };
    let link_type = u32_at(bytes, 20);
    assert_eq!(link_type, 1, "expected Ethernet frames");
    let mut at = 24;
    while at + 16 <= bytes.len() {
        let incl = u32_at(bytes, at + 8) as usize;
        let start = at + 16;
        if start + incl > bytes.len() {
            break;
        }
        let frame = &bytes[start..start + incl];
        at = start + incl;
        if frame.len() < 14 + 20 || frame[12..14] != [0x08, 0x00] {
            continue;
        }
        let ip = &frame[14..];
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
        if ip[9] != 6 || ip.len() < ihl + 20 {
            continue;
        }
        let tcp = &ip[ihl..];
        let data_offset = usize::from(tcp[12] >> 4) * 4;
        out.push(Segment {
            src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
            dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
            sport: u16::from_be_bytes([tcp[0], tcp[1]]),
            dport: u16::from_be_bytes([tcp[2], tcp[3]]),
            payload_len: total.saturating_sub(ihl + data_offset),
        });
    }
    out
}

/// Whether `needle` occurs in `haystack`.
pub fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Pod addresses are 10.10.x.y: traffic of pods (not the ztunnels' xDS or the scrapes).
pub fn is_pod_ip(ip: Ipv4Addr) -> bool {
    ip.octets()[0..2] == [10, 10]
}

/// Segments between pods (either end a pod address).
pub fn pod_segments(segments: &[Segment]) -> Vec<Segment> {
    segments.iter().filter(|s| is_pod_ip(s.src) || is_pod_ip(s.dst)).cloned().collect()
}

/// The ports pod traffic was sent to on the link: 15008 for both directions of HBONE (pod to
/// pod, and its replies from a pod's 15008 to the other pod's ephemeral port), else the
/// destination port of a segment to a pod (a plaintext reply to a pod counts its ephemeral port).
pub fn pod_dports(segments: &[Segment]) -> BTreeMap<u16, usize> {
    let mut ports = BTreeMap::new();
    for s in pod_segments(segments).iter().filter(|s| is_pod_ip(s.dst)) {
        let port = if s.sport == 15008 { 15008 } else { s.dport };
        *ports.entry(port).or_insert(0) += 1;
    }
    ports
}

/// A Namespace, in the ambient mesh or not.
pub fn namespace(name: &str, ambient: bool) -> String {
    let labels = if ambient { "\n  labels:\n    istio.io/dataplane-mode: ambient" } else { "" };
    format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}{labels}\n---\n")
}

/// A Pod running weft-app (HTTP 8080, TCP echo 9000) with label app=<name> and service account
/// <name>.
pub fn pod(namespace: &str, name: &str, node: &str) -> String {
    pod_running(namespace, name, node, r#"[weft-app, --http, "8080", --tcp-echo, "9000"]"#)
}

/// A Pod running `command` (a YAML flow sequence).
pub fn pod_running(namespace: &str, name: &str, node: &str, command: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  labels:\n    app: {name}\n\
         spec:\n  nodeName: {node}\n  serviceAccountName: {name}\n  containers:\n  - name: main\n    command: {command}\n---\n"
    )
}

/// A Service `name` (cluster IP `ip`, port 80 → 8080 and 9000) selecting app=<app>.
pub fn service(namespace: &str, name: &str, ip: &str, app: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n  clusterIP: {ip}\n  \
         selector:\n    app: {app}\n  ports:\n  - name: http\n    port: 80\n    targetPort: 8080\n  - name: echo\n    port: 9000\n---\n"
    )
}

/// A counter's summed value over the series whose labels contain every `needles` entry.
pub fn counter(metrics: &str, name: &str, needles: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

// ---- HBONE from a node, as anything holding a node's credentials may ----

/// A certificate of `ns/sa` from the local cluster's CA, asked for with `node`'s token from
/// inside the node's namespace, as anything holding that node's credentials may.
pub fn certificate(t: &TestMesh, node: &str, ns: &str, sa: &str) -> Arc<WorkloadCertificate> {
    try_certificate(t, node, ns, sa).unwrap()
}

/// [`certificate`], or the CA's refusal.
pub fn try_certificate(
    t: &TestMesh,
    node: &str,
    ns: &str,
    sa: &str,
) -> Result<Arc<WorkloadCertificate>, String> {
    let token = cluster::state_dir(t.mesh.name()).join("tokens").join(node);
    let endpoint = ControlPlane::parse(
        &format!("https://{}", t.mesh.controller_addr().unwrap()),
        &t.mesh.root_cert_path(),
        None,
    )
    .unwrap();
    let identity = Identity::new(up::TRUST_DOMAIN, ns, sa).unwrap();
    in_runtime(&t.node_netns(node), async move {
        let ca = CaClient::new(&endpoint, Token::File(token), Duration::from_secs(3600));
        CertManager::new(ca).get(&identity).await.map_err(|e| e.to_string())
    })
}

/// Runs `f` to completion on a runtime whose threads are in the namespace `netns`.
pub fn in_runtime<T: Send>(netns: &str, f: impl std::future::Future<Output = T> + Send) -> T {
    weft_core::netns::run_in(netns, || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
            .block_on(f)
    })
    .unwrap()
}

/// One CONNECT to `to` through the HBONE port of `via` (the pod's own node, or a waypoint),
/// presenting `cert`, from this namespace's own address, with `forwarded: for=<claimed>` when
/// given.
pub async fn connect(
    cert: Arc<WorkloadCertificate>,
    expected: Identity,
    via: IpAddr,
    to: SocketAddr,
    claimed: Option<SocketAddr>,
) -> Result<(), ClientError> {
    let pool = Pool::new(ClientSettings::default());
    pool.connect(ConnectRequest {
        certificate: cert,
        expected: vec![expected],
        source_ip: None,
        hbone_addr: SocketAddr::new(via, 15008),
        authority: to,
        forwarded: Forwarded { for_addr: claimed, host: None },
        baggage: None,
        traceparent: None,
    })
    .await
    .map(drop)
}

pub fn status(result: &Result<(), ClientError>) -> Option<u16> {
    match result {
        Err(ClientError::Status { status, .. }) => Some(status.as_u16()),
        _ => None,
    }
}

// ---- Resilience: many requests from one curl, what a pod received, the waypoint's side ----

/// One answer of [`replies`]: the status (0 when curl got none, e.g. past `--max-time`), curl's
/// `time_total` in seconds, and the body.
#[derive(Debug, Clone)]
pub struct Reply {
    pub code: u16,
    pub secs: f64,
    pub body: String,
}

/// `urls` fetched in turn by one curl inside `netns` (one keep-alive connection per host), with
/// `extra` arguments for every one and at most `secs` seconds each; a failed transfer is a reply
/// with code 0, not an error.
pub fn replies(netns: &str, secs: u32, extra: &[&str], urls: &[String]) -> Vec<Reply> {
    const MARK: &str = "\n@@reply ";
    let out = Command::new("ip")
        .args(["netns", "exec", netns, "curl", "-s", "--max-time", &secs.to_string()])
        .args(["-w", &format!("{MARK}%{{http_code}} %{{time_total}}\\n")])
        .args(extra)
        .args(urls)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut parts = text.split(MARK);
    let mut body = parts.next().unwrap_or_default().to_owned();
    let mut out_replies = Vec::new();
    for part in parts {
        let (head, rest) = part.split_once('\n').unwrap_or((part, ""));
        let (code, secs) = head.split_once(' ').unwrap_or((head, "0"));
        out_replies.push(Reply {
            code: code.trim().parse().unwrap_or(0),
            secs: secs.trim().parse().unwrap_or(f64::NAN),
            body: std::mem::take(&mut body),
        });
        body = rest.to_owned();
    }
    assert_eq!(
        out_replies.len(),
        urls.len(),
        "curl in {netns} answered {} of {} URLs ({}): {}",
        out_replies.len(),
        urls.len(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out_replies
}

/// `n` GETs of `url` by one curl ([`replies`]).
pub fn replies_n(netns: &str, secs: u32, extra: &[&str], url: &str, n: usize) -> Vec<Reply> {
    replies(netns, secs, extra, &vec![url.to_owned(); n])
}

/// `clients` curls at once, `n` GETs of `url` each ([`replies_n`]); the replies of all.
pub fn replies_parallel(
    netns: &str,
    secs: u32,
    extra: &[&str],
    url: &str,
    n: usize,
    clients: usize,
) -> Vec<Reply> {
    std::thread::scope(|s| {
        let handles: Vec<_> =
            (0..clients).map(|_| s.spawn(|| replies_n(netns, secs, extra, url, n))).collect();
        handles.into_iter().flat_map(|h| h.join().unwrap()).collect()
    })
}

/// How many of `replies` have status `code`.
pub fn with_code(replies: &[Reply], code: u16) -> usize {
    replies.iter().filter(|r| r.code == code).count()
}

/// The statuses of `replies`, counted.
pub fn codes(replies: &[Reply]) -> BTreeMap<u16, usize> {
    let mut codes = BTreeMap::new();
    for r in replies {
        *codes.entry(r.code).or_insert(0) += 1;
    }
    codes
}

/// The `q`-quantile (0..=1) of the replies' times, in seconds.
pub fn quantile(replies: &[Reply], q: f64) -> f64 {
    let mut secs: Vec<f64> = replies.iter().map(|r| r.secs).collect();
    secs.sort_by(f64::total_cmp);
    let at = ((secs.len() as f64 * q).ceil() as usize).clamp(1, secs.len()) - 1;
    secs[at]
}

/// weft-app's `/count` at `ns/pod` on its HTTP `port`, read from inside the pod (not through the
/// mesh): `{"requests": N, "by_path": {..}, "pod": ..}`.
pub fn app_counts(t: &TestMesh, ns: &str, pod: &str, port: u16) -> serde_json::Value {
    let (status, body) = t.mesh.pod_get(ns, pod, port, "/count").unwrap();
    assert_eq!(status, 200, "{ns}/{pod} /count: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{ns}/{pod} /count: not JSON ({e}): {body}"))
}

/// The requests weft-app at `ns/pod` (HTTP on `port`) has received ([`app_counts`]).
pub fn received(t: &TestMesh, ns: &str, pod: &str, port: u16) -> u64 {
    app_counts(t, ns, pod, port)["requests"].as_u64().unwrap()
}

/// The Prometheus text of the waypoint of namespace `ns` (`waypoint-0`, :15020/metrics).
pub fn waypoint_metrics(t: &TestMesh, ns: &str) -> String {
    let (status, body) = t.mesh.pod_get(ns, "waypoint-0", up::METRICS_PORT, "/metrics").unwrap();
    assert_eq!(status, 200, "{ns} waypoint /metrics: {body}");
    body
}

/// The last lines of the log of pod `ns/pod`'s process (the waypoint's, for `waypoint-0`).
pub fn pod_log(t: &TestMesh, ns: &str, pod: &str) -> String {
    up::log_tail(&t.mesh.log_path(&format!("pod-{ns}-{pod}")))
}

// ---- Authorization: a static file server in a pod (an identity provider's JWKS) ----

/// `python3 -m http.server <port>` serving `dir` inside `netns` on every address, as an identity
/// provider publishing its JWKS; started when it answers, killed on drop.
pub struct FileServer {
    child: Child,
}

impl FileServer {
    pub fn start(netns: &str, port: u16, dir: &Path) -> FileServer {
        let mut child = Command::new("ip")
            .args(["netns", "exec", netns, "python3", "-m", "http.server", &port.to_string()])
            .args(["--bind", "0.0.0.0", "--directory"])
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let url = format!("http://127.0.0.1:{port}/");
        let up = poll(Duration::from_secs(10), || curl(netns, 1, &["-o", "/dev/null", &url]).ok());
        if up.is_none() {
            let _ = child.kill();
            let _ = child.wait();
            panic!("python3 -m http.server {port} in {netns} never answered");
        }
        FileServer { child }
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Namespace `ns` in the ambient mesh with its waypoint (an `istio-waypoint` Gateway named
/// `waypoint`, `istio.io/use-waypoint` on the namespace): the HTTP traffic to its services goes
/// client → ztunnel → waypoint → ztunnel → pod.
pub fn waypoint_namespace(ns: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {ns}\n  labels:\n    istio.io/dataplane-mode: ambient\n    \
         istio.io/use-waypoint: waypoint\n---\napiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  \
         name: waypoint\n  namespace: {ns}\n  labels:\n    istio.io/waypoint-for: service\nspec:\n  \
         gatewayClassName: istio-waypoint\n  listeners:\n  - name: mesh\n    port: 15008\n    protocol: HBONE\n---\n"
    )
}

/// A long-lived TCP connection that keeps echoing: a thread writes a chunk to a TCP echo server
/// every few milliseconds and reads it back, counting the bytes echoed, until stopped or until
/// the connection fails (a reset, a close or 5 s without the echo), which it records.
pub struct EchoStream {
    echoed: Arc<std::sync::atomic::AtomicU64>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<Result<(), String>>>,
    /// The client's local port (to find the connection on the wire).
    pub local_port: u16,
}

impl EchoStream {
    /// Connects from `netns` to `to` (a TCP echo server) and starts echoing.
    pub fn open(netns: &str, to: std::net::SocketAddr) -> EchoStream {
        let stream = weft::cluster::in_netns(netns, || {
            let s = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(5))?;
            s.set_read_timeout(Some(Duration::from_secs(5)))?;
            s.set_nodelay(true)?;
            Ok::<_, std::io::Error>(s)
        })
        .map_err(|e| e.to_string())
        .and_then(|r| r.map_err(|e| e.to_string()))
        .unwrap_or_else(|e| panic!("cannot open the stream to {to}: {e}"));
        let local_port = stream.local_addr().map(|a| a.port()).unwrap_or_default();
        let echoed = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (e, s) = (Arc::clone(&echoed), Arc::clone(&stop));
        let thread = std::thread::spawn(move || {
            use std::io::{Read, Write};
            use std::sync::atomic::Ordering;
            let mut stream = stream;
            let chunk = [0x5au8; 1024];
            let mut back = [0u8; 1024];
            while !s.load(Ordering::SeqCst) {
                stream
                    .write_all(&chunk)
                    .map_err(|err| format!("write after {} bytes: {err}", e.load(Ordering::SeqCst)))?;
                stream
                    .read_exact(&mut back)
                    .map_err(|err| format!("read after {} bytes: {err}", e.load(Ordering::SeqCst)))?;
                if back != chunk {
                    return Err("the echo differs from what was sent".into());
                }
                e.fetch_add(chunk.len() as u64, Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(())
        });
        EchoStream { echoed, stop, thread: Some(thread), local_port }
    }

    /// Bytes echoed so far.
    pub fn echoed(&self) -> u64 {
        self.echoed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until at least `more` further bytes have been echoed (within 5 s); panics naming
    /// `what` and the stream's error otherwise.
    pub fn keeps_flowing(&mut self, what: &str, more: u64) {
        let from = self.echoed();
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.echoed() < from + more {
            if self.thread.as_ref().is_some_and(|t| t.is_finished()) || Instant::now() > deadline {
                let error = self.finish().err().unwrap_or_else(|| "stalled".into());
                panic!("{what}: the stream stopped after {} bytes: {error}", self.echoed());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops echoing; the error that ended it early, if any.
    pub fn finish(&mut self) -> Result<(), String> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        match self.thread.take() {
            Some(t) => t.join().unwrap_or_else(|_| Err("the stream's thread panicked".into())),
            None => Ok(()),
        }
    }
}

impl Drop for EchoStream {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}
