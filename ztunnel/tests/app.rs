//! The whole ztunnel run in-process from its `Config` (`ztunnel::app`), against a fake delta ADS
//! server and a fake CA on real ports: not ready until the controller's resources and the local
//! pod's certificate are in, then ready; the admin endpoints serve the config (without the
//! token) and `/quitquitquit` ends it.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use weft_core::cert_manager::Token;
use weft_core::control::ControlPlane;
use weft_core::proto::istio::security::Authorization;
use weft_core::proto::istio::workload::{address, Address};
use weft_core::proto::{ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL};
use weft_core::testing::ads::{response, FakeAds};
use weft_core::testing::ca::FakeCa;
use weft_core::testing::resources::workload;
use ztunnel::app::App;
use ztunnel::config::Config;

/// `GET`/`POST` `path` on `addr`: the status line and body.
fn http(addr: SocketAddr, method: &str, path: &str) -> String {
    let mut tcp = std::net::TcpStream::connect(addr).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(tcp, "{method} {path} HTTP/1.1\r\nHost: ztunnel\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    tcp.read_to_string(&mut out).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_in_process_becomes_ready_and_quits() {
    let mut ads = FakeAds::start().await;
    let ca = FakeCa::start().await;
    let mut config = Config::local("node-a", &ControlPlane::plaintext(&ads.endpoint()).unwrap());
    config.ca = ControlPlane::plaintext(&ca.endpoint()).unwrap();
    config.token = Token::Static("s3cret".into());
    let log = weft_core::telemetry::init_tracing(weft_core::telemetry::LogFormat::Plain, "info");
    let app = App::start(config, log).await.unwrap();
    let admin = app.admin;

    let r =
        tokio::task::spawn_blocking(move || http(admin.readiness, "GET", "/healthz/ready")).await.unwrap();
    assert!(r.starts_with("HTTP/1.1 503") && r.contains("xds: nothing received yet"), "{r}");

    let stream = ads.next_stream().await;
    let pod = workload("shop", "web", "10.0.1.5");
    let pod = (pod.uid.clone(), "1".to_owned(), Address { r#type: Some(address::Type::Workload(pod)) });
    stream.respond(response(ADDRESS_TYPE_URL, "1", vec![pod], &[]));
    stream.respond(response::<Authorization>(AUTHORIZATION_TYPE_URL, "2", vec![], &[]));

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = tokio::task::spawn_blocking(move || http(admin.readiness, "GET", "/healthz/ready"))
            .await
            .unwrap();
        if r.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(Instant::now() < deadline, "never ready: {r}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ca.signed(), 1, "the local pod's certificate came from the CA");

    let dump = tokio::task::spawn_blocking(move || http(admin.admin, "GET", "/config_dump")).await.unwrap();
    assert!(
        dump.contains("Kubernetes//Pod/shop/web") && dump.contains("spiffe://cluster.local/ns/shop/sa/web"),
        "{dump}"
    );
    assert!(dump.contains("\"node_name\": \"node-a\"") && !dump.contains("s3cret"), "{dump}");

    let r = tokio::task::spawn_blocking(move || http(admin.admin, "POST", "/quitquitquit")).await.unwrap();
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let mut quit = app.quit.clone();
    tokio::time::timeout(Duration::from_secs(5), quit.wait_for(|q| *q)).await.unwrap().unwrap();
    app.shutdown().await;
}
