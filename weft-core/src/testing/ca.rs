//! A fake Istio CA for proxy tests: `IstioCertificateService/CreateCertificate` over real gRPC,
//! signing every well-formed CSR with a [`TestCa`] root and counting the calls. No caller is
//! authenticated: the controller's CA (and its tests) own that.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

use super::TestCa;
use crate::proto::ca::istio_certificate_service_server::{
    IstioCertificateService, IstioCertificateServiceServer,
};
use crate::proto::ca::{IstioCertificateRequest, IstioCertificateResponse};

/// The running CA.
pub struct FakeCa {
    pub addr: SocketAddr,
    pub ca: Arc<TestCa>,
    /// CreateCertificate calls answered.
    pub signed: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

struct Service {
    ca: Arc<TestCa>,
    signed: Arc<AtomicUsize>,
}

impl FakeCa {
    /// Serves on a fresh loopback port with a new root.
    pub async fn start() -> FakeCa {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind loopback");
        let addr = listener.local_addr().expect("bound address");
        let ca = Arc::new(TestCa::new());
        let signed = Arc::new(AtomicUsize::new(0));
        let service =
            IstioCertificateServiceServer::new(Service { ca: Arc::clone(&ca), signed: Arc::clone(&signed) });
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await;
        });
        FakeCa { addr, ca, signed, task }
    }

    /// `http://<addr>`, the client's endpoint.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn signed(&self) -> usize {
        self.signed.load(Ordering::SeqCst)
    }
}

impl Drop for FakeCa {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[tonic::async_trait]
impl IstioCertificateService for Service {
    async fn create_certificate(
        &self,
        request: Request<IstioCertificateRequest>,
    ) -> Result<Response<IstioCertificateResponse>, Status> {
        let request = request.into_inner();
        let csr = self.ca.ca.check_csr(&request.csr).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let lifetime = match request.validity_duration {
            secs if secs > 0 => Duration::from_secs(secs.unsigned_abs()),
            _ => Duration::from_secs(3600),
        };
        let cert_chain = self.ca.ca.sign(&csr, lifetime).map_err(|e| Status::internal(e.to_string()))?;
        self.signed.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(IstioCertificateResponse { cert_chain }))
    }
}
