use super::*;
use crate::state::ProxyState;
use crate::testing::resources::*;

/// The labels a destination ztunnel writes for `shop/client` calling `shop/web` through the
/// `web` service over mTLS, in the order they are encoded.
const INBOUND: &str = "reporter=\"destination\",source_workload=\"client\",source_canonical_service=\"client\",\
source_canonical_revision=\"latest\",source_workload_namespace=\"shop\",\
source_principal=\"spiffe://cluster.local/ns/shop/sa/client\",source_app=\"client\",source_version=\"latest\",\
source_cluster=\"Kubernetes\",destination_service=\"web.shop.svc.cluster.local\",\
destination_service_namespace=\"shop\",destination_service_name=\"web\",destination_workload=\"web\",\
destination_canonical_service=\"web\",destination_canonical_revision=\"latest\",\
destination_workload_namespace=\"shop\",destination_principal=\"spiffe://cluster.local/ns/shop/sa/web\",\
destination_app=\"web\",destination_version=\"latest\",destination_cluster=\"Kubernetes\",\
request_protocol=\"tcp\"";

fn inbound_labels() -> ConnectionLabels {
    let mut state = ProxyState::new("");
    add_workload(&mut state, workload("shop", "client", "10.0.1.1"));
    add_workload(&mut state, workload("shop", "web", "10.0.1.5"));
    add_service(&mut state, service("shop", "web", "10.96.0.10", &[(80, 8080)]));
    let client = state.workload_by_ip(ip("10.0.1.1")).unwrap();
    let web = state.workload_by_ip(ip("10.0.1.5")).unwrap();
    let svc = state.service_by_vip(ip("10.96.0.10")).unwrap();
    ConnectionLabels::new(Reporter::Destination, SecurityPolicy::MutualTls)
        .with_source(client)
        .with_source_principal(&client.identity)
        .with_destination(web)
        .with_destination_service(svc)
}

/// The sample lines of `text` (no comments), sorted.
fn samples(text: &str) -> Vec<String> {
    let mut lines: Vec<String> = text.lines().filter(|l| !l.starts_with('#')).map(str::to_owned).collect();
    lines.sort();
    lines
}

#[test]
fn exposes_istio_metric_names_with_help_and_type() {
    let (metrics, registry) = Metrics::new();
    // A family without samples is not written at all.
    assert_eq!(encode(&registry), "# EOF\n");
    drop(metrics.connection_opened(inbound_labels()));
    let text = encode(&registry);
    for name in ["tcp_connections_opened", "tcp_connections_closed", "tcp_sent_bytes", "tcp_received_bytes"] {
        assert!(text.contains(&format!("# TYPE istio_{name} counter\n")), "{name}: {text}");
    }
    assert!(
        text.contains("# HELP istio_tcp_connections_opened The total number of TCP connections opened.\n"),
        "{text}"
    );
    assert!(text.ends_with("# EOF\n"), "{text}");
}

#[test]
fn a_connection_counts_opened_bytes_and_closed() {
    let (metrics, registry) = Metrics::new();
    let guard = metrics.connection_opened(inbound_labels());
    guard.add_received(100);
    guard.add_received(23);
    guard.add_sent(4096);
    let tail = "response_flags=\"-\",connection_security_policy=\"mutual_tls\"}";
    assert_eq!(
        samples(&encode(&registry)),
        vec![
            format!("istio_tcp_connections_opened_total{{{INBOUND},{tail} 1"),
            format!("istio_tcp_received_bytes_total{{{INBOUND},{tail} 123"),
            format!("istio_tcp_sent_bytes_total{{{INBOUND},{tail} 4096"),
        ]
    );
    drop(guard);
    assert!(encode(&registry).contains(&format!("istio_tcp_connections_closed_total{{{INBOUND},{tail} 1\n")));
}

#[test]
fn a_denial_is_opened_with_dash_and_closed_with_deny() {
    let (metrics, registry) = Metrics::new();
    metrics.denied(inbound_labels());
    let mtls = "connection_security_policy=\"mutual_tls\"}";
    assert_eq!(
        samples(&encode(&registry)),
        vec![
            format!("istio_tcp_connections_closed_total{{{INBOUND},response_flags=\"DENY\",{mtls} 1"),
            format!("istio_tcp_connections_opened_total{{{INBOUND},response_flags=\"-\",{mtls} 1"),
            format!("istio_tcp_received_bytes_total{{{INBOUND},response_flags=\"-\",{mtls} 0"),
            format!("istio_tcp_sent_bytes_total{{{INBOUND},response_flags=\"-\",{mtls} 0"),
        ]
    );
}

#[test]
fn unknown_peers_and_failed_upstreams() {
    let (metrics, registry) = Metrics::new();
    let mut guard = metrics.connection_opened(ConnectionLabels::new(Reporter::Source, SecurityPolicy::None));
    guard.set_response_flags(ResponseFlags::Connect);
    drop(guard);
    let u = "\"unknown\"";
    let labels = format!(
        "reporter=\"source\",source_workload={u},source_canonical_service={u},source_canonical_revision={u},\
         source_workload_namespace={u},source_principal={u},source_app={u},source_version={u},source_cluster={u},\
         destination_service={u},destination_service_namespace={u},destination_service_name={u},\
         destination_workload={u},destination_canonical_service={u},destination_canonical_revision={u},\
         destination_workload_namespace={u},destination_principal={u},destination_app={u},\
         destination_version={u},destination_cluster={u},request_protocol=\"tcp\""
    );
    let text = encode(&registry);
    assert!(
        text.contains(&format!(
            "istio_tcp_connections_closed_total{{{labels},response_flags=\"CONNECT\",connection_security_policy=\"none\"}} 1\n"
        )),
        "{text}"
    );
    assert!(text.contains(&format!(
        "istio_tcp_connections_opened_total{{{labels},response_flags=\"-\",connection_security_policy=\"none\"}} 1\n"
    )));
}

#[test]
fn a_plaintext_source_principal_stays_unknown_and_a_peer_identity_is_written() {
    let labels = ConnectionLabels::new(Reporter::Destination, SecurityPolicy::Unknown);
    assert_eq!(labels.source_principal, "unknown");
    let id = crate::Identity::new("cluster.local", "other", "x").unwrap();
    assert_eq!(labels.with_source_principal(&id).source_principal, "spiffe://cluster.local/ns/other/sa/x");
}

#[test]
fn a_source_workload_does_not_set_the_principal() {
    let mut state = ProxyState::new("");
    add_workload(&mut state, workload("shop", "client", "10.0.1.1"));
    let client = state.workload_by_ip(ip("10.0.1.1")).unwrap();
    let labels = ConnectionLabels::new(Reporter::Destination, SecurityPolicy::Unknown).with_source(client);
    assert_eq!((labels.source_workload.as_str(), labels.source_principal.as_str()), ("client", "unknown"));
}
