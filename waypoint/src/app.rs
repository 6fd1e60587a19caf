//! Builds and runs the whole waypoint from a [`Config`]: the certificate manager, the xDS
//! client (its own Waypoint resource and the mesh), the HBONE listener and the admin server (on
//! its own thread, see `weft_core::admin`) with the readiness checks. `main.rs` runs it until a
//! signal; tests run it in-process.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use weft_core::admin::{self, Admin, AdminAddresses, AdminServer, Readiness};
use weft_core::cert_manager::{CaClient, CertManager, CertificateSource};
use weft_core::drain;
use weft_core::names::{NODE_NAME_METADATA, WAYPOINT_NAME_METADATA};
use weft_core::state::{ProxyState, Shared};
use weft_core::telemetry::{LogLevel, Metrics as TcpMetrics};
use weft_core::tls::DEFAULT_CERT_LIFETIME;
use weft_core::xds::{self, Synced, XdsConfig};

use crate::config::Config;
use crate::jwks::Jwks;
use crate::metrics::RequestMetrics;
use crate::model::Waypoint;
use crate::proxy::{Ctx, Proxy};
use crate::xds::WaypointHandler;

/// How long open streams may take to finish after a drain begins.
const DRAIN_DEADLINE: Duration = Duration::from_secs(5);
/// How often the waypoint's certificate is asked for until it is held (then the certificate
/// manager renews it).
const CERTIFICATE_RETRY: Duration = Duration::from_secs(1);

/// Why the waypoint could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("HBONE listener: {0}")]
    Listener(std::io::Error),
    #[error("admin endpoints: {0}")]
    Admin(std::io::Error),
}

/// A running waypoint.
pub struct App {
    /// Where the HBONE listener is bound.
    pub hbone: SocketAddr,
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
    waypoint: Option<&'a Waypoint>,
    #[serde(flatten)]
    state: weft_core::state::ConfigDump,
}

impl App {
    /// Starts everything `config` asks for. Must be called inside a tokio runtime.
    pub async fn start(config: Config, log: LogLevel) -> Result<App, StartError> {
        let ca = CaClient::new(&config.ca, config.token.clone(), DEFAULT_CERT_LIFETIME);
        App::start_with(config, log, CertManager::new(ca)).await
    }

    /// [`App::start`] with another certificate source (tests).
    pub async fn start_with<S: CertificateSource>(
        config: Config,
        log: LogLevel,
        certs: CertManager<S>,
    ) -> Result<App, StartError> {
        let config = Arc::new(config);
        let certs = Arc::new(certs);
        let state = Arc::new(Shared::new(ProxyState::new("")));
        let waypoint = Arc::new(Shared::new(None));
        let mut registry = prometheus_client::registry::Registry::default();
        let requests = RequestMetrics::default();
        requests.register(&mut registry);
        let tcp = TcpMetrics::default();
        tcp.register(&mut registry);

        let jwks = Jwks::with_timing(config.jwks_refresh, crate::jwks::MIN_REFETCH_GAP);
        let ctx = Arc::new(Ctx::new(
            Arc::clone(&config),
            Arc::clone(&waypoint),
            Arc::clone(&state),
            Arc::clone(&certs),
            requests,
            tcp,
            jwks.clone(),
        ));
        ctx.clusters.metrics.register(&mut registry);
        let proxy = Proxy::bind(Arc::clone(&ctx)).await.map_err(StartError::Listener)?;
        let hbone = proxy.local_addr().map_err(StartError::Listener)?;

        let handler = Arc::new(WaypointHandler::new(
            config.resource_name(),
            Arc::clone(&waypoint),
            Arc::clone(&state),
            jwks,
        ));
        let (synced_tx, synced) = watch::channel(Synced::new(&xds::Handler::type_urls(handler.as_ref())));
        let mut metadata =
            std::collections::BTreeMap::from([(WAYPOINT_NAME_METADATA.to_owned(), config.name.clone())]);
        if let Some(node) = &config.node_name {
            metadata.insert(NODE_NAME_METADATA.to_owned(), node.clone());
        }
        let xds_config = XdsConfig {
            endpoint: config.xds.clone(),
            node_id: config.node_id(),
            metadata,
            token: config.token.clone(),
        };
        let tasks = vec![
            tokio::spawn(xds::run(xds_config, handler, synced_tx)),
            tokio::spawn(fetch_certificate(Arc::clone(&certs), config.identity.clone())),
        ];

        let readiness = Arc::new(Readiness::default());
        add_checks(&readiness, synced, Arc::clone(&waypoint), Arc::clone(&certs), &config);
        let (quit_tx, quit) = watch::channel(false);
        let dump = {
            let (config, state, waypoint) = (Arc::clone(&config), state, Arc::clone(&waypoint));
            move || {
                let current = waypoint.load();
                let dump = Dump {
                    config: &config,
                    waypoint: current.as_ref().as_ref(),
                    state: state.load().config_dump(),
                };
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
        tracing::info!(waypoint = config.resource_name(), identity = %config.identity, xds = config.xds.url(), "waypoint started");
        Ok(App { hbone, admin: admin.addresses, quit, drain, proxy, tasks, _admin: admin })
    }

    /// Runs until SIGTERM, Ctrl-C or `/quitquitquit`, then drains.
    pub async fn run_until_signal(mut self) -> std::io::Result<()> {
        drain::stop_signal(&mut self.quit).await?;
        self.shutdown().await;
        Ok(())
    }

    /// Stops accepting, gives open streams the drain deadline, and stops the rest.
    pub async fn shutdown(self) {
        self.drain.drain();
        let _ = tokio::time::timeout(DRAIN_DEADLINE, self.proxy).await;
        for task in self.tasks {
            task.abort();
        }
    }
}

/// Asks for the waypoint's certificate until it is held (the manager then keeps it renewed).
async fn fetch_certificate<S: CertificateSource>(
    certs: Arc<CertManager<S>>,
    identity: weft_core::identity::Identity,
) {
    loop {
        match certs.get(&identity).await {
            Ok(_) => return,
            Err(e) => tracing::warn!(%identity, error = %e, "no certificate yet"),
        }
        tokio::time::sleep(CERTIFICATE_RETRY).await;
    }
}

/// Ready once its Waypoint resource, the mesh's addresses and its certificate are in.
fn add_checks<S: CertificateSource>(
    readiness: &Readiness,
    synced: watch::Receiver<Synced>,
    waypoint: Arc<Shared<Option<Waypoint>>>,
    certs: Arc<CertManager<S>>,
    config: &Config,
) {
    readiness.add("xds", move || {
        let synced = synced.borrow();
        (!synced.complete()).then(|| {
            let missing: Vec<&str> = synced.missing.iter().copied().collect();
            format!("nothing received yet of {}", missing.join(", "))
        })
    });
    let name = config.resource_name();
    readiness.add("waypoint", move || {
        waypoint.load().is_none().then(|| format!("no Waypoint resource {name} yet: does its Gateway exist?"))
    });
    let identity = config.identity.clone();
    readiness.add("certificate", move || {
        certs.current(&identity).is_none().then(|| format!("none yet for {identity}"))
    });
}
