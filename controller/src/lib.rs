//! Weft's control plane: the CA that signs workload certificates for nodes' ztunnels, configured
//! from flags. Depends on weft-core only, never on another Weft binary; `main.rs` only parses
//! flags and waits for a signal.

pub mod ca;
pub mod config;
pub mod model;
pub mod sources;
pub mod xds;

use std::future::Future;
use std::net::SocketAddr;

use tokio::net::TcpListener;

use crate::ca::{CaError, CaService, StaticAuthorizer};
use crate::config::Config;

/// A controller whose root is loaded and whose port is bound, ready to [`run`](Self::run).
pub struct Controller {
    listener: TcpListener,
    local_addr: SocketAddr,
    service: CaService<StaticAuthorizer>,
}

impl Controller {
    /// Loads (or on first start creates) the root, then binds the CA's port.
    pub async fn bind(config: &Config) -> Result<Controller, CaError> {
        let ca = ca::load_or_create_root(&config.ca_dir, &config.trust_domain)?;
        let service = CaService::new(ca, config.authorizer()).with_max_lifetime(config.max_cert_lifetime);
        let bind_err = |source| CaError::Bind { addr: config.listen, source };
        let listener = TcpListener::bind(config.listen).await.map_err(bind_err)?;
        let local_addr = listener.local_addr().map_err(bind_err)?;
        tracing::info!(%local_addr, trust_domain = %config.trust_domain, "CA listening");
        Ok(Controller { listener, local_addr, service })
    }

    /// The address the CA listens on (the real port when the config asked for port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The root certificate workloads must trust, PEM.
    pub fn root_pem(&self) -> &str {
        self.service.ca().root_pem()
    }

    /// Serves until `shutdown` completes, then drains.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), CaError> {
        ca::serve(self.listener, self.service, shutdown).await
    }
}
