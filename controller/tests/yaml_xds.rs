//! The whole controller in-process with a watched config directory: YAML files written, edited
//! and deleted reach a real delta ADS client (as Istio's ztunnel connects) as workload upserts and
//! removals, over the same port the CA serves on.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use prost::Message;
use tokio::sync::oneshot;
use weft_core::proto::istio::workload::{address, Address, TunnelProtocol, Workload};

use controller::config::Config;
use controller::translate::DEFAULT_CLUSTER_ID;
use controller::Controller;

mod support;
use support::Ads;

/// Every wait is bounded by this.
const WAIT: Duration = Duration::from_secs(5);
const ZTUNNEL: &str = "ztunnel~10.0.0.1~ztunnel-a.weft-system~weft-system.svc.cluster.local";

const AMBIENT_NS: &str =
    "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}\n";
const PLAIN_NS: &str = "apiVersion: v1\nkind: Namespace\nmetadata: {name: shop}\n";
const POD: &str = "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop}\nspec: {nodeName: node-a, serviceAccountName: web}\nstatus: {podIP: 10.0.1.5, phase: Running}\n";

/// Waits on `ads` for the workload `uid`, sent with the tunnel protocol `want`.
async fn workload(ads: &mut Ads, uid: &str, want: TunnelProtocol) -> anyhow::Result<Workload> {
    ads.until(&format!("{uid} as {want:?}"), WAIT, |response| {
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
        node_tokens: [("t0ken-a".to_owned(), "node-a".to_owned())].into(),
        ..Config::default()
    };
    let controller = Controller::bind(&config).await?;
    let xds = controller.xds().context("a config dir means xDS is served")?.clone();
    let endpoint = format!("http://{}", controller.local_addr());
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(controller.run(async {
        let _ = stopped.await;
    }));

    // Like the CA, xDS wants the node's token, and for its own node only.
    for (token, node, why) in [
        (None, "node-a", "xDS needs the node's token"),
        (Some("t0ken-a"), "node-b", "but the stream's NODE_NAME is"),
    ] {
        let refusal = Ads::refusal(endpoint.clone(), ZTUNNEL, node, token, WAIT).await;
        anyhow::ensure!(refusal.contains(why), "{refusal}");
    }
    let mut ads = Ads::subscribe(endpoint, ZTUNNEL, "node-a", Some("t0ken-a")).await?;
    let uid = format!("{DEFAULT_CLUSTER_ID}//Pod/shop/web");

    write(&config_dir, "shop.yaml", &format!("{AMBIENT_NS}---\n{POD}"))?;
    let web = workload(&mut ads, &uid, TunnelProtocol::Hbone).await?;
    assert_eq!((web.node.as_str(), web.service_account.as_str()), ("node-a", "web"));
    assert_eq!(web.addresses, [vec![10, 0, 1, 5]]);
    assert_eq!(xds.clients().len(), 1, "the ztunnel is connected");

    write(&config_dir, "shop.yaml", &format!("{PLAIN_NS}---\n{POD}"))?;
    workload(&mut ads, &uid, TunnelProtocol::None).await?;

    std::fs::remove_file(config_dir.join("shop.yaml"))?;
    ads.until("the workload's removal", WAIT, |r| r.removed_resources.contains(&uid).then_some(())).await?;

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
