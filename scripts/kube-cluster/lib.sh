# shellcheck shell=bash
# Shared by start.sh, stop.sh, run.sh and import.sh (sourced, not run): the names and addresses of
# a cluster, all derived from its STATE_DIR, so stop.sh finds everything even after a start that
# died half-way and left no env file.
#
# Set by cluster_names STATE_DIR:
#   STATE          absolute state dir
#   CLUSTER_ID     6 hex digits of sha1(STATE)
#   NETNS[a|b]     network namespace names, also the node names: wkc-<id>-a, wkc-<id>-b
#   NODE_IP[a|b]   192.168.77.1 / 192.168.77.2 (only inside the node namespaces)
#   POD_CIDR[a|b]  10.244.1.0/24 / 10.244.2.0/24
#   CGROOT[a|b]    kubelet's cgroupRoot, /wkc-<id>-a and /wkc-<id>-b
#   SOCK[a|b]      containerd's socket, STATE/a/containerd.sock ...
# (not readonly: callers may source STATE_DIR/env after this)
VERSION=1.20.2
SERVICE_CIDR=10.96.0.0/16
CLUSTER_CIDR=10.244.0.0/16
KUBERNETES_SVC_IP=10.96.0.1
NODES=(a b)
# The global sysctls kubelet rewrites when it starts (setupKernelTunables); start.sh records them,
# stop.sh puts them back. With several clusters up at once, the first one's record is kept in
# SYSCTL_RECORD while any is up, and the last one to stop puts the values back.
GLOBAL_SYSCTLS=(kernel.panic kernel.panic_on_oops vm.overcommit_memory vm.panic_on_oom
  kernel.keys.root_maxkeys kernel.keys.root_maxbytes)
SYSCTL_RECORD=/run/weft-kube-cluster.sysctl

# other_clusters: the node netns of other clusters of these scripts that are up
other_clusters() { ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^wkc-[0-9a-f]{6}-a$' | grep -v "^wkc-$CLUSTER_ID-a$"; }

say() { echo "kube-cluster/${SCRIPT_NAME:-?}: $*" >&2; }
fail() {
  say "ERROR: $*"
  exit 1
}

declare -A NETNS NODE_IP POD_CIDR CGROOT SOCK
cluster_names() {
  mkdir -p "$1"
  STATE=$(cd "$1" && pwd -P)
  CLUSTER_ID=$(printf %s "$STATE" | sha1sum | cut -c1-6)
  local n i=1
  for n in "${NODES[@]}"; do
    NETNS[$n]=wkc-$CLUSTER_ID-$n
    NODE_IP[$n]=192.168.77.$i
    POD_CIDR[$n]=10.244.$i.0/24
    CGROOT[$n]=/wkc-$CLUSTER_ID-$n
    SOCK[$n]=$STATE/$n/containerd.sock
    i=$((i + 1))
  done
}

# pid_is PID EXE: PID is alive and runs EXE (guards against pid reuse).
pid_is() { [[ $(readlink "/proc/$1/exe" 2>/dev/null) == "$2" ]]; }

# holder_pid NODE: the `sleep` that holds the node's network + mount namespaces, if alive.
holder_pid() {
  local name pid exe
  [[ -f $STATE/pids ]] || return 1
  while read -r name pid exe; do
    if [[ $name == holder-$1 ]] && pid_is "$pid" "$exe"; then
      echo "$pid"
      return 0
    fi
  done <"$STATE/pids"
  return 1
}
