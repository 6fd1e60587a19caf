//! ztunnel's configuration: every flag and environment variable named once, parsed into typed
//! values and checked together before anything is bound, so an operator sees every mistake at
//! once. The effective [`Config`] is served in the admin `/config_dump`.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::num::NonZeroUsize;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use serde::Serialize;
use weft_core::admin::AdminAddresses;
use weft_core::cert_manager::Token;
use weft_core::control::ControlPlane;
use weft_core::flags::{log_format, socket_addr, token_kind, value, ControlArgs};
use weft_core::telemetry::LogFormat;

use crate::proxy::Ports;

/// The environment variables ztunnel reads (Istio's names where Istio has one).
pub mod env {
    pub const NODE_NAME: &str = "NODE_NAME";
    pub const INSTANCE_IP: &str = "INSTANCE_IP";
    pub const TOKEN: &str = "WEFT_TOKEN";
    pub const TOKEN_FILE: &str = "WEFT_TOKEN_FILE";
    pub const BPF_PIN_DIR: &str = "WEFT_BPF_PIN_DIR";
    pub const UPLINKS: &str = "WEFT_UPLINKS";
    pub const CAPTURE_ATTACH: &str = "WEFT_CAPTURE_ATTACH";
    pub const WORKER_THREADS: &str = "ZTUNNEL_WORKER_THREADS";
    pub const LOG_FORMAT: &str = "LOG_FORMAT";
    pub const HANDOVER_SOCKET: &str = "WEFT_HANDOVER_SOCKET";
    pub const POD_STATE_DIR: &str = "WEFT_POD_STATE_DIR";
    /// The pod's termination grace period (Istio's ztunnel reads the same variable).
    pub const TERMINATION_GRACE_PERIOD_SECONDS: &str = "TERMINATION_GRACE_PERIOD_SECONDS";
}

/// The command line as typed; [`Config::parse`] turns it into a [`Config`].
#[derive(Parser, Debug)]
#[command(name = "ztunnel", about = "Weft's node proxy: eBPF capture, HBONE tunnels, L4 policy")]
pub struct Args {
    /// The Kubernetes node this proxy serves: it captures and holds certificates for the pods
    /// the controller places there.
    #[arg(long, env = env::NODE_NAME)]
    node_name: String,
    /// This proxy's own IP (the node's), sent in its xDS node id.
    #[arg(long, env = env::INSTANCE_IP)]
    node_ip: String,
    #[command(flatten)]
    control: ControlArgs,
    /// The bearer token presented to the controller.
    #[arg(long, env = env::TOKEN, hide_env_values = true)]
    token: Option<String>,
    /// A file holding the token, re-read on each use (a projected service-account token).
    #[arg(long, env = env::TOKEN_FILE)]
    token_file: Option<PathBuf>,
    /// Where the eBPF programs, links and maps are pinned (bpffs).
    #[arg(long, env = env::BPF_PIN_DIR, default_value = "/sys/fs/bpf/weft")]
    pin_dir: PathBuf,
    /// The node's interfaces to other nodes: traffic for local pods arriving there is captured.
    #[arg(long = "uplink", env = env::UPLINKS, value_delimiter = ',')]
    uplinks: Vec<String>,
    /// How the capture's programs are attached to interfaces: `tcx` (TCX links, Linux 6.6+),
    /// `tc` (a clsact qdisc and tc filters, Linux 5.10+), or `auto` (TCX where the kernel has
    /// it, else tc). `tc` on a 6.6+ kernel is for testing the older kernels' path.
    #[arg(long, env = env::CAPTURE_ATTACH, default_value = "auto")]
    capture_attach: String,
    /// Do not load the eBPF capture (traffic reaches the listeners only when sent to them).
    #[arg(long)]
    no_capture: bool,
    /// Load and pin the capture, then exit (what ztunnel runs itself in a child process).
    #[arg(long, hide = true)]
    load_capture_only: bool,
    /// Address the capture listeners (15001, 15006, 15008) bind; `::` takes IPv4 too.
    #[arg(long, default_value = "::")]
    bind: String,
    /// Threads serving connections (Istio's ztunnel runs 2 by default).
    #[arg(long, env = env::WORKER_THREADS, default_value = "2")]
    worker_threads: String,
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_address: String,
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics_address: String,
    #[arg(long, default_value = "0.0.0.0:15021")]
    readiness_address: String,
    /// `plain` or `json`.
    #[arg(long, env = env::LOG_FORMAT, default_value = "plain")]
    log_format: String,
    /// The Unix socket over which a ztunnel started while this one runs takes over its
    /// listening sockets (an upgrade without dropping connections); in a directory only root
    /// can reach, shared by the old and the new process.
    #[arg(long, env = env::HANDOVER_SOCKET, default_value = "/var/run/ztunnel/handover.sock")]
    handover_socket: PathBuf,
    /// A directory that lives as long as this ztunnel's pod (an emptyDir): a ztunnel that handed
    /// its listeners over marks it, so that a restart of the same pod's container waits to be
    /// deleted instead of taking the listeners back from its successor.
    #[arg(long, env = env::POD_STATE_DIR)]
    pod_state_dir: Option<PathBuf>,
    /// After handing its listeners over, this ztunnel drains its open connections for at most
    /// this many seconds less 5 (then exits before the kubelet would kill it).
    #[arg(long, env = env::TERMINATION_GRACE_PERIOD_SECONDS, default_value = "30")]
    termination_grace_period_seconds: String,
}

/// ztunnel's effective configuration.
#[derive(Clone, Debug, Serialize)]
pub struct Config {
    pub node_name: String,
    pub node_ip: IpAddr,
    pub xds: ControlPlane,
    pub ca: ControlPlane,
    /// How the controller is authenticated to (the token itself is never dumped).
    #[serde(serialize_with = "token_kind")]
    pub token: Token,
    pub capture: Capture,
    pub bind: IpAddr,
    /// The data-path ports (Istio's; tests running the proxy in-process take any).
    pub ports: Ports,
    /// Listeners and upstream sockets use IP_TRANSPARENT (what the capture needs); off only for
    /// an in-process proxy without capture.
    pub transparent: bool,
    pub worker_threads: NonZeroUsize,
    pub admin: AdminAddresses,
    pub log_format: LogFormat,
    /// Where a successor takes over the listeners ([`crate::handover`]); `None`: no hand-over.
    pub handover_socket: Option<PathBuf>,
    /// Lives as long as the pod; marked once this pod has handed over ([`crate::handover`]).
    pub pod_state_dir: Option<PathBuf>,
    /// How long open connections may run after a hand-over before they are cut.
    #[serde(serialize_with = "seconds")]
    pub handover_drain: Duration,
}

fn seconds<S: serde::Serializer>(d: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_u64(d.as_secs())
}

/// Whether and how the eBPF capture is loaded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Capture {
    /// No capture: the listeners get only what is sent to them.
    Off,
    /// Load (or take over) the pinned capture and attach it to the uplinks, in the attach mode
    /// given (`None`: the kernel decides).
    On {
        pin_dir: PathBuf,
        uplinks: Vec<String>,
        #[serde(serialize_with = "attach_mode")]
        attach: Option<ebpf::AttachMode>,
    },
    /// Load and pin the capture, then exit.
    LoadOnly { pin_dir: PathBuf },
}

pub use weft_core::flags::ConfigError;

/// Dumps the capture's attach mode as given: `tcx`, `tc` or `auto`.
fn attach_mode<S: serde::Serializer>(
    mode: &Option<ebpf::AttachMode>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(mode.map_or("auto", ebpf::AttachMode::as_str))
}

impl Config {
    /// The configuration from the process's arguments and environment. Exits with clap's help
    /// on a usage error; returns every value error together.
    pub fn from_env() -> Result<Config, ConfigError> {
        Config::parse(Args::parse())
    }

    /// Parses and checks `args`, collecting every error.
    pub fn parse(args: Args) -> Result<Config, ConfigError> {
        let mut errors = Vec::new();
        let e = &mut errors;
        let node_ip = value(
            e,
            "--node-ip/INSTANCE_IP",
            &args.node_ip,
            args.node_ip.parse::<IpAddr>().map_err(|e| e.to_string()),
        );
        let bind = value(e, "--bind", &args.bind, args.bind.parse::<IpAddr>().map_err(|e| e.to_string()));
        let worker_threads = value(
            e,
            "--worker-threads/ZTUNNEL_WORKER_THREADS",
            &args.worker_threads,
            args.worker_threads.parse::<NonZeroUsize>().map_err(|e| format!("{e} (at least 1)")),
        );
        let admin = value(e, "--admin-address", &args.admin_address, socket_addr(&args.admin_address));
        let metrics =
            value(e, "--metrics-address", &args.metrics_address, socket_addr(&args.metrics_address));
        let readiness =
            value(e, "--readiness-address", &args.readiness_address, socket_addr(&args.readiness_address));
        let log_format = value(e, "--log-format/LOG_FORMAT", &args.log_format, log_format(&args.log_format));
        let grace = value(
            e,
            "--termination-grace-period-seconds/TERMINATION_GRACE_PERIOD_SECONDS",
            &args.termination_grace_period_seconds,
            args.termination_grace_period_seconds.parse::<u64>().map_err(|e| e.to_string()),
        );
        let control = args.control.parse(e);
        if args.node_name.is_empty() {
            errors.push("--node-name/NODE_NAME is empty: name the Kubernetes node this proxy serves".into());
        }
        let token = weft_core::flags::token(&mut errors, args.token, args.token_file);
        let attach = value(
            &mut errors,
            "--capture-attach/WEFT_CAPTURE_ATTACH",
            &args.capture_attach,
            match args.capture_attach.as_str() {
                "auto" => Ok(None),
                given => given.parse::<ebpf::AttachMode>().map(Some).map_err(|e| format!("{e}, or `auto`")),
            },
        );
        let capture = match (args.no_capture, args.load_capture_only) {
            (true, true) => {
                errors.push("--no-capture and --load-capture-only contradict each other".into());
                None
            }
            (true, false) => Some(Capture::Off),
            (false, true) => Some(Capture::LoadOnly { pin_dir: args.pin_dir }),
            (false, false) => {
                attach.map(|attach| Capture::On { pin_dir: args.pin_dir, uplinks: args.uplinks, attach })
            }
        };
        match (
            node_ip,
            bind,
            worker_threads,
            admin,
            metrics,
            readiness,
            log_format,
            control,
            token,
            capture,
            grace,
        ) {
            (
                Some(node_ip),
                Some(bind),
                Some(worker_threads),
                Some(admin),
                Some(metrics),
                Some(readiness),
                Some(log_format),
                Some((xds, ca)),
                Some(token),
                Some(capture),
                Some(grace),
            ) if errors.is_empty() => Ok(Config {
                node_name: args.node_name,
                node_ip,
                xds,
                ca,
                token,
                capture,
                bind,
                ports: Ports::default(),
                transparent: true,
                worker_threads,
                admin: AdminAddresses { admin, metrics, readiness },
                log_format,
                handover_socket: Some(args.handover_socket),
                pod_state_dir: args.pod_state_dir,
                handover_drain: Duration::from_secs(grace.saturating_sub(5).max(1)),
            }),
            _ => Err(ConfigError(errors)),
        }
    }

    /// The xDS node id Istio's ztunnel sends: `ztunnel~<ip>~<pod>.<ns>~<ns>.svc.cluster.local`.
    pub fn node_id(&self) -> String {
        format!(
            "ztunnel~{}~ztunnel-{}.{ns}~{ns}.svc.{}",
            self.node_ip,
            self.node_name,
            weft_core::names::DEFAULT_DOMAIN_SUFFIX,
            ns = weft_core::names::ROOT_NAMESPACE,
        )
    }

    /// A configuration for tests that run the proxy in-process: no capture, every port on
    /// loopback chosen by the kernel.
    pub fn local(node_name: &str, control: &ControlPlane) -> Config {
        let any = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 0);
        Config {
            node_name: node_name.to_owned(),
            node_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            xds: control.clone(),
            ca: control.clone(),
            token: Token::None,
            capture: Capture::Off,
            bind: IpAddr::V6(Ipv6Addr::UNSPECIFIED),
            ports: Ports { outbound: 0, inbound_plain: 0, hbone: 0 },
            transparent: false,
            worker_threads: NonZeroUsize::MIN,
            admin: AdminAddresses { admin: any, metrics: any, readiness: any },
            log_format: LogFormat::Plain,
            handover_socket: None,
            pod_state_dir: None,
            handover_drain: Duration::from_secs(5),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        Config::parse(Args::try_parse_from(std::iter::once("ztunnel").chain(args.iter().copied())).unwrap())
    }

    #[test]
    fn every_error_is_reported_at_once() {
        let err = parse(&[
            "--node-name",
            "node-a",
            "--node-ip",
            "10.0.0.300",
            "--xds-address",
            "10.0.0.1:15012",
            "--worker-threads",
            "0",
            "--metrics-address",
            "0.0.0.0",
            "--token",
            "t",
            "--token-file",
            "/t",
            "--log-format",
            "xml",
        ])
        .unwrap_err();
        let text = err.to_string();
        for part in
            ["--node-ip", "--xds-address", "--worker-threads", "--metrics-address", "--token", "--log-format"]
        {
            assert!(text.contains(part), "{part} missing from: {text}");
        }
        assert_eq!(err.0.len(), 6, "{text}");
    }

    #[test]
    fn a_good_command_line_is_typed_and_dumps_without_the_token() {
        let config = parse(&[
            "--node-name",
            "node-a",
            "--node-ip",
            "10.0.0.1",
            "--xds-address",
            "http://127.0.0.1:15012",
            "--token",
            "secret",
            "--uplink",
            "eth0,eth1",
        ])
        .unwrap();
        assert_eq!(config.ca.url(), "http://127.0.0.1:15012");
        assert_eq!(config.worker_threads.get(), 2);
        assert_eq!(
            config.capture,
            Capture::On {
                pin_dir: "/sys/fs/bpf/weft".into(),
                uplinks: vec!["eth0".into(), "eth1".into()],
                attach: None
            }
        );
        assert_eq!(
            config.node_id(),
            "ztunnel~10.0.0.1~ztunnel-node-a.istio-system~istio-system.svc.cluster.local"
        );
        let dump = serde_json::to_string(&config).unwrap();
        assert!(!dump.contains("secret") && dump.contains("static (hidden)"), "{dump}");
        assert!(dump.contains(r#""attach":"auto""#), "{dump}");
    }

    #[test]
    fn the_capture_attach_mode_is_chosen_or_left_to_the_kernel() {
        let base = ["--node-name", "n", "--node-ip", "10.0.0.1", "--xds-address", "http://127.0.0.1:15012"];
        for (given, expected) in
            [("auto", None), ("tcx", Some(ebpf::AttachMode::Tcx)), ("tc", Some(ebpf::AttachMode::Tc))]
        {
            let config = parse(&[&base[..], &["--capture-attach", given]].concat()).unwrap();
            assert!(
                matches!(&config.capture, Capture::On { attach, .. } if *attach == expected),
                "{given}: {:?}",
                config.capture
            );
        }
        let err = parse(&[&base[..], &["--capture-attach", "clsact"]].concat()).unwrap_err();
        assert!(err.to_string().contains("--capture-attach/WEFT_CAPTURE_ATTACH"), "{err}");
    }
}
