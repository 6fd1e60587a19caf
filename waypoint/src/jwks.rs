//! The JWK sets of RequestAuthentication rules' `jwksUri`s: fetched over HTTP or HTTPS (rustls
//! with the webpki roots), cached per URI and shared by every request. It owns only the fetching
//! and the cache; what a key set means for a token is decided in [`crate::jwt`].
//!
//! When fetches happen: [`Jwks::ensure`] (at configuration time, off the data path) starts a
//! task per URI that fetches at once, then every [`REFRESH_INTERVAL`] (Istio's
//! `PILOT_JWT_PUB_KEY_REFRESH_INTERVAL` default, 20 minutes) after a success, or after
//! [`MIN_REFETCH_GAP`] after a failure. A request whose token's `kid` is not in the cached set,
//! or whose URI has no keys yet, waits for one [`Jwks::refetch`], which is rate-limited to one
//! fetch per URI per [`MIN_REFETCH_GAP`] (a request inside the gap gets the cached keys) and
//! bounded by the rule's timeout. A failed fetch keeps the last good keys; a URI that never
//! fetched has none, and [`crate::jwt`] then refuses tokens for it ("Jwks remote fetch is failed").
//! Responses are bounded to [`MAX_JWKS_BYTES`]. Deviation: Istio has istiod fetch and inline the
//! keys; the waypoint fetches them itself, as Envoy's `remote_jwks` does.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, RwLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, HOST, USER_AGENT};
use http::{Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

use crate::jwt::KeySet;

/// How often a URI's keys are refetched after a success (Istio's default).
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(20 * 60);
/// The least time between two fetches of one URI on demand, and the retry delay after a failure.
pub const MIN_REFETCH_GAP: Duration = Duration::from_secs(30);
/// The largest JWKS response read.
pub const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// The shared JWKS cache; clones share it. Refresh tasks stop when the last clone is dropped.
#[derive(Clone)]
pub struct Jwks {
    inner: Arc<Inner>,
}

struct Inner {
    refresh_interval: Duration,
    min_refetch_gap: Duration,
    entries: Mutex<HashMap<String, Arc<Entry>>>,
    tls: OnceLock<Result<Arc<ClientConfig>, String>>,
}

struct Entry {
    keys: RwLock<Option<Arc<KeySet>>>,
    /// Held during a fetch (so concurrent refetches wait for it); the time of the last attempt.
    last_attempt: tokio::sync::Mutex<Option<Instant>>,
}

/// Why a fetch failed (logged; the last good keys stay).
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("{0:?} is not an http(s) URI with a host")]
    Uri(String),
    #[error("connecting: {0} (is the JWKS server reachable from the waypoint?)")]
    Connect(#[from] std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    #[error("answered {0}")]
    Status(StatusCode),
    #[error("response body: {0} (over {MAX_JWKS_BYTES} bytes?)")]
    Body(String),
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("key set: {0}")]
    Keys(String),
}

impl Default for Jwks {
    fn default() -> Self {
        Jwks::new()
    }
}

impl Jwks {
    pub fn new() -> Self {
        Jwks::with_timing(REFRESH_INTERVAL, MIN_REFETCH_GAP)
    }

    /// A cache with other refresh intervals (tests).
    pub fn with_timing(refresh_interval: Duration, min_refetch_gap: Duration) -> Self {
        Jwks {
            inner: Arc::new(Inner {
                refresh_interval,
                min_refetch_gap,
                entries: Mutex::new(HashMap::new()),
                tls: OnceLock::new(),
            }),
        }
    }

    /// Makes sure `uri`'s keys are fetched and kept fresh: the first call for a URI starts its
    /// refresh task (when there is a tokio runtime); later calls do nothing.
    pub fn ensure(&self, uri: &str, timeout: Duration) {
        let (entry, new) = self.entry(uri);
        if !new {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let inner = Arc::downgrade(&self.inner);
        let entry = Arc::downgrade(&entry);
        runtime.spawn(refresh_loop(inner, entry, uri.to_string(), timeout));
    }

    /// Drops the URIs `keep` refuses (no rule names them any more); their tasks end.
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        if let Ok(mut entries) = self.inner.entries.lock() {
            entries.retain(|uri, _| keep(uri));
        }
    }

    /// The cached keys of `uri`, if a fetch ever succeeded.
    pub fn cached(&self, uri: &str) -> Option<Arc<KeySet>> {
        let entries = self.inner.entries.lock().ok()?;
        entries.get(uri)?.current()
    }

    /// Fetches `uri` again now, unless it was fetched (or tried) within the minimum gap; waits
    /// for a fetch in flight. Returns the keys then cached. Bounded by `timeout` in all.
    pub async fn refetch(&self, uri: &str, timeout: Duration) -> Option<Arc<KeySet>> {
        let (entry, _) = self.entry(uri);
        let inner = self.inner.clone();
        let attempt = async {
            let mut last = entry.last_attempt.lock().await;
            if last.is_some_and(|t| t.elapsed() < inner.min_refetch_gap) {
                return;
            }
            *last = Some(Instant::now());
            let _ = inner.fetch_into(&entry, uri, timeout).await;
        };
        let _ = tokio::time::timeout(timeout, attempt).await;
        entry.current()
    }

    fn entry(&self, uri: &str) -> (Arc<Entry>, bool) {
        let mut entries = match self.inner.entries.lock() {
            Ok(e) => e,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(e) = entries.get(uri) {
            return (e.clone(), false);
        }
        let e = Arc::new(Entry { keys: RwLock::new(None), last_attempt: tokio::sync::Mutex::new(None) });
        entries.insert(uri.to_string(), e.clone());
        (e, true)
    }
}

impl Inner {
    fn tls(&self) -> Result<Arc<ClientConfig>, FetchError> {
        self.tls
            .get_or_init(|| {
                let roots = RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
                let provider = Arc::new(rustls::crypto::ring::default_provider());
                ClientConfig::builder_with_provider(provider)
                    .with_safe_default_protocol_versions()
                    .map(|b| {
                        let mut config = b.with_root_certificates(roots).with_no_client_auth();
                        config.alpn_protocols = vec![b"http/1.1".to_vec()];
                        Arc::new(config)
                    })
                    .map_err(|e| e.to_string())
            })
            .clone()
            .map_err(FetchError::Tls)
    }

    /// One fetch; on success the keys replace the cached ones, on failure they stay.
    async fn fetch_into(&self, entry: &Entry, uri: &str, timeout: Duration) -> Result<(), FetchError> {
        let result = match tokio::time::timeout(timeout, fetch(uri, self)).await {
            Ok(r) => r,
            Err(_) => Err(FetchError::Timeout(timeout)),
        };
        match result {
            Ok(set) => {
                tracing::debug!(uri, keys = set.len(), "JWKS fetched");
                if let Ok(mut keys) = entry.keys.write() {
                    *keys = Some(Arc::new(set));
                }
                Ok(())
            }
            Err(e) => {
                tracing::warn!(uri, error = %e, "JWKS fetch failed; keeping the last good keys");
                Err(e)
            }
        }
    }
}

impl Entry {
    fn current(&self) -> Option<Arc<KeySet>> {
        self.keys.read().ok()?.clone()
    }
}

async fn refresh_loop(inner: Weak<Inner>, entry: Weak<Entry>, uri: String, timeout: Duration) {
    loop {
        let wait = {
            let (Some(inner), Some(entry)) = (inner.upgrade(), entry.upgrade()) else { return };
            let mut last = entry.last_attempt.lock().await;
            *last = Some(Instant::now());
            match inner.fetch_into(&entry, &uri, timeout).await {
                Ok(()) => inner.refresh_interval,
                Err(_) => inner.min_refetch_gap,
            }
        };
        tokio::time::sleep(wait).await;
    }
}

async fn fetch(uri_text: &str, inner: &Inner) -> Result<KeySet, FetchError> {
    let bad_uri = || FetchError::Uri(uri_text.to_string());
    let uri: Uri = uri_text.parse().map_err(|_| bad_uri())?;
    let https = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(bad_uri()),
    };
    let host = uri.host().ok_or_else(bad_uri)?;
    let authority = uri.authority().ok_or_else(bad_uri)?.as_str().to_string();
    let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
    let bare_host = host.trim_start_matches('[').trim_end_matches(']').to_string();
    let path = uri.path_and_query().map_or("/", |p| p.as_str());
    let request = Request::get(path)
        .header(HOST, authority)
        .header(ACCEPT, "application/json")
        .header(USER_AGENT, "weft-waypoint")
        .body(Empty::<Bytes>::new())
        .map_err(|_| bad_uri())?;
    let tcp = TcpStream::connect((bare_host.as_str(), port)).await?;
    let body = if https {
        let name = ServerName::try_from(bare_host).map_err(|e| FetchError::Tls(e.to_string()))?;
        let tls = TlsConnector::from(inner.tls()?)
            .connect(name, tcp)
            .await
            .map_err(|e| FetchError::Tls(e.to_string()))?;
        get(TokioIo::new(tls), request).await?
    } else {
        get(TokioIo::new(tcp), request).await?
    };
    let text = std::str::from_utf8(&body).map_err(|e| FetchError::Body(e.to_string()))?;
    KeySet::parse(text).map_err(FetchError::Keys)
}

async fn get<T>(io: TokioIo<T>, request: Request<Empty<Bytes>>) -> Result<Bytes, FetchError>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
    let connection = tokio::spawn(connection);
    let result = async {
        let response = sender.send_request(request).await?;
        if response.status() != StatusCode::OK {
            return Err(FetchError::Status(response.status()));
        }
        let body = Limited::new(response.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| FetchError::Body(e.to_string()))?;
        Ok(body.to_bytes())
    }
    .await;
    connection.abort();
    result
}

#[cfg(test)]
mod tests;
