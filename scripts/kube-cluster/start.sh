#!/usr/bin/env bash
# Starts a real two-node Kubernetes v1.20.2 cluster on this machine, for tests: each node is its
# own network namespace + mount namespace with its own containerd, kubelet and kube-proxy
# (iptables mode); the control plane (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler) runs in node a's namespaces. Binaries come from build.sh (this dir) and
# scripts/kube-apiserver/build.sh; run both first. Needs root.
#
#   scripts/kube-cluster/start.sh STATE_DIR [IMAGE_TAR...]    # then: stop.sh STATE_DIR
#
# IMAGE_TARs (docker-archive or OCI tarballs) are imported into both nodes' containerd, as is
# the pause image (localhost/weft/pause:3.2). Pods should use `imagePullPolicy: Never` or
# IfNotPresent with a non-latest tag: there is no registry.
#
# Layout (nothing outside STATE_DIR, the two netns and the cgroup dirs /wkc-<id>-{a,b}):
#   node a  netns wkc-<id>-a, eth0 192.168.77.1/24, pods 10.244.1.0/24, control plane, apiserver
#           https://192.168.77.1:6443 (also Service 10.96.0.1:443)
#   node b  netns wkc-<id>-b, eth0 192.168.77.2/24, pods 10.244.2.0/24
#   The two eth0s are the ends of one veth pair; each node routes the other's pod CIDR via the
#   other's IP. Services: 10.96.0.0/16, no cluster DNS. The root namespace is not touched: use
#   run.sh to reach the cluster (kubectl, helm, curl run in node a's netns).
#   In each node's mount namespace (made from the root one, slave, then rshared inside): a tmpfs
#   on /run (containerd's shim sockets and runc state live under /run/containerd, the pods'
#   network namespaces are pinned in /run/netns, hostPath /var/run/... is per node), private dirs
#   bound over /var/lib (kubelet hard-codes /var/lib/kubelet/device-plugins; CNI's cache is
#   /var/lib/cni) and /var/log (kubelet writes /var/log/pods and /var/log/containers), and a
#   fresh bpffs on /sys/fs/bpf, shared, so that each node has its own /sys/fs/bpf and
#   hostPath mounts with mountPropagation HostToContainer work. etcd keeps its data on node a's
#   /run tmpfs.
#
# Writes STATE_DIR/env (sourceable): CLUSTER_ID NETNS_A NETNS_B NODE_A NODE_B NODE_A_IP NODE_B_IP
#   POD_CIDR_A POD_CIDR_B SERVICE_CIDR KUBECONFIG KUBE_APISERVER_URL KUBE_ADMIN_TOKEN KUBE_CA_FILE
#   CONTAINERD_SOCK_A CONTAINERD_SOCK_B NODE_A_PID NODE_B_PID (a process in each node's net+mount
#   namespaces: `nsenter -t $NODE_A_PID -n -m CMD` runs CMD as the node sees the world),
#   PAUSE_IMAGE.
# Also: admin.kubeconfig, pids ("name pid exe" per process, for stop.sh), pki/, logs/<comp>.log,
#   a/ and b/ (per-node containerd, kubelet and CNI state). The last stdout line is the env path.
# On failure the log tails are printed and stop.sh cleans up (KEEP_FAILED=1 keeps it all).
# Environment: WEFT_KUBE_NODE_DIR, WEFT_KUBE_APISERVER_DIR (build caches), START_TIMEOUT (s, 240).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SCRIPT_NAME=start
# shellcheck source=lib.sh
. "$HERE/lib.sh"

NODE_DIR=${WEFT_KUBE_NODE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/weft/kube-node-$VERSION}
API_DIR=${WEFT_KUBE_APISERVER_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/weft/kube-apiserver-$VERSION}
TIMEOUT=${START_TIMEOUT:-240}

(($# >= 1)) && [[ -n $1 ]] || fail "usage: start.sh STATE_DIR [IMAGE_TAR...]"
((EUID == 0)) || fail "must run as root"
cluster_names "$1"
shift
images=()
for t in "$@"; do
  [[ -s $t ]] || fail "no image tarball $t"
  images+=("$(readlink -f "$t")")
done
case $STATE/ in
/run/* | /var/run/* | /var/lib/* | /var/log/* | /sys/* | /proc/*)
  fail "STATE_DIR $STATE is under a path each node's mount namespace replaces" ;;
esac
((${#SOCK[a]} + 8 < 108)) || fail "STATE_DIR is too long for a unix socket path (${SOCK[a]})"

declare -A BIN
for b in kubelet kube-controller-manager kube-scheduler kube-proxy; do
  BIN[$b]=$NODE_DIR/bin/$b
  [[ -x ${BIN[$b]} ]] || fail "no ${BIN[$b]}; run $HERE/build.sh first"
done
BIN[kube-apiserver]=$API_DIR/bin/kube-apiserver
[[ -x ${BIN[kube-apiserver]} ]] || fail "no ${BIN[kube-apiserver]}; run scripts/kube-apiserver/build.sh first"
BIN[etcd]=$(readlink -f "$API_DIR/bin/etcd") || true
[[ -x ${BIN[etcd]} ]] || fail "no etcd at $API_DIR/bin/etcd; run scripts/kube-apiserver/build.sh"
pause_tar=$NODE_DIR/images/pause.tar
[[ -s $pause_tar ]] || fail "no $pause_tar; run $HERE/build.sh first"
readonly PAUSE_IMAGE=localhost/weft/pause:3.2
for tool in containerd ctr runc conntrack iptables ip nsenter unshare setsid openssl curl kubectl; do
  command -v "$tool" >/dev/null || fail "$tool is not installed (build.sh installs the packages)"
done
for b in "${!BIN[@]}"; do BIN[$b]=$(readlink -f "${BIN[$b]}"); done

t0=$(date +%s.%N)
elapsed() { printf %.1f "$(echo "$(date +%s.%N) - $t0" | bc)"; }
step() { say "[$(elapsed)s] $*"; }

in_a() { nsenter --net="/run/netns/${NETNS[a]}" -- "$@"; }
admin_curl() { # PATH
  in_a curl -sS --max-time 5 --cacert "$STATE/pki/ca.crt" -H "Authorization: Bearer $ADMIN_TOKEN" \
    "https://${NODE_IP[a]}:6443$1"
}
kc() { in_a kubectl --kubeconfig "$STATE/admin.kubeconfig" --request-timeout=10s "$@"; }

# --- already running? --------------------------------------------------------------------------
if [[ -s $STATE/env && -s $STATE/pids ]] && holder_pid a >/dev/null && holder_pid b >/dev/null; then
  ADMIN_TOKEN=$(sed -n 's/^KUBE_ADMIN_TOKEN=//p' "$STATE/env")
  if [[ $(admin_curl /readyz 2>/dev/null) == ok ]]; then
    say "already running (cluster $CLUSTER_ID); importing images only"
    ((${#images[@]} == 0)) || "$HERE/import.sh" "$STATE" "${images[@]}"
    echo "$STATE/env"
    exit 0
  fi
fi
if [[ -e $STATE/pids ]] || ip netns list | grep -qE "^wkc-$CLUSTER_ID-[ab]( |$)"; then
  say "stopping what is left of an earlier start in $STATE"
  "$HERE/stop.sh" "$STATE" || fail "could not stop the earlier cluster in $STATE"
fi

on_exit() {
  local rc=$?
  ((rc == 0)) && return
  say "start failed after $(elapsed)s (exit $rc); log tails:"
  local f
  for f in "$STATE"/logs/*.log; do
    [[ -s $f ]] || continue
    echo "----- $(basename "$f")" >&2
    tail -n 8 "$f" >&2
  done
  if [[ ${KEEP_FAILED:-0} == 1 ]]; then
    say "KEEP_FAILED=1: left running; stop with $HERE/stop.sh $STATE"
  else
    "$HERE/stop.sh" "$STATE" >&2 || true
  fi
}
trap on_exit EXIT

mkdir -p "$STATE/logs" "$STATE/pki"
: >"$STATE/pids"
: >"$STATE/cgroups"

# --- global sysctls kubelet rewrites (stop.sh puts them back) ----------------------------------
if [[ -n $(other_clusters) && -s $SYSCTL_RECORD ]]; then
  cp "$SYSCTL_RECORD" "$STATE/sysctl.before" # their kubelets already changed the values
else
  for k in "${GLOBAL_SYSCTLS[@]}"; do echo "$k $(sysctl -n "$k")"; done >"$STATE/sysctl.before"
  cp "$STATE/sysctl.before" "$SYSCTL_RECORD"
fi

# --- keys, certificates, admin token ---------------------------------------------------------------
pki=$STATE/pki
(
  cd "$pki"
  ossl() { openssl "$@" 2>>"$STATE/logs/openssl.log" >/dev/null; }
  ossl ecparam -name prime256v1 -genkey -noout -out ca.key
  ossl req -x509 -new -key ca.key -out ca.crt -days 30 -subj "/CN=weft-kube-cluster-$CLUSTER_ID" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign,digitalSignature"
  cert() { # NAME SUBJECT EXT...
    local n=$1 subj=$2
    shift 2
    ossl ecparam -name prime256v1 -genkey -noout -out "$n.key"
    ossl req -new -key "$n.key" -out "$n.csr" -subj "$subj"
    printf '%s\n' "basicConstraints=CA:FALSE" "keyUsage=critical,digitalSignature,keyEncipherment" "$@" >"$n.ext"
    ossl x509 -req -in "$n.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -days 30 -extfile "$n.ext" -out "$n.crt"
  }
  cert apiserver "/CN=kube-apiserver" "extendedKeyUsage=serverAuth" \
    "subjectAltName=IP:127.0.0.1,IP:$KUBERNETES_SVC_IP,IP:${NODE_IP[a]},DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
  cert apiserver-kubelet-client "/O=system:masters/CN=kube-apiserver-kubelet-client" "extendedKeyUsage=clientAuth"
  for n in "${NODES[@]}"; do
    cert "node-$n" "/O=system:nodes/CN=system:node:${NETNS[$n]}" "extendedKeyUsage=clientAuth"
  done
  ossl genrsa -out sa.key 2048
  ossl rsa -in sa.key -pubout -out sa.pub
  printf '%s,weft-admin,weft-admin,"system:masters"\n' "$(openssl rand -hex 32)" >tokens.csv
  chmod 600 ./*.key tokens.csv
)
ADMIN_TOKEN=$(cut -d, -f1 "$pki/tokens.csv")
API_URL=https://${NODE_IP[a]}:6443
kubeconfig() { # FILE USER-YAML
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: weft-kc
  cluster: {server: "$API_URL", certificate-authority: $pki/ca.crt}
users:
- name: u
  user: $2
contexts:
- name: weft-kc
  context: {cluster: weft-kc, user: u}
current-context: weft-kc
EOF
}
kubeconfig "$STATE/admin.kubeconfig" "{token: $ADMIN_TOKEN}"
for n in "${NODES[@]}"; do
  kubeconfig "$STATE/$n.kubeconfig" "{client-certificate: $pki/node-$n.crt, client-key: $pki/node-$n.key}"
done
step "pki made"

# --- network: two netns joined by a veth pair; never created in the root namespace --------------
for n in "${NODES[@]}"; do ip netns add "${NETNS[$n]}"; done
ip -n "${NETNS[a]}" link add eth0 type veth peer name eth0 netns "${NETNS[b]}"
for n in "${NODES[@]}"; do
  o=$([[ $n == a ]] && echo b || echo a)
  ipn=(ip -n "${NETNS[$n]}")
  "${ipn[@]}" link set lo up
  "${ipn[@]}" addr add "${NODE_IP[$n]}/24" dev eth0
  "${ipn[@]}" link set eth0 up
  "${ipn[@]}" route add "${POD_CIDR[$o]}" via "${NODE_IP[$o]}" dev eth0
  # Only so that a node-local connection to a ClusterIP finds a route before kube-proxy's DNAT.
  "${ipn[@]}" route add "$SERVICE_CIDR" dev eth0
  ip netns exec "${NETNS[$n]}" sysctl -qw net.ipv4.ip_forward=1
done
step "network namespaces ${NETNS[a]} ${NETNS[b]} up"

# --- per-node mount namespaces, held by a sleep that is in the node's netns too -----------------
record() { echo "$1 $2 $3" >>"$STATE/pids"; }
for n in "${NODES[@]}"; do
  nd=$STATE/$n
  mkdir -p "$nd/var-lib/kubelet/device-plugins" "$nd/var-log" "$nd/kubelet" "$nd/containerd" \
    "$nd/cni/net.d" "$nd/cni/ipam" "$nd/volume-plugins"
  setsid nsenter --net="/run/netns/${NETNS[$n]}" -- unshare -m --propagation slave -- sleep infinity \
    </dev/null >/dev/null 2>&1 &
  hp=$!
  for _ in $(seq 100); do
    [[ $(readlink "/proc/$hp/ns/mnt" 2>/dev/null) != "$(readlink /proc/self/ns/mnt)" ]] &&
      [[ $(readlink "/proc/$hp/exe" 2>/dev/null) == */sleep ]] && break
    sleep 0.05
  done
  # Never go on with the root mount namespace: the mounts below would land there.
  [[ $(readlink "/proc/$hp/exe" 2>/dev/null) == */sleep ]] &&
    [[ $(readlink "/proc/$hp/ns/mnt") != "$(readlink /proc/self/ns/mnt)" ]] &&
    [[ $(readlink "/proc/$hp/ns/net") == "net:[$(stat -L -c %i "/run/netns/${NETNS[$n]}")]" ]] ||
    fail "the namespace holder of node $n (pid $hp) did not come up in its own namespaces"
  record "holder-$n" "$hp" "$(readlink "/proc/$hp/exe")"
  # slave (from unshare): nothing made here reaches the root namespace; rshared on top, so that
  # mounts under these paths reach the containers that ask for HostToContainer/Bidirectional.
  nsenter -t "$hp" -m -- sh -euc '
    [ "$(readlink /proc/self/ns/mnt)" != "$2" ] || { echo "in the root mount namespace" >&2; exit 1; }
    mount --make-rshared /
    mount -t tmpfs -o mode=0755,size=256m weft-kc-run /run
    mkdir -p /run/containerd /run/netns /run/lock
    mount --bind "$1/var-lib" /var/lib
    mount --bind "$1/var-log" /var/log
    mount -t bpf bpf /sys/fs/bpf
    mount --make-shared /sys/fs/bpf
  ' sh "$nd" "$(readlink /proc/self/ns/mnt)" || fail "could not set up node $n's mounts"
  declare "HOLDER_$n=$hp"
done
step "mount namespaces ready"

# --- cgroup roots, in every hierarchy (kubelet refuses a missing cgroupRoot) ---------------------
for n in "${NODES[@]}"; do
  for h in /sys/fs/cgroup/*/; do
    [[ -f $h/cgroup.procs ]] || continue
    d=${h%/}${CGROOT[$n]}
    [[ -d $d ]] || { mkdir "$d" && echo "$d" >>"$STATE/cgroups"; }
    if [[ -f $d/cpuset.cpus && -z $(cat "$d/cpuset.cpus") ]]; then
      cat "${h%/}/cpuset.cpus" >"$d/cpuset.cpus"
      cat "${h%/}/cpuset.mems" >"$d/cpuset.mems"
    fi
  done
done

# --- per-node configuration ------------------------------------------------------------------------
for n in "${NODES[@]}"; do
  nd=$STATE/$n
  cat >"$nd/containerd.toml" <<EOF
version = 2
root = "$nd/containerd/root"
state = "$nd/containerd/state"
oom_score = 0
[grpc]
  address = "${SOCK[$n]}"
[ttrpc]
  address = "${SOCK[$n]}.ttrpc"
[debug]
  level = "warn"
[metrics]
  address = ""
[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "$PAUSE_IMAGE"
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    enable_selinux = false
    # root has no CAP_SYS_RESOURCE here: without this every sandbox fails to start.
    restrict_oom_score_adj = true
    # pod netns are pinned in /var/run/netns, which is the node's own tmpfs (see above)
    [plugins."io.containerd.grpc.v1.cri".containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          SystemdCgroup = false
    [plugins."io.containerd.grpc.v1.cri".cni]
      bin_dir = "/usr/lib/cni"
      conf_dir = "$nd/cni/net.d"
      max_conf_num = 1
  [plugins."io.containerd.internal.v1.opt"]
    path = "$nd/containerd/opt"
EOF
  # ptp, not bridge: each pod gets its own veth with a /32 peer route on the node and only an
  # on-link route to the gateway (no subnet route), so every packet, also between two pods of the
  # same node, is routed through the node, where Weft's eBPF capture sees it on the pod's
  # host-side veth. A bridge would switch same-node pod traffic at L2, bypassing the capture.
  cat >"$nd/cni/net.d/10-weft-ptp.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "weft-kc",
  "plugins": [
    {
      "type": "ptp",
      "ipMasq": false,
      "mtu": 1500,
      "ipam": {
        "type": "host-local",
        "ranges": [[{"subnet": "${POD_CIDR[$n]}"}]],
        "routes": [{"dst": "0.0.0.0/0"}],
        "dataDir": "$nd/cni/ipam"
      }
    }
  ]
}
EOF
  cat >"$nd/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
cgroupDriver: cgroupfs
cgroupRoot: ${CGROOT[$n]}
cgroupsPerQOS: true
enforceNodeAllocatable: ["pods"]
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $pki/ca.crt}
authorization: {mode: Webhook}
address: ${NODE_IP[$n]}
clusterDomain: cluster.local
failSwapOn: false
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
serializeImagePulls: false
makeIPTablesUtilChains: false
volumePluginDir: $nd/volume-plugins
# Absolute thresholds: the nodes share the machine's disk with build caches, and a percentage of a
# large, mostly full volume tainted both nodes with disk-pressure in CI (no pod could schedule).
evictionHard: {memory.available: "100Mi", nodefs.available: "512Mi", imagefs.available: "512Mi", nodefs.inodesFree: "1%"}
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
nodeStatusUpdateFrequency: 4s
syncFrequency: 10s
EOF
  cat >"$nd/kube-proxy.yaml" <<EOF
apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: $STATE/admin.kubeconfig}
mode: iptables
clusterCIDR: $CLUSTER_CIDR
bindAddress: ${NODE_IP[$n]}
healthzBindAddress: 127.0.0.1:10256
metricsBindAddress: 127.0.0.1:10249
hostnameOverride: ${NETNS[$n]}
iptables: {minSyncPeriod: 0s, syncPeriod: 30s}
# 0 = leave the (global) conntrack sysctls alone
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
EOF
done

# launch NAME NODE EXE ARGS...: in the node's net+mount namespaces, own session, log file.
launch() {
  local name=$1 n=$2 hv=HOLDER_$2
  shift 2
  setsid nsenter -t "${!hv}" -m -n -- "$@" </dev/null >"$STATE/logs/$name.log" 2>&1 &
  record "$name" "$!" "$1"
}
wait_for() { # WHAT SECONDS CMD...
  local what=$1 secs=$2 end
  shift 2
  end=$((SECONDS + secs))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < end)) || fail "timed out after ${secs}s waiting for $what"
    sleep 0.2
  done
}
deadline=$((SECONDS + TIMEOUT))
left() { echo $((deadline - SECONDS > 5 ? deadline - SECONDS : 5)); }

# --- containerd on both nodes, images --------------------------------------------------------------
for n in "${NODES[@]}"; do
  launch "containerd-$n" "$n" "$(readlink -f "$(command -v containerd)")" --config "$STATE/$n/containerd.toml"
done
for n in "${NODES[@]}"; do
  wait_for "containerd on node $n" "$(left)" ctr -a "${SOCK[$n]}" version
done
step "containerd up on both nodes"
# One tarball after the other per node (parallel imports into one containerd contend for a lock).
import_pids=()
for n in "${NODES[@]}"; do
  (for t in "$pause_tar" "${images[@]}"; do
    ctr -a "${SOCK[$n]}" -n k8s.io images import "$t" || exit 1
  done) >>"$STATE/logs/import-$n.log" 2>&1 &
  import_pids+=($!)
done

# --- control plane in node a -------------------------------------------------------------------------
launch etcd a "${BIN[etcd]}" --name weft-kc --data-dir /run/etcd \
  --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
  --listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
  --initial-cluster weft-kc=http://127.0.0.1:2380 --initial-cluster-state new \
  --listen-metrics-urls "" --log-level warn --logger zap
launch kube-apiserver a "${BIN[kube-apiserver]}" \
  --etcd-servers http://127.0.0.1:2379 \
  --bind-address "${NODE_IP[a]}" --advertise-address "${NODE_IP[a]}" --secure-port 6443 --insecure-port 0 \
  --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
  --client-ca-file "$pki/ca.crt" --token-auth-file "$pki/tokens.csv" \
  --authorization-mode Node,RBAC --enable-admission-plugins NodeRestriction \
  --kubelet-client-certificate "$pki/apiserver-kubelet-client.crt" \
  --kubelet-client-key "$pki/apiserver-kubelet-client.key" \
  --kubelet-preferred-address-types InternalIP,Hostname \
  --service-account-issuer https://kubernetes.default.svc.cluster.local \
  --service-account-key-file "$pki/sa.pub" --service-account-signing-key-file "$pki/sa.key" \
  --api-audiences https://kubernetes.default.svc.cluster.local,istio-ca \
  --service-cluster-ip-range "$SERVICE_CIDR" --allow-privileged=true --profiling=false \
  --logtostderr=true --v=1
api_ready() { [[ $(admin_curl /readyz) == ok ]]; }
wait_for "kube-apiserver /readyz" "$(left)" api_ready
step "kube-apiserver ready at $API_URL"
launch kube-controller-manager a "${BIN[kube-controller-manager]}" \
  --kubeconfig "$STATE/admin.kubeconfig" \
  --authentication-kubeconfig "$STATE/admin.kubeconfig" --authorization-kubeconfig "$STATE/admin.kubeconfig" \
  --service-account-private-key-file "$pki/sa.key" --root-ca-file "$pki/ca.crt" \
  --use-service-account-credentials=true --leader-elect=false --controllers '*' \
  --bind-address 127.0.0.1 --secure-port 10257 --port 0 \
  --cluster-signing-cert-file "$pki/ca.crt" --cluster-signing-key-file "$pki/ca.key" \
  --flex-volume-plugin-dir "$STATE/a/volume-plugins" --logtostderr=true --v=1
launch kube-scheduler a "${BIN[kube-scheduler]}" --kubeconfig "$STATE/admin.kubeconfig" \
  --authentication-kubeconfig "$STATE/admin.kubeconfig" --authorization-kubeconfig "$STATE/admin.kubeconfig" \
  --leader-elect=false --bind-address 127.0.0.1 --secure-port 10259 --port 0 --logtostderr=true --v=1

for p in "${import_pids[@]}"; do
  wait "$p" || fail "ctr images import failed (see $STATE/logs/import-*.log)"
done
step "images imported into both nodes"

# --- node components -----------------------------------------------------------------------------
for n in "${NODES[@]}"; do
  nd=$STATE/$n
  launch "kubelet-$n" "$n" "${BIN[kubelet]}" --config "$nd/kubelet.yaml" --kubeconfig "$STATE/$n.kubeconfig" \
    --container-runtime remote --container-runtime-endpoint "unix://${SOCK[$n]}" \
    --root-dir "$nd/kubelet" --cert-dir "$nd/kubelet/pki" \
    --hostname-override "${NETNS[$n]}" --node-ip "${NODE_IP[$n]}" \
    --pod-infra-container-image "$PAUSE_IMAGE" --logtostderr=true --v=1
  launch "kube-proxy-$n" "$n" "${BIN[kube-proxy]}" --config "$nd/kube-proxy.yaml" --v=1
done

node_ready() {
  [[ $(kc get node "$1" -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}') == True ]]
}
for n in "${NODES[@]}"; do
  wait_for "node ${NETNS[$n]} Ready" "$(left)" node_ready "${NETNS[$n]}"
  # Tell the API which pod CIDR each node has (nothing allocates it; the CNI config is static).
  kc patch node "${NETNS[$n]}" --type merge \
    -p "{\"spec\":{\"podCIDR\":\"${POD_CIDR[$n]}\",\"podCIDRs\":[\"${POD_CIDR[$n]}\"]}}" >/dev/null ||
    say "warning: could not set spec.podCIDR of ${NETNS[$n]}"
done
step "both nodes Ready"
default_sa_ready() {
  kc -n default get serviceaccount default -o 'jsonpath={.secrets[0].name}' | grep -q .
}
wait_for "the default ServiceAccount and its token" "$(left)" default_sa_ready
# kube-proxy must have written the rules for the kubernetes Service before anyone uses it.
wait_for "kube-proxy rules for $KUBERNETES_SVC_IP on both nodes" "$(left)" sh -c \
  "ip netns exec ${NETNS[a]} iptables-save -t nat | grep -q -- '-d $KUBERNETES_SVC_IP/32' &&
   ip netns exec ${NETNS[b]} iptables-save -t nat | grep -q -- '-d $KUBERNETES_SVC_IP/32'"
step "default ServiceAccount ready"

cat >"$STATE/env" <<EOF
CLUSTER_ID=$CLUSTER_ID
NETNS_A=${NETNS[a]}
NETNS_B=${NETNS[b]}
NODE_A=${NETNS[a]}
NODE_B=${NETNS[b]}
NODE_A_IP=${NODE_IP[a]}
NODE_B_IP=${NODE_IP[b]}
POD_CIDR_A=${POD_CIDR[a]}
POD_CIDR_B=${POD_CIDR[b]}
SERVICE_CIDR=$SERVICE_CIDR
KUBECONFIG=$STATE/admin.kubeconfig
KUBE_APISERVER_URL=$API_URL
KUBE_ADMIN_TOKEN=$ADMIN_TOKEN
KUBE_CA_FILE=$pki/ca.crt
CONTAINERD_SOCK_A=${SOCK[a]}
CONTAINERD_SOCK_B=${SOCK[b]}
NODE_A_PID=$HOLDER_a
NODE_B_PID=$HOLDER_b
PAUSE_IMAGE=$PAUSE_IMAGE
EOF
say "cluster $CLUSTER_ID up in $(elapsed)s: nodes ${NETNS[a]} (${NODE_IP[a]}) ${NETNS[b]} (${NODE_IP[b]}); use $HERE/run.sh $STATE kubectl ..."
echo "$STATE/env"
