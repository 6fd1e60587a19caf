"""The chart renders, its values are checked, and the committed manifests are what it renders."""

import subprocess

import pytest

from conftest import CHART, DAEMONSET, MANIFESTS, MANIFEST_FILES, find, helm_template, need_tool


def test_committed_manifests_are_what_the_chart_renders(tmp_path):
    need_tool("helm")
    out = subprocess.run([str(DAEMONSET / "render.sh"), str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 0, f"render.sh failed:\n{out.stderr}"
    rendered = sorted(p.name for p in tmp_path.iterdir())
    committed = sorted(p.name for p in MANIFESTS.iterdir())
    assert rendered == committed == sorted(MANIFEST_FILES)
    stale = [name for name in rendered if (tmp_path / name).read_text() != (MANIFESTS / name).read_text()]
    assert not stale, f"daemonset/manifests/{stale} differ from the chart: run daemonset/render.sh and commit"


def test_chart_lints_strictly():
    helm = need_tool("helm")
    out = subprocess.run([helm, "lint", "--strict", str(CHART)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize(
    "setting, complaint",
    [
        ("image.pullPolicy=Sometimes", "/image/pullPolicy"),
        ("ztunnel.capabilities={SYS_MODULE}", "/ztunnel/capabilities"),
        ("ztunnel.pinDir=/tmp/weft", "/ztunnel/pinDir"),
        ("ztunnel.uplinks={eth0/1}", "/ztunnel/uplinks"),
        ("trustDomain=Not A Domain", "/trustDomain"),
        ("controller.resources.limits.memory=lots", "/controller/resources/limits/memory"),
        ("controller.replcas=2", "replcas"),
        ("controller.replicas=0", "/controller/replicas"),
        ("controller.caSecret=weft-ca", "caSecret"),
    ],
)
def test_bad_values_are_refused(setting, complaint):
    helm = need_tool("helm")
    out = subprocess.run([helm, "template", "weft", str(CHART), "--set", setting], capture_output=True, text=True)
    assert out.returncode != 0, f"--set {setting} was accepted"
    assert complaint in out.stderr, out.stderr


def kinds(objects):
    return sorted((o["kind"], o["metadata"]["name"]) for o in objects)


def test_helm_install_leaves_the_namespace_to_helm_and_keeps_crds():
    objects = helm_template()
    assert not [o for o in objects if o["kind"] == "Namespace"]
    crds = [o for o in objects if o["kind"] == "CustomResourceDefinition"]
    assert len(crds) == 9
    # Uninstalling Weft must not delete every VirtualService, policy, ... in the cluster.
    assert all(c["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep" for c in crds)
    namespaced = [o for o in objects if o["kind"] not in ("CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding")]
    assert {o["metadata"]["namespace"] for o in namespaced} == {"weft-system"}


def test_crd_toggles():
    def crds(*args):
        return sorted(o["metadata"]["name"] for o in helm_template(*args) if o["kind"] == "CustomResourceDefinition")

    everything = crds()
    assert "gateways.gateway.networking.k8s.io" in everything
    assert crds("--set", "crds.gatewayAPI=false") == [n for n in everything if n != "gateways.gateway.networking.k8s.io"]
    assert crds("--set", "crds.istio=false") == ["gateways.gateway.networking.k8s.io"]
    assert crds("--set", "crds.istio=false", "--set", "crds.gatewayAPI=false") == []


def test_values_reach_the_objects():
    objects = helm_template(
        "--set", "trustDomain=example.org",
        "--set", "logLevel=debug",
        "--set", "image.tag=1.2.3",
        "--set", "image.pullPolicy=Always",
        "--set", "ztunnel.image.repository=registry.example/weft/ztunnel",
        "--set", "ztunnel.image.tag=9.9.9",
        "--set", "ztunnel.uplinks={ens5,ens6}",
        "--set", "ztunnel.resources.limits.memory=3Gi",
        "--set", "controller.replicas=2",
        "--set", "waypoint.image.repository=registry.example/weft/waypoint",
        "--namespace", "mesh-system",
    )
    controller = find(objects, "Deployment", "weft-controller")["spec"]
    assert controller["replicas"] == 2
    container = controller["template"]["spec"]["containers"][0]
    assert container["image"] == "localhost:5000/weft/controller:1.2.3"
    assert container["imagePullPolicy"] == "Always"
    assert "--trust-domain=example.org" in container["args"]
    assert "--waypoint-image=registry.example/weft/waypoint:1.2.3" in container["args"]
    # TLS for the Service's name in the release namespace; waypoints dial its cluster IP.
    assert "--tls-dns-name=weft-controller.mesh-system.svc" in container["args"]
    assert "--waypoint-controller-address=https://$(WEFT_CONTROLLER_SERVICE_HOST):15012" in container["args"]
    assert "--waypoint-controller-server-name=weft-controller.mesh-system.svc" in container["args"]
    assert {"name": "RUST_LOG", "value": "debug"} in container["env"]
    # The CA root is in the namespace's Secrets, not in a volume.
    assert "volumes" not in controller["template"]["spec"]
    assert not any(a.startswith("--ca-dir") for a in container["args"])

    ztunnel = find(objects, "DaemonSet", "ztunnel")["spec"]["template"]["spec"]["containers"][0]
    assert ztunnel["image"] == "registry.example/weft/ztunnel:9.9.9"
    assert [a for a in ztunnel["args"] if a.startswith("--uplink")] == ["--uplink=ens5", "--uplink=ens6"]
    assert ztunnel["resources"]["limits"]["memory"] == "3Gi"
    assert {"name": "RUST_LOG", "value": "debug"} in ztunnel["env"]


def test_ztunnel_surges_where_the_cluster_can():
    def strategy(*args):
        return find(helm_template(*args), "DaemonSet", "ztunnel")["spec"]["updateStrategy"]

    # Kubernetes 1.22+ has DaemonSet surge: the new ztunnel takes over from the running one.
    assert strategy("--kube-version", "1.22.0") == {
        "type": "RollingUpdate",
        "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0},
    }
    assert strategy("--kube-version", "1.20.2") == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
    pod = find(helm_template("--set", "ztunnel.terminationGracePeriodSeconds=120"), "DaemonSet", "ztunnel")
    pod = pod["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] == 120
    assert {"name": "TERMINATION_GRACE_PERIOD_SECONDS", "value": "120"} in pod["containers"][0]["env"]
