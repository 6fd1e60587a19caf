//! The channel from a proxy to the controller (xDS and the CA share one port): gRPC over TLS 1.3
//! with ALPN h2, the controller's certificate verified against the mesh root as Istio's ztunnel
//! verifies istiod's (the root file, the server name of the address or `ALT_*_HOSTNAME`), or
//! plaintext to a loopback address only (a controller on the same host started with
//! `--plaintext`). The root file is read on every connect, so a rotated root (a ConfigMap update)
//! is used without a restart. Owns connecting; what flows over the channel is the xDS and CA
//! clients' business.

use std::fmt;
use std::future::Future;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls::client::WebPkiServerVerifier;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::ServerName;
use serde::Serialize;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::codegen::Service;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::tls::{describe, parse_pem_certs, provider, ALPN_H2};

/// Where Istio mounts the mesh root in its proxies (`istio-ca-root-cert` ConfigMap), and the
/// default root file of every Weft proxy.
pub const DEFAULT_ROOT_CERT: &str = "/var/run/secrets/istio/root-cert.pem";

/// How to reach the controller: its URL and whether (and how) the channel is TLS.
#[derive(Clone, Serialize)]
pub struct ControlPlane {
    url: String,
    #[serde(flatten)]
    transport: Transport,
}

/// Plaintext (loopback only) or TLS verified against a root file for a server name.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "transport", rename_all = "lowercase")]
pub enum Transport {
    Plaintext,
    Tls {
        /// PEM file of the roots the controller's certificate must chain to (several during a
        /// root rotation).
        roots: PathBuf,
        /// The DNS name or IP the controller's certificate must carry.
        server_name: String,
    },
}

/// Why the controller could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot read the mesh root {}: {source} (is the istio-ca-root-cert ConfigMap mounted there?)", .path.display())]
    ReadRoots { path: PathBuf, source: std::io::Error },
    #[error("the mesh root {} is unusable: {reason}", .path.display())]
    Roots { path: PathBuf, reason: String },
    #[error("cannot connect to {addr}: {source}")]
    Tcp { addr: String, source: std::io::Error },
    #[error("TLS handshake with the controller at {addr} (expecting a certificate for {server_name:?} chaining to the mesh root) failed: {reason}")]
    Handshake { addr: String, server_name: String, reason: String },
    #[error("connecting to {addr} took longer than {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
}

impl ControlPlane {
    /// Parses `url` (`https://host:port`, or `http://<loopback>:port`): TLS with the roots in
    /// `roots` and the host as server name unless `alt_hostname` names another. A root file
    /// that cannot be read or holds no certificate is an error now, not at the first connect.
    pub fn parse(url: &str, roots: &Path, alt_hostname: Option<&str>) -> Result<ControlPlane, String> {
        let uri: Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
        let host = uri.host().filter(|h| !h.is_empty()).ok_or("must name a host")?;
        if uri.port_u16().is_none() {
            return Err("must name a port (the controller serves on 15012)".into());
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err("must be scheme://host:port with nothing after the port".into());
        }
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let transport = match uri.scheme_str() {
            Some("https") => {
                let server_name = alt_hostname.filter(|h| !h.is_empty()).unwrap_or(host).to_owned();
                ServerName::try_from(server_name.clone())
                    .map_err(|e| format!("{server_name:?} is not a DNS name or IP: {e}"))?;
                read_roots(roots).map_err(|e| e.to_string())?;
                Transport::Tls { roots: roots.to_owned(), server_name }
            }
            Some("http") => {
                if !host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback()) {
                    return Err("plaintext (http://) reaches only a controller on this host's loopback; \
                                use https:// (the controller serves TLS on 15012)"
                        .into());
                }
                Transport::Plaintext
            }
            _ => return Err("must start with https:// (or http:// to a loopback address)".into()),
        };
        Ok(ControlPlane { url: url.to_owned(), transport })
    }

    /// A plaintext channel to a loopback controller (tests and in-process setups).
    pub fn plaintext(url: &str) -> Result<ControlPlane, String> {
        ControlPlane::parse(url, Path::new(DEFAULT_ROOT_CERT), None).and_then(|c| match c.transport {
            Transport::Plaintext => Ok(c),
            Transport::Tls { .. } => Err("not an http:// URL".into()),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// A channel that connects on first use and reconnects as needed.
    pub fn lazy_channel(&self, connect_timeout: Duration, request_timeout: Option<Duration>) -> Channel {
        let endpoint = self.endpoint(connect_timeout, request_timeout);
        match &self.transport {
            Transport::Plaintext => endpoint.connect_lazy(),
            Transport::Tls { roots, server_name } => {
                endpoint.connect_with_connector_lazy(TlsConnect::new(roots, server_name, connect_timeout))
            }
        }
    }

    /// Connects now; the error says whether TCP, the root or the handshake failed.
    pub async fn connect(&self, connect_timeout: Duration) -> Result<Channel, tonic::transport::Error> {
        let endpoint = self.endpoint(connect_timeout, None);
        match &self.transport {
            Transport::Plaintext => endpoint.connect().await,
            Transport::Tls { roots, server_name } => {
                endpoint.connect_with_connector(TlsConnect::new(roots, server_name, connect_timeout)).await
            }
        }
    }

    fn endpoint(&self, connect_timeout: Duration, request_timeout: Option<Duration>) -> Endpoint {
        // Invariant: `parse` accepted the URL, and tonic accepts every URI that parses.
        let endpoint = Endpoint::from_shared(self.url.clone())
            .expect("a parsed URL is a valid endpoint")
            .connect_timeout(connect_timeout)
            .tcp_nodelay(true);
        match request_timeout {
            Some(timeout) => endpoint.timeout(timeout),
            None => endpoint,
        }
    }
}

/// tonic's connector for a TLS channel: TCP to the URI's authority, then the handshake, within
/// the connect timeout.
#[derive(Clone)]
struct TlsConnect {
    roots: PathBuf,
    server_name: String,
    timeout: Duration,
}

type TlsIo = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;

impl TlsConnect {
    /// TCP, then TLS with a client config built from the root file as it is at each connect.
    fn new(roots: &Path, server_name: &str, timeout: Duration) -> TlsConnect {
        TlsConnect { roots: roots.to_owned(), server_name: server_name.to_owned(), timeout }
    }
}

impl Service<Uri> for TlsConnect {
    type Response = TlsIo;
    type Error = ConnectError;
    type Future = Pin<Box<dyn Future<Output = Result<TlsIo, ConnectError>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), ConnectError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            let addr = authority(&uri);
            let connect = tls_connect(&addr, &this.roots, &this.server_name);
            match tokio::time::timeout(this.timeout, connect).await {
                Ok(result) => result,
                Err(_) => Err(ConnectError::Timeout { addr, timeout: this.timeout }),
            }
        })
    }
}

impl fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.transport {
            Transport::Plaintext => write!(f, "{} (plaintext)", self.url),
            Transport::Tls { roots, server_name } => {
                write!(f, "{} (TLS, {server_name:?}, roots {})", self.url, roots.display())
            }
        }
    }
}

impl fmt::Display for ControlPlane {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.url)
    }
}

/// `host:port` of a URI (IPv6 hosts keep their brackets, as `TcpStream::connect` wants).
fn authority(uri: &Uri) -> String {
    uri.authority().map(|a| a.as_str().to_owned()).unwrap_or_default()
}

async fn tls_connect(addr: &str, roots: &Path, server_name: &str) -> Result<TlsIo, ConnectError> {
    let config = client_config(roots)?;
    let tcp = TcpStream::connect(addr)
        .await
        .map_err(|source| ConnectError::Tcp { addr: addr.to_owned(), source })?;
    let _ = tcp.set_nodelay(true);
    let handshake_err = |reason: String| ConnectError::Handshake {
        addr: addr.to_owned(),
        server_name: server_name.to_owned(),
        reason,
    };
    let name = ServerName::try_from(server_name.to_owned()).map_err(|e| handshake_err(e.to_string()))?;
    let tls = TlsConnector::from(config).connect(name, tcp).await.map_err(|e| {
        let reason = match e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>()) {
            Some(tls) => describe(tls),
            None => e.to_string(),
        };
        handshake_err(reason)
    })?;
    Ok(TokioIo::new(tls))
}

/// TLS 1.3 only, ALPN h2, the server verified (chain, validity, name) against the roots in the file.
fn client_config(roots_path: &Path) -> Result<Arc<ClientConfig>, ConnectError> {
    let store = read_roots(roots_path)?;
    let roots_err = |reason: String| ConnectError::Roots { path: roots_path.to_owned(), reason };
    let provider = Arc::new(provider());
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone())
        .build()
        .map_err(|e| roots_err(e.to_string()))?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| roots_err(e.to_string()))?
        .with_webpki_verifier(verifier)
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    Ok(Arc::new(config))
}

fn read_roots(path: &Path) -> Result<RootCertStore, ConnectError> {
    let pem = std::fs::read_to_string(path)
        .map_err(|source| ConnectError::ReadRoots { path: path.to_owned(), source })?;
    let roots_err = |reason: String| ConnectError::Roots { path: path.to_owned(), reason };
    let certs = parse_pem_certs(&pem).map_err(|e| roots_err(e.to_string()))?;
    if certs.is_empty() {
        return Err(roots_err("no PEM \"CERTIFICATE\" block".into()));
    }
    let mut store = RootCertStore::empty();
    for cert in certs {
        store.add(cert).map_err(|e| roots_err(e.to_string()))?;
    }
    Ok(store)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roots_file() -> tempfile::NamedTempFile {
        let ca = crate::tls::CertificateAuthority::generate("cluster.local").unwrap();
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), ca.root_pem()).unwrap();
        file
    }

    #[test]
    fn parses_tls_and_loopback_plaintext_and_refuses_the_rest() {
        let roots = roots_file();
        let tls =
            ControlPlane::parse("https://weft-controller.weft-system.svc:15012", roots.path(), None).unwrap();
        assert_eq!(
            tls.transport(),
            &Transport::Tls {
                roots: roots.path().to_owned(),
                server_name: "weft-controller.weft-system.svc".into()
            }
        );
        let alt =
            ControlPlane::parse("https://10.96.0.10:15012", roots.path(), Some("istiod.istio-system.svc"))
                .unwrap();
        assert!(
            matches!(alt.transport(), Transport::Tls { server_name, .. } if server_name == "istiod.istio-system.svc")
        );
        let ip = ControlPlane::parse("https://[fd00::1]:15012", roots.path(), None).unwrap();
        assert!(matches!(ip.transport(), Transport::Tls { server_name, .. } if server_name == "fd00::1"));
        for local in ["http://127.0.0.1:15012", "http://[::1]:15012"] {
            assert_eq!(
                ControlPlane::parse(local, roots.path(), None).unwrap().transport(),
                &Transport::Plaintext
            );
        }
        for (bad, why) in [
            ("http://10.0.0.1:15012", "loopback"),
            ("http://weft-controller:15012", "loopback"),
            ("https://controller", "port"),
            ("ftp://controller:1", "https://"),
            ("controller:15012", "https://"),
            ("https://controller:15012/x", "nothing after"),
        ] {
            let err = ControlPlane::parse(bad, roots.path(), None).unwrap_err();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn a_missing_or_empty_root_file_is_refused_naming_it() {
        let missing =
            ControlPlane::parse("https://c:15012", Path::new("/nonexistent/root.pem"), None).unwrap_err();
        assert!(
            missing.contains("/nonexistent/root.pem") && missing.contains("istio-ca-root-cert"),
            "{missing}"
        );
        let empty = tempfile::NamedTempFile::new().unwrap();
        let err = ControlPlane::parse("https://c:15012", empty.path(), None).unwrap_err();
        assert!(err.contains("no PEM"), "{err}");
    }
}
