"""The committed manifests on a real kube-apiserver (v1.20.2, scripts/kube-apiserver): the CRDs
are installed for real and come up Established with structural schemas; every object of the
manifests passes a server-side dry-run (server-side apply, dryRun=All) that keeps every field
sent; an instance of each Istio and Gateway API kind, at every served version, passes a dry-run
create with its spec kept whole, and invalid ones are refused.

The test starts a private apiserver rather than using the one scripts/test.sh shares with the
Rust tests (WEFT_TEST_KUBECONFIG): CRDs are cluster-wide, the Rust tests install their own
versions of the same CRDs concurrently, and namespaces never finish deleting there (no
controller-manager). A private instance sees exactly the chart's CRDs, and stopping it cleans up
everything. Dry-runs persist nothing; only the Namespace and the CRDs are created for real.
"""

import copy
import json
import pathlib
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request

import pytest

from conftest import MANIFESTS, REPO, in_ci, load_all, missing

SCRIPTS = REPO / "scripts" / "kube-apiserver"
FIELD_MANAGER = "weft-manifests-test"
WAIT = 30


class Api:
    """A minimal client: the admin token and CA that start.sh wrote into its state directory."""

    def __init__(self, state: pathlib.Path):
        env = dict(
            line.split("=", 1) for line in (state / "env").read_text().splitlines() if "=" in line
        )
        self.url = env["KUBE_APISERVER_URL"]
        self.token = env["KUBE_ADMIN_TOKEN"]
        self.tls = ssl.create_default_context(cafile=env["KUBE_CA_FILE"])
        self.resources: dict[str, list[dict]] = {}

    def request(self, method, path, body=None, content_type="application/json"):
        """(HTTP status, decoded JSON body)."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", content_type)
        try:
            with urllib.request.urlopen(req, context=self.tls, timeout=WAIT) as resp:
                return resp.status, json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def path_of(self, obj: dict) -> str:
        """The object's URL path, from the apiserver's discovery of its group/version."""
        api_version, kind = obj["apiVersion"], obj["kind"]
        base = f"/api/{api_version}" if "/" not in api_version else f"/apis/{api_version}"
        if api_version not in self.resources:
            status, body = self.request("GET", base)
            assert status == 200, f"discovery of {api_version}: {status} {body}"
            self.resources[api_version] = body["resources"]
        (resource,) = [r for r in self.resources[api_version] if r["kind"] == kind and "/" not in r["name"]]
        namespace = obj["metadata"].get("namespace")
        assert resource["namespaced"] == (namespace is not None), f"{kind} namespace {namespace!r}"
        scope = f"/namespaces/{namespace}" if namespace else ""
        return f"{base}{scope}/{resource['name']}"

    def apply(self, obj: dict, dry_run: bool):
        """Server-side apply, as `kubectl apply --server-side --force-conflicts` would."""
        query = f"?fieldManager={FIELD_MANAGER}&force=true" + ("&dryRun=All" if dry_run else "")
        path = f"{self.path_of(obj)}/{obj['metadata']['name']}{query}"
        return self.request("PATCH", path, obj, "application/apply-patch+yaml")


@pytest.fixture(scope="module")
def api():
    """A private kube-apiserver, stopped (and its state removed) when the module is done."""
    if not (SCRIPTS / "start.sh").exists():
        pytest.fail("scripts/kube-apiserver/start.sh is gone")
    state = pathlib.Path(tempfile.mkdtemp(prefix="weft-manifests-apiserver."))
    out = subprocess.run([str(SCRIPTS / "start.sh"), str(state)], capture_output=True, text=True)
    if out.returncode != 0:
        subprocess.run([str(SCRIPTS / "stop.sh"), str(state)], capture_output=True)
        if not in_ci():
            shutil.rmtree(state, ignore_errors=True)
        missing(f"the kube-apiserver did not start (scripts/kube-apiserver/build.sh first?):\n{out.stderr[-2000:]}")
    try:
        yield Api(state)
    finally:
        stopped = subprocess.run([str(SCRIPTS / "stop.sh"), str(state)], capture_output=True, text=True)
        assert stopped.returncode == 0, f"stop.sh {state}: {stopped.stderr}"
        shutil.rmtree(state, ignore_errors=True)


def by_kind(kind):
    return [o for name in sorted(p.name for p in MANIFESTS.iterdir()) for o in load_all(MANIFESTS / name) if o["kind"] == kind]


def eventually(what, attempt):
    deadline = time.monotonic() + WAIT
    while True:
        result, last = attempt()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"{what}: not within {WAIT}s; last: {last}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def installed(api):
    """The Namespace and every CRD, applied for real; the CRDs Established."""
    for obj in by_kind("Namespace") + by_kind("CustomResourceDefinition"):
        status, body = api.apply(obj, dry_run=False)
        assert status in (200, 201), f"applying {obj['kind']} {obj['metadata']['name']}: {status} {body}"
    crds = {}
    for crd in by_kind("CustomResourceDefinition"):
        name = crd["metadata"]["name"]

        def established():
            _, body = api.request("GET", f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")
            conditions = {c["type"]: c["status"] for c in body.get("status", {}).get("conditions", [])}
            return (body if conditions.get("Established") == "True" else None), conditions

        crds[name] = eventually(f"CRD {name} Established", established)
    return crds


def test_crds_are_established_with_structural_schemas(installed):
    assert len(installed) == 9
    for name, crd in installed.items():
        conditions = {c["type"]: c for c in crd["status"]["conditions"]}
        assert conditions["NamesAccepted"]["status"] == "True", (name, conditions)
        # The apiserver flags schemas that are not structural (and then refuses to prune/serve
        # them properly) with this condition.
        assert "NonStructuralSchema" not in conditions, (name, conditions["NonStructuralSchema"])
        if name.endswith(".k8s.io"):
            assert conditions["KubernetesAPIApprovalPolicyConformant"]["status"] == "True", (name, conditions)
        assert crd["status"]["storedVersions"] == ["v1"]


def kept(sent, got, path="") -> list[str]:
    """Where `got` lacks or changed something of `sent` (fields the apiserver dropped)."""
    if isinstance(sent, dict):
        if not isinstance(got, dict):
            return [f"{path}: {got!r}"]
        return [p for k, v in sent.items() for p in (kept(v, got[k], f"{path}.{k}") if k in got else [f"{path}.{k} dropped"])]
    if isinstance(sent, list):
        if not isinstance(got, list) or len(got) != len(sent):
            return [f"{path}: {got!r}"]
        return [p for i, (s, g) in enumerate(zip(sent, got)) for p in kept(s, g, f"{path}[{i}]")]
    return [] if sent == got or str(sent) == str(got) else [f"{path}: sent {sent!r}, got {got!r}"]


def every_object():
    return [o for name in sorted(p.name for p in MANIFESTS.iterdir()) for o in load_all(MANIFESTS / name)]


@pytest.mark.parametrize("obj", every_object(), ids=lambda o: f"{o['kind']}/{o['metadata']['name']}")
def test_manifest_object_passes_server_side_dry_run(api, installed, obj):
    status, body = api.apply(obj, dry_run=True)
    assert status in (200, 201), f"{status}: {body.get('message', body)}"
    assert not kept(obj, body), f"the apiserver did not keep: {kept(obj, body)}"


# One realistic instance of each kind; the test sends it at every version the CRD serves.
SPECS = {
    ("networking.istio.io", "VirtualService"): {
        "hosts": ["reviews"],
        "http": [{"match": [{"headers": {"end-user": {"exact": "jason"}}}], "route": [{"destination": {"host": "reviews", "subset": "v2"}}]},
                 {"route": [{"destination": {"host": "reviews", "subset": "v1"}, "weight": 100}], "timeout": "3s",
                  "retries": {"attempts": 3, "perTryTimeout": "1s"}}],
    },
    ("networking.istio.io", "DestinationRule"): {
        "host": "reviews.prod.svc.cluster.local",
        "trafficPolicy": {"loadBalancer": {"simple": "LEAST_REQUEST"}, "outlierDetection": {"consecutive5xxErrors": 5, "interval": "10s"}},
        "subsets": [{"name": "v1", "labels": {"version": "v1"}}, {"name": "v2", "labels": {"version": "v2"},
                     "trafficPolicy": {"connectionPool": {"tcp": {"maxConnections": 100}}}}],
    },
    ("networking.istio.io", "Gateway"): {
        "selector": {"istio": "ingressgateway"},
        "servers": [{"port": {"number": 443, "name": "https", "protocol": "HTTPS"}, "hosts": ["*.example.com"],
                     "tls": {"mode": "SIMPLE", "credentialName": "example-cert"}}],
    },
    ("networking.istio.io", "ServiceEntry"): {
        "hosts": ["api.example.com"], "location": "MESH_EXTERNAL", "resolution": "DNS",
        "ports": [{"number": 443, "name": "https", "protocol": "TLS"}],
    },
    ("security.istio.io", "AuthorizationPolicy"): {
        "selector": {"matchLabels": {"app": "echo"}}, "action": "DENY",
        "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/demo/sa/intruder"]}}],
                   "to": [{"operation": {"ports": ["8080"]}}], "when": [{"key": "source.ip", "values": ["10.0.0.0/8"]}]}],
    },
    ("security.istio.io", "PeerAuthentication"): {
        "selector": {"matchLabels": {"app": "echo"}}, "mtls": {"mode": "STRICT"},
        "portLevelMtls": {"8080": {"mode": "PERMISSIVE"}},
    },
    ("security.istio.io", "RequestAuthentication"): {
        "targetRefs": [{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "waypoint"}],
        "jwtRules": [{"issuer": "https://issuer.example.com", "jwksUri": "https://issuer.example.com/jwks", "audiences": ["echo"]}],
    },
    ("telemetry.istio.io", "Telemetry"): {
        "selector": {"matchLabels": {"app": "echo"}},
        "accessLogging": [{"providers": [{"name": "envoy"}]}], "tracing": [{"randomSamplingPercentage": 10.0}],
    },
    ("gateway.networking.k8s.io", "Gateway"): {
        "gatewayClassName": "istio-waypoint",
        "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}],
    },
}


def instances():
    return [
        pytest.param(crd["spec"]["group"], crd["spec"]["names"]["kind"], version["name"],
                     id=f"{crd['spec']['names']['kind']}.{crd['spec']['group']}/{version['name']}")
        for crd in by_kind("CustomResourceDefinition")
        for version in crd["spec"]["versions"]
    ]


def create_dry_run(api, installed, group, kind, version, spec):
    crd = [c for c in installed.values() if c["spec"]["group"] == group and c["spec"]["names"]["kind"] == kind][0]
    obj = {
        "apiVersion": f"{group}/{version}", "kind": kind,
        "metadata": {"name": "example", "namespace": "weft-system"}, "spec": spec,
    }
    path = f"/apis/{group}/{version}/namespaces/weft-system/{crd['spec']['names']['plural']}?dryRun=All"

    def create():
        status, body = api.request("POST", path, obj)
        # 404 until the new group/version is served (right after the CRD is Established).
        return ((status, body) if status != 404 else None), (status, body)

    return obj, *eventually(f"dry-run create of {kind}.{group}/{version}", create)


@pytest.mark.parametrize("group, kind, version", instances())
def test_every_served_version_accepts_istio_yaml(api, installed, group, kind, version):
    spec = SPECS[(group, kind)]
    obj, status, body = create_dry_run(api, installed, group, kind, version, spec)
    assert status == 201, f"{status}: {body.get('message', body)}"
    assert body["apiVersion"] == f"{group}/{version}"
    assert body["spec"] == spec, "the CRD's schema pruned or changed the spec"


@pytest.mark.parametrize(
    "group, kind, spec, complaint",
    [
        ("security.istio.io", "PeerAuthentication", {"mtls": {"mode": "SOMETIMES"}}, "spec.mtls.mode"),
        ("security.istio.io", "AuthorizationPolicy", {"action": "MAYBE"}, "spec.action"),
        ("networking.istio.io", "VirtualService", {"hosts": "reviews"}, "spec.hosts"),
        ("gateway.networking.k8s.io", "Gateway", {"gatewayClassName": "istio-waypoint"}, "spec.listeners"),
        ("gateway.networking.k8s.io", "Gateway",
         {"gatewayClassName": "istio-waypoint", "listeners": [{"name": "mesh", "port": 0, "protocol": "HBONE"}]},
         "spec.listeners.port"),
    ],
)
def test_invalid_instances_are_refused(api, installed, group, kind, spec, complaint):
    _, status, body = create_dry_run(api, installed, group, kind, "v1", copy.deepcopy(spec))
    assert status == 422, f"{status}: {body}"
    assert complaint in body["message"], body["message"]
