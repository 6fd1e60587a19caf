#!/usr/bin/env bash
# Builds what a real two-node Kubernetes v1.20.2 cluster on this machine needs besides the
# apiserver (scripts/kube-apiserver/build.sh makes kube-apiserver and etcd): kubelet,
# kube-controller-manager, kube-scheduler and kube-proxy from Debian bookworm's `kubernetes`
# source package (Go from apt, vendored dependencies, GOPATH mode, no module downloads), the
# `pause` sandbox binary from the same tree (gcc -static), and two images written without any
# registry (docker-archive tarballs, see mkimage.py). Also installs, only if missing, the apt
# packages start.sh needs: containerd, runc, the CNI plugins, conntrack, iptables, busybox-static.
#
#   scripts/kube-cluster/build.sh
#
# Output, in $WEFT_KUBE_NODE_DIR (default ${XDG_CACHE_HOME:-$HOME/.cache}/weft/kube-node-1.20.2):
#   bin/kubelet bin/kube-controller-manager bin/kube-scheduler bin/kube-proxy   stripped, v1.20.2
#   bin/pause                     static pause binary
#   images/pause.tar              localhost/weft/pause:3.2       (entrypoint /pause)
#   images/busybox.tar            localhost/weft/busybox:1.35  (busybox-static, applets linked
#                                 in /bin; no entrypoint, e.g. command: [sh, -c, ...])
#   BUILD_INFO
# The last stdout line is the cache dir. A second run finds everything and returns at once.
# The cold build takes ~7 min on 2 cores; it runs under `nice -n 19` (BUILD_NICE to change).
# The work tree lives in the cache dir's work/, removed on success, kept after a failure.
# The machine's apt sources are not changed (private deb-src list inside work/).
set -euo pipefail

readonly VERSION=1.20.2
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
CACHE_DIR=${WEFT_KUBE_NODE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/weft/kube-node-$VERSION}
NICE=${BUILD_NICE:-19}
readonly BINS=(kubelet kube-controller-manager kube-scheduler kube-proxy)
readonly APT_DEPS=(golang-go golang-github-modern-go-reflect2-dev gcc libc6-dev python3
  containerd runc containernetworking-plugins conntrack iptables iproute2 util-linux
  busybox-static openssl curl ca-certificates debian-archive-keyring etcd-server)

say() { echo "kube-cluster/build: $*" >&2; }
fail() {
  say "ERROR: $*"
  exit 1
}

bins_built() {
  local b
  for b in "${BINS[@]}" pause; do [[ -x $CACHE_DIR/bin/$b ]] || return 1; done
}
images_built() { [[ -s $CACHE_DIR/images/pause.tar && -s $CACHE_DIR/images/busybox.tar ]]; }
deps_installed() {
  local pkg
  for pkg in "${APT_DEPS[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || return 1
  done
}
done_already() { bins_built && images_built && deps_installed; }

if done_already; then
  echo "$CACHE_DIR"
  exit 0
fi

mkdir -p "$CACHE_DIR/bin" "$CACHE_DIR/images"
CACHE_DIR=$(cd "$CACHE_DIR" && pwd)
exec {lock_fd}>"$CACHE_DIR/.lock"
flock "$lock_fd"
if done_already; then
  echo "$CACHE_DIR"
  exit 0
fi

WORK=$CACHE_DIR/work
start_time=$SECONDS
report_failure() {
  local rc=$?
  ((rc == 0)) || say "failed after $((SECONDS - start_time))s (exit $rc); work tree left in $WORK"
}
trap report_failure EXIT

# --- apt packages, only the missing ones -------------------------------------------------------
missing=()
for pkg in "${APT_DEPS[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  ((EUID == 0)) || fail "missing Debian packages ${missing[*]}; run as root to install them"
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt_install() {
    # (no init system here starts containerd after installing it; start.sh runs its own per node)
    apt-get -o DPkg::Lock::Timeout=900 install -y -qq --no-install-recommends "${missing[@]}" {lock_fd}>&- >&2
  }
  if ! apt_install; then
    apt-get -o DPkg::Lock::Timeout=900 update -qq {lock_fd}>&- >&2 || fail "apt-get update failed"
    apt_install || fail "apt-get install ${missing[*]} failed"
  fi
fi
for tool in go gcc python3 containerd runc ctr conntrack iptables; do
  command -v "$tool" >/dev/null || fail "no $tool on PATH after installing ${APT_DEPS[*]}"
done
[[ -x /usr/lib/cni/ptp && -x /usr/lib/cni/host-local && -x /usr/lib/cni/loopback ]] ||
  fail "/usr/lib/cni lacks ptp/host-local/loopback (containernetworking-plugins)"

# --- binaries -----------------------------------------------------------------------------------
if ! bins_built; then
  reflect2_src=/usr/share/gocode/src/github.com/modern-go/reflect2
  [[ -f $reflect2_src/reflect2.go ]] || fail "$reflect2_src is missing (golang-github-modern-go-reflect2-dev)"
  chmod -R u+w "$WORK" 2>/dev/null || true
  rm -rf "$WORK"
  apt_dir=$WORK/apt
  mkdir -p "$apt_dir/sources.list.d" "$apt_dir/preferences.d" "$apt_dir/lists/partial" \
    "$apt_dir/cache/archives/partial" "$WORK/src"
  mirror=$(sed -n 's/^URIs:[[:space:]]*//p' /etc/apt/sources.list.d/*.sources 2>/dev/null |
    tr ' ' '\n' | grep -v -e security -e '^$' | head -n1 || true)
  if [[ -z $mirror && -f /etc/apt/sources.list ]]; then
    mirror=$(awk '$1 == "deb" && !/security/ { print ($2 ~ /^\[/ ? $3 : $2); exit }' /etc/apt/sources.list)
  fi
  [[ -n $mirror ]] || fail "found no Debian archive URI in /etc/apt/sources.list{,.d}"
  cat >"$apt_dir/sources.list.d/kubernetes-src.sources" <<EOS
Types: deb-src
URIs: $mirror
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOS
  private_apt=(
    -o Dir::Etc::SourceList=/dev/null
    -o Dir::Etc::SourceParts="$apt_dir/sources.list.d"
    -o Dir::Etc::Preferences=/dev/null
    -o Dir::Etc::PreferencesParts="$apt_dir/preferences.d"
    -o Dir::State::Lists="$apt_dir/lists"
    -o Dir::Cache="$apt_dir/cache"
    -o Debug::NoLocking=1
  )
  say "fetching Debian's kubernetes source package from $mirror"
  apt-get "${private_apt[@]}" update -qq >"$WORK/apt.log" 2>&1 ||
    { tail -n 20 "$WORK/apt.log" >&2; fail "apt-get update with the private deb-src list failed"; }
  (cd "$apt_dir" && apt-get "${private_apt[@]}" source --download-only kubernetes) >>"$WORK/apt.log" 2>&1 ||
    { tail -n 20 "$WORK/apt.log" >&2; fail "apt-get source --download-only kubernetes failed"; }
  orig=$(compgen -G "$apt_dir/kubernetes_*.orig.tar.gz" | head -n1 || true)
  [[ -n $orig ]] || fail "apt-get source downloaded no kubernetes_*.orig.tar.gz (see $WORK/apt.log)"
  tar -xzf "$orig" -C "$WORK/src"
  src=$WORK/src/kubernetes-$VERSION
  [[ -d $src/cmd/kubelet ]] || fail "$(basename "$orig") holds $(ls "$WORK/src"), not kubernetes-$VERSION/"

  # pause: a static C binary, built first since it takes a second.
  nice -n "$NICE" gcc -Os -static -DVERSION="v3.4.1-weft" -o "$WORK/pause" "$src/build/pause/linux/pause.c" ||
    fail "gcc -static pause.c failed"

  # The vendored reflect2 1.0.1 faults at run time when built with Go >= 1.18.
  rm -rf "$src/vendor/github.com/modern-go/reflect2"
  mkdir -p "$src/vendor/github.com/modern-go/reflect2"
  find "$reflect2_src" -maxdepth 1 -type f \( -name '*.go' -o -name '*.s' \) ! -name '*_test.go' \
    -exec cp -t "$src/vendor/github.com/modern-go/reflect2" {} +

  mkdir -p "$WORK/gopath/src/k8s.io" "$WORK/tmp"
  ln -s "$src" "$WORK/gopath/src/k8s.io/kubernetes"
  export GOPATH=$WORK/gopath GOCACHE=$WORK/gocache GOTMPDIR=$WORK/tmp GO111MODULE=off GOFLAGS='' GOPROXY=off CGO_ENABLED=0
  cd "$WORK/gopath/src/k8s.io/kubernetes"

  # The tarball lacks the generated OpenAPI definitions the components link against.
  say "generating OpenAPI definitions ($(go version | cut -d' ' -f3))"
  nice -n "$NICE" go build -o "$WORK/openapi-gen" ./vendor/k8s.io/kube-openapi/cmd/openapi-gen
  grep -rlE --include='*.go' '^// *\+k8s:openapi-gen=' cmd pkg plugin staging/src third_party 2>/dev/null |
    xargs -n1 dirname | sed 's|^staging/src/|vendor/|' |
    grep -vE '^vendor/k8s\.io/(code-generator|sample-apiserver)/' | LC_ALL=C sort -u >"$WORK/openapi-packages" ||
    true
  (($(wc -l <"$WORK/openapi-packages") > 50)) ||
    fail "only $(wc -l <"$WORK/openapi-packages") packages carry +k8s:openapi-gen tags; the source tree looks wrong"
  nice -n "$NICE" "$WORK/openapi-gen" \
    --input-dirs "$(sed 's|^|k8s.io/kubernetes/|' "$WORK/openapi-packages" | paste -sd,)" \
    --output-package k8s.io/kubernetes/pkg/generated/openapi \
    --output-file-base zz_generated.openapi \
    --go-header-file vendor/k8s.io/code-generator/hack/boilerplate.go.txt \
    --report-filename "$WORK/openapi-rule-violations" \
    >"$WORK/openapi-gen.log" 2>&1 ||
    { tail -n 20 "$WORK/openapi-gen.log" >&2; fail "openapi-gen failed"; }
  [[ -s pkg/generated/openapi/zz_generated.openapi.go ]] || fail "openapi-gen wrote no zz_generated.openapi.go"

  ldflags="-s -w"
  for pkg in k8s.io/kubernetes/vendor/k8s.io/component-base/version \
    k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=v$VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=20"
    ldflags+=" -X $pkg.gitTreeState=clean"
  done
  mkdir -p "$WORK/out"
  for b in "${BINS[@]}"; do
    say "compiling $b ($((SECONDS - start_time))s so far)"
    nice -n "$NICE" go build -ldflags "$ldflags" -o "$WORK/out/$b" "./cmd/$b" >"$WORK/build-$b.log" 2>&1 ||
      { tail -n 30 "$WORK/build-$b.log" >&2; fail "go build ./cmd/$b failed"; }
    "$WORK/out/$b" --version 2>&1 | grep -q "Kubernetes v$VERSION" ||
      fail "$b reports '$("$WORK/out/$b" --version 2>&1 | head -n1)', not v$VERSION"
  done
  cd "$CACHE_DIR"
  cat >BUILD_INFO <<EOI
kubelet kube-controller-manager kube-scheduler kube-proxy v$VERSION and pause from $(basename "$orig") (Debian bookworm source package)
vendored reflect2 replaced by golang-github-modern-go-reflect2-dev $(dpkg-query -W -f='${Version}' golang-github-modern-go-reflect2-dev)
$(go version); $(gcc --version | head -n1)
built $(date -u +%Y-%m-%dT%H:%M:%SZ) in $((SECONDS - start_time))s
EOI
  mv -f "$WORK/pause" bin/pause
  for b in "${BINS[@]}"; do mv -f "$WORK/out/$b" "bin/$b"; done
  chmod -R u+w "$WORK" # the Go build cache is read-only
  rm -rf "$WORK"
  say "binaries built in $((SECONDS - start_time))s"
fi

# --- images -------------------------------------------------------------------------------------
cd "$CACHE_DIR"
if [[ ! -s images/pause.tar ]]; then
  echo "file $CACHE_DIR/bin/pause /pause 0755" |
    python3 "$HERE/mkimage.py" images/pause.tar localhost/weft/pause:3.2 '["/pause"]'
fi
if [[ ! -s images/busybox.tar ]]; then
  bb=$(readlink -f /bin/busybox)
  file "$bb" 2>/dev/null | grep -q 'dynamically' && fail "$bb is not static (busybox-static)"
  {
    echo "file $bb /bin/busybox 0755"
    for d in /tmp /etc /proc /sys /dev /root /var/run; do echo "dir $d"; done
    "$bb" --list | grep -vx busybox | while read -r applet; do echo "link /bin/$applet busybox"; done
  } | python3 "$HERE/mkimage.py" images/busybox.tar localhost/weft/busybox:1.35 '[]' '["sh"]'
fi
images_built || fail "images were not written"
echo "$CACHE_DIR"
