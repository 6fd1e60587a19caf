#!/usr/bin/env python3
"""Writes a one-layer image as a docker-archive tarball (what `docker save` makes and
`ctr -n k8s.io images import` reads), without any registry or image tool.

  mkimage.py OUT.tar TAG ENTRYPOINT_JSON [CMD_JSON] < SPEC

TAG is a full reference, e.g. localhost/weft/pause:3.2. ENTRYPOINT_JSON / CMD_JSON are JSON
lists ("[]" for none). SPEC lines (stdin), paths in the image absolute:
  file SRC DST [MODE]     copy host file SRC to DST (mode octal, default: SRC's mode)
  link DST TARGET         symlink DST -> TARGET
  dir DST                 empty directory (mode 0755; /tmp gets 1777)
Parent directories are added as needed. The layer is deterministic (mtime 0, uid/gid 0), so the
same inputs give the same image id.
"""
import hashlib, io, json, os, sys, tarfile


def main():
    if len(sys.argv) not in (4, 5):
        sys.exit(__doc__)
    out, tag, entry = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    cmd = json.loads(sys.argv[4]) if len(sys.argv) == 5 else []
    entries = {}  # path -> (kind, arg, mode)

    def add_parents(p):
        d = os.path.dirname(p)
        while d not in ("/", ""):
            entries.setdefault(d, ("dir", None, 0o755))
            d = os.path.dirname(d)

    for line in sys.stdin:
        f = line.split()
        if not f or f[0].startswith("#"):
            continue
        if f[0] == "file":
            mode = int(f[3], 8) if len(f) > 3 else os.stat(f[1]).st_mode & 0o7777
            entries[f[2]] = ("file", f[1], mode)
        elif f[0] == "link":
            entries[f[1]] = ("link", f[2], 0o777)
        elif f[0] == "dir":
            entries[f[1]] = ("dir", None, 0o1777 if f[1] == "/tmp" else 0o755)
        else:
            sys.exit(f"mkimage: bad spec line: {line!r}")
        add_parents(f[2] if f[0] == "file" else f[1])

    layer = io.BytesIO()
    with tarfile.open(fileobj=layer, mode="w", format=tarfile.GNU_FORMAT) as t:
        for path in sorted(entries):
            kind, arg, mode = entries[path]
            ti = tarfile.TarInfo(path.lstrip("/"))
            ti.mtime, ti.uid, ti.gid, ti.uname, ti.gname, ti.mode = 0, 0, 0, "", "", mode
            if kind == "dir":
                ti.type = tarfile.DIRTYPE
                t.addfile(ti)
            elif kind == "link":
                ti.type, ti.linkname = tarfile.SYMTYPE, arg
                t.addfile(ti)
            else:
                with open(arg, "rb") as fh:
                    data = fh.read()
                ti.size = len(data)
                t.addfile(ti, io.BytesIO(data))
    layer_bytes = layer.getvalue()
    diff_id = "sha256:" + hashlib.sha256(layer_bytes).hexdigest()
    config = {
        "architecture": "amd64",
        "os": "linux",
        "created": "1970-01-01T00:00:00Z",
        "config": {"Entrypoint": entry or None, "Cmd": cmd or None,
                   "Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"],
                   "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": "1970-01-01T00:00:00Z", "created_by": "weft mkimage.py"}],
    }
    config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    config_id = hashlib.sha256(config_bytes).hexdigest()
    layer_dir = diff_id[len("sha256:"):]
    manifest = [{"Config": config_id + ".json", "RepoTags": [tag],
                 "Layers": [layer_dir + "/layer.tar"]}]
    name, _, ver = tag.rpartition(":")
    repositories = {name: {ver: layer_dir}}

    tmp = out + ".tmp"
    with tarfile.open(tmp, mode="w", format=tarfile.GNU_FORMAT) as t:
        def put(n, data, dir_=False):
            ti = tarfile.TarInfo(n)
            ti.mtime = 0
            if dir_:
                ti.type, ti.mode = tarfile.DIRTYPE, 0o755
                t.addfile(ti)
            else:
                ti.size, ti.mode = len(data), 0o644
                t.addfile(ti, io.BytesIO(data))
        put(layer_dir, b"", dir_=True)
        put(layer_dir + "/layer.tar", layer_bytes)
        put(config_id + ".json", config_bytes)
        put("manifest.json", json.dumps(manifest).encode())
        put("repositories", json.dumps(repositories).encode())
    os.replace(tmp, out)


if __name__ == "__main__":
    main()
