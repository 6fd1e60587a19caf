//! Weft's control plane: the CA that signs workload certificates for nodes' ztunnels and, when
//! given a config directory or the Kubernetes API, the xDS server that tells them Istio's workload
//! API (translated from the watched model), all on one port; on Kubernetes also the waypoint
//! Deployments of `istio-waypoint` Gateways. Depends on weft-core and weft-config only, never on
//! another Weft binary; `main.rs` only parses flags and waits for a signal.

pub mod ca;
pub mod config;
pub mod grpc;
pub mod model;
pub mod sources;
pub mod tls;
pub mod translate;
pub mod unenforced;
pub mod waypoints;
pub mod xds;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tonic::service::Routes;
use weft_core::proto::ca::istio_certificate_service_server::IstioCertificateServiceServer;

use crate::ca::{
    Authorizer, CaError, CaService, Caller, ModelAuthorizer, NodeAuthorizer, StaticAuthorizer,
    TokenReviewAuthorizer, WaypointTokenDir,
};
use crate::config::{Config, KubeAccess};
use crate::model::Model;
use crate::sources::dir::DirError;
use crate::xds::{Authenticate, Principal, XdsError, XdsOptions, XdsServer};

/// Why the controller could not start or keep serving.
#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error(transparent)]
    Xds(#[from] XdsError),
    #[error("cannot watch the config directory {}: {source} (does it exist, and is it readable?)", .path.display())]
    ConfigDir { path: PathBuf, source: DirError },
    #[error(
        "cannot reach the Kubernetes API server: {0} (check --kubeconfig or the in-cluster service account)"
    )]
    Kube(String),
    #[error(transparent)]
    Serving(#[from] tls::ServingError),
}

/// A controller whose root is loaded and whose port is bound, ready to [`run`](Self::run).
pub struct Controller {
    listener: grpc::Listener,
    local_addr: SocketAddr,
    mode: Mode,
    /// The TLS serving certificate, renewed while the controller runs; `None`: plaintext.
    serving: Option<Arc<tls::ServingCert>>,
}

/// What the controller serves.
enum Mode {
    /// The CA alone, identities from the static node table.
    Ca(CaService<StaticAuthorizer>),
    /// The CA, identities from the model, and xDS translated from the model.
    Mesh(Box<Mesh>),
}

struct Mesh {
    ca: CaService<Arc<NodeAuthorizer>>,
    xds: XdsServer,
    model: watch::Receiver<Arc<Model>>,
    trust_domain: String,
    /// With Kubernetes: the client and options of the waypoint manager.
    waypoints: Option<(kube::Client, waypoints::WaypointOptions)>,
    /// With Kubernetes: the CA's Secrets, followed for rotation, and the client that publishes
    /// the roots to every namespace.
    ca_secret: Option<(kube::Client, ca::SecretCa)>,
}

/// xDS clients authenticated as the CA authenticates them: the token names a node agent or a
/// waypoint.
struct CallerTokens(Arc<NodeAuthorizer>);

impl Authenticate for CallerTokens {
    fn principal(
        &self,
        token: Option<String>,
    ) -> futures::future::BoxFuture<'static, Result<Principal, String>> {
        let authorizer = self.0.clone();
        Box::pin(async move {
            match authorizer.authenticate(token.as_deref()).await.map_err(|e| e.to_string())? {
                Caller::NodeAgent { node } => Ok(Principal::NodeAgent(node)),
                Caller::Waypoint { namespace, name } => Ok(Principal::Waypoint { namespace, name }),
            }
        })
    }
}

/// A client for the API server `access` names.
async fn kube_client(access: &KubeAccess) -> Result<kube::Client, ControllerError> {
    let err = |e: &dyn std::fmt::Display| ControllerError::Kube(e.to_string());
    let config = match access {
        KubeAccess::Default => kube::Config::infer().await.map_err(|e| err(&e))?,
        KubeAccess::File(path) => {
            let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|e| err(&e))?;
            kube::Config::from_custom_kubeconfig(kubeconfig, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|e| err(&e))?
        }
    };
    kube::Client::try_from(config).map_err(|e| err(&e))
}

impl Controller {
    /// Loads (or on first start creates) the root, in its directory or on Kubernetes in its
    /// Secret, starts watching the config directory if there is one, then binds the port.
    pub async fn bind(config: &Config) -> Result<Controller, ControllerError> {
        let client = match (&config.config_dir, &config.kubernetes) {
            (None, Some(access)) => Some(kube_client(access).await?),
            _ => None,
        };
        let ca_secret = match &client {
            Some(client) => Some(
                ca::SecretCa::load(client.clone(), &config.trust_domain, config.ca_secret.clone()).await?,
            ),
            None => None,
        };
        let ca = match &ca_secret {
            Some(secret) => secret.authority(),
            None => {
                watch::channel(Arc::new(ca::load_or_create_root(&config.ca_dir, &config.trust_domain)?)).1
            }
        };
        let model = match (&config.config_dir, &client) {
            (Some(dir), _) => Some(
                sources::dir_model::watch_model(dir)
                    .map_err(|source| ControllerError::ConfigDir { path: dir.clone(), source })?,
            ),
            (None, Some(client)) => Some(sources::kube::watch_model(client.clone())),
            (None, None) => None,
        };
        let mode = match model {
            None => {
                let service =
                    CaService::following(ca, config.authorizer()).with_max_lifetime(config.max_cert_lifetime);
                Mode::Ca(service)
            }
            Some(model) => {
                // On Kubernetes, ztunnels present service-account tokens unless a static table
                // of node tokens is given.
                let authorizer = match &client {
                    Some(client) if config.node_tokens.is_empty() => {
                        tracing::info!(
                            ztunnel_service_account = %config.ztunnel_service_account,
                            "CA authenticates nodes by TokenReview"
                        );
                        NodeAuthorizer::TokenReview(TokenReviewAuthorizer::new(
                            client.clone(),
                            config.ztunnel_service_account.clone(),
                            &config.trust_domain,
                            model.clone(),
                        ))
                    }
                    _ => {
                        let authorizer =
                            ModelAuthorizer::new(config.authorizer(), &config.trust_domain, model.clone());
                        NodeAuthorizer::Static(match &config.waypoint_tokens_dir {
                            Some(dir) => {
                                tracing::info!(dir = %dir.display(), "waypoints authenticate by the token files under");
                                authorizer.with_waypoint_tokens(WaypointTokenDir::new(dir))
                            }
                            None => authorizer,
                        })
                    }
                };
                let authorizer = Arc::new(authorizer);
                // xDS asks the same of its clients as the CA: the node's or waypoint's token. Only
                // a static table without any tokens (a local setup) leaves it open, as nobody
                // could authenticate.
                let no_tokens = config.node_tokens.is_empty() && config.waypoint_tokens_dir.is_none();
                let authenticate: Option<Box<dyn Authenticate>> =
                    if matches!(*authorizer, NodeAuthorizer::Static(_)) && no_tokens {
                        tracing::warn!(
                            "no --node-token nor --waypoint-tokens-dir: xDS serves any client unauthenticated"
                        );
                        None
                    } else {
                        Some(Box::new(CallerTokens(authorizer.clone())))
                    };
                let service =
                    CaService::following(ca, authorizer).with_max_lifetime(config.max_cert_lifetime);
                let xds =
                    XdsServer::with_authentication(translate::view(), XdsOptions::default(), authenticate);
                xds.update(translate::snapshot(
                    &model.borrow(),
                    &config.trust_domain,
                    translate::DEFAULT_CLUSTER_ID,
                ));
                Mode::Mesh(Box::new(Mesh {
                    ca: service,
                    xds,
                    model,
                    trust_domain: config.trust_domain.clone(),
                    waypoints: client.clone().map(|client| (client, config.waypoints.clone())),
                    ca_secret: client.zip(ca_secret),
                }))
            }
        };
        let serving = match &config.tls {
            Some(names) => {
                let ca = match &mode {
                    Mode::Ca(service) => service.ca(),
                    Mode::Mesh(mesh) => mesh.ca.ca(),
                };
                Some(tls::ServingCert::issue(&ca, names.clone())?)
            }
            None => None,
        };
        let bind_err = |source| CaError::Bind { addr: config.listen, source };
        let tcp = TcpListener::bind(config.listen).await.map_err(bind_err)?;
        let local_addr = tcp.local_addr().map_err(bind_err)?;
        let serves = if matches!(mode, Mode::Ca(_)) { "CA" } else { "CA and xDS" };
        let transport = if serving.is_some() { "TLS" } else { "plaintext (loopback only)" };
        tracing::info!(%local_addr, trust_domain = %config.trust_domain, serves, transport, tls = ?config.tls, "listening");
        let listener = grpc::Listener { tcp, tls: serving.as_ref().map(|cert| cert.server_config()) };
        Ok(Controller { listener, local_addr, mode, serving })
    }

    /// The address the CA (and xDS) listens on (the real port when the config asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The root certificates workloads must trust now, PEM.
    pub fn root_pem(&self) -> String {
        match &self.mode {
            Mode::Ca(service) => service.ca().root_pem().to_owned(),
            Mode::Mesh(mesh) => mesh.ca.ca().root_pem().to_owned(),
        }
    }

    /// The xDS server, when the controller serves one (it was given a config directory).
    pub fn xds(&self) -> Option<&XdsServer> {
        match &self.mode {
            Mode::Ca(_) => None,
            Mode::Mesh(mesh) => Some(&mesh.xds),
        }
    }

    /// Serves until `shutdown` completes, then drains. With a config directory, every model
    /// change is translated into a new xDS snapshot meanwhile.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ControllerError> {
        let renewal = self.serving.map(|cert| {
            let ca = match &self.mode {
                Mode::Ca(service) => service.signer(),
                Mode::Mesh(mesh) => mesh.ca.signer(),
            };
            AbortOnDrop(tokio::spawn(cert.renew_periodically(ca)))
        });
        let _renewal = renewal;
        match self.mode {
            Mode::Ca(service) => Ok(ca::serve(self.listener, service, shutdown).await?),
            Mode::Mesh(mesh) => {
                let Mesh { ca, xds, model, trust_domain, waypoints, ca_secret } = *mesh;
                let updater = tokio::spawn(publish_snapshots(model, xds.clone(), trust_domain));
                let waypoints =
                    waypoints.map(|(client, options)| tokio::spawn(waypoints::run(client, options)));
                let ca_tasks = ca_secret.map(|(client, secret)| {
                    let roots = tokio::spawn(ca::root_configmap::run(client, secret.authority()));
                    (tokio::spawn(secret.run()), roots)
                });
                let routes = Routes::new(IstioCertificateServiceServer::new(ca));
                let result = xds::serve(self.listener, xds, routes, shutdown).await;
                updater.abort();
                if let Some(waypoints) = waypoints {
                    waypoints.abort();
                }
                if let Some((secret, roots)) = ca_tasks {
                    secret.abort();
                    roots.abort();
                }
                Ok(result?)
            }
        }
    }
}

/// Translates the model into a snapshot on every change, until the model's source stops, and
/// logs what it holds that is not enforced as written (each entry once, see [`unenforced`]).
async fn publish_snapshots(mut model: watch::Receiver<Arc<Model>>, xds: XdsServer, trust_domain: String) {
    let mut reporter = unenforced::Reporter::default();
    loop {
        let current = model.borrow_and_update().clone();
        let snapshot = translate::snapshot(&current, &trust_domain, translate::DEFAULT_CLUSTER_ID);
        reporter.report(&current);
        tracing::debug!(version = snapshot.version(), objects = current.len(), "publishing xDS snapshot");
        xds.update(snapshot);
        if model.changed().await.is_err() {
            return;
        }
    }
}

/// Aborts a background task when dropped (when [`Controller::run`] returns).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}
