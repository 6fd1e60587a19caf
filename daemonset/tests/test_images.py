"""The images, both ways they are built.

Statically (there is no container engine here): every path the Containerfiles copy exists, the
whole workspace is copied, the packages and binaries they build are the workspace's, the runtime
stage is `FROM scratch` plus files of a Debian 12 stage and the binary the builder made.

For real, without an engine: scripts/images/build.sh builds the four images (docker-archive) from
the release binaries; their layer holds exactly the files the Containerfile's runtime stage copies
(parsed here independently of the script), their config is that stage's, their tags the chart's,
and each runs its binary (and `ip`, `curl`) chrooted into the unpacked layer as the image's user.
Needs the release binaries ($WEFT_BIN_DIR, default $CARGO_TARGET_DIR/release, as build.sh) and
root (chroot); CI=true fails without them, elsewhere these tests skip.
"""

import filecmp
import hashlib
import importlib.util
import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import tarfile
import time
import tomllib

import pytest
import yaml

from conftest import CHART, DAEMONSET, REPO, missing

IMAGES = DAEMONSET / "images"
BUILD_SH = REPO / "scripts" / "images" / "build.sh"
# Image -> (Containerfile, binary, its package).
BINARIES = {
    "controller": ("controller", "controller"),
    "ztunnel": ("ztunnel", "ztunnel"),
    "waypoint": ("waypoint", "waypoint"),
    "app": ("weft-app", "weft"),
}
# Image -> the chart value naming its repository (the app image is the tests' own).
CHART_REPOSITORY = {"controller": "controller", "ztunnel": "ztunnel", "waypoint": "waypoint"}


def instructions(path):
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    lines = [l.strip() for l in text.splitlines() if l.strip() and not l.strip().startswith("#")]
    return [tuple(l.split(None, 1)) for l in lines]


def stages(image):
    """The Containerfile's stages: lists of instructions, each starting with its FROM."""
    steps = instructions(IMAGES / f"{image}.Containerfile")
    starts = [i for i, (op, _) in enumerate(steps) if op == "FROM"]
    return [steps[a:b] for a, b in zip(starts, starts[1:] + [len(steps)])]


def runtime_copies(image):
    """(--from stage or None, source, destination) of each COPY of the runtime (last) stage."""
    copies = []
    for op, args in stages(image)[-1]:
        if op == "COPY":
            words = args.split()
            froms = [w.split("=", 1)[1] for w in words if w.startswith("--from=")]
            operands = [w for w in words if not w.startswith("--")]
            assert len(operands) == 2, f"COPY {args}: one file per COPY"
            copies.append((froms[0] if froms else None, *operands))
    return copies


def expected_layer(image):
    """Every path of the image: the runtime stage's COPY destinations and their parents."""
    paths = set()
    for _, _, dest in runtime_copies(image):
        path = pathlib.PurePosixPath(dest)
        paths.add(str(path))
        paths.update(str(p) for p in path.parents if str(p) != "/")
    return paths


def bin_targets(member: str) -> set[str]:
    manifest = tomllib.loads((REPO / member / "Cargo.toml").read_text())
    bins = {b["name"] for b in manifest.get("bin", [])}
    if (REPO / member / "src/main.rs").exists():
        bins.add(manifest["package"]["name"])
    for path in (REPO / member / "src/bin").glob("*.rs"):
        bins.add(path.stem)
    return bins


@pytest.mark.parametrize("image", list(BINARIES))
def test_containerfile(image):
    binary, package = BINARIES[image]
    steps = instructions(IMAGES / f"{image}.Containerfile")
    members = tomllib.loads((REPO / "Cargo.toml").read_text())["workspace"]["members"]
    build, debian, runtime = stages(image)  # builder, Debian 12 files, FROM scratch
    assert build[0][1].endswith(" AS build") and "bookworm" in build[0][1]
    assert re.fullmatch(r"docker\.io/library/debian:12-slim AS debian", debian[0][1]), debian[0][1]
    assert runtime[0][1] == "scratch", "the runtime is the copied files and nothing else"
    assert [op for op, _ in runtime if op == "RUN"] == [], "no RUN in a scratch image"

    copied = []
    for op, args in steps:
        if op == "COPY" and not args.startswith("--from"):
            *sources, _dest = args.split()
            copied += sources
    for source in copied:
        assert (REPO / source).exists(), f"COPY {source}: no such path in the repository"
    assert {"Cargo.toml", "Cargo.lock"} <= set(copied)
    assert set(members) <= set(copied), "cargo needs every workspace member's manifest"

    (cargo,) = [args for op, args in build if op == "RUN" and re.search(r"cargo (build|rustc) ", args)]
    assert re.search(r"-p (\S+)", cargo).group(1) == package
    assert re.search(r"--bin (\S+)", cargo).group(1) == binary
    assert "--locked" in cargo
    # The release profile, or one inheriting it (ztunnel's, in Cargo.toml).
    profile = "release" if "--release" in cargo.split() else re.search(r"--profile (\S+)", cargo).group(1)
    profiles = tomllib.loads((REPO / "Cargo.toml").read_text())["profile"]
    assert profile == "release" or profiles[profile]["inherits"] == "release"
    assert package in members
    assert tomllib.loads((REPO / package / "Cargo.toml").read_text())["package"]["name"] == package
    assert binary in bin_targets(package)

    copies = runtime_copies(image)
    assert all(stage in (None, "build", "debian") for stage, _, _ in copies)
    assert (
        [(source, dest) for stage, source, dest in copies if stage == "build"]
        == [(f"/src/target/{profile}/{binary}", f"/usr/local/bin/{binary}")]
    ), "the runtime copies the builder's binary, and only it"
    for stage, source, dest in copies:
        # iptables-nft is one binary that reads its mode from its name: copied as iptables and
        # ip6tables. Every other Debian file keeps its path.
        if stage == "debian" and source != "/usr/sbin/xtables-nft-multi":
            assert source == dest, "Debian's files keep their paths"
    (entrypoint,) = [args for op, args in runtime if op == "ENTRYPOINT"]
    assert json.loads(entrypoint) == [f"/usr/local/bin/{binary}"]
    dests = {dest for _, _, dest in copies}
    assert {"/etc/passwd", "/etc/group", "/etc/ssl/certs/ca-certificates.crt", "/tmp"} <= dests
    assert "/lib64/ld-linux-x86-64.so.2" in dests and "/lib/x86_64-linux-gnu/libc.so.6" in dests


@pytest.mark.parametrize(("image", "package", "tool"), [("ztunnel", "iproute2", "/bin/ip"), ("app", "curl", "/usr/bin/curl")])
def test_image_has_its_tool(image, package, tool):
    """ztunnel runs `ip` (route lookups, the capture's fwmark rule); the tests exec curl in the app."""
    _, debian, _ = stages(image)
    assert any(op == "RUN" and re.search(rf"apt-get install .*\b{package}\b", args) for op, args in debian)
    assert ("debian", tool, tool) in runtime_copies(image)


def image_user(image):
    users = [args for op, args in stages(image)[-1] if op == "USER"]
    return users[-1] if users else ""


def test_chart_runs_the_waypoint_as_the_image_user():
    """The controller's waypoint Deployment runs as 1337 (Istio's waypoint user); so does the image."""
    assert image_user("waypoint") == "1337:1337"
    resources = (REPO / "controller/src/waypoints/resources.rs").read_text()
    assert '"runAsUser": 1337' in resources


def test_chart_runs_the_controller_as_the_image_user():
    assert image_user("controller") == "65532:65532"
    values = (DAEMONSET / "chart/weft/templates/controller.yaml").read_text()
    assert "runAsUser: 65532" in values


def test_image_users_exist():
    """Every image's user is in the /etc/passwd and /etc/group the images copy."""
    passwd = {line.split(":")[2] for line in (REPO / "scripts/images/etc/passwd").read_text().splitlines()}
    group = {line.split(":")[2] for line in (REPO / "scripts/images/etc/group").read_text().splitlines()}
    for image in BINARIES:
        user, _, grp = (image_user(image) or "0:0").partition(":")
        assert user in passwd and grp in group, image


# --- the images built by scripts/images/build.sh ------------------------------------------------


def bin_dir() -> pathlib.Path:
    if os.environ.get("WEFT_BIN_DIR"):
        return pathlib.Path(os.environ["WEFT_BIN_DIR"])
    target = os.environ.get("CARGO_TARGET_DIR") or pathlib.Path.home() / ".cache/weft/target"
    return pathlib.Path(target) / "release"


def need_release_binaries() -> None:
    missing_bins = [b for b, _ in BINARIES.values() if not (bin_dir() / b).is_file()]
    if missing_bins:
        missing(
            f"release binaries {', '.join(missing_bins)} not in {bin_dir()} (set WEFT_BIN_DIR or run"
            " scripts/release.sh)"
        )


def build(out: pathlib.Path, *images: str) -> str:
    need_release_binaries()
    env = {k: v for k, v in os.environ.items() if k != "SOURCE_DATE_EPOCH"}
    run = subprocess.run(
        [str(BUILD_SH), "--bin-dir", str(bin_dir()), str(out), *images], capture_output=True, text=True, env=env
    )
    assert run.returncode == 0, f"scripts/images/build.sh failed:\n{run.stderr}"
    return run.stdout


@pytest.fixture(scope="session")
def built(tmp_path_factory):
    """The four images, built once by scripts/images/build.sh."""
    out = tmp_path_factory.mktemp("images")
    build(out)
    yield out
    shutil.rmtree(out)  # ~400 MB


class Image:
    """One built image: its docker-archive's manifest entry, config and layer, the layer unpacked."""

    def __init__(self, archive: pathlib.Path, root: pathlib.Path):
        with tarfile.open(archive) as outer:
            (self.manifest,) = json.load(outer.extractfile("manifest.json"))
            config_bytes = outer.extractfile(self.manifest["Config"]).read()
            (layer_name,) = self.manifest["Layers"]
            digest = hashlib.sha256()
            with outer.extractfile(layer_name) as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    digest.update(chunk)
            assert self.manifest["Config"] == hashlib.sha256(config_bytes).hexdigest() + ".json"
            self.config = json.loads(config_bytes)
            assert self.config["rootfs"]["diff_ids"] == [f"sha256:{digest.hexdigest()}"]
            with tarfile.open(fileobj=outer.extractfile(layer_name)) as layer:
                self.members = {m.name: m for m in layer.getmembers()}
                self.root = root
                root.chmod(0o755)  # an image's / (mktemp made it 0700)
                if hasattr(tarfile, "fully_trusted_filter"):
                    layer.extractall(root, filter="fully_trusted")
                else:
                    layer.extractall(root)


@pytest.fixture(scope="session")
def images(built, tmp_path_factory):
    """Image name -> Image, read and unpacked once."""
    cache = {}

    def get(name: str) -> Image:
        if name not in cache:
            cache[name] = Image(built / f"{name}.tar", tmp_path_factory.mktemp(f"{name}-root"))
        return cache[name]

    yield get
    for image in cache.values():
        shutil.rmtree(image.root)


@pytest.mark.parametrize("image", list(BINARIES))
def test_built_image_is_the_containerfile_runtime(images, image):
    """Both builds make the same file list: the script's layer holds exactly the Containerfile's files."""
    built = images(image)
    manifest, config, members = built.manifest, built.config, built.members
    assert {"/" + name for name in members} == expected_layer(image)
    for member in members.values():
        assert (member.uid, member.gid, member.mtime) == (0, 0, 0), member.name
        assert member.isdir() or member.isfile(), f"{member.name}: no links, COPY follows them"
    assert members["tmp"].isdir() and members["tmp"].mode == 0o1777
    binary, _ = BINARIES[image]
    assert members[f"usr/local/bin/{binary}"].size == (bin_dir() / binary).stat().st_size
    for stage, source, dest in runtime_copies(image):
        host = REPO / source if stage is None else pathlib.Path(source)
        if stage != "build" and host.is_file():
            assert members[dest.lstrip("/")].size == host.stat().st_size, dest

    runtime = stages(image)[-1]

    def value(op):
        return [args for o, args in runtime if o == op]

    assert config["config"]["Entrypoint"] == json.loads(value("ENTRYPOINT")[0])
    assert config["config"]["User"] == image_user(image)
    ports = {f"{p}/tcp" for args in value("EXPOSE") for p in args.split()}
    assert set(config["config"]["ExposedPorts"]) == ports
    assert config["config"]["Env"] == value("ENV")
    assert (config["os"], config["architecture"]) == ("linux", "amd64")
    assert manifest["RepoTags"] == [f"localhost:5000/weft/{image}:0.1.0"]


def test_built_image_tags_are_the_charts(images):
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    for image, key in CHART_REPOSITORY.items():
        assert images(image).manifest["RepoTags"] == [f"{values[key]['image']['repository']}:{values['image']['tag']}"]


def test_build_is_deterministic(built, tmp_path):
    build(tmp_path, "ztunnel")
    assert filecmp.cmp(tmp_path / "ztunnel.tar", built / "ztunnel.tar", shallow=False)
    (tmp_path / "ztunnel.tar").unlink()


def test_build_checks_the_libraries_with_ldd():
    """A library the binaries load but the Containerfile does not copy (or the reverse) fails the build."""
    spec = importlib.util.spec_from_file_location("images_build", REPO / "scripts/images/build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    need_release_binaries()
    path = IMAGES / "ztunnel.Containerfile"
    declared = module.parse_spec("ztunnel", path, bin_dir())
    module.check_libraries("ztunnel", path, declared)
    less = dict(declared, files={k: v for k, v in declared["files"].items() if not k.endswith("/libmnl.so.0")})
    with pytest.raises(module.BuildError, match="missing: COPY --from=debian /lib/x86_64-linux-gnu/libmnl.so.0"):
        module.check_libraries("ztunnel", path, less)
    more = dict(declared, files={**declared["files"], "/lib/x86_64-linux-gnu/libzstd.so.1": pathlib.Path("/x")})
    with pytest.raises(module.BuildError, match="not loaded by .*libzstd.so.1"):
        module.check_libraries("ztunnel", path, more)


# --- the images run: chrooted into the unpacked layer -------------------------------------------

# Image -> commands run in it (beyond `BINARY --help`).
COMMANDS = {
    "controller": [],
    "waypoint": [],
    "ztunnel": [["ip", "-V"], ["ip", "-o", "-4", "route", "get", "127.0.0.1"], ["ip", "rule", "show"]],
    "app": [["curl", "--version"]],
}


@pytest.fixture(scope="module")
def chroot_tool():
    if os.geteuid() != 0:
        missing("chrooting into the images needs root")
    path = shutil.which("chroot")
    if path is None:
        missing("chroot (coreutils) is not installed")
    return path


def in_image(chroot, root, config, argv, **kwargs):
    """Runs argv in the image as its user, with its environment only."""
    user = config["User"] or "0:0"
    env = dict(e.split("=", 1) for e in config["Env"])
    return subprocess.Popen([chroot, f"--userspec={user}", str(root), *argv], env=env, **kwargs)


@pytest.mark.parametrize("image", list(BINARIES))
def test_image_runs(images, chroot_tool, image):
    root, config = images(image).root, images(image).config["config"]
    for argv in [[*config["Entrypoint"], "--help"], *COMMANDS[image]]:
        proc = in_image(chroot_tool, root, config, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, f"{' '.join(argv)} in {image}: exit {proc.returncode}\n{out}\n{err}"
        assert out.strip(), f"{' '.join(argv)} printed nothing"


def test_app_image_serves_and_curls(images, chroot_tool):
    """weft-app serves HTTP in its image, and the image's curl reaches it (as `kubectl exec` would)."""
    root, config = images("app").root, images("app").config["config"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = in_image(
        chroot_tool, root, config, [*config["Entrypoint"], "--http", str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            curl = in_image(
                chroot_tool, root, config,
                ["curl", "-sS", "--max-time", "2", f"http://127.0.0.1:{port}/hello?x=1"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            out, err = curl.communicate(timeout=10)
            if curl.returncode == 0 or time.monotonic() > deadline or server.poll() is not None:
                break
            time.sleep(0.1)
        assert curl.returncode == 0, f"curl: {err}; weft-app: {server.poll()}"
        answer = json.loads(out)
        assert answer["path"] == "/hello?x=1" and answer["method"] == "GET"
    finally:
        server.kill()
        server.wait()
