//! The whole controller in-process with a watched config directory: YAML files written, edited
//! and deleted reach a real delta ADS client (as Istio's ztunnel connects) as workload upserts and
//! removals, over the same port the CA serves on.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use prost::Message;
use prost_types::value::Kind;
use prost_types::{Struct, Value};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Streaming;
use weft_core::proto::envoy::config::core::v3::Node;
use weft_core::proto::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use weft_core::proto::envoy::service::discovery::v3::{DeltaDiscoveryRequest, DeltaDiscoveryResponse};
use weft_core::proto::istio::workload::{address, Address, TunnelProtocol, Workload};

use controller::config::Config;
use controller::translate::DEFAULT_CLUSTER_ID;
use controller::xds::ADDRESS_TYPE_URL;
use controller::Controller;

/// Every wait is bounded by this.
const WAIT: Duration = Duration::from_secs(5);
const ZTUNNEL: &str = "ztunnel~10.0.0.1~ztunnel-a.weft-system~weft-system.svc.cluster.local";

const AMBIENT_NS: &str =
    "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n";
const PLAIN_NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n";
const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop}\nspec: {nodeName: node-a, serviceAccountName: web}\nstatus: {podIP: 10.0.1.5, phase: Running}\n";

/// One delta ADS stream, client side; every response is ACKed as it is read.
struct Ads {
    tx: mpsc::Sender<DeltaDiscoveryRequest>,
    responses: Streaming<DeltaDiscoveryResponse>,
}

impl Ads {
    async fn subscribe(endpoint: String) -> anyhow::Result<Ads> {
        let channel = Channel::from_shared(endpoint)?.connect().await?;
        let mut client = AggregatedDiscoveryServiceClient::new(channel);
        let string = |s: &str| Value { kind: Some(Kind::StringValue(s.to_owned())) };
        let node = Node {
            id: ZTUNNEL.to_owned(),
            metadata: Some(Struct { fields: BTreeMap::from([("NODE_NAME".to_owned(), string("node-a"))]) }),
            ..Default::default()
        };
        let (tx, rx) = mpsc::channel(16);
        tx.send(DeltaDiscoveryRequest {
            node: Some(node),
            type_url: ADDRESS_TYPE_URL.to_owned(),
            ..Default::default()
        })
        .await?;
        let responses = client.delta_aggregated_resources(ReceiverStream::new(rx)).await?.into_inner();
        Ok(Ads { tx, responses })
    }

    /// Reads (and ACKs) responses until one satisfies `check`, for at most [`WAIT`].
    async fn until<T>(
        &mut self,
        what: &str,
        mut check: impl FnMut(&DeltaDiscoveryResponse) -> Option<T>,
    ) -> anyhow::Result<T> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let response = tokio::time::timeout_at(deadline, self.responses.message())
                .await
                .with_context(|| format!("no response with {what} within {WAIT:?}"))??
                .context("stream ended")?;
            self.tx
                .send(DeltaDiscoveryRequest {
                    type_url: response.type_url.clone(),
                    response_nonce: response.nonce.clone(),
                    ..Default::default()
                })
                .await?;
            if let Some(found) = check(&response) {
                return Ok(found);
            }
        }
    }

    /// Waits for the workload `uid`, sent with the tunnel protocol `want`.
    async fn workload(&mut self, uid: &str, want: TunnelProtocol) -> anyhow::Result<Workload> {
        self.until(&format!("{uid} as {want:?}"), |response| {
            response.resources.iter().filter(|r| r.name == uid).find_map(|r| {
                let body = r.resource.as_ref()?;
                match Address::decode(body.value.as_slice()).ok()?.r#type? {
                    address::Type::Workload(w) if w.tunnel_protocol == want as i32 => Some(w),
                    _ => None,
                }
            })
        })
        .await
    }
}

fn write(dir: &Path, name: &str, text: &str) -> anyhow::Result<()> {
    std::fs::write(dir.join(name), text).with_context(|| format!("writing {name}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn yaml_edits_reach_a_ztunnel_as_workload_updates() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let config_dir = tmp.path().join("config");
    std::fs::create_dir(&config_dir)?;
    let config = Config {
        ca_dir: tmp.path().join("ca"),
        listen: "127.0.0.1:0".parse()?,
        config_dir: Some(config_dir.clone()),
        ..Config::default()
    };
    let controller = Controller::bind(&config).await?;
    let xds = controller.xds().context("a config dir means xDS is served")?.clone();
    let endpoint = format!("http://{}", controller.local_addr());
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(controller.run(async {
        let _ = stopped.await;
    }));

    let mut ads = Ads::subscribe(endpoint).await?;
    let uid = format!("{DEFAULT_CLUSTER_ID}//Pod/shop/web");

    write(&config_dir, "shop.yaml", &format!("{AMBIENT_NS}---\n{POD}"))?;
    let web = ads.workload(&uid, TunnelProtocol::Hbone).await?;
    assert_eq!((web.node.as_str(), web.service_account.as_str()), ("node-a", "web"));
    assert_eq!(web.addresses, [vec![10, 0, 1, 5]]);
    assert_eq!(xds.clients().len(), 1, "the ztunnel is connected");

    write(&config_dir, "shop.yaml", &format!("{PLAIN_NS}---\n{POD}"))?;
    ads.workload(&uid, TunnelProtocol::None).await?;

    std::fs::remove_file(config_dir.join("shop.yaml"))?;
    ads.until("the workload's removal", |r| r.removed_resources.contains(&uid).then_some(())).await?;

    let _ = stop.send(());
    tokio::time::timeout(WAIT, task).await.context("controller did not stop")???;
    Ok(())
}

#[tokio::test]
async fn a_missing_config_dir_is_reported_before_serving() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let config = Config {
        ca_dir: tmp.path().join("ca"),
        listen: "127.0.0.1:0".parse()?,
        config_dir: Some(tmp.path().join("absent")),
        ..Config::default()
    };
    let Err(err) = Controller::bind(&config).await else { anyhow::bail!("bound without its config dir") };
    assert!(err.to_string().contains("absent"), "{err}");
    Ok(())
}
