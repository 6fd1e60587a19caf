//! `ztunnel`: Weft's node proxy. Run one per node, in the node's network namespace (hostNetwork
//! on Kubernetes), as root or with CAP_BPF, CAP_NET_ADMIN and CAP_NET_RAW.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};

use anyhow::Context;
use clap::Parser;
use tokio::net::TcpListener;
use tokio::sync::watch;
use weft_core::cert_manager::{CaClient, CertManager, Token};
use weft_core::tls::DEFAULT_CERT_LIFETIME;

use ztunnel::admin::{self, AdminState};
use ztunnel::capture::{self, LocalPods};
use ztunnel::metrics::Metrics;
use ztunnel::proxy::{Ports, Proxy, ProxyInputs};
use ztunnel::state::ProxyState;
use ztunnel::xds::{self, Synced, XdsConfig};

#[derive(Parser, Debug)]
#[command(name = "ztunnel", about = "Weft's node proxy: eBPF capture, HBONE tunnels, L4 policy")]
struct Args {
    /// The Kubernetes node this proxy serves: it captures and holds certificates for the pods
    /// the controller places there.
    #[arg(long, env = "NODE_NAME")]
    node_name: String,
    /// This proxy's own IP (the node's), sent in its xDS node id.
    #[arg(long, env = "INSTANCE_IP")]
    node_ip: IpAddr,
    /// The controller's xDS address, e.g. http://10.0.0.1:15012.
    #[arg(long, env = "XDS_ADDRESS")]
    xds_address: String,
    /// The CA address; the xDS address by default (the controller serves both on one port).
    #[arg(long, env = "CA_ADDRESS")]
    ca_address: Option<String>,
    /// The bearer token presented to the controller.
    #[arg(long, env = "WEFT_TOKEN", hide_env_values = true, conflicts_with = "token_file")]
    token: Option<String>,
    /// A file holding the token, re-read on each use (a projected service-account token).
    #[arg(long, env = "WEFT_TOKEN_FILE")]
    token_file: Option<PathBuf>,
    /// Where the eBPF programs, links and maps are pinned (bpffs).
    #[arg(long, env = "WEFT_BPF_PIN_DIR", default_value = "/sys/fs/bpf/weft")]
    pin_dir: PathBuf,
    /// The node's interfaces to other nodes: traffic for local pods arriving there is captured.
    #[arg(long = "uplink", env = "WEFT_UPLINKS", value_delimiter = ',')]
    uplinks: Vec<String>,
    /// Do not load the eBPF capture (traffic reaches the listeners only when sent to them).
    #[arg(long)]
    no_capture: bool,
    /// Load and pin the capture, then exit (what ztunnel runs itself in a child process).
    #[arg(long, hide = true)]
    load_capture_only: bool,
    /// Address the capture listeners (15001, 15006, 15008) bind; `::` takes IPv4 too.
    #[arg(long, default_value = "::")]
    bind: IpAddr,
    /// Threads serving connections (Istio's ztunnel runs 2 by default).
    #[arg(long, env = "ZTUNNEL_WORKER_THREADS", default_value_t = 2)]
    worker_threads: usize,
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin_address: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics_address: SocketAddr,
    #[arg(long, default_value = "0.0.0.0:15021")]
    readiness_address: SocketAddr,
}

/// Loads the capture in a child process that then exits. Loading parses the kernel's BTF, and
/// the ~16 MB of heap that takes stays with the process that did it (the allocator keeps it); the
/// pinned programs and maps are then taken over from bpffs at no such cost.
fn load_in_child() -> anyhow::Result<()> {
    let status = std::process::Command::new(std::env::current_exe()?)
        .args(std::env::args_os().skip(1))
        .arg("--load-capture-only")
        .status()
        .context("starting the capture loader")?;
    anyhow::ensure!(status.success(), "loading the eBPF capture failed ({status}); see the lines above");
    Ok(())
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.worker_threads.max(1))
        .enable_all()
        .build()
        .context("starting the runtime")?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let token = match (&args.token, &args.token_file) {
        (Some(t), _) => Token::Static(t.clone()),
        (None, Some(path)) => Token::File(path.clone()),
        (None, None) => Token::None,
    };
    let ca_address = args.ca_address.clone().unwrap_or_else(|| args.xds_address.clone());
    let ca = CaClient::new(&ca_address, token.clone(), DEFAULT_CERT_LIFETIME)
        .map_err(|e| anyhow::anyhow!("CA client for {ca_address}: {e}"))?;
    let certs = Arc::new(CertManager::new(ca));
    let state = Arc::new(RwLock::new(ProxyState::new("")));
    let (metrics, registry) = Metrics::new();
    let metrics = Arc::new(metrics);

    let capture = if args.no_capture {
        None
    } else {
        let config = ebpf::CaptureConfig { pin_dir: args.pin_dir.clone(), ..ebpf::CaptureConfig::default() };
        if args.load_capture_only {
            ebpf::Capture::open(config).context("loading the eBPF capture")?;
            return Ok(());
        }
        if !args.pin_dir.exists() {
            load_in_child()?;
        }
        let mut capture = ebpf::Capture::open(config).context("loading the eBPF capture")?;
        for uplink in &args.uplinks {
            capture.attach_uplink(uplink).with_context(|| format!("capturing on uplink {uplink}"))?;
        }
        Some(Arc::new(Mutex::new(capture)))
    };

    let proxy = Proxy::bind(
        ProxyInputs {
            state: Arc::clone(&state),
            certs: Arc::clone(&certs),
            metrics: Arc::clone(&metrics),
            node_name: args.node_name.clone(),
        },
        args.bind,
        Ports::default(),
    )
    .await
    .context("binding the capture listeners (needs CAP_NET_ADMIN for IP_TRANSPARENT)")?;

    let (synced_tx, synced) = watch::channel(Synced::default());
    let (local_tx, local) = watch::channel(LocalPods::default());
    let (quit_tx, mut quit) = watch::channel(false);
    let xds_config = XdsConfig {
        endpoint: args.xds_address.clone(),
        node_id: format!(
            "ztunnel~{}~ztunnel-{}.istio-system~istio-system.svc.cluster.local",
            args.node_ip, args.node_name
        ),
        node_name: args.node_name.clone(),
        token,
    };
    tokio::spawn(xds::run(xds_config, Arc::clone(&state), synced_tx));
    tokio::spawn(capture::sync(
        args.node_name.clone(),
        Arc::clone(&state),
        synced.clone(),
        capture,
        Arc::clone(&certs),
        local_tx,
    ));

    let admin_state =
        Arc::new(AdminState { state, certs, registry: Arc::new(registry), synced, local, quit: quit_tx });
    let (drain_trigger, drain_watch) = weft_core::drain::channel();
    for (address, which) in [
        (args.admin_address, "admin"),
        (args.metrics_address, "metrics"),
        (args.readiness_address, "readiness"),
    ] {
        let listener = TcpListener::bind(address)
            .await
            .with_context(|| format!("binding the {which} endpoint on {address}"))?;
        let a = Arc::clone(&admin_state);
        let mut stop = drain_watch.clone();
        let shutdown = async move { stop.signaled().await };
        match which {
            "admin" => tokio::spawn(admin::serve(listener, move |r| admin::admin(&a, r), shutdown)),
            "metrics" => tokio::spawn(admin::serve(listener, move |r| admin::metrics(&a, r), shutdown)),
            _ => tokio::spawn(admin::serve(listener, move |r| admin::readiness(&a, r), shutdown)),
        };
    }
    let proxy_task = tokio::spawn(proxy.run(drain_watch));
    tracing::info!(node = args.node_name, xds = args.xds_address, "ztunnel started");

    let mut sigterm = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = sigterm.recv() => tracing::info!("SIGTERM: draining"),
        _ = tokio::signal::ctrl_c() => tracing::info!("interrupted: draining"),
        _ = quit.wait_for(|q| *q) => tracing::info!("quitquitquit: draining"),
    }
    // The capture stays pinned: enrolled pods fail closed until a ztunnel is back.
    drain_trigger.drain();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), proxy_task).await;
    Ok(())
}
