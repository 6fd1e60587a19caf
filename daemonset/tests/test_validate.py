"""Every committed manifest passes kubernetes-validate --strict (Kubernetes' own JSON schemas,
unknown fields refused). The CRDs are validated as objects; the chart ships no custom resources
(test_apiserver.py checks instances against the CRDs on a real apiserver)."""

import re
import subprocess

import pytest

from conftest import MANIFESTS, MANIFEST_FILES, load_all, need_tool

# The newest Kubernetes kubernetes-validate 1.37.0 knows, and the oldest most providers still run.
KUBERNETES_VERSIONS = ("1.37.0", "1.30.0")


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("name", MANIFEST_FILES)
def test_manifest_passes_kubernetes_validate_strict(name, version):
    tool = need_tool("kubernetes-validate")
    path = MANIFESTS / name
    out = subprocess.run([tool, "--strict", "-k", version, str(path)], capture_output=True, text=True)
    report = out.stdout + out.stderr
    assert out.returncode == 0, report
    passed = re.findall(r"passed for resource (\S+)", report)
    expected = [f"{doc['kind'].lower()}/{doc['metadata']['name']}" for doc in load_all(path)]
    assert passed == expected, report
    assert "WARN" not in report and "ERROR" not in report, report
