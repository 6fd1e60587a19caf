#!/usr/bin/env bash
# Builds Weft's container images without a container engine or registry: docker-archive tarballs
# of one layer FROM scratch, holding exactly the files the runtime stage (`FROM scratch`) of
# daemonset/images/<image>.Containerfile copies (the one list of them), taken from the release
# binaries and this machine, which must be Debian 12 like the Containerfiles' stages. ldd checks
# that the libraries listed there are exactly those the binaries load. Details in build.py.
#
#   scripts/images/build.sh [--bin-dir DIR] [--registry R] [--tag T] OUT_DIR [IMAGE...]
#
# IMAGE: controller ztunnel waypoint app (default: all). DIR: the release binaries (default:
# $CARGO_TARGET_DIR/release, as scripts/env.sh sets it; scripts/release.sh builds them). Writes
# OUT_DIR/<image>.tar tagged R/<image>:T (default localhost:5000/weft/<image>:0.1.0, the chart's),
# and prints one line per image: path, tag, image id, size. Same inputs, same image id. Load one
# into a node with
#   ctr -n k8s.io images import OUT_DIR/ztunnel.tar      (or docker load / podman load -i)
# Needs python3, ldd, and the Debian packages the Containerfiles install: iproute2 (ztunnel),
# curl (app), ca-certificates.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../env.sh"
exec python3 "$(dirname "${BASH_SOURCE[0]}")/build.py" "$@"
