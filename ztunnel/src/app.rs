//! Builds and runs the whole node proxy from a [`Config`]: the eBPF capture, the certificate
//! manager, the xDS client, the listeners, the capture/certificate sync and the admin server
//! (on its own thread, see `weft_core::admin`), with the readiness checks each adds. `main.rs`
//! runs it until a signal; tests run it in-process.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use weft_core::admin::{self, Admin, AdminAddresses, AdminServer, Readiness};
use weft_core::cert_manager::{CaClient, CertManager, CertificateSource};
use weft_core::drain;
use weft_core::names::NODE_NAME_METADATA;
use weft_core::state::{ProxyState, Shared};
use weft_core::telemetry::{LogLevel, Metrics};
use weft_core::tls::DEFAULT_CERT_LIFETIME;
use weft_core::xds::{self, MeshHandler, Synced, XdsConfig};

use crate::capture::{self, LocalPods};
use crate::config::{Capture, Config};
use crate::proxy::{ListenAddrs, Proxy, ProxyInputs, ProxyOptions};

/// How long open connections may take to finish after a drain begins.
const DRAIN_DEADLINE: Duration = Duration::from_secs(5);

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("eBPF capture: {0}")]
    Capture(String),
    #[error("binding the capture listeners (needs CAP_NET_ADMIN for IP_TRANSPARENT): {0}")]
    Listeners(std::io::Error),
    #[error("admin endpoints: {0}")]
    Admin(std::io::Error),
}

/// A running proxy.
pub struct App {
    /// Where the data-path listeners are bound.
    pub listen: ListenAddrs,
    /// Where the admin, metrics and readiness endpoints are bound.
    pub admin: AdminAddresses,
    /// Set by `POST /quitquitquit`.
    pub quit: watch::Receiver<bool>,
    drain: drain::Trigger,
    proxy: JoinHandle<()>,
    tasks: Vec<JoinHandle<()>>,
    _admin: AdminServer,
}

/// What the admin `/config_dump` shows.
#[derive(serde::Serialize)]
struct Dump<'a> {
    config: &'a Config,
    #[serde(flatten)]
    state: weft_core::state::ConfigDump,
    certificates: Vec<CertificateDump>,
}

#[derive(serde::Serialize)]
struct CertificateDump {
    identity: String,
    /// Seconds since the Unix epoch.
    not_after: u64,
}

impl App {
    /// Starts everything `config` asks for. Must be called inside a tokio runtime.
    pub async fn start(config: Config, log: LogLevel) -> Result<App, StartError> {
        let ca = CaClient::new(&config.ca, config.token.clone(), DEFAULT_CERT_LIFETIME);
        let certs = Arc::new(CertManager::new(ca));
        let state = Arc::new(Shared::new(ProxyState::new("")));
        let (metrics, registry) = Metrics::new();
        let capture = open_capture(&config.capture)?;
        let handler = Arc::new(MeshHandler { state: Arc::clone(&state) });
        let (synced_tx, synced) = watch::channel(Synced::new(&xds::Handler::type_urls(handler.as_ref())));

        let options = ProxyOptions { transparent: config.transparent, ..ProxyOptions::default() };
        let proxy = Proxy::bind_with(
            ProxyInputs {
                state: Arc::clone(&state),
                certs: Arc::clone(&certs),
                metrics: Arc::new(metrics),
                node_name: config.node_name.clone(),
                updates: synced.clone(),
            },
            config.bind,
            config.ports,
            options,
        )
        .await
        .map_err(StartError::Listeners)?;
        let listen = proxy.local_addrs();

        let (local_tx, local) = watch::channel(LocalPods::default());
        let xds_config = XdsConfig {
            endpoint: config.xds.clone(),
            node_id: config.node_id(),
            metadata: [(NODE_NAME_METADATA.to_owned(), config.node_name.clone())].into(),
            token: config.token.clone(),
        };
        let tasks = vec![
            tokio::spawn(xds::run(xds_config, handler, synced_tx)),
            tokio::spawn(capture::sync(
                config.node_name.clone(),
                Arc::clone(&state),
                synced.clone(),
                capture,
                Arc::clone(&certs),
                local_tx,
            )),
        ];

        let readiness = Arc::new(Readiness::default());
        add_checks(&readiness, synced, local.clone(), Arc::clone(&certs));
        let (quit_tx, quit) = watch::channel(false);
        let config = Arc::new(config);
        let dump = {
            let (config, state, certs, local) = (Arc::clone(&config), state, Arc::clone(&certs), local);
            move || {
                let identities = local.borrow().identities.clone();
                let certificates = identities
                    .iter()
                    .filter_map(|id| certs.current(id))
                    .map(|c| CertificateDump {
                        identity: c.identity().to_string(),
                        not_after: c
                            .not_after()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map(|d| d.as_secs())
                            .unwrap_or_default(),
                    })
                    .collect();
                let dump = Dump { config: &config, state: state.load().config_dump(), certificates };
                serde_json::to_value(dump).unwrap_or_else(|e| serde_json::json!({ "error": e.to_string() }))
            }
        };
        let admin = admin::spawn(
            Admin {
                config_dump: Box::new(dump),
                registry: Arc::new(registry),
                readiness,
                log,
                quit: quit_tx,
            },
            config.admin,
        )
        .map_err(StartError::Admin)?;

        let (drain, drain_watch) = drain::channel();
        let proxy = tokio::spawn(proxy.run(drain_watch));
        tracing::info!(node = config.node_name, xds = config.xds.url(), "ztunnel started");
        Ok(App { listen, admin: admin.addresses, quit, drain, proxy, tasks, _admin: admin })
    }

    /// Runs until SIGTERM, Ctrl-C or `/quitquitquit`, then drains.
    pub async fn run_until_signal(mut self) -> std::io::Result<()> {
        drain::stop_signal(&mut self.quit).await?;
        self.shutdown().await;
        Ok(())
    }

    /// Stops accepting, gives open connections the drain deadline, and stops the rest. The
    /// capture stays pinned: enrolled pods fail closed until a ztunnel is back.
    pub async fn shutdown(self) {
        self.drain.drain();
        let _ = tokio::time::timeout(DRAIN_DEADLINE, self.proxy).await;
        for task in self.tasks {
            task.abort();
        }
    }
}

/// Raises the soft open-files limit to the hard one, as Istio's ztunnel does: every proxied
/// connection holds two descriptors, and a node's worth of them outgrows the usual 1,024.
/// Returns the limit now in force.
pub fn raise_open_files_limit() -> Result<u64, nix::Error> {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE)?;
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard)?;
    }
    Ok(hard)
}

/// Loads (or takes over) the capture `capture` asks for.
fn open_capture(capture: &Capture) -> Result<Option<Arc<Mutex<ebpf::Capture>>>, StartError> {
    let (pin_dir, uplinks, attach) = match capture {
        Capture::Off => return Ok(None),
        Capture::LoadOnly { pin_dir } => (pin_dir, &Vec::new(), None),
        Capture::On { pin_dir, uplinks, attach } => (pin_dir, uplinks, *attach),
    };
    let config = ebpf::CaptureConfig { pin_dir: pin_dir.clone(), attach, ..ebpf::CaptureConfig::default() };
    if matches!(capture, Capture::On { .. }) && !pin_dir.exists() {
        load_in_child()?;
    }
    let mut opened = ebpf::Capture::open(config).map_err(|e| StartError::Capture(format!("loading: {e}")))?;
    for uplink in uplinks {
        opened
            .attach_uplink(uplink)
            .map_err(|e| StartError::Capture(format!("capturing on uplink {uplink}: {e}")))?;
    }
    Ok(Some(Arc::new(Mutex::new(opened))))
}

/// Loads the capture in a child process that then exits. Loading parses the kernel's BTF, and
/// the ~16 MB of heap that takes stays with the process that did it (the allocator keeps it); the
/// pinned programs and maps are then taken over from bpffs at no such cost.
fn load_in_child() -> Result<(), StartError> {
    let exe =
        std::env::current_exe().map_err(|e| StartError::Capture(format!("finding ztunnel's binary: {e}")))?;
    let status = std::process::Command::new(exe)
        .args(std::env::args_os().skip(1))
        .arg("--load-capture-only")
        .status()
        .map_err(|e| StartError::Capture(format!("starting the capture loader: {e}")))?;
    if !status.success() {
        return Err(StartError::Capture(format!("the loader failed ({status}); see the lines above")));
    }
    Ok(())
}

/// ztunnel is ready once the first push of each type is in, the capture is set up for the pods
/// it names, and a certificate is held for every local mesh identity.
fn add_checks<S: CertificateSource>(
    readiness: &Readiness,
    synced: watch::Receiver<Synced>,
    local: watch::Receiver<LocalPods>,
    certs: Arc<CertManager<S>>,
) {
    let xds = synced.clone();
    readiness.add("xds", move || {
        let synced = xds.borrow();
        (!synced.complete()).then(|| {
            let missing: Vec<&str> = synced.missing.iter().copied().collect();
            format!("nothing received yet of {}", missing.join(", "))
        })
    });
    let pods = local.clone();
    readiness.add("capture", move || {
        let complete_at = synced.borrow().complete_at;
        complete_at
            .is_some_and(|at| pods.borrow().generation < at)
            .then(|| "not yet set up for this node's pods".to_owned())
    });
    readiness.add("certificates", move || {
        let missing: Vec<String> = local
            .borrow()
            .identities
            .iter()
            .filter(|id| certs.current(id).is_none())
            .map(|id| id.to_string())
            .collect();
        (!missing.is_empty()).then(|| format!("none yet for {}", missing.join(", ")))
    });
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_open_files_limit_is_raised_to_the_hard_limit() {
        use nix::sys::resource::{getrlimit, Resource};
        let limit = super::raise_open_files_limit().unwrap();
        assert_eq!(getrlimit(Resource::RLIMIT_NOFILE).unwrap(), (limit, limit));
    }
}
