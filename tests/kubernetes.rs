//! Weft on a real Kubernetes cluster: two nodes on this machine, each a network and mount
//! namespace with its own containerd, kubelet and kube-proxy (scripts/kube-cluster, built from
//! Debian's parts), Weft's images built without a registry (scripts/images) and imported, and the
//! Helm chart installed with `helm install`. Then, with real clients inside kubelet-run pods:
//! the controller Deployment and one ztunnel per node become Ready; pod→pod and pod→Service
//! across nodes is HBONE on 15008 only on the node link (tcpdump) and the server sees the client
//! pod's IP; an L4 DENY is enforced; the control channel is TLS (a plaintext client and a client
//! not trusting the mesh root are refused, and no token or PEM crosses the pod network in clear);
//! a ztunnel rollout under load (failed requests counted: Kubernetes 1.20 has no DaemonSet
//! surge, so the hand-over cannot apply); the controller deleted and recreated
//! keeps its root; `weft waypoint apply` deploys the waypoint, whose Gateway turns Programmed
//! only when its pod is Ready, and the namespace's traffic then flows through it.
//!
//! One test, one cluster (starting one takes ~20 s, installing Weft and its images ~40 s). Needs
//! root, the cluster binaries (scripts/kube-cluster/build.sh) and the release binaries
//! ($WEFT_BIN_DIR, default ~/.cache/weft/target-release/release); under CI=true a missing one
//! fails the test, elsewhere it is skipped. Everything it makes is removed, also on failure.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

const REPO: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
const NS: &str = "demo";
const WEFT_NS: &str = "weft-system";

/// A running cluster, stopped (and its state removed) when dropped.
struct Cluster {
    state: tempfile::TempDir,
    env: BTreeMap<String, String>,
}

impl Cluster {
    fn start(images: &[PathBuf]) -> anyhow::Result<Cluster> {
        let state = tempfile::Builder::new().prefix("weft-k8s-").tempdir()?;
        let mut cluster = Cluster { state, env: BTreeMap::new() };
        let mut start = Command::new(format!("{REPO}/scripts/kube-cluster/start.sh"));
        start.arg(cluster.state.path()).args(images);
        run(&mut start).context("scripts/kube-cluster/start.sh")?;
        let env = std::fs::read_to_string(cluster.state.path().join("env"))?;
        cluster.env = env
            .lines()
            .filter_map(|l| l.trim_start_matches("export ").split_once('='))
            .map(|(k, v)| (k.to_owned(), v.trim_matches(['"', '\'']).to_owned()))
            .collect();
        Ok(cluster)
    }

    fn var(&self, key: &str) -> &str {
        self.env.get(key).map(String::as_str).unwrap_or_default()
    }

    /// `args` in node a's network namespace (node b's with `node_b`), KUBECONFIG set.
    fn command(&self, node_b: bool, args: &[&str]) -> Command {
        let mut cmd = Command::new(format!("{REPO}/scripts/kube-cluster/run.sh"));
        if node_b {
            cmd.arg("-b");
        }
        cmd.arg(self.state.path()).args(args);
        cmd
    }

    /// Runs `args` in node a's namespace; its stdout, or an error with its stderr.
    fn sh(&self, args: &[&str]) -> anyhow::Result<String> {
        run(&mut self.command(false, args))
    }

    fn kubectl(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut all = vec!["kubectl"];
        all.extend_from_slice(args);
        self.sh(&all)
    }

    fn apply(&self, yaml: &str) -> anyhow::Result<()> {
        let mut cmd = self.command(false, &["kubectl", "apply", "-f", "-"]);
        let mut child = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn()?;
        std::io::Write::write_all(&mut child.stdin.take().context("stdin")?, yaml.as_bytes())?;
        let out = child.wait_with_output()?;
        check(&out, "kubectl apply").map(drop)
    }

    /// `curl` in the client pod; the body (or `-w` output) and curl's exit status.
    fn curl(&self, args: &[&str]) -> anyhow::Result<(String, Option<i32>)> {
        let mut all =
            vec!["kubectl", "exec", "-n", NS, "deploy/client", "--", "curl", "-sS", "--max-time", "5"];
        all.extend_from_slice(args);
        let out = self.command(false, &all).output()?;
        Ok((String::from_utf8_lossy(&out.stdout).into_owned(), out.status.code()))
    }

    /// What every failure prints: the pods, recent events, the Weft pods' logs.
    fn diagnose(&self) {
        for args in [
            vec!["kubectl", "get", "pods", "-A", "-o", "wide"],
            vec!["kubectl", "get", "events", "-A", "--sort-by=.lastTimestamp"],
            vec![
                "kubectl",
                "logs",
                "-n",
                WEFT_NS,
                "-l",
                "app.kubernetes.io/name=weft-controller",
                "--tail=40",
            ],
            vec!["kubectl", "logs", "-n", WEFT_NS, "-l", "app.kubernetes.io/name=ztunnel", "--tail=40"],
        ] {
            let out = self.command(false, &args).output();
            if let Ok(out) = out {
                eprintln!(
                    "--- {}\n{}{}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let stop =
            Command::new(format!("{REPO}/scripts/kube-cluster/stop.sh")).arg(self.state.path()).output();
        match stop {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!("stop.sh failed: {}", String::from_utf8_lossy(&out.stderr)),
            Err(e) => eprintln!("stop.sh: {e}"),
        }
    }
}

fn check(out: &Output, what: &str) -> anyhow::Result<String> {
    if !out.status.success() {
        bail!(
            "{what}: {}\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let what = format!("{cmd:?}");
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    check(&out, &what)
}

/// Polls `f` until it returns `Some`, for at most `timeout`.
fn wait<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> anyhow::Result<Option<T>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    loop {
        match f() {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = e.to_string(),
        }
        if Instant::now() > deadline {
            bail!("{what}: not within {timeout:?} (last error: {last})");
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The prerequisites, or why they are missing.
fn prerequisites() -> Result<PathBuf, String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Err("not root".into());
    }
    let bins = std::env::var_os("WEFT_BIN_DIR").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/weft/target-release/release")
    });
    for bin in ["controller", "ztunnel", "waypoint", "weft", "weft-app"] {
        if !bins.join(bin).is_file() {
            return Err(format!(
                "no release binary {} (scripts/test.sh builds them)",
                bins.join(bin).display()
            ));
        }
    }
    let built = Command::new(format!("{REPO}/scripts/kube-cluster/build.sh")).output();
    match built {
        Ok(out) if out.status.success() => Ok(bins),
        Ok(out) => {
            Err(format!("scripts/kube-cluster/build.sh failed: {}", String::from_utf8_lossy(&out.stderr)))
        }
        Err(e) => Err(format!("scripts/kube-cluster/build.sh: {e}")),
    }
}

/// Curl loops in the client pod calling `url`, each request on a connection of its own
/// (Connection: close) and allowed 10 s: a request waits while a node has no ztunnel (a SYN the
/// capture drops is sent again), and fails only when that wait runs out or a connection breaks.
struct Load {
    loops: Vec<Child>,
    started: Instant,
}

/// What the loops saw: one line per request (`<status> <seconds> <curl exit code> <error>`).
struct LoadResult {
    lines: Vec<String>,
    secs: f64,
}

impl Load {
    fn start(cluster: &Cluster, url: &str, loops: usize, per_loop: usize) -> anyhow::Result<Load> {
        let urls = format!("{url}?[1-{per_loop}]");
        let loops = (0..loops)
            .map(|_| {
                let mut cmd = cluster.command(
                    false,
                    &[
                        "kubectl",
                        "exec",
                        "-n",
                        NS,
                        "deploy/client",
                        "--",
                        "curl",
                        "-s",
                        "-o",
                        "/dev/null",
                        "-H",
                        "Connection: close",
                        "--max-time",
                        "10",
                        "-w",
                        "%{http_code} %{time_total} %{exitcode} %{errormsg}\\n",
                        &urls,
                    ],
                );
                cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn()
            })
            .collect::<Result<_, _>>()?;
        Ok(Load { loops, started: Instant::now() })
    }

    fn finish(self) -> anyhow::Result<LoadResult> {
        let mut lines = Vec::new();
        for one in self.loops {
            lines.extend(String::from_utf8_lossy(&one.wait_with_output()?.stdout).lines().map(str::to_owned));
        }
        Ok(LoadResult { lines, secs: self.started.elapsed().as_secs_f64() })
    }
}

impl LoadResult {
    /// Prints the failed requests and a summary line naming `what` ran meanwhile; returns the
    /// number failed.
    fn report(&self, what: &str) -> usize {
        let failures: Vec<&String> = self.lines.iter().filter(|l| !l.starts_with("200 ")).collect();
        for line in &failures {
            eprintln!("failed: {line}");
        }
        let slow = self
            .lines
            .iter()
            .filter(|l| l.split(' ').nth(1).and_then(|t| t.parse::<f64>().ok()) > Some(0.9))
            .count();
        eprintln!(
            "{what} under {:.0} req/s: {} of {} requests failed, {slow} took over 0.9 s",
            self.lines.len() as f64 / self.secs,
            failures.len(),
            self.lines.len()
        );
        failures.len()
    }
}

/// The mesh root the controller publishes in the sample namespace (`istio-ca-root-cert`).
fn published_root(cluster: &Cluster) -> anyhow::Result<String> {
    cluster.kubectl(&["get", "cm/istio-ca-root-cert", "-n", NS, "-o", "jsonpath={.data.root-cert\\.pem}"])
}

/// The name of node `node`'s ztunnel pod of the DaemonSet (not one being deleted).
fn ztunnel_pod(cluster: &Cluster, node: &str) -> anyhow::Result<String> {
    let pods = cluster.kubectl(&[
        "get",
        "pods",
        "-n",
        WEFT_NS,
        "-l",
        "app.kubernetes.io/name=ztunnel",
        "--field-selector",
        &format!("spec.nodeName={node}"),
        "-o",
        "jsonpath={range .items[*]}{.metadata.name} {.metadata.deletionTimestamp}{\"\\n\"}{end}",
    ])?;
    pods.lines()
        .filter_map(|l| l.split_once(' '))
        .find(|(_, deleted)| deleted.trim().is_empty())
        .map(|(name, _)| name.to_owned())
        .context("no ztunnel pod on the node")
}

fn sample_workloads(node_a: &str, node_b: &str) -> String {
    let deployment = |name: &str, node: &str| {
        format!(
            r#"---
apiVersion: v1
kind: ServiceAccount
metadata: {{name: {name}, namespace: {NS}}}
---
apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}, namespace: {NS}}}
spec:
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec:
      serviceAccountName: {name}
      nodeSelector: {{kubernetes.io/hostname: {node}}}
      containers:
        - name: app
          image: localhost:5000/weft/app:0.1.0
          imagePullPolicy: IfNotPresent
          args: ["--http", "8080"]
          ports: [{{containerPort: 8080, protocol: TCP}}]
          readinessProbe: {{tcpSocket: {{port: 8080}}, periodSeconds: 2}}
"#
        )
    };
    format!(
        r#"apiVersion: v1
kind: Namespace
metadata:
  name: {NS}
  labels: {{istio.io/dataplane-mode: ambient}}
{}{}---
apiVersion: v1
kind: Service
metadata: {{name: echo, namespace: {NS}}}
spec:
  selector: {{app: echo}}
  ports: [{{name: http, port: 80, targetPort: 8080, protocol: TCP}}]
"#,
        deployment("client", node_a),
        deployment("echo", node_b)
    )
}

/// A background `tcpdump -w` in a node's namespace; stopped (SIGINT) by [`Capture::stop`].
struct Capture {
    child: Child,
    file: PathBuf,
}

impl Capture {
    fn start(cluster: &Cluster, node_b: bool, interface: &str, file: PathBuf) -> anyhow::Result<Capture> {
        let path = file.to_string_lossy().into_owned();
        let mut child = cluster
            // Not loopback: the test cluster's own etcd speaks plaintext there (not the pod network).
            .command(
                node_b,
                // --immediate-mode: without it, packets wait in the kernel's ring for up to a
                // second, and the ones still there when tcpdump is stopped are lost.
                &[
                    "tcpdump",
                    "-i",
                    interface,
                    "--immediate-mode",
                    "-nn",
                    "-s",
                    "0",
                    "-U",
                    "-w",
                    &path,
                    "not net 127.0.0.0/8",
                ],
            )
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        // tcpdump says "listening on ..." once its socket captures.
        let mut stderr = std::io::BufReader::new(child.stderr.take().context("tcpdump's stderr")?);
        let mut line = String::new();
        while !line.contains("listening on") {
            line.clear();
            if std::io::BufRead::read_line(&mut stderr, &mut line)? == 0 {
                bail!("tcpdump on {interface} exited before capturing");
            }
        }
        // Keep draining stderr so tcpdump never blocks on it.
        std::thread::spawn(move || std::io::copy(&mut stderr, &mut std::io::sink()));
        Ok(Capture { child, file })
    }

    fn stop(mut self) -> anyhow::Result<PathBuf> {
        std::thread::sleep(Duration::from_millis(500));
        // run.sh execs into the namespace, so tcpdump is the child (or its only child).
        let _ = Command::new("pkill").args(["-INT", "-P", &self.child.id().to_string()]).status();
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGINT,
        );
        let _ = self.child.wait();
        Ok(self.file.clone())
    }
}

/// Packets of `file` matching the tcpdump `filter`, one line each.
fn packets(file: &Path, filter: &str) -> anyhow::Result<Vec<String>> {
    let out = Command::new("tcpdump").args(["-nn", "-r"]).arg(file).arg(filter).output()?;
    let text = check(&out, "tcpdump -r")?;
    Ok(text.lines().map(str::to_owned).collect())
}

#[test]
fn weft_on_a_real_two_node_cluster() -> anyhow::Result<()> {
    let bins = match prerequisites() {
        Ok(bins) => bins,
        Err(why) => {
            if std::env::var("CI").as_deref() == Ok("true") {
                panic!("the Kubernetes test cannot run: {why}");
            }
            eprintln!("SKIPPED: the Kubernetes test: {why}");
            return Ok(());
        }
    };
    let work = tempfile::tempdir()?;
    let images = work.path().join("images");
    run(Command::new(format!("{REPO}/scripts/images/build.sh")).arg("--bin-dir").arg(&bins).arg(&images))
        .context("building the images")?;
    let tars: Vec<PathBuf> = ["controller", "ztunnel", "waypoint", "app"]
        .iter()
        .map(|i| images.join(format!("{i}.tar")))
        .collect();
    let cluster = Cluster::start(&tars)?;
    // A failed assertion panics: the cluster's story is printed for that too.
    let result =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| exercise(&cluster, &bins, work.path())));
    if !matches!(result, Ok(Ok(()))) {
        cluster.diagnose();
    }
    result.unwrap_or_else(|panic| std::panic::resume_unwind(panic))
}

fn exercise(cluster: &Cluster, bins: &Path, work: &Path) -> anyhow::Result<()> {
    let (node_a, node_b) = (cluster.var("NODE_A").to_owned(), cluster.var("NODE_B").to_owned());

    // --- helm install: the controller Ready, one Ready ztunnel per node --------------------------
    let started = Instant::now();
    cluster.sh(&[
        "helm",
        "install",
        "weft",
        &format!("{REPO}/daemonset/chart/weft"),
        "-n",
        WEFT_NS,
        "--create-namespace",
        // Helm 4 applies server-side by default, which a 1.20 apiserver refuses.
        "--server-side=false",
        "--wait",
        "--timeout",
        "240s",
    ])?;
    eprintln!("helm install --wait: {:?}", started.elapsed());
    let ready = cluster.kubectl(&[
        "get",
        "deploy/weft-controller",
        "-n",
        WEFT_NS,
        "-o",
        "jsonpath={.status.readyReplicas}",
    ])?;
    assert_eq!(ready, "1", "the controller Deployment is Ready");
    let ds = cluster.kubectl(&[
        "get",
        "ds/ztunnel",
        "-n",
        WEFT_NS,
        "-o",
        "jsonpath={.status.numberReady}/{.status.desiredNumberScheduled} {.spec.template.spec.hostNetwork}",
    ])?;
    assert_eq!(ds, "2/2 true", "one Ready hostNetwork ztunnel per node");
    // `weft check` on a node (its own bpffs: the node's mount namespace) against the cluster.
    let weft = bins.join("weft").to_string_lossy().into_owned();
    let mut check = Command::new(format!("{REPO}/scripts/kube-cluster/run.sh"));
    check.args(["-m"]).arg(cluster.state.path()).args([&weft, "check"]);
    let report = run(&mut check).context("weft check on node a")?;
    eprintln!("weft check:\n{report}");
    assert!(report.contains("TCX"), "weft check names the attach mode:\n{report}");

    // --- the sample workloads, with both node links captured from before they exist ---------------
    let link = Capture::start(cluster, false, "eth0", work.join("link.pcap"))?;
    let all_a = Capture::start(cluster, false, "any", work.join("node-a.pcap"))?;
    let all_b = Capture::start(cluster, true, "any", work.join("node-b.pcap"))?;
    cluster.apply(&sample_workloads(&node_a, &node_b))?;
    for app in ["client", "echo"] {
        cluster.kubectl(&["rollout", "status", &format!("deploy/{app}"), "-n", NS, "--timeout=120s"])?;
    }
    let pod_ip = |app: &str| {
        cluster.kubectl(&[
            "get",
            "pod",
            "-n",
            NS,
            "-l",
            &format!("app={app}"),
            "-o",
            "jsonpath={.items[0].status.podIP}",
        ])
    };
    let (client_ip, echo_ip) = (pod_ip("client")?, pod_ip("echo")?);
    // Each pod's ztunnel enrolls it once xDS names it, a few seconds after the pod starts (until
    // then the pod is reachable uncaptured: Istio's CNI enrolls at sandbox creation instead).
    for (node_b, ip) in [(false, &client_ip), (true, &echo_ip)] {
        wait(&format!("{ip} enrolled by its ztunnel"), Duration::from_secs(60), || {
            let dump = run(&mut cluster
                .command(node_b, &["curl", "-sS", "--max-time", "5", "http://127.0.0.1:15000/config_dump"]))?;
            Ok(dump.contains(&format!("\"{ip}\"")).then_some(()))
        })?;
    }
    std::thread::sleep(Duration::from_secs(1));
    let echo_svc = cluster.kubectl(&["get", "svc/echo", "-n", NS, "-o", "jsonpath={.spec.clusterIP}"])?;

    // pod → pod and pod → Service across nodes: the server sees the client pod's own address.
    for url in [format!("http://{echo_ip}:8080/get"), format!("http://{echo_svc}/get")] {
        let body = wait(&format!("GET {url} from the client pod"), Duration::from_secs(60), || {
            let (body, code) = cluster.curl(&[&url])?;
            Ok((code == Some(0)).then_some(body))
        })?;
        let reply: serde_json::Value = serde_json::from_str(&body).with_context(|| body.clone())?;
        let peer = reply["peer"].as_str().unwrap_or_default();
        assert!(peer.starts_with(&format!("{client_ip}:")), "{url}: the server saw {peer}, not {client_ip}");
    }
    let link = link.stop()?;
    let (all_a, all_b) = (all_a.stop()?, all_b.stop()?);
    let hbone = packets(&link, "tcp and src net 10.244.0.0/16 and dst net 10.244.0.0/16 and port 15008")?;
    if hbone.is_empty() {
        let seen = packets(&link, "tcp and net 10.244.0.0/16")?;
        panic!("no pod-to-pod HBONE (15008) on the node link; pod traffic there:\n{}", seen.join("\n"));
    }
    let clear = packets(&link, "tcp and src net 10.244.0.0/16 and dst net 10.244.0.0/16 and not port 15008")?;
    assert!(clear.is_empty(), "pod-to-pod traffic on the node link besides HBONE:\n{}", clear.join("\n"));
    // The control channel carried tokens, CSRs and certificates meanwhile: none of it in clear.
    for pcap in [&all_a, &all_b] {
        let bytes = std::fs::read(pcap)?;
        let control = packets(pcap, "tcp port 15012")?;
        assert!(!control.is_empty(), "{}: the ztunnels talked to the controller", pcap.display());
        for secret in [&b"-----BEGIN"[..], b"eyJhbGciOi", b"CERTIFICATE REQUEST", b"Bearer "] {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret),
                "{}: {:?} in clear",
                pcap.display(),
                String::from_utf8_lossy(secret)
            );
        }
    }

    // --- an L4 DENY on the client's identity is enforced by the echo pod's ztunnel ----------------
    cluster.apply(&format!(
        r#"apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: deny-client, namespace: {NS}}}
spec:
  selector: {{matchLabels: {{app: echo}}}}
  action: DENY
  rules: [{{from: [{{source: {{principals: ["cluster.local/ns/{NS}/sa/client"]}}}}]}}]
"#
    ))?;
    let url = format!("http://{echo_ip}:8080/get");
    wait("the DENY to take effect", Duration::from_secs(30), || {
        Ok((cluster.curl(&[&url])?.1 != Some(0)).then_some(()))
    })?;
    cluster.kubectl(&["delete", "authorizationpolicy/deny-client", "-n", NS])?;
    wait("the DENY to be lifted", Duration::from_secs(30), || {
        Ok((cluster.curl(&[&url])?.1 == Some(0)).then_some(()))
    })?;

    // --- the control channel: TLS only, verified against the mesh root ----------------------------
    let controller_ip = cluster.kubectl(&[
        "get",
        "svc/weft-controller",
        "-n",
        WEFT_NS,
        "-o",
        "jsonpath={.spec.clusterIP}",
    ])?;
    let root = published_root(cluster)?;
    assert!(root.contains("BEGIN CERTIFICATE"), "istio-ca-root-cert is published in {NS}");
    let root_file = work.join("root-cert.pem");
    std::fs::write(&root_file, &root)?;
    let root_path = root_file.to_string_lossy().into_owned();
    let name = format!("weft-controller.{WEFT_NS}.svc");
    let resolve = format!("{name}:15012:{controller_ip}");
    let tls_url = format!("https://{name}:15012/");
    // A client trusting the mesh root completes the handshake (HTTP/2; the path is no gRPC method).
    let ok = cluster
        .command(
            false,
            &[
                "curl",
                "-sS",
                "--http2",
                "--cacert",
                &root_path,
                "--resolve",
                &resolve,
                "-o",
                "/dev/null",
                &tls_url,
            ],
        )
        .output()?;
    assert!(ok.status.success(), "TLS with the mesh root: {}", String::from_utf8_lossy(&ok.stderr));
    // One trusting only the system roots refuses the controller (curl 60: unknown issuer).
    let other = cluster
        .command(false, &["curl", "-sS", "--http2", "--resolve", &resolve, "-o", "/dev/null", &tls_url])
        .output()?;
    assert_eq!(other.status.code(), Some(60), "{}", String::from_utf8_lossy(&other.stderr));
    // A plaintext client (gRPC's h2c) gets nothing.
    let plain = cluster
        .command(
            false,
            &[
                "curl",
                "-sS",
                "--http2-prior-knowledge",
                "--max-time",
                "5",
                &format!("http://{controller_ip}:15012/"),
            ],
        )
        .output()?;
    assert!(!plain.status.success(), "plaintext answered: {}", String::from_utf8_lossy(&plain.stdout));

    // --- ztunnel rollout under a steady load: count the failed requests ----------------------------
    // Kubernetes 1.20 has no DaemonSet surge, so each node's old ztunnel stops before the new one
    // is created (see the chart): this measures that path, whose gap is the kubelet's and the
    // DaemonSet controller's (5-10 s here). The next step shows the surge's hand-over.
    let echo_url = format!("http://{echo_svc}/get");
    let load = Load::start(cluster, &echo_url, 4, 2500)?;
    std::thread::sleep(Duration::from_secs(4));
    cluster.kubectl(&["rollout", "restart", "daemonset/ztunnel", "-n", WEFT_NS])?;
    cluster.kubectl(&["rollout", "status", "daemonset/ztunnel", "-n", WEFT_NS, "--timeout=180s"])?;
    let rolled = load.started.elapsed();
    let result = load.finish()?;
    result.report(&format!("ztunnel rollout restart (done {rolled:?} after the load began)"));
    assert!(
        result.lines.len() >= 9_000,
        "the load ran through the rollout ({} requests)",
        result.lines.len()
    );

    // --- the hand-over between ztunnel pods on a real kubelet: a surge by hand ---------------------
    // What DaemonSet surge (1.22+) does, done by hand: a second ztunnel pod on node b, made from
    // the DaemonSet's own pod template (a bare Pod outside the DaemonSet's selector), takes the
    // running pod's listeners over; the DaemonSet's pod is then deleted, the pod that replaces it
    // takes over from the second one, which drains and exits. Under load, nothing may fail.
    let old = ztunnel_pod(cluster, &node_b)?;
    let template =
        cluster.kubectl(&["get", "daemonset/ztunnel", "-n", WEFT_NS, "-o", "jsonpath={.spec.template}"])?;
    let template: serde_json::Value = serde_json::from_str(&template)?;
    let mut surge = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "ztunnel-surge", "namespace": WEFT_NS, "labels": {"app.kubernetes.io/name": "ztunnel-surge"}},
        "spec": template["spec"].clone(),
    });
    surge["spec"]["nodeName"] = node_b.clone().into();
    surge["spec"]["restartPolicy"] = "Never".into();
    let load = Load::start(cluster, &echo_url, 4, 2000)?;
    std::thread::sleep(Duration::from_secs(3));
    cluster.apply(&surge.to_string())?;
    let took_over = |pod: &str| -> anyhow::Result<Option<()>> {
        let log = cluster.kubectl(&["logs", "-n", WEFT_NS, pod])?;
        Ok(log.contains("took over the listeners of the ztunnel this one replaces").then_some(()))
    };
    wait("the second ztunnel pod takes over", Duration::from_secs(60), || took_over("ztunnel-surge"))?;
    cluster.kubectl(&["delete", "pod", &old, "-n", WEFT_NS, "--wait=false"])?;
    let new = wait("the DaemonSet's new pod", Duration::from_secs(90), || {
        let pod = ztunnel_pod(cluster, &node_b)?;
        Ok((pod != old).then_some(pod))
    })?;
    wait("the DaemonSet's new pod takes over", Duration::from_secs(60), || took_over(&new))?;
    cluster.kubectl(&["delete", "pod", "ztunnel-surge", "-n", WEFT_NS, "--wait=true"])?;
    let result = load.finish()?;
    let failed = result.report("two hand-overs between ztunnel pods on node b (a surge by hand)");
    assert_eq!(failed, 0, "requests failed while ztunnel pods handed over");
    cluster.kubectl(&["rollout", "status", "daemonset/ztunnel", "-n", WEFT_NS, "--timeout=120s"])?;

    // --- the controller deleted and recreated keeps its root --------------------------------------
    cluster.kubectl(&[
        "delete",
        "pod",
        "-n",
        WEFT_NS,
        "-l",
        "app.kubernetes.io/name=weft-controller",
        "--wait=true",
    ])?;
    cluster.kubectl(&["rollout", "status", "deploy/weft-controller", "-n", WEFT_NS, "--timeout=120s"])?;
    let root_after = published_root(cluster)?;
    assert_eq!(root_after, root, "the recreated controller kept the CA root");
    // Old leaves still verify: traffic flows with the certificates issued before.
    let url = format!("http://{echo_svc}/get");
    wait("traffic after the controller's restart", Duration::from_secs(60), || {
        Ok((cluster.curl(&[&url])?.1 == Some(0)).then_some(()))
    })?;

    // --- a waypoint, deployed by the controller from its image -------------------------------------
    cluster.sh(&[&weft, "waypoint", "apply", "-n", NS])?;
    // Programmed only once its pod is Ready.
    wait("the waypoint Gateway Programmed", Duration::from_secs(180), || {
        let programmed = cluster.kubectl(&[
            "get",
            "gateway/waypoint",
            "-n",
            NS,
            "-o",
            "jsonpath={.status.conditions[?(@.type==\"Programmed\")].status}",
        ])?;
        if programmed != "True" {
            return Ok(None);
        }
        let ready = cluster.kubectl(&[
            "get",
            "deploy/waypoint",
            "-n",
            NS,
            "-o",
            "jsonpath={.status.readyReplicas}",
        ])?;
        assert_eq!(ready, "1", "the Gateway turned Programmed before its pod was Ready");
        Ok(Some(()))
    })?;
    let waypoint_ip = cluster.kubectl(&[
        "get",
        "pod",
        "-n",
        NS,
        "-l",
        "gateway.networking.k8s.io/gateway-name=waypoint",
        "-o",
        "jsonpath={.items[0].status.podIP}",
    ])?;
    let metrics_url = format!("http://{waypoint_ip}:15020/metrics");
    let requests = || -> anyhow::Result<u64> {
        let text = cluster.sh(&["curl", "-sS", "--max-time", "5", &metrics_url])?;
        Ok(text
            .lines()
            .filter(|l| {
                l.starts_with("istio_requests_total{") && l.contains("destination_service_name=\"echo\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64)
    };
    wait("traffic of the namespace through its waypoint", Duration::from_secs(60), || {
        let before = requests()?;
        let (_, code) = cluster.curl(&[&url])?;
        Ok((code == Some(0) && requests()? > before).then_some(()))
    })?;

    plug_in_ca(cluster, work, &node_b)
}

/// Istio's plug-in CA: a `cacerts` Secret with the user's root and intermediate. The controller
/// picks it up, publishes its root, and leaves issued afterwards chain through the intermediate.
fn plug_in_ca(cluster: &Cluster, work: &Path, node_b: &str) -> anyhow::Result<()> {
    let dir = work.join("cacerts");
    std::fs::create_dir_all(&dir)?;
    let openssl = |args: &[&str]| run(Command::new("openssl").current_dir(&dir).args(args));
    let key = |name: &str| {
        openssl(&["genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", name])
    };
    key("root-key.pem")?;
    openssl(&[
        "req",
        "-x509",
        "-new",
        "-key",
        "root-key.pem",
        "-days",
        "30",
        "-subj",
        "/O=cluster.local/CN=Plug-in Root",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
        "-out",
        "root-cert.pem",
    ])?;
    key("ca-key.pem")?;
    openssl(&[
        "req",
        "-new",
        "-key",
        "ca-key.pem",
        "-subj",
        "/O=cluster.local/CN=Plug-in Intermediate",
        "-out",
        "ca.csr",
    ])?;
    std::fs::write(
        dir.join("ca.ext"),
        "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n",
    )?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        "ca.csr",
        "-CA",
        "root-cert.pem",
        "-CAkey",
        "root-key.pem",
        "-CAcreateserial",
        "-days",
        "30",
        "-extfile",
        "ca.ext",
        "-out",
        "ca-cert.pem",
    ])?;
    let chain = std::fs::read_to_string(dir.join("ca-cert.pem"))?
        + &std::fs::read_to_string(dir.join("root-cert.pem"))?;
    std::fs::write(dir.join("cert-chain.pem"), chain)?;
    let file = |name: &str| format!("--from-file={}", dir.join(name).display());
    cluster.kubectl(&[
        "create",
        "secret",
        "generic",
        "cacerts",
        "-n",
        WEFT_NS,
        &file("ca-cert.pem"),
        &file("ca-key.pem"),
        &file("root-cert.pem"),
        &file("cert-chain.pem"),
    ])?;
    let plug_in_root = std::fs::read_to_string(dir.join("root-cert.pem"))?;
    let plug_in_root = plug_in_root.trim();
    wait("the plug-in root published", Duration::from_secs(60), || {
        let bundle = cluster.kubectl(&[
            "get",
            "cm/istio-ca-root-cert",
            "-n",
            NS,
            "-o",
            "jsonpath={.data.root-cert\\.pem}",
        ])?;
        Ok(bundle.contains(plug_in_root).then_some(()))
    })?;

    // A workload of a new identity gets its first certificate now: ask its ztunnel for it over
    // HBONE (the server's chain comes before the client must show one).
    cluster.apply(&format!(
        r#"apiVersion: v1
kind: ServiceAccount
metadata: {{name: fresh, namespace: {NS}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: fresh, namespace: {NS}}}
spec:
  serviceAccountName: fresh
  nodeSelector: {{kubernetes.io/hostname: {node_b}}}
  containers: [{{name: app, image: "localhost:5000/weft/app:0.1.0", args: ["--http", "8080"]}}]
"#
    ))?;
    cluster.kubectl(&["wait", "-n", NS, "--for=condition=Ready", "pod/fresh", "--timeout=120s"])?;
    let ip = cluster.kubectl(&["get", "pod/fresh", "-n", NS, "-o", "jsonpath={.status.podIP}"])?;
    let presented = wait("the new workload's chain", Duration::from_secs(60), || {
        let out = cluster
            .command(
                false,
                &["openssl", "s_client", "-connect", &format!("{ip}:15008"), "-alpn", "h2", "-showcerts"],
            )
            .stdin(Stdio::null())
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        Ok(text.contains("BEGIN CERTIFICATE").then_some(text))
    })?;
    let pems: Vec<String> = presented
        .split("-----BEGIN CERTIFICATE-----")
        .skip(1)
        .filter_map(|rest| rest.split("-----END CERTIFICATE-----").next())
        .map(|body| format!("-----BEGIN CERTIFICATE-----{body}-----END CERTIFICATE-----\n"))
        .collect();
    assert!(pems.len() >= 2, "leaf and intermediate presented:\n{presented}");
    std::fs::write(dir.join("leaf.pem"), &pems[0])?;
    let issuer = openssl(&["x509", "-in", "leaf.pem", "-noout", "-issuer"])?;
    assert!(issuer.contains("Plug-in Intermediate"), "the leaf's issuer: {issuer}");
    let verified = openssl(&["verify", "-CAfile", "root-cert.pem", "-untrusted", "ca-cert.pem", "leaf.pem"])?;
    assert!(verified.contains("OK"), "{verified}");
    Ok(())
}
