//! The foundation demo: the controller (CA) as a process, two workloads' certificates from it,
//! and a TCP echo carried through an HBONE tunnel between them on loopback.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use weft_core::cert_manager::{CaClient, CertManager, CertificateSource, Token};
use weft_core::hbone::{
    ClientSettings, ConnectInfo, ConnectRequest, Inbound, Pool, Refusal, Server, ServerSettings,
};
use weft_core::tls::{WorkloadCertificate, DEFAULT_CERT_LIFETIME};
use weft_core::{drain, Identity};

const CLIENT: &str = "spiffe://cluster.local/ns/demo/sa/sleep";
const SERVER: &str = "spiffe://cluster.local/ns/demo/sa/echo";
const MESSAGE: &[u8] = b"hello through HBONE";

pub async fn run(bin_dir: Option<PathBuf>) -> anyhow::Result<()> {
    let client_id: Identity = CLIENT.parse()?;
    let server_id: Identity = SERVER.parse()?;
    let state = tempfile::tempdir()?;

    println!("Weft foundation demo");
    let ca = start_controller(bin_dir, &state.path().join("ca")).await?;
    println!("  controller (CA) pid {} listening on {}", ca.child.id().unwrap_or_default(), ca.addr);
    println!("  root written to {} (mode 0600)", state.path().join("ca/root-key.pem").display());

    let endpoint = format!("http://{}", ca.addr);
    let node_a = CertManager::new(CaClient::new(
        &endpoint,
        Token::Static("token-node-a".into()),
        DEFAULT_CERT_LIFETIME,
    )?);
    let node_b = CertManager::new(CaClient::new(
        &endpoint,
        Token::Static("token-node-b".into()),
        DEFAULT_CERT_LIFETIME,
    )?);
    let client_cert = node_a.get(&client_id).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    let server_cert = node_b.get(&server_id).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    for (node, cert) in [("node-a", &client_cert), ("node-b", &server_cert)] {
        println!("  {node}: certificate for {} valid until {}", cert.identity(), httpdate(cert.not_after()));
    }

    // node-a's token may not obtain node-b's workload identity.
    let refused = CaClient::new(&endpoint, Token::Static("token-node-a".into()), DEFAULT_CERT_LIFETIME)?
        .fetch(&server_id)
        .await;
    match refused {
        Err(e) => println!("  node-a asking for {server_id}: refused ({e})"),
        Ok(_) => bail!("the CA signed an identity node-a may not hold"),
    }

    let echo = echo_server().await?;
    let inbound = Arc::new(DemoInbound { cert: server_cert.clone(), seen: Mutex::default() });
    let server =
        Server::new(TcpListener::bind("127.0.0.1:0").await?, ServerSettings::default(), inbound.clone());
    let hbone_addr = server.local_addr()?;
    let (stop, watch) = drain::channel();
    let serving = tokio::spawn(server.run(watch));
    println!("  HBONE server on {hbone_addr} presents {server_id}");

    let pool = Pool::new(ClientSettings::default());
    let mut stream = pool
        .connect(ConnectRequest {
            certificate: client_cert.clone(),
            expected: vec![server_id.clone()],
            source_ip: None,
            hbone_addr,
            authority: echo,
            forwarded_for: None,
            baggage: Some("k8s.namespace.name=demo,k8s.deployment.name=sleep".into()),
            traceparent: None,
        })
        .await?;
    stream.write_all(MESSAGE).await?;
    stream.shutdown().await?;
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).await?;
    if reply != MESSAGE {
        bail!("echo came back as {:?}", String::from_utf8_lossy(&reply));
    }
    let seen = inbound.seen.lock().map_err(|_| anyhow::anyhow!("lock poisoned"))?.clone();
    let Some(peer) = seen else { bail!("the server saw no CONNECT") };
    println!(
        "  client sent {:?} through CONNECT {} over mutual TLS 1.3",
        String::from_utf8_lossy(MESSAGE),
        peer
    );
    println!("    the server verified the client as  {}", client_cert.identity());
    println!("    the client verified the server as  {server_id}");
    println!("    echo came back: {:?}", String::from_utf8_lossy(&reply));

    drop(stream);
    stop.drain();
    let _ = tokio::time::timeout(Duration::from_secs(6), serving).await;
    ca.stop().await;
    println!("Demo finished.");
    Ok(())
}

struct Controller {
    child: tokio::process::Child,
    addr: SocketAddr,
}

impl Controller {
    async fn stop(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }
}

async fn start_controller(bin_dir: Option<PathBuf>, ca_dir: &std::path::Path) -> anyhow::Result<Controller> {
    let dir = match bin_dir {
        Some(dir) => dir,
        None => std::env::current_exe()?.parent().context("weft has no parent directory")?.to_path_buf(),
    };
    let binary = dir.join("controller");
    if !binary.exists() {
        bail!("{} not found; build it with `cargo build --release --workspace`", binary.display());
    }
    // A free loopback port for the controller.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let child = tokio::process::Command::new(&binary)
        .arg("--ca-dir")
        .arg(ca_dir)
        .arg("--listen")
        .arg(addr.to_string())
        .args([
            "--node-identity",
            &format!("node-a={CLIENT}"),
            "--node-identity",
            &format!("node-b={SERVER}"),
        ])
        .env("WEFT_NODE_TOKENS", "node-a=token-node-a,node-b=token-node-b")
        .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(addr).await.is_err() {
        if Instant::now() > deadline {
            bail!("controller did not listen on {addr} within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(Controller { child, addr })
}

/// Presents the echo workload's certificate and forwards each CONNECT to its authority.
struct DemoInbound {
    cert: Arc<WorkloadCertificate>,
    seen: Mutex<Option<String>>,
}

impl Inbound for DemoInbound {
    type Upstream = TcpStream;

    async fn tls_config(&self, _local: SocketAddr) -> Result<Arc<rustls::ServerConfig>, String> {
        Ok(self.cert.server_config())
    }

    async fn connect(&self, info: ConnectInfo) -> Result<TcpStream, Refusal> {
        if let Ok(mut seen) = self.seen.lock() {
            *seen = Some(format!("{} from {}", info.authority, info.peer_identity));
        }
        TcpStream::connect(info.authority).await.map_err(|e| Refusal::unavailable(e.to_string()))
    }
}

async fn echo_server() -> anyhow::Result<SocketAddr> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let (mut read, mut write) = stream.split();
                let _ = tokio::io::copy(&mut read, &mut write).await;
                let _ = write.shutdown().await;
            });
        }
    });
    Ok(addr)
}

fn httpdate(t: std::time::SystemTime) -> String {
    let secs = t.duration_since(std::time::SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    weft_core::tls::Timestamp(secs).to_string()
}
