#!/usr/bin/env bash
# Starts a throw-away etcd and kube-apiserver (built by build.sh) for tests, on free ports of
# 127.0.0.1 only, keeping all their state, keys and logs in STATE_DIR.
#
#   scripts/kube-apiserver/start.sh STATE_DIR      # then: scripts/kube-apiserver/stop.sh STATE_DIR
#
# The apiserver serves TLS with a CA made here, authenticates a static admin bearer token (user
# `weft-admin`, group system:masters) and service-account tokens, authorizes with RBAC and
# refuses anonymous requests. It issues service-account tokens itself (TokenRequest), and
# TokenReview checks them. It is only an apiserver: no scheduler, controller-manager or kubelet,
# so nothing runs Pods, fills Endpoints, creates ServiceAccounts or finishes deleting a Namespace.
# The ServiceAccount admission plugin is off, since no controller creates the `default` account.
#
# Writes into STATE_DIR:
#   kubeconfig               server URL, CA data, admin token
#   env                      shell assignments: KUBE_APISERVER_URL, KUBE_APISERVER_PORT,
#                            KUBE_ADMIN_TOKEN, KUBE_CA_FILE, ETCD_URL, ETCD_PEER_PORT, KUBECONFIG
#   pids                     "name pid executable" per process, for stop.sh
#   pki/, tokens.csv, etcd/  keys, certificates, the token file and etcd's data
#   etcd.log, kube-apiserver.log
# The processes run in their own sessions with output to the logs, so a caller reading this
# script's output through a pipe is not held up; they outlive it until stop.sh.
# If an instance from this STATE_DIR is already up and ready, it is kept and reused.
# On failure the log tail is printed, whatever was started is stopped, and the exit status is 1.
# The last stdout line is the kubeconfig path.
#
# Environment: WEFT_KUBE_APISERVER_DIR (build.sh's cache dir), START_TIMEOUT (seconds, default 60),
# KEEP_STATE=1 (a restart: keep etcd's data from the last start in STATE_DIR and listen on the same
# ports again when they are free, so that clients holding the old kubeconfig reconnect; without
# it, etcd starts empty).
set -euo pipefail

readonly VERSION=1.20.2
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE_DIR=${WEFT_KUBE_APISERVER_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/weft/kube-apiserver-$VERSION}
TIMEOUT=${START_TIMEOUT:-60}

say() { echo "kube-apiserver/start: $*" >&2; }
fail() {
  say "ERROR: $*"
  exit 1
}

if (($# != 1)) || [[ -z $1 ]]; then fail "usage: start.sh STATE_DIR"; fi
mkdir -p "$1"
STATE=$(cd "$1" && pwd)
started_at=$SECONDS

apiserver_bin=$CACHE_DIR/bin/kube-apiserver
[[ -x $apiserver_bin ]] || fail "no $apiserver_bin; run $HERE/build.sh first"
apiserver_bin=$(readlink -f "$apiserver_bin")
etcd_bin=$(readlink -f "$CACHE_DIR/bin/etcd" || true)
[[ -n $etcd_bin && -x $etcd_bin ]] || fail "no etcd at $CACHE_DIR/bin/etcd; run $HERE/build.sh again"
for tool in openssl curl base64 setsid; do
  command -v "$tool" >/dev/null || fail "$tool is not installed"
done

# Readiness needs credentials: anonymous requests are refused.
ready() { # ready PORT
  [[ $(curl -sS --max-time 3 --cacert "$STATE/pki/ca.crt" -H "Authorization: Bearer $admin_token" \
    "https://127.0.0.1:$1/readyz" 2>/dev/null) == ok ]]
}

# --- already running? ------------------------------------------------------------------------------
if [[ -s $STATE/pids && -s $STATE/env && -s $STATE/tokens.csv ]]; then
  admin_token=$(cut -d, -f1 "$STATE/tokens.csv")
  port=$(sed -n 's/^KUBE_APISERVER_PORT=//p' "$STATE/env")
  if [[ -n $port ]] && ready "$port"; then
    say "already running at https://127.0.0.1:$port"
    echo "$STATE/kubeconfig"
    exit 0
  fi
fi
if [[ -e $STATE/pids ]]; then
  say "stopping what is left of an earlier start in $STATE"
  "$HERE/stop.sh" "$STATE" || fail "could not stop the earlier instance in $STATE"
fi

# --- keys, certificates, token (made once per STATE_DIR) -------------------------------------------
pki=$STATE/pki
if [[ ! -s $pki/sa.pub ]]; then
  say "making a CA, a serving certificate and the service-account signing key in $pki"
  rm -rf "$pki"
  mkdir -m 700 "$pki"
  {
    openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj /CN=weft-test-kube-ca \
      -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign \
      -keyout "$pki/ca.key" -out "$pki/ca.crt"
    openssl req -new -newkey rsa:2048 -nodes -subj /CN=kube-apiserver \
      -keyout "$pki/apiserver.key" -out "$pki/apiserver.csr"
    printf '%s\n' basicConstraints=CA:FALSE keyUsage=critical,digitalSignature,keyEncipherment \
      extendedKeyUsage=serverAuth \
      subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc \
      >"$pki/apiserver.ext"
    openssl x509 -req -days 365 -in "$pki/apiserver.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" \
      -CAcreateserial -extfile "$pki/apiserver.ext" -out "$pki/apiserver.crt"
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out "$pki/sa.key"
    openssl pkey -in "$pki/sa.key" -pubout -out "$pki/sa.pub"
  } >"$STATE/pki.log" 2>&1 || {
    tail -n 20 "$STATE/pki.log" >&2
    rm -rf "$pki"
    fail "openssl could not make the keys and certificates"
  }
fi
if [[ ! -s $STATE/tokens.csv ]]; then
  (umask 077 && printf '%s,weft-admin,weft-admin,"system:masters"\n' "$(openssl rand -hex 32)" \
    >"$STATE/tokens.csv")
fi
admin_token=$(cut -d, -f1 "$STATE/tokens.csv")

# --- process bookkeeping ----------------------------------------------------------------------------
# Each process goes into $STATE/pids as soon as it is started, so that stop.sh can clean up even
# if this script dies half-way.
etcd_pid='' apiserver_pid=''
write_pids() {
  {
    [[ -z $etcd_pid ]] || echo "etcd $etcd_pid $etcd_bin"
    [[ -z $apiserver_pid ]] || echo "kube-apiserver $apiserver_pid $apiserver_bin"
  } >"$STATE/pids"
}
alive() { # alive PID EXE: PID runs EXE (also after EXE was replaced on disk: "EXE (deleted)")
  local exe
  exe=$(readlink "/proc/$1/exe" 2>/dev/null) || return 1
  [[ ${exe% (deleted)} == "$2" ]]
}
stop_pid() { # stop_pid PID EXE: TERM, up to 10 s, then KILL
  local i
  alive "$1" "$2" || return 0
  kill -TERM "$1" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do
    alive "$1" "$2" || return 0
    sleep 0.2
  done
  kill -KILL "$1" 2>/dev/null || true
}
on_exit() {
  local rc=$?
  ((rc != 0)) || return 0
  stop_pid "$apiserver_pid" "$apiserver_bin"
  stop_pid "$etcd_pid" "$etcd_bin"
  rm -f "$STATE/pids"
}
trap on_exit EXIT
show_log() { # show_log FILE: the tail, for the error message
  say "last lines of $1:"
  tail -n 25 "$1" >&2 || true
}

# Ports: random ones below the kernel's ephemeral range (32768 and up), so outgoing connections
# never hold them; checked free by connecting, and retried if a race loses the bind anyway.
port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
free_port() { # free_port [PORTS TO AVOID...]
  local port _
  for _ in {1..100}; do
    port=$((20000 + SRANDOM % 12000))
    [[ " $* " == *" $port "* ]] && continue
    port_in_use "$port" || {
      echo "$port"
      return 0
    }
  done
  fail "found no free port on 127.0.0.1"
}
lost_bind() { grep -qE 'address already in use|bind: ' "$1"; }

# --- a restart keeps the data and, when free, the ports of the last start -------------------------
keep=${KEEP_STATE:-}
prev_port='' prev_etcd_port='' prev_etcd_peer_port=''
if [[ -n $keep && -s $STATE/env ]]; then
  prev_port=$(sed -n 's/^KUBE_APISERVER_PORT=//p' "$STATE/env")
  prev_etcd_port=$(sed -n 's|^ETCD_URL=http://127.0.0.1:||p' "$STATE/env")
  prev_etcd_peer_port=$(sed -n 's/^ETCD_PEER_PORT=//p' "$STATE/env")
fi

# --- etcd -------------------------------------------------------------------------------------------
for attempt in 1 2 3; do
  if [[ -z $keep || ! -d $STATE/etcd ]]; then
    rm -rf "$STATE/etcd"
    mkdir -m 700 "$STATE/etcd"
  fi
  if ((attempt == 1)) && [[ -n $prev_etcd_port && -n $prev_etcd_peer_port ]] &&
    ! port_in_use "$prev_etcd_port" && ! port_in_use "$prev_etcd_peer_port"; then
    etcd_port=$prev_etcd_port etcd_peer_port=$prev_etcd_peer_port
  else
    etcd_port=$(free_port)
    etcd_peer_port=$(free_port "$etcd_port")
  fi
  setsid "$etcd_bin" --name weft-test --data-dir "$STATE/etcd" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" \
    --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$etcd_peer_port" \
    --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer_port" \
    --initial-cluster "weft-test=http://127.0.0.1:$etcd_peer_port" \
    --log-level warn </dev/null >"$STATE/etcd.log" 2>&1 &
  etcd_pid=$!
  write_pids
  healthy=''
  deadline=$((SECONDS + 20))
  while ((SECONDS < deadline)); do
    if curl -sS --max-time 2 "http://127.0.0.1:$etcd_port/health" 2>/dev/null | grep -q '"health":"true"'; then
      healthy=1
      break
    fi
    kill -0 "$etcd_pid" 2>/dev/null || break
    sleep 0.2
  done
  [[ -z $healthy ]] || break
  if lost_bind "$STATE/etcd.log" && ((attempt < 3)); then
    say "etcd lost a port race on $etcd_port/$etcd_peer_port; trying other ports"
    stop_pid "$etcd_pid" "$etcd_bin"
    etcd_pid=''
    write_pids
    continue
  fi
  show_log "$STATE/etcd.log"
  fail "etcd did not become healthy within 20 s"
done

# --- kube-apiserver ---------------------------------------------------------------------------------
for attempt in 1 2 3; do
  if ((attempt == 1)) && [[ -n $prev_port ]] && ! port_in_use "$prev_port"; then
    port=$prev_port
  else
    port=$(free_port "$etcd_port" "$etcd_peer_port")
  fi
  # --insecure-port 0: 1.20 would otherwise also serve unauthenticated HTTP on localhost:8080.
  setsid "$apiserver_bin" \
    --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$port" --insecure-port 0 \
    --tls-cert-file "$pki/apiserver.crt" --tls-private-key-file "$pki/apiserver.key" \
    --client-ca-file "$pki/ca.crt" \
    --anonymous-auth=false \
    --token-auth-file "$STATE/tokens.csv" \
    --authorization-mode RBAC \
    --service-account-issuer https://kubernetes.default.svc \
    --api-audiences https://kubernetes.default.svc \
    --service-account-key-file "$pki/sa.pub" \
    --service-account-signing-key-file "$pki/sa.key" \
    --service-cluster-ip-range 10.96.0.0/16 \
    --disable-admission-plugins ServiceAccount \
    --allow-privileged=true \
    --profiling=false --logtostderr=true --v=1 \
    </dev/null >"$STATE/kube-apiserver.log" 2>&1 &
  apiserver_pid=$!
  write_pids
  is_ready=''
  deadline=$((SECONDS + TIMEOUT))
  while ((SECONDS < deadline)); do
    if ready "$port"; then
      is_ready=1
      break
    fi
    kill -0 "$apiserver_pid" 2>/dev/null || break
    sleep 0.25
  done
  [[ -z $is_ready ]] || break
  # The log tail is taken before anything is stopped, so it shows why, not the shutdown.
  if ! kill -0 "$apiserver_pid" 2>/dev/null; then
    if lost_bind "$STATE/kube-apiserver.log" && ((attempt < 3)); then
      say "kube-apiserver lost a port race on $port; trying another port"
      apiserver_pid=''
      write_pids
      continue
    fi
    show_log "$STATE/kube-apiserver.log"
    fail "kube-apiserver exited while starting"
  fi
  show_log "$STATE/kube-apiserver.log"
  fail "kube-apiserver was not ready within $TIMEOUT s"
done

# --- what clients need ------------------------------------------------------------------------------
(
  umask 077
  cat >"$STATE/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
  - name: weft-test
    cluster:
      server: https://127.0.0.1:$port
      certificate-authority-data: $(base64 -w0 <"$pki/ca.crt")
users:
  - name: weft-admin
    user:
      token: $admin_token
contexts:
  - name: weft-test
    context:
      cluster: weft-test
      user: weft-admin
current-context: weft-test
EOF
  cat >"$STATE/env" <<EOF
KUBE_APISERVER_URL=https://127.0.0.1:$port
KUBE_APISERVER_PORT=$port
KUBE_ADMIN_TOKEN=$admin_token
KUBE_CA_FILE=$pki/ca.crt
ETCD_URL=http://127.0.0.1:$etcd_port
ETCD_PEER_PORT=$etcd_peer_port
KUBECONFIG=$STATE/kubeconfig
EOF
)
trap - EXIT
say "ready in $((SECONDS - started_at))s at https://127.0.0.1:$port (kube-apiserver pid $apiserver_pid, etcd pid $etcd_pid)"
echo "$STATE/kubeconfig"
