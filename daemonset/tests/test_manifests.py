"""What the rendered objects promise: least-privilege RBAC covering exactly what the controller
watches (read from controller/src/sources/kube.rs), CRDs for every version Weft decodes (read from
weft-config/src/decode.rs), and the ztunnel DaemonSet and controller Deployment as the issue
asks for them."""

import re

from conftest import REPO, find

READ = ["get", "list", "watch"]


def watched_kinds() -> list[tuple[str, str]]:
    """(group, plural) of everything the Kubernetes source watches."""
    source = (REPO / "controller/src/sources/kube.rs").read_text()
    custom = re.findall(
        r'custom\(\s*[\w"]+,\s*"([^"]+)",\s*"v1",\s*"\w+",\s*"(\w+)",?\s*\)', source
    )
    typed = re.findall(r"spawn_typed::<(\w+)>", source)
    assert len(custom) >= 9 and typed, "controller/src/sources/kube.rs changed shape: update this test"
    plural = {"Namespace": "namespaces", "Pod": "pods", "Service": "services"}
    return [("", plural[kind]) for kind in typed] + custom


def decoded_versions() -> dict[str, list[str]]:
    source = (REPO / "weft-config/src/decode.rs").read_text()

    def versions(const):
        found = re.search(rf"const {const}: &\[&str\] = &\[([^\]]*)\];", source)
        assert found, f"{const} is gone from weft-config/src/decode.rs: update this test"
        return re.findall(r'"(\w+)"', found.group(1))

    return {
        "networking.istio.io": versions("ISTIO_NETWORKING"),
        "security.istio.io": versions("ISTIO_SECURITY"),
        "telemetry.istio.io": versions("ISTIO_TELEMETRY"),
        "gateway.networking.k8s.io": versions("GATEWAY_API"),
    }


def rules(manifests) -> list[dict]:
    return find(manifests, "ClusterRole", "weft-controller")["rules"]


def verbs_on(manifests, group: str, resource: str) -> set[str]:
    return {
        verb
        for rule in rules(manifests)
        if group in rule["apiGroups"] and resource in rule["resources"]
        for verb in rule["verbs"]
    }


def test_controller_reads_everything_it_watches(manifests):
    for group, plural in watched_kinds():
        assert set(READ) <= verbs_on(manifests, group, plural), f"the controller cannot watch {plural}.{group}"


def test_controller_rights_are_exactly_these(manifests):
    granted = {
        (group, resource, verb)
        for rule in rules(manifests)
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    expected = {(g, r, v) for g, r in watched_kinds() for v in READ}
    # What the waypoint manager needs (controller/src/waypoints: server-side apply, delete), and
    # no more: controller/tests/waypoints.rs applies this same ClusterRole and proves it with
    # `kubectl auth can-i`, allowed and denied.
    expected |= {("gateway.networking.k8s.io", "gateways/status", "patch")}
    expected |= {("authentication.k8s.io", "tokenreviews", "create")}
    writes = ["create", "patch", "delete"]
    expected |= {("", "services", v) for v in READ + writes}
    expected |= {("", "serviceaccounts", v) for v in ["get", "list"] + writes}
    # Waypoint Deployments are watched too: a Gateway is Programmed once one of its pods is ready.
    expected |= {("apps", "deployments", v) for v in READ + writes}
    # The mesh roots, published as istio-ca-root-cert in every namespace (server-side apply).
    expected |= {("", "configmaps", v) for v in ["create", "patch"]}
    assert granted == expected
    for rule in rules(manifests):
        assert "*" not in rule["apiGroups"] + rule["resources"] + rule["verbs"]
        assert "resourceNames" not in rule and "nonResourceURLs" not in rule


def test_only_the_controller_is_bound_and_ztunnel_has_no_api_token(manifests):
    bindings = [o for o in manifests if o["kind"] in ("ClusterRoleBinding", "RoleBinding")]
    subjects = [s for b in bindings for s in b["subjects"]]
    controller = {"kind": "ServiceAccount", "name": "weft-controller", "namespace": "weft-system"}
    assert subjects == [controller, controller]
    # The one Role: the CA's Secrets in the controller's own namespace, read and created once.
    (role,) = [o for o in manifests if o["kind"] == "Role"]
    assert role["metadata"]["namespace"] == "weft-system"
    assert role["rules"] == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "create"]}]
    assert find(manifests, "ServiceAccount", "ztunnel")["automountServiceAccountToken"] is False


def test_crds_serve_every_version_weft_decodes_and_store_v1(manifests):
    crds = {o["metadata"]["name"]: o["spec"] for o in manifests if o["kind"] == "CustomResourceDefinition"}
    versions = decoded_versions()
    for group, plural in watched_kinds():
        if not group:
            continue
        spec = crds.get(f"{plural}.{group}")
        assert spec, f"no CRD for {plural}.{group}"
        assert [v["name"] for v in spec["versions"]] == versions[group]
        assert all(v["served"] for v in spec["versions"])
        assert [v["name"] for v in spec["versions"] if v["storage"]] == ["v1"]
        for version in spec["versions"]:
            schema = version["openAPIV3Schema"] if "openAPIV3Schema" in version else version["schema"]["openAPIV3Schema"]
            assert schema["properties"]["spec"]["properties"], f"{plural}.{group} {version['name']}: no spec fields"
            assert version["subresources"] == {"status": {}}
    assert len(crds) == len([k for k in watched_kinds() if k[0]])


def test_ztunnel_daemonset(manifests):
    daemonset = find(manifests, "DaemonSet", "ztunnel")
    # The committed manifests are rendered for Kubernetes 1.20, which has no DaemonSet surge
    # (test_render checks that the chart surges on 1.22+).
    assert daemonset["spec"]["updateStrategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 30
    assert pod["hostNetwork"] is True
    assert pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["serviceAccountName"] == "ztunnel"
    assert pod["automountServiceAccountToken"] is False
    assert {"operator": "Exists"} in pod["tolerations"], "ztunnel must tolerate every taint"
    (container,) = pod["containers"]
    security = container["securityContext"]
    # Privileged for now (the chart's comment says why); the capabilities are what it uses.
    assert security.get("privileged", False) is True
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["BPF", "PERFMON", "NET_ADMIN", "NET_RAW"]}
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz/ready", "port": 15021}
    for kind in ("requests", "limits"):
        assert set(container["resources"][kind]) == {"cpu", "memory"}
    env = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for e in container["env"]}
    assert env["NODE_NAME"] == "spec.nodeName" and env["INSTANCE_IP"] == "status.podIP"

    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert volumes["bpffs"]["hostPath"] == {"path": "/sys/fs/bpf", "type": "Directory"}
    assert mounts["bpffs"] == "/sys/fs/bpf"
    assert [a for a in container["args"] if a.startswith("--pin-dir=")] == ["--pin-dir=/sys/fs/bpf/weft"]
    (token,) = volumes["istio-token"]["projected"]["sources"]
    assert token["serviceAccountToken"]["audience"] == "istio-ca"
    token_file = f"{mounts['istio-token']}/{token['serviceAccountToken']['path']}"
    assert f"--token-file={token_file}" in container["args"]
    assert "--xds-address=https://$(WEFT_CONTROLLER_SERVICE_HOST):15012" in container["args"]
    assert {"name": "ALT_XDS_HOSTNAME", "value": "weft-controller.weft-system.svc"} in container["env"]
    # The hand-over socket's directory, shared by the old and the new ztunnel of an upgrade.
    assert volumes["handover"]["hostPath"] == {"path": "/var/run/ztunnel", "type": "DirectoryOrCreate"}
    assert mounts["handover"] == "/var/run/ztunnel"
    assert {"name": "TERMINATION_GRACE_PERIOD_SECONDS", "value": "30"} in container["env"]
    # The pod's own state (emptyDir): marked once the pod has handed over.
    assert volumes["pod-state"] == {"name": "pod-state", "emptyDir": {}}
    assert mounts["pod-state"] == "/var/run/ztunnel-pod"
    assert {"name": "WEFT_POD_STATE_DIR", "value": "/var/run/ztunnel-pod"} in container["env"]
    # Nothing else from the node.
    assert [v for v in volumes.values() if "hostPath" in v] == [volumes["handover"], volumes["bpffs"]]


def test_controller_deployment_and_service(manifests):
    service = find(manifests, "Service", "weft-controller")["spec"]
    assert {p["name"]: p["port"] for p in service["ports"]} == {"grpc-xds": 15012, "http-monitoring": 15014}
    pod = find(manifests, "Deployment", "weft-controller")["spec"]["template"]["spec"]
    assert service["selector"].items() <= find(manifests, "Deployment", "weft-controller")["spec"]["template"]["metadata"]["labels"].items()
    assert pod["serviceAccountName"] == "weft-controller"
    assert pod["securityContext"]["runAsNonRoot"] is True
    (container,) = pod["containers"]
    assert container["args"][:2] == ["--kubernetes", "--listen=0.0.0.0:15012"]
    # Waypoints run the chart's waypoint image and reach the controller as ztunnel does.
    assert "--waypoint-image=localhost:5000/weft/waypoint:0.1.0" in container["args"]
    assert "--waypoint-controller-address=https://$(WEFT_CONTROLLER_SERVICE_HOST):15012" in container["args"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["tcpSocket"] == {"port": "grpc-xds"}
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
