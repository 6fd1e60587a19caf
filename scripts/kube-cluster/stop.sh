#!/usr/bin/env bash
# Stops the two-node cluster start.sh started from STATE_DIR and removes every trace of it:
# workloads are deleted first (kubelet tears the pods down, CNI DEL included; bounded by
# STOP_GRACE seconds, default 20), then every process is stopped by pid: the recorded ones
# (checked against /proc/PID/exe), and any other process still inside the cluster's node
# network or mount namespaces or its cgroups (container processes, containerd shims, commands
# left running through run.sh). Then both network namespaces are deleted (their links, routes and
# iptables rules go with them; the node mount namespaces, their mounts and bpffs went with their
# last process), the cgroup dirs under /wkc-<id>-{a,b} are removed, the global sysctls kubelet
# changed are put back (by the last cluster to stop, when several are up), and STATE_DIR is removed (KEEP_LOGS=1 keeps STATE_DIR/logs).
#
#   scripts/kube-cluster/stop.sh STATE_DIR
#
# Idempotent, and works after a partial or failed start: names are derived from STATE_DIR.
# Exit status 1 if something could not be removed (it says what).
set -uo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SCRIPT_NAME=stop
# shellcheck source=lib.sh
. "$HERE/lib.sh"

(($# == 1)) && [[ -n $1 ]] || fail "usage: stop.sh STATE_DIR"
((EUID == 0)) || fail "must run as root"
[[ -d $1 ]] || { say "no $1: nothing to stop"; exit 0; }
cluster_names "$1"
GRACE=${STOP_GRACE:-20}
t0=$(date +%s.%N)
step() { say "[$(printf %.1f "$(echo "$(date +%s.%N) - $t0" | bc)")s] $*"; }
problems=0

netns_exists() { [[ -e /run/netns/${NETNS[$1]} ]]; }

# --- 1. let kubelet tear the workloads down ----------------------------------------------------------
if netns_exists a && [[ -s $STATE/admin.kubeconfig ]]; then
  kc() {
    nsenter --net="/run/netns/${NETNS[a]}" -- kubectl --kubeconfig "$STATE/admin.kubeconfig" \
      --request-timeout=5s "$@"
  }
  if kc get --raw /readyz >/dev/null 2>&1; then
    kc delete daemonsets,deployments,statefulsets,replicasets,jobs,cronjobs --all -A --wait=false \
      >/dev/null 2>&1
    kc delete pods --all -A --grace-period=1 --wait=false >/dev/null 2>&1
    end=$((SECONDS + GRACE)) busy=0
    while ((SECONDS < end)); do
      busy=0
      for n in "${NODES[@]}"; do
        [[ -S ${SOCK[$n]} ]] || continue
        [[ -z $(ctr -a "${SOCK[$n]}" -n k8s.io tasks ls -q 2>/dev/null) ]] || busy=1
      done
      ((busy)) || break
      sleep 0.5
    done
    ((busy)) && say "pods still running after ${GRACE}s; killing them"
    step "workloads deleted"
  fi
fi

# --- 2. the recorded processes, control plane and kubelets first, containerd and holders last ------
declare -A NS_NET NS_MNT # inode strings ("net:[4026...]") of the cluster's namespaces
for n in "${NODES[@]}"; do
  if netns_exists "$n"; then
    NS_NET["net:[$(stat -L -c %i "/run/netns/${NETNS[$n]}")]"]=1
  fi
done
declare -a recs=()
[[ -f $STATE/pids ]] && mapfile -t recs <"$STATE/pids"
for r in "${recs[@]}"; do
  read -r name pid exe <<<"$r"
  if pid_is "$pid" "$exe"; then
    m=$(readlink "/proc/$pid/ns/mnt") && [[ $m != "$(readlink /proc/self/ns/mnt)" ]] && NS_MNT[$m]=1
  fi
done

stop_group() { # PATTERN...: SIGTERM the matching recorded processes, wait 10s, then SIGKILL
  local r name pid exe pat p
  local -a pids=()
  for r in "${recs[@]}"; do
    read -r name pid exe <<<"$r"
    for pat in "$@"; do
      # shellcheck disable=SC2053
      if [[ $name == $pat ]] && pid_is "$pid" "$exe"; then
        kill -TERM "$pid" 2>/dev/null && pids+=("$pid:$exe")
      fi
    done
  done
  local end=$((SECONDS + 10))
  for p in "${pids[@]}"; do
    while pid_is "${p%%:*}" "${p#*:}" && ((SECONDS < end)); do sleep 0.1; done
    if pid_is "${p%%:*}" "${p#*:}"; then
      kill -KILL "${p%%:*}" 2>/dev/null
      say "killed ${p#*:} (${p%%:*}) after 10s"
    fi
  done
}
stop_group 'kube-proxy-*' 'kubelet-*' kube-scheduler kube-controller-manager
stop_group kube-apiserver
stop_group etcd
step "kubernetes components stopped"

# --- 3. everything else of the cluster: container processes, shims, leftovers of run.sh -----------
cgroup_dirs() {
  local n h
  for n in "${NODES[@]}"; do
    for h in /sys/fs/cgroup/*/; do
      [[ -d ${h%/}${CGROOT[$n]} ]] && echo "${h%/}${CGROOT[$n]}"
    done
  done
}
ours() { # the pids of every process in the cluster's cgroups or namespaces, except the holders
  local d p net mnt
  for d in $(cgroup_dirs); do find "$d" -name cgroup.procs -exec cat {} + 2>/dev/null; done
  for p in /proc/[0-9]*; do
    net=$(readlink "$p/ns/net" 2>/dev/null) || continue
    mnt=$(readlink "$p/ns/mnt" 2>/dev/null) || continue
    if [[ -n ${NS_NET[$net]:-} || -n ${NS_MNT[$mnt]:-} ]]; then echo "${p#/proc/}"; fi
  done
}
holders=" "
for r in "${recs[@]}"; do
  read -r name pid exe <<<"$r"
  [[ $name == holder-* ]] && holders+="$pid "
done
# containerd gets a SIGTERM first (it may flush its state), the rest SIGKILL.
stop_group 'containerd-*'
for round in 1 2 3 4 5 6 7 8 9 10; do
  victims=()
  for p in $(ours | sort -un); do
    [[ $p == "$$" || $holders == *" $p "* ]] && continue
    victims+=("$p")
  done
  ((${#victims[@]})) || break
  ((round == 1)) || say "round $round: killing ${#victims[@]} leftover processes"
  kill -KILL "${victims[@]}" 2>/dev/null
  sleep 0.3
done
((${#victims[@]})) && { say "processes left: ${victims[*]}"; problems=1; }
stop_group 'holder-*'
step "all processes stopped"

# --- 4. network namespaces, mounts left in the root namespace (none are expected) -----------------
for n in "${NODES[@]}"; do
  if netns_exists "$n"; then
    ip netns delete "${NETNS[$n]}" || { say "could not delete netns ${NETNS[$n]}"; problems=1; }
  fi
done
while read -r m; do
  umount -l "$m" && say "unmounted $m (left in the root namespace)"
done < <(awk -v s="$STATE/" 'index($2 "/", s) == 1 { print $2 }' /proc/self/mounts | sort -r)

# --- 5. cgroups (after their processes are gone) ------------------------------------------------------
for attempt in 1 2 3 4 5 6 7 8 9 10; do
  left=0
  for d in $(cgroup_dirs); do
    find "$d" -depth -type d -exec rmdir {} + 2>/dev/null || true
    [[ -d $d ]] && left=1
  done
  ((left)) || break
  sleep 0.3
done
((left)) && { say "cgroup dirs left: $(cgroup_dirs | tr '\n' ' ')"; problems=1; }

# --- 6. sysctls, state ----------------------------------------------------------------------------
others=$(other_clusters | tr '\n' ' ')
if [[ -n $others ]]; then
  [[ -f $STATE/sysctl.before ]] && say "other clusters are up ($others): the last to stop puts the sysctls back"
else
  record=$STATE/sysctl.before
  [[ -s $record ]] || record=$SYSCTL_RECORD
  if [[ -s $record ]]; then
    while read -r k v; do
      [[ -n $k && -n $v ]] && [[ $(sysctl -n "$k") != "$v" ]] && sysctl -qw "$k=$v"
    done <"$record"
  fi
  rm -f "$SYSCTL_RECORD"
fi
if [[ ${KEEP_LOGS:-0} == 1 ]]; then
  find "$STATE" -mindepth 1 -maxdepth 1 ! -name logs -exec rm -rf {} +
else
  rm -rf "$STATE"
fi
step "cluster $CLUSTER_ID stopped"
exit "$problems"
