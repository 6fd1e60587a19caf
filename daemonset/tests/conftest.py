"""Shared fixtures of the chart's tests (daemonset/tests, run by daemonset/tests/run.sh).

A missing tool or apiserver skips the tests that need it, except in CI (CI=true), where it fails
them: scripts/setup.sh installs helm, kubernetes-validate and pytest, and scripts/kube-apiserver
builds the apiserver.
"""

import os
import pathlib
import shutil
import subprocess

import pytest
import yaml

DAEMONSET = pathlib.Path(__file__).resolve().parent.parent
REPO = DAEMONSET.parent
CHART = DAEMONSET / "chart" / "weft"
MANIFESTS = DAEMONSET / "manifests"
MANIFEST_FILES = ("crds-istio.yaml", "crds-gateway-api.yaml", "weft.yaml")


def in_ci() -> bool:
    return os.environ.get("CI") == "true"


def missing(what: str) -> None:
    """A prerequisite is missing: fails in CI, skips elsewhere."""
    if in_ci():
        pytest.fail(f"{what}; CI requires it (scripts/setup.sh installs the tools)", pytrace=False)
    pytest.skip(f"{what}; run scripts/setup.sh to install it")


def need_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        missing(f"{name} is not installed")
    return path


def load_all(path: pathlib.Path) -> list[dict]:
    with open(path) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc]


@pytest.fixture(scope="session")
def manifests() -> list[dict]:
    """Every object of the committed manifests, in file order."""
    return [doc for name in MANIFEST_FILES for doc in load_all(MANIFESTS / name)]


def helm_template(*args: str) -> list[dict]:
    """The chart rendered with helm (release weft, namespace weft-system) and `args`."""
    helm = need_tool("helm")
    out = subprocess.run(
        [helm, "template", "weft", str(CHART), "--namespace", "weft-system", *args],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, f"helm template {' '.join(args)} failed:\n{out.stderr}"
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def find(objects: list[dict], kind: str, name: str) -> dict:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{len(found)} objects {kind}/{name}"
    return found[0]
