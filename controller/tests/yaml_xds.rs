//! The whole controller in-process with a watched config directory: YAML files written, edited
//! and deleted reach a real delta ADS client (as Istio's ztunnel connects) as workload upserts and
//! removals, over the same port the CA serves on; a waypoint's `Waypoint` resource reaches that
//! waypoint, and no ztunnel; with `--waypoint-tokens-dir`, a waypoint's token gets it its own
//! identity and resource only, and a ztunnel's token neither.

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use prost::Message;
use tokio::sync::oneshot;
use weft_core::control::ControlPlane;
use weft_core::proto::envoy::service::discovery::v3::Resource;
use weft_core::proto::istio::workload::{address, Address, TunnelProtocol, Workload};
use weft_core::proto::weft::waypoint::v1::Waypoint;

use controller::config::{Args, Config};
use controller::translate::DEFAULT_CLUSTER_ID;
use controller::xds::{XdsOptions, ADDRESS_TYPE_URL, NODE_NAME_KEY, WAYPOINT_NAME_KEY, WAYPOINT_TYPE_URL};
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

/// A waypoint pod of the Gateway `shop/waypoint`, as Istio's waypoints name themselves.
const WAYPOINT: &str = "waypoint~10.0.1.9~waypoint-5d8f7c-x2k.shop~shop.svc.cluster.local";
/// The namespace `shop`, its waypoint (an `istio-waypoint` Gateway) and the Service `reviews`
/// bound to it by its own label.
const SHOP_WITH_WAYPOINT: &str = "\
apiVersion: v1
kind: Namespace
metadata: {name: shop, labels: {istio.io/dataplane-mode: ambient}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: shop}
spec: {gatewayClassName: istio-waypoint, listeners: [{name: mesh, port: 15008, protocol: HBONE}]}
---
apiVersion: v1
kind: Service
metadata: {name: reviews, namespace: shop, labels: {istio.io/use-waypoint: waypoint}}
spec: {clusterIP: 10.96.0.20, selector: {app: reviews}, ports: [{port: 9080}]}
";
/// A second Service bound to the same waypoint.
const RATINGS: &str = "\
apiVersion: v1
kind: Service
metadata: {name: ratings, namespace: shop, labels: {istio.io/use-waypoint: waypoint}}
spec: {clusterIP: 10.96.0.21, selector: {app: ratings}, ports: [{port: 9080}]}
";

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

fn names(resources: &[Resource]) -> Vec<&str> {
    resources.iter().map(|r| r.name.as_str()).collect()
}

/// Waits on `ads` for the Waypoint `name` whose bound services have exactly the `hostnames`
/// (sorted).
async fn waypoint(ads: &mut Ads, name: &str, hostnames: &[&str]) -> anyhow::Result<Waypoint> {
    ads.until(&format!("Waypoint {name} for {hostnames:?}"), WAIT, |response| {
        if response.type_url != WAYPOINT_TYPE_URL {
            return None;
        }
        response.resources.iter().filter(|r| r.name == name).find_map(|r| {
            let body = r.resource.as_ref().filter(|b| b.type_url == WAYPOINT_TYPE_URL)?;
            let waypoint = Waypoint::decode(body.value.as_slice()).ok()?;
            let mut bound: Vec<&str> = waypoint.services.iter().map(|s| s.hostname.as_str()).collect();
            bound.sort_unstable();
            (bound == hostnames).then_some(waypoint)
        })
    })
    .await
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waypoint_subscribes_to_its_own_waypoint_resource_and_a_ztunnel_gets_none() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let config_dir = tmp.path().join("config");
    std::fs::create_dir(&config_dir)?;
    write(&config_dir, "shop.yaml", SHOP_WITH_WAYPOINT)?;
    // Started as `controller --config-dir DIR` is: the binary's flags, its defaults (no
    // --node-token: xDS unauthenticated; plaintext on loopback) and its code path, so the xDS options are the defaults.
    let args: [OsString; 8] = [
        "controller".into(),
        "--config-dir".into(),
        config_dir.clone().into(),
        "--ca-dir".into(),
        tmp.path().join("ca").into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--plaintext".into(),
    ];
    let config = Config::from_args(Args::try_parse_from(args)?)?;
    let controller = Controller::bind(&config).await?;
    let xds = controller.xds().context("a config dir means xDS is served")?.clone();
    assert_eq!(xds.options(), &XdsOptions::default());
    let endpoint = format!("http://{}", controller.local_addr());
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(controller.run(async {
        let _ = stopped.await;
    }));

    // The waypoint opens its stream with the Waypoint type (the first request: a type not served
    // would close the stream) and is sent its own resource, as translated from the YAML.
    let waypoint_metadata = [(NODE_NAME_KEY, "node-a"), (WAYPOINT_NAME_KEY, "waypoint")];
    let mut wp = Ads::open(endpoint.clone(), WAYPOINT, &waypoint_metadata, WAYPOINT_TYPE_URL, None).await?;
    let own = waypoint(&mut wp, "shop/waypoint", &["reviews.shop.svc.cluster.local"]).await?;
    assert_eq!((own.name.as_str(), own.namespace.as_str()), ("waypoint", "shop"));
    assert_eq!(own.identity, "spiffe://cluster.local/ns/shop/sa/waypoint");
    assert_eq!(own.services[0].ports, [9080]);
    assert_eq!(xds.snapshot().resources(WAYPOINT_TYPE_URL).count(), 1);

    // A ztunnel may subscribe to the type too, but holds no waypoint's resource: its first answer
    // is empty although the snapshot has one.
    let mut ztunnel =
        Ads::open(endpoint, ZTUNNEL, &[(NODE_NAME_KEY, "node-a")], WAYPOINT_TYPE_URL, None).await?;
    let first = ztunnel.until("the answer to the subscription", WAIT, |r| Some(r.clone())).await?;
    assert_eq!(first.type_url, WAYPOINT_TYPE_URL);
    assert!(first.resources.is_empty(), "a ztunnel was sent {:?}", names(&first.resources));
    ztunnel.also(ADDRESS_TYPE_URL).await?;

    // An edit reaches the waypoint as its updated resource, and the ztunnel as an Address only.
    write(&config_dir, "ratings.yaml", RATINGS)?;
    let hosts = ["ratings.shop.svc.cluster.local", "reviews.shop.svc.cluster.local"];
    waypoint(&mut wp, "shop/waypoint", &hosts).await?;
    let ratings = "shop/ratings.shop.svc.cluster.local";
    ztunnel
        .until("the ratings Service", WAIT, |r| r.resources.iter().any(|r| r.name == ratings).then_some(()))
        .await?;
    // The server pushes every type of a stream before it reads the ACK that follows: once the
    // ztunnel's ACK of the ratings Address is recorded, any Waypoint push of that update went out.
    let deadline = tokio::time::Instant::now() + WAIT;
    let waypoint_type = loop {
        let status = xds.clients().into_iter().find(|c| c.node.id == ZTUNNEL).context("ztunnel gone")?;
        if status.types.get(ADDRESS_TYPE_URL).is_some_and(|t| t.acked.contains_key(ratings)) {
            break status.types.get(WAYPOINT_TYPE_URL).cloned().context("no Waypoint subscription")?;
        }
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "the ztunnel's ACK of {ratings} never came");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(waypoint_type.wildcard);
    assert_eq!(waypoint_type.responses, 1, "only the empty answer to the subscription");
    assert!(waypoint_type.acked.is_empty(), "the ztunnel holds {:?}", waypoint_type.acked);

    let _ = stop.send(());
    tokio::time::timeout(WAIT, task).await.context("controller did not stop")???;
    Ok(())
}

/// The namespace `shop`, its waypoint `waypoint` and that waypoint's pod on node-a (labelled as
/// Istio labels waypoint pods), the pod `web` on node-a, and the Service `reviews` bound to the
/// waypoint.
const SHOP_WITH_WAYPOINT_POD: &str = "\
apiVersion: v1
kind: Pod
metadata:
  name: waypoint-5d8f7c-x2k
  namespace: shop
  labels: {gateway.networking.k8s.io/gateway-name: waypoint, istio.io/dataplane-mode: none}
spec: {nodeName: node-a, serviceAccountName: waypoint}
status: {podIP: 10.0.1.9, phase: Running}
";

/// A refusal's gRPC code and message (a certificate is a failure of the test).
async fn ca_refusal(
    client: &weft_core::cert_manager::CaClient,
    identity: &weft_core::Identity,
) -> anyhow::Result<(tonic::Code, String)> {
    use weft_core::cert_manager::{CertificateSource, FetchError};
    match client.fetch(identity).await {
        Err(FetchError::Refused { code, message, .. }) => Ok((code, message)),
        Err(other) => anyhow::bail!("expected a refusal for {identity}, got {other}"),
        Ok(_) => anyhow::bail!("the CA signed {identity}, which it must refuse"),
    }
}

/// Locally (`--waypoint-tokens-dir`), a waypoint's token file, written while the controller runs,
/// gets that waypoint its own identity from the CA and its own Waypoint resource over xDS, and
/// nothing else; the ztunnel of the waypoint pod's node gets neither; a removed file revokes the
/// token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waypoint_token_gets_only_its_own_identity_and_resource() -> anyhow::Result<()> {
    use weft_core::cert_manager::{CaClient, CertificateSource, Token};
    use weft_core::Identity;

    let tmp = tempfile::tempdir()?;
    let config_dir = tmp.path().join("config");
    std::fs::create_dir(&config_dir)?;
    write(&config_dir, "shop.yaml", &format!("{SHOP_WITH_WAYPOINT}---\n{POD}---\n{SHOP_WITH_WAYPOINT_POD}"))?;
    let tokens_dir = tmp.path().join("waypoint-tokens");
    // Through the binary's flags and environment, as `weft up` starts it.
    let args: [OsString; 10] = [
        "controller".into(),
        "--config-dir".into(),
        config_dir.clone().into(),
        "--ca-dir".into(),
        tmp.path().join("ca").into(),
        "--listen".into(),
        "127.0.0.1:0".into(),
        "--plaintext".into(),
        "--waypoint-tokens-dir".into(),
        tokens_dir.clone().into(),
    ];
    let mut config = Config::from_args(Args::try_parse_from(args)?)?;
    config.node_tokens = [("t0ken-a".to_owned(), "node-a".to_owned())].into();
    let controller = Controller::bind(&config).await?;
    let endpoint = format!("http://{}", controller.local_addr());
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(controller.run(async {
        let _ = stopped.await;
    }));

    let own = Identity::new("cluster.local", "shop", "waypoint")?;
    let web = Identity::new("cluster.local", "shop", "web")?;
    let ca = |token: &str| {
        CaClient::new(
            &ControlPlane::plaintext(&endpoint).unwrap(),
            Token::Static(token.to_owned()),
            Duration::from_secs(3600),
        )
    };
    let wp_ca = ca("wp-secret");
    let node_ca = ca("t0ken-a");

    // The ztunnel of node-a gets web's identity (once the model has the pod), never the
    // waypoint's, although the waypoint pod runs on node-a.
    let deadline = tokio::time::Instant::now() + WAIT;
    while node_ca.fetch(&web).await.is_err() {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "node-a never got web's certificate");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, message) = ca_refusal(&node_ca, &own).await?;
    assert_eq!(code, tonic::Code::PermissionDenied, "{message}");
    assert!(
        message.contains("node node-a may not hold identity spiffe://cluster.local/ns/shop/sa/waypoint"),
        "{message}"
    );

    // No file yet: the waypoint's token is unknown. Written while the controller runs, it is
    // picked up at the next request.
    let (code, message) = ca_refusal(&wp_ca, &own).await?;
    assert_eq!(code, tonic::Code::Unauthenticated, "{message}");
    std::fs::create_dir_all(tokens_dir.join("shop"))?;
    std::fs::write(tokens_dir.join("shop/waypoint"), "wp-secret\n")?;
    let cert = wp_ca.fetch(&own).await.context("the waypoint's own certificate")?;
    assert_eq!(cert.identity(), &own);
    let (code, message) = ca_refusal(&wp_ca, &web).await?;
    assert_eq!(code, tonic::Code::PermissionDenied, "{message}");
    assert!(message.contains("waypoint shop/waypoint may hold only its own identity"), "{message}");
    for other in [
        Identity::new("cluster.local", "infra", "waypoint")?,
        Identity::new("cluster.local", "shop", "other")?,
    ] {
        let (code, _) = ca_refusal(&wp_ca, &other).await?;
        assert_eq!(code, tonic::Code::PermissionDenied, "{other}");
    }

    // xDS: the waypoint subscribes as itself and gets its own resource.
    let waypoint_metadata = [(NODE_NAME_KEY, "node-a"), (WAYPOINT_NAME_KEY, "waypoint")];
    let mut wp =
        Ads::open(endpoint.clone(), WAYPOINT, &waypoint_metadata, WAYPOINT_TYPE_URL, Some("wp-secret"))
            .await?;
    let resource = waypoint(&mut wp, "shop/waypoint", &["reviews.shop.svc.cluster.local"]).await?;
    assert_eq!(resource.identity, own.to_string());
    wp.also(ADDRESS_TYPE_URL).await?;
    let uid = format!("{DEFAULT_CLUSTER_ID}//Pod/shop/web");
    workload(&mut wp, &uid, TunnelProtocol::Hbone).await?;

    // ... and only as itself; a ztunnel's token never as a waypoint. (The refusal shows the
    // status message with its quotes escaped.)
    let other_ns = "waypoint~10.0.1.9~waypoint-5d8f7c-x2k.infra~infra.svc.cluster.local";
    // (node id, metadata, token, a fragment of the refusal)
    type Refusal<'a> = (&'a str, &'a [(&'a str, &'a str)], Option<&'a str>, &'a str);
    let refusals: [Refusal<'_>; 5] = [
        (
            WAYPOINT,
            &[(WAYPOINT_NAME_KEY, "other")],
            Some("wp-secret"),
            "but the stream's WAYPOINT_NAME is \\\"other",
        ),
        (other_ns, &[(WAYPOINT_NAME_KEY, "waypoint")], Some("wp-secret"), "puts it in namespace \\\"infra"),
        (
            WAYPOINT,
            &[(NODE_NAME_KEY, "node-a")],
            Some("wp-secret"),
            "but the stream's WAYPOINT_NAME is \\\"\\\"",
        ),
        (WAYPOINT, &waypoint_metadata, Some("t0ken-a"), "only that waypoint's own token may"),
        (WAYPOINT, &waypoint_metadata, Some("not-a-token"), "unknown token"),
    ];
    for (node_id, metadata, token, why) in refusals {
        let refusal = match Ads::open(endpoint.clone(), node_id, metadata, WAYPOINT_TYPE_URL, token).await {
            Err(e) => format!("{e:#}"),
            Ok(mut ads) => match ads.until("a refusal", WAIT, |_| Some(())).await {
                Err(e) => format!("{e:#}"),
                Ok(()) => anyhow::bail!("{node_id} {metadata:?} with {token:?} was served"),
            },
        };
        anyhow::ensure!(refusal.contains(why), "{node_id} {metadata:?}: wanted {why:?} in {refusal}");
    }
    // The ztunnel subscribes to the type as itself and is sent no Waypoint.
    let mut ztunnel = Ads::open(
        endpoint.clone(),
        ZTUNNEL,
        &[(NODE_NAME_KEY, "node-a")],
        WAYPOINT_TYPE_URL,
        Some("t0ken-a"),
    )
    .await?;
    let first = ztunnel.until("the answer to the subscription", WAIT, |r| Some(r.clone())).await?;
    assert!(first.resources.is_empty(), "a ztunnel was sent {:?}", names(&first.resources));

    // A removed file revokes the token.
    std::fs::remove_file(tokens_dir.join("shop/waypoint"))?;
    let (code, message) = ca_refusal(&wp_ca, &own).await?;
    assert_eq!(code, tonic::Code::Unauthenticated, "{message}");

    let _ = stop.send(());
    tokio::time::timeout(WAIT, task).await.context("controller did not stop")???;
    Ok(())
}
