"""What can be checked of the Containerfiles without a container engine (there is none here):
every path they copy exists, the whole workspace is copied, the packages and binaries they build
are the workspace's, the runtime copies the binary the builder made, and both stages are
Debian 12."""

import re
import tomllib

import pytest

from conftest import DAEMONSET, REPO

IMAGES = DAEMONSET / "images"


def instructions(path):
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    lines = [l.strip() for l in text.splitlines() if l.strip() and not l.strip().startswith("#")]
    return [tuple(l.split(None, 1)) for l in lines]


def bin_targets(member: str) -> set[str]:
    manifest = tomllib.loads((REPO / member / "Cargo.toml").read_text())
    bins = {b["name"] for b in manifest.get("bin", [])}
    if (REPO / member / "src/main.rs").exists():
        bins.add(manifest["package"]["name"])
    return bins


@pytest.mark.parametrize("binary", ["controller", "ztunnel", "waypoint"])
def test_containerfile(binary):
    steps = instructions(IMAGES / f"{binary}.Containerfile")
    members = tomllib.loads((REPO / "Cargo.toml").read_text())["workspace"]["members"]
    froms = [args for op, args in steps if op == "FROM"]
    assert len(froms) == 2, "multi-stage: a builder and a runtime"
    assert froms[0].endswith(" AS build") and "bookworm" in froms[0]
    assert re.search(r"debian12|debian:12", froms[1]), froms[1]

    copied = []
    for op, args in steps:
        if op == "COPY" and not args.startswith("--from"):
            *sources, _dest = args.split()
            copied += sources
    for source in copied:
        assert (REPO / source).exists(), f"COPY {source}: no such path in the repository"
    assert {"Cargo.toml", "Cargo.lock"} <= set(copied)
    assert set(members) <= set(copied), "cargo needs every workspace member's manifest"

    (build,) = [args for op, args in steps if op == "RUN" and "cargo build" in args]
    package = re.search(r"-p (\S+)", build).group(1)
    target = re.search(r"--bin (\S+)", build).group(1)
    assert "--release" in build and "--locked" in build
    assert package in members and tomllib.loads((REPO / package / "Cargo.toml").read_text())["package"]["name"] == package
    assert target == binary

    runtime = steps[[i for i, (op, _) in enumerate(steps) if op == "FROM"][1]:]
    (copy,) = [args for op, args in runtime if op == "COPY"]
    assert copy.split()[:2] == ["--from=build", f"/src/target/release/{target}"]
    installed = copy.split()[2]
    (entrypoint,) = [args for op, args in runtime if op == "ENTRYPOINT"]
    assert entrypoint == f'["{installed}"]'
    if binary == "waypoint" and target not in bin_targets(package):
        # Everything else about the image is checked above; the binary is being written.
        pytest.skip("the waypoint crate has no `waypoint` binary (src/main.rs) yet")
    assert target in bin_targets(package)


def test_chart_runs_the_waypoint_as_the_image_user():
    """The controller's waypoint Deployment runs as 1337 (Istio's waypoint user); so does the image."""
    steps = instructions(IMAGES / "waypoint.Containerfile")
    assert ("USER", "1337:1337") in steps
    resources = (REPO / "controller/src/waypoints/resources.rs").read_text()
    assert '"runAsUser": 1337' in resources


def test_ztunnel_image_has_ip():
    """ztunnel runs `ip` (route lookups, the capture's fwmark rule)."""
    steps = instructions(IMAGES / "ztunnel.Containerfile")
    runtime = steps[[i for i, (op, _) in enumerate(steps) if op == "FROM"][1]:]
    assert any(op == "RUN" and "iproute2" in args for op, args in runtime)


def test_chart_runs_the_controller_as_the_image_user():
    steps = instructions(IMAGES / "controller.Containerfile")
    assert ("USER", "65532:65532") in steps
    values = (DAEMONSET / "chart/weft/templates/controller.yaml").read_text()
    assert "runAsUser: 65532" in values
