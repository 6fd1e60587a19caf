#!/usr/bin/env bash
# Runs a command inside a node of the cluster start.sh made from STATE_DIR, with KUBECONFIG set
# to the admin kubeconfig: by default in node a's network namespace (where the apiserver,
# node IPs, pod IPs and ClusterIPs are all reachable; the root namespace reaches none of them),
# with the root namespace's files. Exit status and stdio are the command's.
#
#   scripts/kube-cluster/run.sh [-b] [-m] STATE_DIR CMD [ARGS...]
#     -b   node b instead of node a
#     -m   also enter the node's mount namespace (its own /sys/fs/bpf, /run, /var/lib, /var/log)
# e.g. run.sh "$S" kubectl get pods -A -o wide;  run.sh "$S" helm install ...;
#      run.sh -b "$S" tcpdump -ni eth0;  run.sh -m "$S" bpftool map show
set -euo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SCRIPT_NAME=run
# shellcheck source=lib.sh
. "$HERE/lib.sh"
node=a mnt=0
while (($#)); do
  case $1 in
  -b) node=b ;;
  -a) node=a ;;
  -m) mnt=1 ;;
  *) break ;;
  esac
  shift
done
(($# >= 2)) || fail "usage: run.sh [-b] [-m] STATE_DIR CMD [ARGS...]"
[[ -d $1 ]] || fail "no state dir $1"
cluster_names "$1"
shift
[[ -e /run/netns/${NETNS[$node]} ]] || fail "cluster ${CLUSTER_ID} is not running (no netns ${NETNS[$node]})"
export KUBECONFIG=$STATE/admin.kubeconfig
if ((mnt)); then
  hp=$(holder_pid "$node") || fail "node $node's namespace holder is not running"
  exec nsenter -t "$hp" -n -m -- "$@"
fi
exec nsenter --net="/run/netns/${NETNS[$node]}" -- "$@"
