//! The JWKS cache against a local HTTP server: first fetch, rotation, the unknown-`kid` refetch
//! and its rate limit, failures keeping the last good keys, and a server absent at start.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use jsonwebtoken::Algorithm;
use serde_json::json;
use tokio::net::TcpListener;

use super::*;
use crate::jwt::tests::{
    claims, jwk, jwks, proto_rule, request, sign, ISS_A, RSA1_JWK, RSA1_PRIVATE, RSA2_JWK, RSA2_PRIVATE,
};
use crate::jwt::{authenticate, JwtRule, Status};

/// A JWKS server: what it answers (status, body) can change; it counts requests.
#[derive(Clone)]
struct Server {
    answer: Arc<Mutex<(u16, String)>>,
    hits: Arc<AtomicUsize>,
}

impl Server {
    fn new(body: String) -> Self {
        Server { answer: Arc::new(Mutex::new((200, body))), hits: Arc::new(AtomicUsize::new(0)) }
    }

    fn set(&self, status: u16, body: String) {
        *self.answer.lock().expect("lock") = (status, body);
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    async fn serve(&self, listener: TcpListener) {
        let server = self.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                let server = server.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |_req| {
                        let server = server.clone();
                        async move {
                            server.hits.fetch_add(1, Ordering::SeqCst);
                            let (status, body) = server.answer.lock().expect("lock").clone();
                            let mut response = http::Response::new(Full::new(Bytes::from(body)));
                            *response.status_mut() = StatusCode::from_u16(status).expect("status");
                            Ok::<_, Infallible>(response)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
    }
}

fn rule(uri: &str) -> JwtRule {
    let mut r = proto_rule(ISS_A);
    r.jwks_uri = uri.to_string();
    r.timeout = Some(prost_types::Duration { seconds: 1, nanos: 0 });
    JwtRule::try_from(&r).expect("rule")
}

fn token(private: &str, kid: &str) -> String {
    let mut c = claims(ISS_A);
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
    c["exp"] = json!(now + 600);
    c["iat"] = json!(now);
    sign(Algorithm::RS256, private, Some(kid), &c)
}

async fn auth(jwks: &Jwks, rule: &JwtRule, token: &str) -> Result<bool, Status> {
    let mut parts = request("/", &[("authorization", &format!("Bearer {token}"))]);
    authenticate(&[rule], jwks, &mut parts).await.map(|a| a.is_some()).map_err(|r| r.code)
}

/// Polls `cond` every 20 ms for up to 5 s.
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    for _ in 0..250 {
        if cond() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for {what}");
}

async fn started(body: String) -> (Server, String) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let uri = format!("http://{}/jwks", listener.local_addr().expect("addr"));
    let server = Server::new(body);
    server.serve(listener).await;
    (server, uri)
}

#[tokio::test]
async fn rotation_by_refresh() {
    let (server, uri) = started(jwks(&[jwk(RSA1_JWK, "r1", None)])).await;
    let cache = Jwks::with_timing(Duration::from_millis(150), Duration::from_millis(50));
    let rule = rule(&uri);
    cache.ensure(&uri, rule.timeout);
    eventually("first fetch", || cache.cached(&uri).is_some()).await;
    assert_eq!(auth(&cache, &rule, &token(RSA1_PRIVATE, "r1")).await, Ok(true));

    // r2 added: picked up by the interval refresh, no request needed.
    server.set(200, jwks(&[jwk(RSA1_JWK, "r1", None), jwk(RSA2_JWK, "r2", None)]));
    eventually("r2 added", || cache.cached(&uri).is_some_and(|k| k.len() == 2)).await;
    assert_eq!(auth(&cache, &rule, &token(RSA2_PRIVATE, "r2")).await, Ok(true));

    // r1 removed: refused after the refresh.
    server.set(200, jwks(&[jwk(RSA2_JWK, "r2", None)]));
    eventually("r1 removed", || cache.cached(&uri).is_some_and(|k| k.kids() == vec![Some("r2")])).await;
    assert_eq!(auth(&cache, &rule, &token(RSA1_PRIVATE, "r1")).await, Err(Status::JwksKidAlgMismatch));
    assert_eq!(auth(&cache, &rule, &token(RSA2_PRIVATE, "r2")).await, Ok(true));
}

#[tokio::test]
async fn unknown_kid_refetches_once() {
    let (server, uri) = started(jwks(&[jwk(RSA1_JWK, "r1", None)])).await;
    let cache = Jwks::with_timing(Duration::from_secs(3600), Duration::from_millis(300));
    let rule = rule(&uri);
    cache.ensure(&uri, rule.timeout);
    eventually("first fetch", || cache.cached(&uri).is_some()).await;
    assert_eq!(server.hits(), 1);
    server.set(200, jwks(&[jwk(RSA1_JWK, "r1", None), jwk(RSA2_JWK, "r2", None)]));

    // Inside the gap: no refetch, the new kid is unknown.
    assert_eq!(auth(&cache, &rule, &token(RSA2_PRIVATE, "r2")).await, Err(Status::JwksKidAlgMismatch));
    assert_eq!(server.hits(), 1);

    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(auth(&cache, &rule, &token(RSA2_PRIVATE, "r2")).await, Ok(true));
    assert_eq!(server.hits(), 2, "one refetch for the unknown kid");
    // A kid nobody has, right after: rate-limited, refused without another fetch.
    assert_eq!(auth(&cache, &rule, &token(RSA2_PRIVATE, "zz")).await, Err(Status::JwksKidAlgMismatch));
    // Known kids never fetch.
    assert_eq!(auth(&cache, &rule, &token(RSA1_PRIVATE, "r1")).await, Ok(true));
    assert_eq!(server.hits(), 2);
}

#[tokio::test]
async fn failures_keep_the_last_good_keys() {
    let (server, uri) = started(jwks(&[jwk(RSA1_JWK, "r1", None)])).await;
    let cache = Jwks::with_timing(Duration::from_secs(3600), Duration::ZERO);
    let rule = rule(&uri);
    cache.ensure(&uri, rule.timeout);
    eventually("first fetch", || cache.cached(&uri).is_some()).await;
    let big = format!("{{\"keys\": [], \"pad\": \"{}\"}}", "x".repeat(MAX_JWKS_BYTES + 10));
    for (status, body) in [(500, jwks(&[])), (200, "not json".to_string()), (200, jwks(&[])), (200, big)] {
        server.set(status, body);
        let before = server.hits();
        let keys = cache.refetch(&uri, Duration::from_secs(1)).await;
        assert_eq!(server.hits(), before + 1, "{status}");
        assert_eq!(keys.map(|k| k.len()), Some(1), "{status}: last good keys kept");
        assert_eq!(auth(&cache, &rule, &token(RSA1_PRIVATE, "r1")).await, Ok(true));
    }
}

#[tokio::test]
async fn absent_server_fails_closed_then_recovers() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let uri = format!("http://{addr}/jwks");
    let cache = Jwks::with_timing(Duration::from_secs(3600), Duration::from_millis(100));
    let rule = rule(&uri);
    cache.ensure(&uri, rule.timeout);
    assert_eq!(auth(&cache, &rule, &token(RSA1_PRIVATE, "r1")).await, Err(Status::JwksFetchFail));
    let mut parts = request("/", &[]);
    assert_eq!(authenticate(&[&rule], &cache, &mut parts).await, Ok(None), "no token passes");

    let server = Server::new(jwks(&[jwk(RSA1_JWK, "r1", None)]));
    server.serve(TcpListener::bind(addr).await.expect("rebind")).await;
    eventually("the retry after a failure", || cache.cached(&uri).is_some()).await;
    assert_eq!(auth(&cache, &rule, &token(RSA1_PRIVATE, "r1")).await, Ok(true));
}

#[tokio::test]
async fn silent_server_times_out() {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let uri = format!("http://{}/jwks", listener.local_addr().expect("addr"));
    // Accepts and never answers.
    let _held = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let cache = Jwks::with_timing(Duration::from_secs(3600), Duration::ZERO);
    let start = Instant::now();
    assert!(cache.refetch(&uri, Duration::from_millis(200)).await.is_none());
    assert!(start.elapsed() < Duration::from_secs(2));
    let rule = rule(&uri);
    assert_eq!(auth(&cache, &rule, &token(RSA1_PRIVATE, "r1")).await, Err(Status::JwksFetchFail));
}

#[tokio::test]
async fn https_to_a_plain_server_fails() {
    let (_server, uri) = started(jwks(&[jwk(RSA1_JWK, "r1", None)])).await;
    let https = uri.replace("http://", "https://");
    let cache = Jwks::new();
    let err = fetch(&https, &cache.inner).await.map(|k| k.len()).expect_err("not TLS");
    assert!(matches!(err, FetchError::Tls(_)), "{err}");
    assert!(matches!(fetch("ftp://x/", &cache.inner).await, Err(FetchError::Uri(_))));
}
