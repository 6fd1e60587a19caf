#!/usr/bin/env python3
"""Builds Weft's images without a container engine or registry (see build.sh for the interface).

Each image is FROM scratch plus one layer, and the files of that layer are declared in ONE place:
the runtime stage (the last FROM, which must be `FROM scratch`) of
daemonset/images/<image>.Containerfile. Every COPY there names one file (or an empty directory),
and this script copies the same file from this machine:

  COPY --from=build /src/target/PROFILE/BIN DEST   the release binary BIN of --bin-dir (where
                                                   scripts/release.sh puts each, whatever its
                                                   cargo profile: ztunnel's is its own)
  COPY --from=STAGE /PATH DEST                     /PATH of this machine (Debian 12, the release
                                                   of the Containerfile's Debian stages); a
                                                   directory is made empty, with /PATH's mode
  COPY PATH DEST                                   PATH of the repository (the build context)

USER, ENV, EXPOSE, ENTRYPOINT and CMD of that stage become the image's config; anything else there
is refused. Before writing anything it runs ldd on every executable of the image (files under a
bin/ or sbin/ directory) and fails unless the shared libraries declared (files named *.so*) are
exactly those ldd resolves, the dynamic loader included, so the Containerfile cannot lose or keep
a library behind the binaries' back.

Output: OUT_DIR/<image>.tar in docker-archive format (manifest.json, <config sha256>.json,
<layer diff_id>/layer.tar, repositories), what `docker save` writes and `docker load`,
`podman load`, `skopeo copy docker-archive:...` and `ctr -n k8s.io images import` read.
Deterministic: entries sorted, mtime 0 (or $SOURCE_DATE_EPOCH), owner 0:0, modes normalised
(0755 or 0644 for files, 0755 for parent directories), so the same inputs give the same image id
(the config's sha256, printed).
"""

import argparse
import hashlib
import io
import json
import os
import pathlib
import re
import shlex
import stat
import subprocess
import sys
import tarfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent.parent
IMAGES_DIR = REPO / "daemonset" / "images"
# Image name -> Containerfile; the chart's repositories are localhost:5000/weft/<name>.
IMAGES = {
    "controller": "controller.Containerfile",
    "ztunnel": "ztunnel.Containerfile",
    "waypoint": "waypoint.Containerfile",
    "app": "app.Containerfile",
}
DEFAULT_REGISTRY = "localhost:5000/weft"
DEFAULT_TAG = "0.1.0"  # the chart's image.tag (daemonset/tests/test_images.py checks it)
BUILD_BIN = re.compile(r"/src/target/[a-z0-9-]+/([^/]+)")
LOADER_LINE = re.compile(r"^\s*(/\S+) \(0x[0-9a-f]+\)$")
LIB_LINE = re.compile(r"^\s*(\S+) => (\S+) \(0x[0-9a-f]+\)$")
VDSO_LINE = re.compile(r"^\s*linux-vdso\.so\.\d+ \(0x[0-9a-f]+\)$")


class BuildError(Exception):
    pass


def instructions(path: pathlib.Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Containerfile: continuations joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", path.read_text())
    lines = [l.strip() for l in text.splitlines() if l.strip() and not l.strip().startswith("#")]
    return [(l.split(None, 1)[0].upper(), (l.split(None, 1) + [""])[1]) for l in lines]


def runtime_stage(path: pathlib.Path) -> tuple[list[str], list[tuple[str, str]]]:
    """The names of the Containerfile's earlier stages and the instructions of its last one."""
    steps = instructions(path)
    froms = [i for i, (op, _) in enumerate(steps) if op == "FROM"]
    if not froms or steps[froms[-1]][1].strip() != "scratch":
        raise BuildError(f"{path}: the last stage must be `FROM scratch`")
    stages = []
    for i in froms[:-1]:
        m = re.search(r"\s+AS\s+(\S+)$", steps[i][1], re.IGNORECASE)
        if m:
            stages.append(m.group(1))
    return stages, steps[froms[-1] + 1 :]


def parse_spec(name: str, path: pathlib.Path, bin_dir: pathlib.Path) -> dict:
    """What the runtime stage declares: files (dest -> host source) and the image config."""
    stages, steps = runtime_stage(path)
    spec = {"files": {}, "user": "", "env": [], "ports": [], "entrypoint": None, "cmd": None}
    for op, args in steps:
        where = f"{path.name}: {op} {args}"
        if op == "COPY":
            words = shlex.split(args)
            flags = [w for w in words if w.startswith("--")]
            operands = [w for w in words if not w.startswith("--")]
            stage = None
            for flag in flags:
                if flag.startswith("--from="):
                    stage = flag[len("--from=") :]
                else:
                    raise BuildError(f"{where}: only --from is supported")
            if len(operands) != 2:
                raise BuildError(f"{where}: one source and one destination per COPY")
            source, dest = operands
            if not dest.startswith("/") or dest.endswith("/"):
                raise BuildError(f"{where}: the destination must be an absolute file path")
            if stage is None:
                host = REPO / source
            elif stage not in stages:
                raise BuildError(f"{where}: no stage {stage!r}")
            elif stage == "build":
                built = BUILD_BIN.fullmatch(source)
                if not built:
                    raise BuildError(f"{where}: the build stage's files are /src/target/PROFILE/BIN")
                host = bin_dir / built.group(1)
            else:
                if not source.startswith("/"):
                    raise BuildError(f"{where}: a Debian stage's path must be absolute")
                host = pathlib.Path(source)
            if dest in spec["files"]:
                raise BuildError(f"{where}: {dest} copied twice")
            spec["files"][dest] = host
        elif op == "USER":
            spec["user"] = args.strip()
        elif op == "ENV":
            for word in shlex.split(args):
                if "=" not in word:
                    raise BuildError(f"{where}: use ENV KEY=VALUE")
                spec["env"].append(word)
        elif op == "EXPOSE":
            for port in args.split():
                spec["ports"].append(port if "/" in port else f"{port}/tcp")
        elif op in ("ENTRYPOINT", "CMD"):
            value = json.loads(args)
            if not isinstance(value, list):
                raise BuildError(f"{where}: use the JSON (exec) form")
            spec["entrypoint" if op == "ENTRYPOINT" else "cmd"] = value
        else:
            raise BuildError(f"{where}: not supported in the runtime stage")
    return spec


def is_elf(path: pathlib.Path) -> bool:
    with open(path, "rb") as f:
        return f.read(4) == b"\x7fELF"


def ldd(path: pathlib.Path) -> set[str]:
    """The shared libraries (and loader) `path` loads, as ldd resolves them on this machine."""
    out = subprocess.run(["ldd", str(path)], capture_output=True, text=True)
    text = out.stdout + out.stderr
    if "not a dynamic executable" in text or "statically linked" in text:
        return set()
    if out.returncode != 0:
        raise BuildError(f"ldd {path} failed:\n{text}")
    libs = set()
    for line in out.stdout.splitlines():
        if VDSO_LINE.match(line):
            continue
        if "=> not found" in line:
            raise BuildError(f"ldd {path}: {line.strip()}")
        m = LIB_LINE.match(line) or LOADER_LINE.match(line)
        if not m:
            raise BuildError(f"ldd {path}: cannot read {line!r}")
        libs.add(m.groups()[-1])
    return libs


def check_libraries(name: str, path: pathlib.Path, spec: dict) -> None:
    executables = [
        dest for dest in spec["files"] if re.search(r"/s?bin/[^/]+$", dest) and is_elf(spec["files"][dest])
    ]
    needed = set()
    for dest in executables:
        needed |= ldd(spec["files"][dest])
    # Plugins (iptables' xtables extensions) are loaded with dlopen: not ldd's business.
    declared = {
        dest for dest in spec["files"] if ".so" in os.path.basename(dest) and "/xtables/" not in dest
    }
    problems = [f"  missing: COPY --from=debian {lib} {lib}" for lib in sorted(needed - declared)]
    problems += [f"  not loaded by {', '.join(executables)}: {lib}" for lib in sorted(declared - needed)]
    if problems:
        raise BuildError(
            f"{path}: the libraries declared are not those ldd finds for {name}:\n" + "\n".join(problems)
        )


def check_sources(path: pathlib.Path, spec: dict) -> None:
    missing = [f"  {dest}: {host}" for dest, host in spec["files"].items() if not host.exists()]
    if missing:
        raise BuildError(
            f"{path}: sources missing on this machine (release binaries: cargo build --release;"
            " Debian files: apt-get install the Containerfile's packages):\n" + "\n".join(missing)
        )


def layer_entries(spec: dict) -> dict:
    """Image path (no leading /) -> (TarInfo type, host source or None, mode)."""
    entries = {}
    for dest, host in spec["files"].items():
        st = host.stat()  # follows symlinks, as COPY does for its source
        if stat.S_ISDIR(st.st_mode):
            entries[dest] = (tarfile.DIRTYPE, None, stat.S_IMODE(st.st_mode))
        elif stat.S_ISREG(st.st_mode):
            entries[dest] = (tarfile.REGTYPE, host, 0o755 if st.st_mode & 0o100 else 0o644)
        else:
            raise BuildError(f"{host}: neither a file nor a directory")
    for dest in list(entries):
        parent = os.path.dirname(dest)
        while parent != "/":
            if parent in entries and entries[parent][0] != tarfile.DIRTYPE:
                raise BuildError(f"{parent} is both a file and a directory")
            entries.setdefault(parent, (tarfile.DIRTYPE, None, 0o755))
            parent = os.path.dirname(parent)
    return {dest.lstrip("/"): entry for dest, entry in entries.items()}


def tarinfo(name: str, kind, mode: int, size: int, mtime: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.size, info.mtime = kind, mode, size, mtime
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def sha256_file(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_image(name: str, spec: dict, tag: str, out: pathlib.Path, mtime: int, containerfile: str) -> str:
    layer_path = out.with_name(out.name + ".layer.tmp")
    archive_path = out.with_name(out.name + ".tmp")
    try:
        with tarfile.open(layer_path, "w", format=tarfile.GNU_FORMAT) as layer:
            for path, (kind, host, mode) in sorted(layer_entries(spec).items()):
                if kind == tarfile.DIRTYPE:
                    layer.addfile(tarinfo(path, kind, mode, 0, mtime))
                else:
                    with open(host, "rb") as f:
                        size = os.fstat(f.fileno()).st_size
                        layer.addfile(tarinfo(path, kind, mode, size, mtime), f)
        diff_id = sha256_file(layer_path)
        created = "%04d-%02d-%02dT%02d:%02d:%02dZ" % time.gmtime(mtime)[:6]
        config = {
            "architecture": "amd64",
            "os": "linux",
            "created": created,
            "config": {
                "User": spec["user"],
                "Env": spec["env"],
                "ExposedPorts": {port: {} for port in spec["ports"]},
                "Entrypoint": spec["entrypoint"],
                "Cmd": spec["cmd"],
                "WorkingDir": "/",
                "Labels": {"org.opencontainers.image.version": tag.rpartition(":")[2]},
            },
            "rootfs": {"type": "layers", "diff_ids": [f"sha256:{diff_id}"]},
            "history": [
                {
                    "created": created,
                    "created_by": f"scripts/images/build.sh from daemonset/images/{containerfile}",
                }
            ],
        }
        config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
        image_id = hashlib.sha256(config_bytes).hexdigest()
        manifest = [{"Config": f"{image_id}.json", "RepoTags": [tag], "Layers": [f"{diff_id}/layer.tar"]}]
        repository, _, version = tag.rpartition(":")
        repositories = {repository: {version: diff_id}}

        def put(archive, member: str, data: bytes) -> None:
            archive.addfile(tarinfo(member, tarfile.REGTYPE, 0o644, len(data), mtime), io.BytesIO(data))

        with tarfile.open(archive_path, "w", format=tarfile.GNU_FORMAT) as archive:
            archive.addfile(tarinfo(diff_id, tarfile.DIRTYPE, 0o755, 0, mtime))
            with open(layer_path, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                archive.addfile(tarinfo(f"{diff_id}/layer.tar", tarfile.REGTYPE, 0o644, size, mtime), f)
            put(archive, f"{image_id}.json", config_bytes)
            put(archive, "manifest.json", json.dumps(manifest, separators=(",", ":")).encode())
            put(archive, "repositories", json.dumps(repositories, separators=(",", ":")).encode())
        os.replace(archive_path, out)
    finally:
        for tmp in (layer_path, archive_path):
            tmp.unlink(missing_ok=True)
    return image_id


def check_host() -> None:
    try:
        release = dict(
            line.split("=", 1) for line in pathlib.Path("/etc/os-release").read_text().splitlines() if "=" in line
        )
    except OSError:
        release = {}
    if release.get("ID") != "debian" or release.get("VERSION_ID", "").strip('"') != "12":
        raise BuildError(
            "this machine is not Debian 12: the images' libraries must be those of the Containerfiles'"
            " Debian 12 stages (and the binaries built against them)"
        )


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/images/build.sh",
        description="Builds Weft's images (docker-archive tarballs) from release binaries, without a container engine.",
    )
    default_bin_dir = pathlib.Path(
        os.environ.get("CARGO_TARGET_DIR") or pathlib.Path.home() / ".cache/weft/target"
    ) / "release"
    parser.add_argument("--bin-dir", type=pathlib.Path, default=default_bin_dir,
                        help="the release binaries (default: $CARGO_TARGET_DIR/release, %(default)s)")
    parser.add_argument("--registry", default=DEFAULT_REGISTRY, help="image repository prefix (default: %(default)s)")
    parser.add_argument("--tag", default=DEFAULT_TAG, help="image tag (default: %(default)s)")
    parser.add_argument("out_dir", metavar="OUT_DIR", type=pathlib.Path)
    parser.add_argument("images", metavar="IMAGE", nargs="*",
                        help=f"images to build (default: all: {' '.join(IMAGES)})")
    args = parser.parse_args()
    names = args.images or list(IMAGES)
    for name in names:
        if name not in IMAGES:
            parser.error(f"no image {name!r} (images: {' '.join(IMAGES)})")
    mtime = int(os.environ.get("SOURCE_DATE_EPOCH", "0"))
    try:
        check_host()
        specs = {}
        for name in names:  # every check before any output
            path = IMAGES_DIR / IMAGES[name]
            spec = parse_spec(name, path, args.bin_dir.resolve())
            check_sources(path, spec)
            check_libraries(name, path, spec)
            specs[name] = spec
        args.out_dir.mkdir(parents=True, exist_ok=True)
        for name in names:
            tag = f"{args.registry}/{name}:{args.tag}"
            out = args.out_dir / f"{name}.tar"
            image_id = write_image(name, specs[name], tag, out, mtime, IMAGES[name])
            size = out.stat().st_size
            print(f"{out}\t{tag}\tsha256:{image_id}\t{size / 1e6:.1f} MB")
    except BuildError as e:
        print(f"images/build: ERROR: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
