//! The processes of `weft up`: starting the controller, a ztunnel per node and the pods' commands
//! inside their network namespaces, waiting for them to be ready, their logs, and killing them.
//! It decides nothing about the mesh: what each process is given comes from the [`Mesh`].

use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::http::http_get;
use super::{
    io, Mesh, PodDef, UpError, ADMIN_PORT, CONTROLLER_NODE_INDEX, CONTROLLER_PORT, READY_PORT, TRUST_DOMAIN,
};
use crate::cluster;

/// Lines of a log shown when a process fails to come up.
const LOG_TAIL_LINES: usize = 30;

impl Mesh {
    /// Starts the controller in the first node's namespace and waits until it accepts
    /// connections.
    pub fn start_controller(&mut self) -> Result<(), UpError> {
        let node = self.cluster.plan().nodes[CONTROLLER_NODE_INDEX].name.clone();
        let netns = self.cluster.node_netns(&node)?.to_string();
        let mut tokens = Vec::new();
        for n in &self.cluster.plan().nodes {
            tokens.push(format!("{}={}", n.name, self.read_token(&n.name)?));
        }
        let state = cluster::state_dir(self.name());
        let mut cmd = Command::new(self.bin_dir.join("controller"));
        cmd.arg("--config-dir")
            .arg(self.config_dir())
            .arg("--listen")
            .arg(format!("0.0.0.0:{CONTROLLER_PORT}"))
            .arg("--ca-dir")
            .arg(state.join("ca"))
            .args(["--trust-domain", TRUST_DOMAIN])
            // TLS as on Kubernetes: a serving certificate for the address the proxies dial.
            .arg("--tls-ip")
            .arg(self.controller_addr()?.ip().to_string())
            // Each waypoint's token is a file there, written when its pod is made.
            .arg("--waypoint-tokens-dir")
            .arg(self.waypoint_tokens_dir())
            // In the environment, not on the command line where `ps` shows it.
            .env("WEFT_NODE_TOKENS", tokens.join(","));
        self.spawn("controller", &netns, cmd, false)?;
        let addr = self.controller_addr()?;
        let deadline = Instant::now() + self.ready_timeout;
        loop {
            let connected =
                cluster::in_netns(&netns, || TcpStream::connect_timeout(&addr, Duration::from_secs(1)))?;
            if connected.is_ok() {
                return Ok(());
            }
            self.check_alive("controller")?;
            if Instant::now() > deadline {
                return Err(self.not_ready("controller", format!("nothing accepts connections on {addr}")));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The machine's cores divided among the nodes, at least one.
    fn worker_threads(&self) -> usize {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        (cores / self.cluster.plan().nodes.len().max(1)).max(1)
    }

    /// Starts `node`'s ztunnel in the node's namespace (it does not wait for readiness: see
    /// [`Mesh::wait_ztunnel_ready`]).
    pub fn start_ztunnel(&mut self, node: &str) -> Result<(), UpError> {
        let netns = self.cluster.node_netns(node)?.to_string();
        let node_ip = self.node_ip(node)?;
        let uplink = self.cluster.node(node)?.uplink.clone();
        let mut cmd = Command::new(self.bin_dir.join("ztunnel"));
        cmd.args(["--node-name", node])
            .arg("--node-ip")
            .arg(node_ip.to_string())
            .arg("--xds-address")
            .arg(format!("https://{}", self.controller_addr()?))
            .arg("--xds-root-ca")
            .arg(self.root_cert_path())
            .arg("--token-file")
            .arg(self.token_path(node))
            // No --trust-domain: the ztunnel binary takes none (it serves the identities the
            // controller's workloads carry, all in the controller's trust domain).
            .arg("--pin-dir")
            .arg(cluster::node_bpf_pin_dir(self.name(), node))
            .args(["--uplink", &uplink])
            // The nodes share this machine's cores: each ztunnel gets its share, as it would
            // have its node's cores on a real cluster (more threads than cores only adds
            // cross-thread wake-ups: measured in BENCHMARKS.md, L4 mesh).
            .arg("--worker-threads")
            .arg(self.worker_threads().to_string())
            .arg("--handover-socket")
            .arg(cluster::state_dir(self.name()).join("handover").join(format!("{node}.sock")));
        self.spawn(&ztunnel_process(node), &netns, cmd, true)
    }

    /// Upgrades `node`'s ztunnel the way its DaemonSet rolls out with a surge: a new process
    /// starts while the old one runs and takes over the listeners once ready; the old one drains.
    /// The old process stays known as `ztunnel-<node>-old`: [`Mesh::terminate`] it once the new
    /// one has taken over (as the DaemonSet controller deletes the old pod once the new one is
    /// ready), and it exits when its last connection ends.
    pub fn upgrade_ztunnel(&mut self, node: &str) -> Result<(), UpError> {
        let name = ztunnel_process(node);
        let Some(old) = self.children.remove(&name) else {
            return Err(UpError::Config(format!("no process {name} was started")));
        };
        self.children.insert(format!("{name}-old"), old);
        self.start_ztunnel(node)
    }

    /// Waits until `node`'s ztunnel answers 200 on `/healthz/ready`.
    pub fn wait_ztunnel_ready(&mut self, node: &str) -> Result<(), UpError> {
        self.wait_ready(&ztunnel_process(node), |mesh| mesh.ztunnel_get(node, READY_PORT, "/healthz/ready"))
    }

    /// Polls `get` (a GET of `/healthz/ready`) until it answers 200, while `process` lives, for
    /// at most the ready timeout.
    fn wait_ready(
        &mut self,
        process: &str,
        get: impl Fn(&Mesh) -> Result<(u16, String), UpError>,
    ) -> Result<(), UpError> {
        let deadline = Instant::now() + self.ready_timeout;
        loop {
            let last = match get(self) {
                Ok((200, _)) => return Ok(()),
                Ok((status, body)) => format!("/healthz/ready answered {status}: {}", body.trim()),
                Err(e) => format!("GET /healthz/ready: {e}"),
            };
            self.check_alive(process)?;
            if Instant::now() > deadline {
                return Err(self.not_ready(process, last));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// GET `path` from one of `node`'s ztunnel ports, from inside the node's namespace (the
    /// admin port listens on the node's loopback only). Returns the status and the body.
    pub fn ztunnel_get(&self, node: &str, port: u16, path: &str) -> Result<(u16, String), UpError> {
        let netns = self.cluster.node_netns(node)?.to_string();
        let ip = if port == ADMIN_PORT { IpAddr::V4(Ipv4Addr::LOCALHOST) } else { self.node_ip(node)? };
        let addr = SocketAddr::new(ip, port);
        cluster::in_netns(&netns, || http_get(addr, path))?
            .map_err(|source| UpError::Http { what: format!("GET http://{addr}{path} in {netns}"), source })
    }

    pub(super) fn start_pod(&mut self, pod: &PodDef) -> Result<(), UpError> {
        let Some((program, args)) = pod.command.split_first() else {
            tracing::info!(pod = %pod.process_name(), "no command; the pod only has its network namespace");
            return Ok(());
        };
        let netns = self.cluster.pod_netns(&pod.namespace, &pod.name)?.to_string();
        let program = self.resolve(program);
        let mut cmd = Command::new(program);
        cmd.args(args);
        for (k, v) in &pod.env {
            cmd.env(k, v);
        }
        let ip = self.cluster.pod_ip(&pod.namespace, &pod.name)?;
        cmd.env("POD_NAME", &pod.name)
            .env("POD_NAMESPACE", &pod.namespace)
            .env("INSTANCE_IP", ip.to_string());
        if let Some(gateway) = &pod.waypoint {
            // What the controller's waypoint Deployment gives the waypoint on Kubernetes.
            cmd.env("WAYPOINT_NAME", gateway)
                .env("SERVICE_ACCOUNT", &pod.service_account)
                .env("NODE_NAME", &pod.node)
                .env("XDS_ADDRESS", format!("https://{}", self.controller_addr()?))
                .env("XDS_ROOT_CA", self.root_cert_path())
                .env("WEFT_TOKEN_FILE", self.waypoint_token_path(&pod.namespace, gateway))
                // A node's share of the cores, as each ztunnel gets: more threads than cores
                // only adds cross-thread wake-ups (measured in BENCHMARKS.md, Waypoint).
                .env("WAYPOINT_WORKER_THREADS", self.worker_threads().to_string());
        }
        self.spawn(&pod.process_name(), &netns, cmd, false)
    }

    /// Waits for `weft-app`'s `ready` line in its log, or a waypoint's `/healthz/ready` (other
    /// programs are not waited for).
    pub(super) fn wait_pod_ready(&mut self, pod: &PodDef) -> Result<(), UpError> {
        if pod.waypoint.is_some() {
            return self.wait_waypoint_ready(pod);
        }
        let Some(program) = pod.command.first() else { return Ok(()) };
        if Path::new(program).file_name().is_none_or(|f| f != "weft-app") {
            return Ok(());
        }
        let process = pod.process_name();
        let log = self.log_path(&process);
        let deadline = Instant::now() + self.ready_timeout;
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.lines().any(|l| l == "ready") {
                return Ok(());
            }
            self.check_alive(&process)?;
            if Instant::now() > deadline {
                return Err(self.not_ready(&process, "weft-app printed no `ready` line".into()));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the waypoint pod `pod` answers 200 on `/healthz/ready`.
    fn wait_waypoint_ready(&mut self, pod: &PodDef) -> Result<(), UpError> {
        self.wait_ready(&pod.process_name(), |mesh| {
            mesh.pod_get(&pod.namespace, &pod.name, READY_PORT, "/healthz/ready")
        })
    }

    /// GET `path` from port `port` of a pod, from inside its network namespace.
    pub fn pod_get(
        &self,
        namespace: &str,
        name: &str,
        port: u16,
        path: &str,
    ) -> Result<(u16, String), UpError> {
        let netns = self.cluster.pod_netns(namespace, name)?.to_string();
        let addr = SocketAddr::new(self.cluster.pod_ip(namespace, name)?, port);
        cluster::in_netns(&netns, || http_get(addr, path))?
            .map_err(|source| UpError::Http { what: format!("GET http://{addr}{path} in {netns}"), source })
    }

    /// A bare program name is looked up in the bin dir first (`weft-app`), then on PATH.
    fn resolve(&self, program: &str) -> PathBuf {
        let local = self.bin_dir.join(program);
        if !program.contains('/') && local.exists() {
            local
        } else {
            PathBuf::from(program)
        }
    }

    /// Starts `cmd` inside `netns` as a process of its own group (so it outlives `weft up` and
    /// a Ctrl-C of it), output appended to `logs/<process>.log`.
    fn spawn(&mut self, process: &str, netns: &str, cmd: Command, keep_mounts: bool) -> Result<(), UpError> {
        let log_path = self.log_path(process);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io(format!("opening {}", log_path.display())))?;
        let log2 = log.try_clone().map_err(io(format!("opening {}", log_path.display())))?;
        let mut outer = if keep_mounts {
            // Only the network namespace: `ip netns exec` would also give the process a mount
            // namespace with a fresh /sys, hiding the host's bpffs (/sys/fs/bpf). ztunnel's pins
            // would then live in a private bpffs that dies with the process, and the capture
            // with them (failing open); `weft down` could not see them either.
            let mut c = Command::new("nsenter");
            c.arg(format!("--net={}", cluster::netns_path(netns).display())).arg("--");
            c
        } else {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", netns]);
            c
        };
        outer.arg(cmd.get_program()).args(cmd.get_args());
        for (key, value) in cmd.get_envs() {
            match value {
                Some(value) => outer.env(key, value),
                None => outer.env_remove(key),
            };
        }
        if std::env::var_os("RUST_LOG").is_none() {
            outer.env("RUST_LOG", "info");
        }
        // Plain text in the log files.
        outer.env("NO_COLOR", "1");
        outer.stdin(Stdio::null()).stdout(log).stderr(log2).process_group(0);
        let shown = format!(
            "{} {netns} {} {}",
            if keep_mounts { "nsenter --net" } else { "ip netns exec" },
            cmd.get_program().to_string_lossy(),
            cmd.get_args().map(|a| a.to_string_lossy()).collect::<Vec<_>>().join(" ")
        );
        let child = outer.spawn().map_err(io(format!("starting `{shown}`")))?;
        tracing::info!(process, pid = child.id(), command = %shown, "started");
        if let Some(mut old) = self.children.insert(process.to_string(), child) {
            let _ = old.try_wait();
        }
        Ok(())
    }

    fn check_alive(&mut self, process: &str) -> Result<(), UpError> {
        let Some(child) = self.children.get_mut(process) else { return Ok(()) };
        match child.try_wait() {
            Ok(Some(status)) => {
                let log = self.log_path(process);
                Err(UpError::Exited {
                    process: process.into(),
                    status: status.to_string(),
                    tail: log_tail(&log),
                    log: log.display().to_string(),
                })
            }
            _ => Ok(()),
        }
    }

    fn not_ready(&self, process: &str, reason: String) -> UpError {
        let log = self.log_path(process);
        UpError::NotReady {
            process: process.into(),
            timeout: self.ready_timeout,
            reason,
            tail: log_tail(&log),
            log: log.display().to_string(),
        }
    }

    /// The pid of a process `weft up` started (`controller`, `ztunnel-<node>`,
    /// `pod-<ns>-<name>`), if it still runs.
    pub fn pid(&mut self, process: &str) -> Option<u32> {
        let child = self.children.get_mut(process)?;
        match child.try_wait() {
            Ok(None) => Some(child.id()),
            _ => None,
        }
    }

    /// Asks a process `weft up` started to stop (SIGTERM), as the kubelet does when its pod is
    /// deleted; does not wait.
    pub fn terminate(&mut self, process: &str) -> Result<(), UpError> {
        let Some(pid) = self.pid(process) else {
            return Err(UpError::Config(format!("no process {process} is running")));
        };
        let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)
            .map_err(|e| UpError::Config(format!("cannot signal {process}: {e}")))
    }

    /// Kills a process `weft up` started (SIGKILL, as a crash) and waits for it.
    pub fn kill(&mut self, process: &str) -> Result<(), UpError> {
        let Some(mut child) = self.children.remove(process) else {
            return Err(UpError::Config(format!("no process {process} was started")));
        };
        let _ = child.kill();
        child.wait().map_err(io(format!("waiting for {process}")))?;
        Ok(())
    }
}

/// The process (and log) name of a node's ztunnel.
pub fn ztunnel_process(node: &str) -> String {
    format!("ztunnel-{node}")
}

/// The last lines of a log file (or why there are none).
pub fn log_tail(path: &Path) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(LOG_TAIL_LINES);
            let tail = lines[from..].join("\n");
            if tail.is_empty() {
                "(empty)".into()
            } else {
                tail
            }
        }
        Err(e) => format!("(cannot read: {e})"),
    }
}
