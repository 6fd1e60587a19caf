//! Workload certificates on demand: fetched from a CA per identity, cached, and renewed in the
//! background at half their lifetime. Connections already open keep the certificate they were
//! made with; new ones get the newest. Knows the CA only through [`CertificateSource`].

use std::collections::HashMap;
use std::future::Future;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::sync::watch;
use tokio::task::AbortHandle;
use tonic::transport::Channel;

use crate::control::ControlPlane;
use tracing::{debug, info, warn};

use crate::identity::Identity;
use crate::proto::ca::istio_certificate_service_client::IstioCertificateServiceClient;
use crate::proto::ca::IstioCertificateRequest;
use crate::tls::{generate_csr, IssueError, RootBundle, TlsError, WorkloadCertificate};

/// The metadata key a node proxy uses to ask for another workload's certificate (Istio's name).
pub const IMPERSONATED_IDENTITY: &str = "ImpersonatedIdentity";

/// First retry delay after a failed fetch; doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(500);
const MAX_RETRY: Duration = Duration::from_secs(30);
/// Shortest wait between renewals, so a CA handing out nearly expired certificates is not hammered.
const MIN_RENEWAL_WAIT: Duration = Duration::from_secs(1);

/// Why a certificate could not be obtained.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("could not make a key and CSR: {0}")]
    Csr(#[from] IssueError),
    #[error("CA at {endpoint} refused ({code:?}): {message}")]
    Refused { endpoint: String, code: tonic::Code, message: String },
    #[error("cannot read the service-account token {path}: {source}")]
    Token { path: PathBuf, source: std::io::Error },
    #[error("CA answered with an unusable certificate: {0}")]
    Response(#[from] TlsError),
    #[error("CA signed {got} but {want} was asked for")]
    WrongIdentity { want: String, got: String },
    #[error("{0}")]
    Other(String),
}

/// Where certificates come from (the CA over gRPC in production; an in-process CA in tests).
pub trait CertificateSource: Send + Sync + 'static {
    fn fetch(
        &self,
        identity: &Identity,
    ) -> impl Future<Output = Result<WorkloadCertificate, FetchError>> + Send;
}

/// The bearer token presented to the CA.
#[derive(Debug, Clone)]
pub enum Token {
    None,
    Static(String),
    /// Re-read on every request (a projected service-account token is rotated by the kubelet).
    File(PathBuf),
}

/// A client of `istio.v1.auth.IstioCertificateService`, Istio's CA API.
#[derive(Clone)]
pub struct CaClient {
    endpoint: String,
    client: IstioCertificateServiceClient<Channel>,
    token: Token,
    lifetime: Duration,
    extra_roots: RootBundle,
    /// Ask as a node proxy on behalf of the workload (sets `ImpersonatedIdentity`).
    impersonate: bool,
}

impl CaClient {
    /// A client for the CA at `endpoint`. Connects lazily.
    pub fn new(endpoint: &ControlPlane, token: Token, lifetime: Duration) -> Self {
        let channel = endpoint.lazy_channel(Duration::from_secs(5), Some(Duration::from_secs(30)));
        CaClient {
            endpoint: endpoint.url().to_owned(),
            client: IstioCertificateServiceClient::new(channel),
            token,
            lifetime,
            extra_roots: RootBundle::default(),
            impersonate: true,
        }
    }

    /// Roots trusted besides the one the CA returns (e.g. the next root during a rotation).
    pub fn with_extra_roots(mut self, roots: RootBundle) -> Self {
        self.extra_roots = roots;
        self
    }

    async fn bearer(&self) -> Result<Option<String>, FetchError> {
        self.token.value().await
    }
}

impl Token {
    /// The token to send now (a file's is read afresh), or none.
    pub async fn value(&self) -> Result<Option<String>, FetchError> {
        match self {
            Token::None => Ok(None),
            Token::Static(token) => Ok(Some(token.clone())),
            Token::File(path) => tokio::fs::read_to_string(path)
                .await
                .map(|t| Some(t.trim().to_owned()))
                .map_err(|source| FetchError::Token { path: path.clone(), source }),
        }
    }
}

impl CertificateSource for CaClient {
    async fn fetch(&self, identity: &Identity) -> Result<WorkloadCertificate, FetchError> {
        let (key_pem, csr) = generate_csr(identity)?;
        let metadata = self.impersonate.then(|| prost_types::Struct {
            fields: [(
                IMPERSONATED_IDENTITY.to_owned(),
                prost_types::Value {
                    kind: Some(prost_types::value::Kind::StringValue(identity.to_string())),
                },
            )]
            .into(),
        });
        let mut request = tonic::Request::new(IstioCertificateRequest {
            csr,
            validity_duration: i64::try_from(self.lifetime.as_secs()).unwrap_or(i64::MAX),
            metadata,
        });
        if let Some(token) = self.bearer().await? {
            let value = format!("Bearer {token}").parse().map_err(|_| {
                FetchError::Other("the service-account token is not a valid header value".into())
            })?;
            request.metadata_mut().insert("authorization", value);
        }
        let response =
            self.client.clone().create_certificate(request).await.map_err(|status| FetchError::Refused {
                endpoint: self.endpoint.clone(),
                code: status.code(),
                message: status_text(&status),
            })?;
        let cert =
            WorkloadCertificate::from_pem(&key_pem, &response.into_inner().cert_chain, &self.extra_roots)?;
        if cert.identity() != identity {
            return Err(FetchError::WrongIdentity {
                want: identity.to_string(),
                got: cert.identity().to_string(),
            });
        }
        Ok(cert)
    }
}

/// The state of one identity's certificate, as its refresher publishes it.
#[derive(Clone)]
enum Slot {
    Pending,
    Ready(Arc<WorkloadCertificate>),
    Failed(Arc<FetchError>),
}

struct Entry {
    state: watch::Receiver<Slot>,
    refresher: AbortHandle,
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.refresher.abort();
    }
}

/// Certificates per identity, kept fresh.
pub struct CertManager<S> {
    source: Arc<S>,
    entries: Mutex<HashMap<Identity, Entry>>,
}

impl<S: CertificateSource> CertManager<S> {
    pub fn new(source: S) -> Self {
        CertManager { source: Arc::new(source), entries: Mutex::new(HashMap::new()) }
    }

    /// The current certificate for `identity`, fetching it first if this is the first ask.
    /// Waits for an outstanding fetch; returns its error if the latest attempt failed and no
    /// certificate is held yet (a background retry continues).
    pub async fn get(&self, identity: &Identity) -> Result<Arc<WorkloadCertificate>, Arc<FetchError>> {
        let mut state = {
            let mut entries = self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            entries.entry(identity.clone()).or_insert_with(|| self.start(identity.clone())).state.clone()
        };
        let slot = state.wait_for(|slot| !matches!(slot, Slot::Pending)).await.map(|slot| slot.clone());
        match slot {
            Ok(Slot::Ready(cert)) => Ok(cert),
            Ok(Slot::Failed(err)) => Err(err),
            // The refresher never ends while the entry exists; treat it as a failure anyway.
            Ok(Slot::Pending) | Err(_) => {
                Err(Arc::new(FetchError::Other("certificate refresher stopped".into())))
            }
        }
    }

    /// The current certificate, if one is held; never waits.
    pub fn current(&self, identity: &Identity) -> Option<Arc<WorkloadCertificate>> {
        let entries = self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let slot = entries.get(identity)?.state.borrow().clone();
        match slot {
            Slot::Ready(cert) => Some(cert),
            _ => None,
        }
    }

    /// Stops renewing `identity` (its workloads left this node) and drops its certificate.
    pub fn forget(&self, identity: &Identity) {
        let mut entries = self.entries.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        entries.remove(identity);
    }

    fn start(&self, identity: Identity) -> Entry {
        let (tx, rx) = watch::channel(Slot::Pending);
        let task = tokio::spawn(refresh(self.source.clone(), identity, tx));
        Entry { state: rx, refresher: task.abort_handle() }
    }
}

/// When to renew: half-way through the certificate's life.
pub fn renewal_due(cert: &WorkloadCertificate) -> SystemTime {
    let lifetime = cert.not_after().duration_since(cert.not_before()).unwrap_or(Duration::ZERO);
    cert.not_before() + lifetime / 2
}

async fn refresh<S: CertificateSource>(source: Arc<S>, identity: Identity, state: watch::Sender<Slot>) {
    let mut retry = FIRST_RETRY;
    loop {
        match source.fetch(&identity).await {
            Ok(cert) => {
                retry = FIRST_RETRY;
                let due = renewal_due(&cert);
                info!(%identity, expires = ?cert.not_after(), "workload certificate ready");
                state.send_replace(Slot::Ready(Arc::new(cert)));
                let wait =
                    due.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO).max(MIN_RENEWAL_WAIT);
                debug!(%identity, ?wait, "next renewal");
                tokio::time::sleep(wait).await;
            }
            Err(err) => {
                let holding =
                    matches!(&*state.borrow(), Slot::Ready(cert) if cert.not_after() > SystemTime::now());
                warn!(%identity, error = %err, ?retry, holding, "certificate fetch failed; retrying");
                if !holding {
                    state.send_replace(Slot::Failed(Arc::new(err)));
                }
                tokio::time::sleep(retry).await;
                retry = (retry * 2).min(MAX_RETRY);
            }
        }
    }
}

/// A status's message and, for a failure to connect, why (tonic's message alone says only
/// "transport error").
fn status_text(status: &tonic::Status) -> String {
    crate::xds::with_sources(status.message().to_owned(), std::error::Error::source(status))
}
