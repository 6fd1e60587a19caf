#!/usr/bin/env bash
# Imports image tarballs (docker-archive or OCI) into both nodes' containerd (namespace k8s.io)
# of the running cluster start.sh made from STATE_DIR, e.g. after rebuilding an image. An image
# with the same tag is replaced; running pods keep the old one until they are recreated.
#
#   scripts/kube-cluster/import.sh STATE_DIR TAR...
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SCRIPT_NAME=import
# shellcheck source=lib.sh
. "$HERE/lib.sh"
(($# >= 2)) || fail "usage: import.sh STATE_DIR TAR..."
[[ -d $1 ]] || fail "no state dir $1"
cluster_names "$1"
shift
pids=()
for n in "${NODES[@]}"; do
  [[ -S ${SOCK[$n]} ]] || fail "no containerd socket ${SOCK[$n]}: is the cluster running?"
  for t in "$@"; do [[ -s $t ]] || fail "no image tarball $t"; done
  # one after the other per node: parallel imports into one containerd contend for a lock
  (for t in "$@"; do ctr -a "${SOCK[$n]}" -n k8s.io images import "$t" >/dev/null || exit 1; done) &
  pids+=($!)
done
rc=0
for p in "${pids[@]}"; do wait "$p" || rc=1; done
((rc == 0)) || fail "ctr images import failed"
say "imported $* into nodes ${NETNS[a]} and ${NETNS[b]}"
