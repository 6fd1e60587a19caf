//! Builds and runs the whole node proxy from a [`Config`]: the eBPF capture, the certificate
//! manager, the xDS client, the listeners, the capture/certificate sync and the admin server
//! (on its own thread, see `weft_core::admin`), with the readiness checks each adds. `main.rs`
//! runs it until a signal; tests run it in-process.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};
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
use crate::handover;
use crate::proxy::{self, ListenAddrs, Proxy, ProxyInputs, ProxyOptions};

/// How long open connections may take to finish after a drain begins.
const DRAIN_DEADLINE: Duration = Duration::from_secs(5);
/// How long a stopping ztunnel keeps accepting after the capture stopped giving it new
/// connections: handshakes under way complete and land in the queue within a round trip.
const QUEUE_SWEEP: Duration = Duration::from_millis(100);
/// How long a fresh ztunnel waits to be ready before it accepts connections anyway.
const READY_WAIT: Duration = Duration::from_secs(10);
/// How long a successor waits to be ready before it takes the listeners anyway.
const HANDOVER_READY_WAIT: Duration = Duration::from_secs(30);

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
    /// Fires when a successor has taken the listeners over.
    handed_over: oneshot::Receiver<()>,
    handover_drain: Duration,
    pod_state_dir: Option<PathBuf>,
    capture: Option<Arc<Mutex<ebpf::Capture>>>,
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
    ///
    /// When another ztunnel serves the hand-over socket (an upgrade), this one gets ready first
    /// (xDS, capture, certificates), then takes over that one's listening sockets, and that one
    /// drains. Otherwise it binds its own, and accepts on them once ready (or after
    /// [`READY_WAIT`]): the kernel queues what arrives before, so early connections wait instead
    /// of meeting a proxy that knows no pods yet.
    pub async fn start(config: Config, log: LogLevel) -> Result<App, StartError> {
        let ca = CaClient::new(&config.ca, config.token.clone(), DEFAULT_CERT_LIFETIME);
        let certs = Arc::new(CertManager::new(ca));
        let state = Arc::new(Shared::new(ProxyState::new("")));
        let (metrics, registry) = Metrics::new();
        let capture = open_capture(&config.capture)?;
        let kept_capture = capture.clone();
        let handler = Arc::new(MeshHandler { state: Arc::clone(&state) });
        let (synced_tx, synced) = watch::channel(Synced::new(&xds::Handler::type_urls(handler.as_ref())));

        let (local_tx, local) = watch::channel(LocalPods::default());
        let reattach = Arc::new(tokio::sync::Notify::new());
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
                Arc::clone(&reattach),
            )),
        ];
        let readiness = Arc::new(Readiness::default());
        add_checks(&readiness, synced.clone(), local.clone(), Arc::clone(&certs));

        let taken = match &config.handover_socket {
            Some(path) => take_over(path, &readiness).await,
            None => None,
        };
        let successor = taken.is_some();
        let (data, admin_listeners, taken) = match taken {
            Some(taken) => {
                let [o, i, h, a, m, r] = taken.listeners;
                ([o, i, h], [a, m, r], Some(taken.predecessor))
            }
            None => (bind_data(&config)?, admin::bind(config.admin).map_err(StartError::Admin)?, None),
        };
        if let Some(capture) = &kept_capture {
            register_listeners(capture, &data);
        }
        // Duplicates of the six sockets, for the successor that will take them from this one.
        let handover_fds = data
            .iter()
            .chain(admin_listeners.iter())
            .map(|l| l.try_clone().map(OwnedFd::from))
            .collect::<std::io::Result<Vec<_>>>();

        // The listeners give open connections the longest drain there is (after a hand-over);
        // a drain on SIGTERM is cut shorter by [`App::shutdown`] ending the process.
        let options = ProxyOptions {
            transparent: config.transparent,
            drain_deadline: config.handover_drain,
            ..ProxyOptions::default()
        };
        let proxy = Proxy::on_listeners(
            ProxyInputs {
                state: Arc::clone(&state),
                certs: Arc::clone(&certs),
                metrics: Arc::new(metrics),
                node_name: config.node_name.clone(),
                updates: synced.clone(),
            },
            data,
            options,
        )
        .map_err(StartError::Listeners)?;
        let listen = proxy.local_addrs();

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
        let admin = admin::serve_on(
            Admin {
                config_dump: Box::new(dump),
                registry: Arc::new(registry),
                readiness: Arc::clone(&readiness),
                log,
                quit: quit_tx,
            },
            admin_listeners,
        )
        .map_err(StartError::Admin)?;

        let (drain, drain_watch) = drain::channel();
        let proxy = tokio::spawn(async move {
            if !successor {
                wait_ready(&readiness, READY_WAIT, "accepting connections anyway").await;
            }
            proxy.run(drain_watch).await
        });
        if let Some(predecessor) = taken {
            match tokio::task::spawn_blocking(move || predecessor.confirm()).await {
                Ok(Ok(())) => {
                    tracing::info!("took over the listeners of the ztunnel this one replaces");
                    reattach.notify_one();
                }
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "the replaced ztunnel did not hear the confirmation; both serve until it exits")
                }
                Err(e) => tracing::warn!(error = %e, "confirming the hand-over panicked"),
            }
        }
        let (handed_tx, handed_over) = oneshot::channel();
        let mut tasks = tasks;
        match (&config.handover_socket, handover_fds) {
            (Some(path), Ok(fds)) => tasks.push(tokio::spawn(handover::serve(path.clone(), fds, handed_tx))),
            (Some(_), Err(e)) => {
                tracing::error!(error = %e, "cannot duplicate the listeners; an upgrade will not be seamless")
            }
            (None, _) => {}
        }
        tracing::info!(node = config.node_name, xds = config.xds.url(), successor, "ztunnel started");
        Ok(App {
            listen,
            admin: admin.addresses,
            quit,
            drain,
            proxy,
            tasks,
            handed_over,
            handover_drain: config.handover_drain,
            pod_state_dir: config.pod_state_dir.clone(),
            capture: kept_capture,
            _admin: admin,
        })
    }

    /// Runs until SIGTERM, Ctrl-C or `/quitquitquit`, then drains for [`DRAIN_DEADLINE`]
    /// ([`App::shutdown`]). When a successor takes the listeners over first, this one stops
    /// accepting and drains at once (the successor serves everything new), and exits once told
    /// to stop and its last connection has ended, or the hand-over drain deadline has passed:
    /// like the old pod of a DaemonSet surge, which the controller deletes once the new one is
    /// ready. Exiting on its own instead would have the kubelet restart it, and the restarted
    /// process take the listeners back.
    pub async fn run_until_signal(mut self) -> std::io::Result<()> {
        let mut quit = self.quit.clone();
        tokio::select! {
            stopped = drain::stop_signal(&mut quit) => {
                stopped?;
                self.shutdown().await;
            }
            Ok(()) = &mut self.handed_over => {
                if let Some(dir) = &self.pod_state_dir {
                    if let Err(e) = handover::mark_pod_handed_over(dir) {
                        tracing::warn!(error = %e, dir = %dir.display(), "cannot mark the pod as handed over");
                    }
                }
                let drained = self.hand_over_and_drain();
                tokio::pin!(drained);
                // Drained before being told to stop: wait for it.
                tokio::select! {
                    () = &mut drained => drain::stop_signal(&mut quit).await?,
                    stopped = drain::stop_signal(&mut quit) => {
                        stopped?;
                        tracing::info!("still draining after the hand-over; exiting once drained");
                        drained.await;
                    }
                }
            }
        }
        Ok(())
    }

    /// Stops accepting, gives open connections the drain deadline, and stops the rest. The
    /// capture stays pinned: enrolled pods fail closed until a ztunnel is back. First the capture
    /// stops handing new connections to the listeners, and what they queued meanwhile is
    /// accepted: closing a listener resets the connections waiting in it, while a dropped SYN is
    /// sent again and meets the next ztunnel.
    pub async fn shutdown(self) {
        if let Some(capture) = &self.capture {
            let capture = Arc::clone(capture);
            let paused = tokio::task::spawn_blocking(move || {
                capture.lock().unwrap_or_else(|p| p.into_inner()).pause_new_connections()
            })
            .await;
            match paused {
                Ok(Ok(())) => tokio::time::sleep(QUEUE_SWEEP).await,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot pause the capture; queued connections will be reset")
                }
                Err(e) => tracing::warn!(error = %e, "pausing the capture panicked"),
            }
        }
        self.finish(DRAIN_DEADLINE).await;
    }

    /// After a successor took the listeners: stops the xDS client and the capture sync (the
    /// successor keeps the capture in step), stops accepting, and lets open connections run
    /// until they end or the hand-over drain deadline passes.
    async fn hand_over_and_drain(self) {
        let deadline = self.handover_drain;
        tracing::info!(?deadline, "draining after the hand-over");
        self.finish(deadline).await;
    }

    /// Stops the background tasks (the hand-over socket's with them: its copies of the
    /// listeners close, so nothing waits in their queues for a process that no longer accepts),
    /// stops accepting, and waits for open connections up to `deadline`.
    async fn finish(self, deadline: Duration) {
        for task in self.tasks {
            task.abort();
        }
        self.drain.drain();
        // The listeners add their own deadline; this one bounds the whole.
        let _ = tokio::time::timeout(deadline + Duration::from_secs(1), self.proxy).await;
        tracing::info!("ztunnel drained");
    }
}

/// Tells the capture which sockets are this process's listeners (bound, or taken over from a
/// predecessor), for the connections only a listener lookup can deliver (a SYN ending a
/// TIME_WAIT of ztunnel's). Without that such SYNs are answered with a stale ACK and sent again.
fn register_listeners(capture: &Mutex<ebpf::Capture>, listeners: &[std::net::TcpListener]) {
    let mut capture = capture.lock().unwrap_or_else(|p| p.into_inner());
    for listener in listeners {
        let registered = listener
            .local_addr()
            .map_err(|e| e.to_string())
            .and_then(|addr| capture.set_listener(addr.port(), listener).map_err(|e| e.to_string()));
        if let Err(e) = registered {
            tracing::warn!(error = %e, "cannot give the capture a listener: a new connection that reuses the ports of one ztunnel closed will be answered late");
        }
    }
}

/// Binds the data path's listeners (15001, 15006, 15008).
fn bind_data(config: &Config) -> Result<[std::net::TcpListener; 3], StartError> {
    let ports = config.ports;
    let listen = |port: u16, what: &str| {
        proxy::listen(SocketAddr::new(config.bind, port), config.transparent, what)
            .map_err(StartError::Listeners)
    };
    Ok([
        listen(ports.outbound, "outbound")?,
        listen(ports.inbound_plain, "plaintext inbound")?,
        listen(ports.hbone, "HBONE")?,
    ])
}

/// Waits until the ztunnel serving `path` (if one does) can be replaced, i.e. until this one is
/// ready, then takes its listeners. `None`: there is none (or it went away: this one binds its
/// own).
async fn take_over(path: &Path, readiness: &Readiness) -> Option<handover::Taken> {
    let p = path.to_owned();
    if !tokio::task::spawn_blocking(move || handover::Predecessor::runs(&p)).await.unwrap_or(false) {
        return None;
    }
    tracing::info!(path = %path.display(), "another ztunnel runs: taking over its listeners once ready");
    wait_ready(readiness, HANDOVER_READY_WAIT, "taking over anyway").await;
    let p = path.to_owned();
    let taken = tokio::task::spawn_blocking(move || match handover::Predecessor::find(&p)? {
        Some(predecessor) => predecessor.take().map(Some),
        None => Ok(None),
    })
    .await;
    match taken {
        Ok(Ok(taken)) => taken,
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "the hand-over failed; binding the listeners anew");
            None
        }
        Err(_) => None,
    }
}

/// Waits until every readiness check passes, or `limit` (then logs what is missing, and
/// `then`: what happens anyway).
async fn wait_ready(readiness: &Readiness, limit: Duration, then: &str) {
    let started = Instant::now();
    while let Some(missing) = readiness.not_ready() {
        if started.elapsed() > limit {
            tracing::warn!(missing, "not ready after {limit:?}; {then}");
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
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
    if matches!(capture, Capture::On { .. }) && !ebpf::pinned_current(pin_dir) {
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

/// Loads the capture (or replaces another version's) in a child process that then exits.
/// Loading parses the kernel's BTF, and
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
