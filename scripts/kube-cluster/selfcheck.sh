#!/usr/bin/env bash
# Self-check of the two-node cluster scripts: builds (cached), starts a cluster, runs a busybox
# pod on each node, checks pod -> pod across nodes and on the same node, pod -> Service ClusterIP,
# pod -> the kubernetes Service, node netns -> pod and ClusterIP, `kubectl logs` and `exec`,
# TokenRequest with audience istio-ca + TokenReview, a projected istio-ca token volume, and a
# hostNetwork DaemonSet mounting /sys/fs/bpf (HostToContainer) on both nodes, each node seeing its
# own bpffs. Then stops the cluster and checks nothing is left (netns, links, mounts, processes,
# cgroups, sysctls, files). Prints timings. Exit status 0 when every check passed.
#
#   scripts/kube-cluster/selfcheck.sh [STATE_DIR]      (default: a fresh /tmp/wkc-selfcheck.XXXXXX)
set -uo pipefail
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
SCRIPT_NAME=selfcheck
# shellcheck source=lib.sh
. "$HERE/lib.sh"

node_dir=$("$HERE/build.sh" | tail -n1) || fail "build.sh failed"
"$HERE/../kube-apiserver/build.sh" >/dev/null || fail "kube-apiserver/build.sh failed"
S=${1:-$(mktemp -d /tmp/wkc-selfcheck.XXXXXX)}
cluster_names "$S"
failures=0
ok() { say "ok:   $*"; }
bad() {
  say "FAIL: $*"
  failures=$((failures + 1))
}
check() { # DESCRIPTION CMD...: passes when CMD succeeds
  local what=$1
  shift
  if "$@"; then ok "$what"; else bad "$what"; fi
}
run() { "$HERE/run.sh" "$S" "$@"; }
kc() { run kubectl --request-timeout=20s "$@"; }

# --- what the root namespace looks like before -----------------------------------------------------
snapshot() {
  echo "## links"
  ip -o link | awk -F': ' '{print $2}' | sort
  echo "## netns"
  ip netns list | sort
  echo "## mounts"
  awk '{print $2, $3}' /proc/self/mounts | sort
  echo "## sysctls"
  for k in "${GLOBAL_SYSCTLS[@]}" net.ipv4.ip_forward net.ipv4.conf.all.route_localnet; do echo "$k $(sysctl -n "$k")"; done
  echo "## paths"
  ls -d /var/lib/cni /var/lib/kubelet /var/log/pods /var/log/containers /usr/libexec/kubernetes \
    /etc/cni /opt/cni /run/containerd/s/* /run/netns/* 2>/dev/null
  echo "## iptables"
  iptables-save 2>/dev/null | grep -c KUBE || true
  echo "## cgroups"
  ls -d /sys/fs/cgroup/*/wkc-* 2>/dev/null
}
before=$(snapshot)

# --- start ---------------------------------------------------------------------------------------------
t=$(date +%s.%N)
"$HERE/start.sh" "$S" "$node_dir/images/busybox.tar" >/dev/null || fail "start.sh failed"
start_s=$(echo "$(date +%s.%N) - $t" | bc)
# shellcheck disable=SC1091
. "$S/env"
say "start.sh took ${start_s}s"

cat >"$S/selfcheck.yaml" <<EOF
apiVersion: v1
kind: Pod
metadata: {name: pa, labels: {app: pa}}
spec:
  nodeName: $NODE_A
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: localhost/weft/busybox:1.35
    imagePullPolicy: Never
    command: [sh, -c, 'mkdir -p /www && echo hello-from-a > /www/index.html && echo started-a && exec httpd -f -p 8080 -h /www']
    ports: [{containerPort: 8080, protocol: TCP}]
    volumeMounts: [{name: istio-token, mountPath: /var/run/secrets/tokens}]
  volumes:
  - name: istio-token
    projected:
      sources:
      - serviceAccountToken: {audience: istio-ca, expirationSeconds: 43200, path: istio-token}
---
apiVersion: v1
kind: Pod
metadata: {name: pa2, labels: {app: pa2}}
spec:
  nodeName: $NODE_A
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: localhost/weft/busybox:1.35
    imagePullPolicy: Never
    command: [sh, -c, 'exec sleep 3600']
---
apiVersion: v1
kind: Pod
metadata: {name: pb, labels: {app: pb}}
spec:
  nodeName: $NODE_B
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: localhost/weft/busybox:1.35
    imagePullPolicy: Never
    command: [sh, -c, 'mkdir -p /www && echo hello-from-b > /www/index.html && echo started-b && exec httpd -f -p 8080 -h /www']
    ports: [{containerPort: 8080, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {name: svc-b}
spec:
  selector: {app: pb}
  ports: [{port: 80, targetPort: 8080, protocol: TCP}]
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: bpf-ds}
spec:
  selector: {matchLabels: {app: bpf-ds}}
  template:
    metadata: {labels: {app: bpf-ds}}
    spec:
      hostNetwork: true
      terminationGracePeriodSeconds: 1
      containers:
      - name: c
        image: localhost/weft/busybox:1.35
        imagePullPolicy: Never
        command: [sh, -c, 'exec sleep 3600']
        securityContext:
          capabilities: {add: [BPF, NET_ADMIN]}
        volumeMounts: [{name: bpf, mountPath: /sys/fs/bpf, mountPropagation: HostToContainer}]
      volumes:
      - name: bpf
        hostPath: {path: /sys/fs/bpf, type: Directory}
EOF
t=$(date +%s.%N)
kc apply -f "$S/selfcheck.yaml" >/dev/null || bad "kubectl apply"
kc wait --for=condition=Ready pod/pa pod/pa2 pod/pb --timeout=120s >/dev/null || bad "pods Ready"
kc rollout status ds/bpf-ds --timeout=120s >/dev/null || bad "DaemonSet rolled out"
say "workloads Ready in $(echo "$(date +%s.%N) - $t" | bc)s"
kc get pods -o wide >&2

ip_of() { kc get pod "$1" -o 'jsonpath={.status.podIP}'; }
pa_ip=$(ip_of pa) pb_ip=$(ip_of pb) pa2_ip=$(ip_of pa2)
svc_ip=$(kc get svc svc-b -o 'jsonpath={.spec.clusterIP}')
say "pa=$pa_ip pa2=$pa2_ip pb=$pb_ip svc-b=$svc_ip"
[[ $pa_ip == 10.244.1.* && $pb_ip == 10.244.2.* ]] && ok "pod IPs from each node's pod CIDR" || bad "pod IPs"
get() { # POD http://IP:PORT/ -> the response body's last line
  # (busybox-static's wget segfaults on this machine, even on the host: plain HTTP over nc)
  local hp=${2#http://}
  hp=${hp%/}
  [[ $hp == *:* ]] || hp=$hp:80
  kc exec "$1" -- sh -c "printf 'GET / HTTP/1.0\r\n\r\n' | nc -w 5 ${hp%:*} ${hp#*:} | tail -n1" 2>/dev/null
}
check "pod a -> pod b across nodes" test "$(get pa "http://$pb_ip:8080/")" = hello-from-b
check "pod b -> pod a across nodes" test "$(get pb "http://$pa_ip:8080/")" = hello-from-a
check "pod a2 -> pod a on the same node" test "$(get pa2 "http://$pa_ip:8080/")" = hello-from-a
check "pod a -> Service ClusterIP (backend on node b)" test "$(get pa "http://$svc_ip/")" = hello-from-b
check "pod b -> Service ClusterIP (backend on the same node)" test "$(get pb "http://$svc_ip/")" = hello-from-b
check "pod b -> kubernetes Service 10.96.0.1:443" kc exec pb -- sh -c "nc -w 5 $KUBERNETES_SVC_IP 443 </dev/null"
check "node a netns -> pod b" test "$(run curl -s --max-time 5 "http://$pb_ip:8080/")" = hello-from-b
check "node a netns -> ClusterIP" test "$(run curl -s --max-time 5 "http://$svc_ip/")" = hello-from-b
check "node b netns -> pod a" test "$("$HERE/run.sh" -b "$S" curl -s --max-time 5 "http://$pa_ip:8080/")" = hello-from-a
routes=$(kc exec pa -- ip route 2>/dev/null)
say "pod a routes: $(echo "$routes" | tr '\n' ';')"
# ptp leaves the pod's address /24 but replaces the on-link subnet route by one via the gateway
# (the node's end of the veth, a /32 there): no on-link route but the gateway's.
if grep -q '^default via 10.244.1.1 dev eth0' <<<"$routes" &&
  [[ -z $(grep -v -e ' via ' -e '^10.244.1.1 dev eth0 scope link' <<<"$routes") ]]; then
  ok "pod routes everything via the node (no on-link route but the gateway's)"
else bad "pod routes"; fi
check "kubectl logs" sh -c "'$HERE/run.sh' '$S' kubectl logs pa | grep -q started-a"
check "kubectl exec" test "$(kc exec pb -- cat /www/index.html)" = hello-from-b
check "projected istio-ca token mounted" kc exec pa -- test -s /var/run/secrets/tokens/istio-token
token=$(kc exec pa -- cat /var/run/secrets/tokens/istio-token 2>/dev/null)
review() { # TOKEN AUDIENCE -> authenticated?
  run curl -s --max-time 5 --cacert "$KUBE_CA_FILE" -H "Authorization: Bearer $KUBE_ADMIN_TOKEN" \
    -H 'Content-Type: application/json' -X POST "$KUBE_APISERVER_URL/apis/authentication.k8s.io/v1/tokenreviews" \
    -d "{\"apiVersion\":\"authentication.k8s.io/v1\",\"kind\":\"TokenReview\",\"spec\":{\"token\":\"$1\",\"audiences\":[\"$2\"]}}"
}
check "TokenReview of the projected istio-ca token" sh -c "echo '$(review "$token" istio-ca)' | grep -q '\"authenticated\": *true'"
tr_token=$(run curl -s --max-time 5 --cacert "$KUBE_CA_FILE" -H "Authorization: Bearer $KUBE_ADMIN_TOKEN" \
  -H 'Content-Type: application/json' -X POST \
  "$KUBE_APISERVER_URL/api/v1/namespaces/default/serviceaccounts/default/token" \
  -d '{"apiVersion":"authentication.k8s.io/v1","kind":"TokenRequest","spec":{"audiences":["istio-ca"],"expirationSeconds":3600}}' |
  sed -n 's/.*"token": *"\([^"]*\)".*/\1/p')
check "TokenRequest (audience istio-ca)" test -n "$tr_token"
check "TokenReview of a TokenRequest token" sh -c "echo '$(review "$tr_token" istio-ca)' | grep -q '\"authenticated\": *true'"

# Each node its own bpffs, seen by its hostNetwork DaemonSet pod.
"$HERE/run.sh" -m "$S" mkdir /sys/fs/bpf/selfcheck-a
"$HERE/run.sh" -b -m "$S" mkdir /sys/fs/bpf/selfcheck-b
for n in A B; do
  node_var=NODE_$n
  pod=$(kc get pods -l app=bpf-ds -o "jsonpath={.items[?(@.spec.nodeName==\"${!node_var}\")].metadata.name}")
  seen=$(kc exec "$pod" -- ls /sys/fs/bpf 2>/dev/null | tr '\n' ' ')
  lower=$(tr AB ab <<<"$n")
  if [[ $seen == *selfcheck-$lower* && $seen != *selfcheck-$(tr ab ba <<<"$lower")* ]]; then
    ok "DaemonSet pod on node $lower sees its own node's bpffs ($seen)"
  else bad "DaemonSet pod on node $lower: /sys/fs/bpf holds '$seen'"; fi
  check "DaemonSet pod on node $lower: /sys/fs/bpf is a bpf mount" \
    sh -c "'$HERE/run.sh' '$S' kubectl exec $pod -- grep -q ' /sys/fs/bpf bpf' /proc/mounts"
done
check "root namespace's /sys/fs/bpf untouched" test ! -e /sys/fs/bpf/selfcheck-a

# --- stop, and nothing may be left -----------------------------------------------------------------
t=$(date +%s.%N)
"$HERE/stop.sh" "$S" || bad "stop.sh reported a problem"
stop_s=$(echo "$(date +%s.%N) - $t" | bc)
say "stop.sh took ${stop_s}s"
after=$(snapshot)
if [[ $before == "$after" ]]; then ok "root namespace as before (links, netns, mounts, sysctls, paths, cgroups)"; else
  bad "root namespace changed:"
  diff <(echo "$before") <(echo "$after") >&2
fi
left=$(for p in /proc/[0-9]*; do
  tr '\0' ' ' 2>/dev/null <"$p/cmdline" | grep -F -e "$S" -e "wkc-$CLUSTER_ID" | sed "s|^|${p#/proc/}: |"
done | grep -v -e selfcheck.sh -e "grep -F")
check "no process of the cluster left" test -z "$left"
[[ -z $left ]] || echo "$left" >&2
check "state dir removed" test ! -e "$S"
"$HERE/stop.sh" "$S" >/dev/null 2>&1
check "stop.sh again is a no-op" test $? -eq 0
say "start ${start_s}s, stop ${stop_s}s, $failures failure(s)"
((failures == 0))
