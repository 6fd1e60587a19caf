use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{DynamicObject, ObjectMeta};
use serde_json::{json, Value};

use super::resources::{self, GatewayInfo};
use super::*;

fn gateway(class: &str) -> GatewayInfo {
    let object = DynamicObject::new("waypoint", &resources::gateway_resource()).within("shop").data(json!({
        "spec": { "gatewayClassName": class, "listeners": [{ "name": "mesh", "port": 15008, "protocol": "HBONE" }] },
    }));
    let mut object = object;
    object.metadata.uid = Some("gw-uid".into());
    object.metadata.generation = Some(3);
    GatewayInfo::from_object(&object).unwrap()
}

#[test]
fn gateways_are_converted_where_they_enter() {
    let gw = gateway(WAYPOINT_CLASS);
    assert_eq!((gw.namespace.as_str(), gw.name.as_str(), gw.uid.as_str()), ("shop", "waypoint", "gw-uid"));
    assert_eq!(gw.generation, 3);
    assert!(gw.is_waypoint() && !gw.deleting);
    assert_eq!(gw.status, Value::Null);
    assert!(!gateway("istio").is_waypoint());
    assert_eq!(gw.hostname(), "waypoint.shop.svc.cluster.local");
    // No uid (never from the API server): not a Gateway the manager can own things for.
    let bare = DynamicObject::new("x", &resources::gateway_resource()).within("shop");
    assert!(GatewayInfo::from_object(&bare).is_none());
}

#[test]
fn deployment_and_service_are_owned_labelled_and_typed() {
    let gw = gateway(WAYPOINT_CLASS);
    let options =
        WaypointOptions { image: "registry.example/waypoint:1".into(), ..WaypointOptions::default() };
    let deployment: Deployment = serde_json::from_value(resources::deployment(&gw, &options)).unwrap();
    let service: Service = serde_json::from_value(resources::service(&gw)).unwrap();

    let owner = OwnerReference {
        api_version: "gateway.networking.k8s.io/v1".into(),
        kind: "Gateway".into(),
        name: "waypoint".into(),
        uid: "gw-uid".into(),
        controller: Some(true),
        block_owner_deletion: None,
    };
    for meta in [&deployment.metadata, &service.metadata] {
        assert_eq!(meta.name.as_deref(), Some("waypoint"));
        assert_eq!(meta.namespace.as_deref(), Some("shop"));
        assert_eq!(meta.owner_references.as_deref(), Some(&[owner.clone()][..]));
        let labels = meta.labels.clone().unwrap();
        assert_eq!(labels[GATEWAY_NAME_LABEL], "waypoint");
        assert_eq!(labels[ISTIO_GATEWAY_NAME_LABEL], "waypoint");
        assert_eq!(labels[MANAGED_BY_LABEL], MANAGED_BY_VALUE);
    }

    let spec = deployment.spec.unwrap();
    assert_eq!(spec.replicas, None, "replicas belong to whoever scales the waypoint");
    let selector = spec.selector.match_labels.unwrap();
    let template_meta = spec.template.metadata.unwrap();
    let annotations = template_meta.annotations.unwrap();
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], "15020");
    assert_eq!(annotations["prometheus.io/path"], "/metrics");
    let template_labels = template_meta.labels.unwrap();
    for (k, v) in &selector {
        assert_eq!(template_labels.get(k), Some(v), "the selector matches the pods");
    }
    assert_eq!(template_labels["istio.io/dataplane-mode"], "none");
    let pod = spec.template.spec.unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some("waypoint"));
    let container = &pod.containers[0];
    assert_eq!(container.image.as_deref(), Some("registry.example/waypoint:1"));
    let ports: BTreeMap<i32, String> =
        container.ports.iter().flatten().map(|p| (p.container_port, p.name.clone().unwrap())).collect();
    assert_eq!(
        ports,
        BTreeMap::from([(15008, "hbone".into()), (15020, "metrics".into()), (15021, "status-port".into())])
    );
    // The binary's flags, as ztunnel's: full URLs (its endpoint parser wants a scheme).
    let args = container.args.clone().unwrap();
    assert_eq!(
        args,
        [
            "--xds-address",
            "https://weft-controller.weft-system.svc:15012",
            "--ca-address",
            "https://weft-controller.weft-system.svc:15012",
            "--token-file",
            "/var/run/secrets/tokens/istio-token",
        ]
    );
    let env: BTreeMap<String, String> = container
        .env
        .iter()
        .flatten()
        .map(|e| {
            let from = e.value_from.as_ref().and_then(|f| f.field_ref.as_ref()).map(|f| f.field_path.clone());
            (e.name.clone(), e.value.clone().or(from).unwrap())
        })
        .collect();
    assert_eq!(
        env,
        BTreeMap::from([
            ("WAYPOINT_NAME".into(), "waypoint".into()),
            ("POD_NAME".into(), "metadata.name".into()),
            ("POD_NAMESPACE".into(), "metadata.namespace".into()),
            ("INSTANCE_IP".into(), "status.podIP".into()),
            ("SERVICE_ACCOUNT".into(), "spec.serviceAccountName".into()),
            ("NODE_NAME".into(), "spec.nodeName".into()),
        ])
    );
    // Istio's waypoint probes: a startup probe every second for 30 s, then readiness every 15 s.
    for (probe, period, failures) in [(&container.startup_probe, 1, 30), (&container.readiness_probe, 15, 4)]
    {
        let probe = probe.as_ref().unwrap();
        let get = probe.http_get.as_ref().unwrap();
        assert_eq!(get.path.as_deref(), Some("/healthz/ready"));
        assert_eq!(get.port, k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(15021));
        assert_eq!((probe.period_seconds, probe.failure_threshold), (Some(period), Some(failures)));
    }
    let resources = container.resources.clone().unwrap();
    let quantity = |m: &Option<BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>>,
                    k: &str| m.as_ref().unwrap()[k].0.clone();
    assert_eq!(
        [
            quantity(&resources.requests, "cpu"),
            quantity(&resources.requests, "memory"),
            quantity(&resources.limits, "cpu"),
            quantity(&resources.limits, "memory"),
        ],
        ["100m", "128Mi", "2", "1Gi"]
    );
    let volumes = pod.volumes.unwrap();
    let volume = |name: &str| volumes.iter().find(|v| v.name == name).unwrap().clone();
    let projected = volume("istio-token").projected.unwrap();
    let token = projected.sources.unwrap()[0].service_account_token.clone().unwrap();
    assert_eq!(token.audience.as_deref(), Some("istio-ca"));
    // The mesh root the waypoint verifies the controller with, from the ConfigMap in its namespace.
    assert_eq!(volume("istiod-ca-cert").config_map.unwrap().name, "istio-ca-root-cert");
    let mounts = container.volume_mounts.clone().unwrap();
    assert!(mounts.iter().any(|m| m.name == "istiod-ca-cert" && m.mount_path == "/var/run/secrets/istio"));

    let service_spec = service.spec.unwrap();
    assert_eq!(service_spec.selector, Some(selector));
    let port = &service_spec.ports.unwrap()[0];
    assert_eq!((port.name.as_deref(), port.port), (Some("mesh"), 15008));
}

#[test]
fn status_conditions_and_address() {
    let mut gw = gateway(WAYPOINT_CLASS);
    let with_ip = resources::status(&gw, Some("10.96.0.12"), 1, "2030-01-01T00:00:00Z");
    assert_eq!(with_ip["addresses"], json!([{ "type": "IPAddress", "value": "10.96.0.12" }]));
    for (i, kind) in ["Accepted", "Programmed"].iter().enumerate() {
        let c = &with_ip["conditions"][i];
        assert_eq!(c["type"], *kind);
        assert_eq!(c["status"], "True");
        assert_eq!(c["reason"], *kind);
        assert_eq!(c["observedGeneration"], 3);
        assert_eq!(c["lastTransitionTime"], "2030-01-01T00:00:00Z");
    }
    let without = resources::status(&gw, None, 1, "2030-01-01T00:00:00Z");
    assert_eq!(
        without["addresses"],
        json!([{ "type": "Hostname", "value": "waypoint.shop.svc.cluster.local" }])
    );
    assert_eq!(without["conditions"][1]["status"], "False");
    assert_eq!(without["conditions"][1]["reason"], "AddressNotAssigned");
    // Programmed only with a ready pod: (address, ready pods) -> (status, reason).
    let cases = [
        (Some("10.96.0.12"), 0, "False", "NoResources"),
        (Some("10.96.0.12"), 1, "True", "Programmed"),
        (Some("10.96.0.12"), 3, "True", "Programmed"),
        (None, 0, "False", "AddressNotAssigned"),
        (None, 2, "False", "AddressNotAssigned"),
    ];
    for (address, ready, want_status, want_reason) in cases {
        let programmed = &resources::status(&gw, address, ready, "x")["conditions"][1];
        assert_eq!(
            (&programmed["status"], &programmed["reason"]),
            (&json!(want_status), &json!(want_reason))
        );
        assert_eq!(programmed["type"], "Programmed");
    }
    let pending = resources::status(&gw, Some("10.96.0.12"), 0, "x");
    let message = pending["conditions"][1]["message"].as_str().unwrap();
    assert!(message.contains("Deployment waypoint has no ready pod yet"), "{message}");

    // Written once: a later reconcile at another time changes nothing and writes nothing.
    gw.status = with_ip.clone();
    let later = resources::status(&gw, Some("10.96.0.12"), 1, "2031-01-01T00:00:00Z");
    assert_eq!(later, with_ip, "unchanged conditions keep their transition time");
    assert!(!resources::status_differs(&gw.status, &later));
    // A new generation, a new address or a lost IP is a change.
    gw.generation = 4;
    assert!(resources::status_differs(&gw.status, &resources::status(&gw, Some("10.96.0.12"), 1, "x")));
    gw.generation = 3;
    assert!(resources::status_differs(&gw.status, &resources::status(&gw, Some("10.96.0.13"), 1, "x")));
    let lost = resources::status(&gw, None, 1, "2031-01-01T00:00:00Z");
    // Losing the last ready pod is a change too.
    assert!(resources::status_differs(&gw.status, &resources::status(&gw, Some("10.96.0.12"), 0, "x")));
    assert!(resources::status_differs(&gw.status, &lost));
    assert_eq!(lost["conditions"][0]["lastTransitionTime"], "2030-01-01T00:00:00Z", "Accepted still True");
    assert_eq!(lost["conditions"][1]["lastTransitionTime"], "2031-01-01T00:00:00Z", "Programmed flipped");
    // Another controller's conditions are not Weft's business.
    let mut foreign = with_ip.clone();
    foreign["conditions"].as_array_mut().unwrap().push(json!({ "type": "Ready", "status": "False" }));
    assert!(!resources::status_differs(&foreign, &with_ip));
}

#[test]
fn strays_are_objects_weft_made_for_a_gateway_that_is_not_live() {
    let owner = |uid: &str, controller: bool| OwnerReference {
        api_version: "gateway.networking.k8s.io/v1".into(),
        kind: "Gateway".into(),
        name: "waypoint".into(),
        uid: uid.into(),
        controller: Some(controller),
        block_owner_deletion: None,
    };
    let meta = |managed: bool, owners: Vec<OwnerReference>| ObjectMeta {
        uid: Some("object-uid".into()),
        labels: managed.then(|| BTreeMap::from([(MANAGED_BY_LABEL.to_owned(), MANAGED_BY_VALUE.to_owned())])),
        owner_references: Some(owners),
        ..ObjectMeta::default()
    };
    let live = BTreeSet::from(["live".to_owned()]);
    let cases: &[(ObjectMeta, bool)] = &[
        (meta(true, vec![owner("gone", true)]), true),
        (meta(true, vec![owner("live", true)]), false),
        (meta(false, vec![owner("gone", true)]), false),
        (meta(true, vec![owner("gone", false)]), false),
        (meta(true, vec![]), false),
        (
            meta(
                true,
                vec![OwnerReference {
                    kind: "Deployment".into(),
                    api_version: "apps/v1".into(),
                    ..owner("gone", true)
                }],
            ),
            false,
        ),
    ];
    for (i, (meta, stray)) in cases.iter().enumerate() {
        assert_eq!(super::stray(meta, &live).is_some(), *stray, "case {i}: {meta:?}");
    }
    let want = Stray { uid: "object-uid".into(), owner_name: "waypoint".into(), owner_uid: "gone".into() };
    assert_eq!(super::stray(&cases[0].0, &live), Some(want));
}
