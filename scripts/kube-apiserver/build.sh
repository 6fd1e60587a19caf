#!/usr/bin/env bash
# Builds the real kube-apiserver (v1.20.2) that Weft's controller tests talk to, and makes etcd
# available next to it. Everything comes from Debian bookworm: the Go toolchain and etcd from apt,
# the Kubernetes source from Debian's `kubernetes` source package, which vendors all its Go
# dependencies, so the build needs no Go module downloads.
#
#   scripts/kube-apiserver/build.sh
#
# Output, in $WEFT_KUBE_APISERVER_DIR (default ${XDG_CACHE_HOME:-$HOME/.cache}/weft/kube-apiserver-1.20.2):
#   bin/kube-apiserver   the server, stripped, reporting v1.20.2
#   bin/etcd             symlink to apt's etcd (package etcd-server)
#   BUILD_INFO           what was built from what, and how long it took
# The last stdout line is the cache dir. A second run finds bin/kube-apiserver and returns at once.
# The work tree (source, Go build cache) lives in the cache dir's work/ and is removed on success;
# after a failure it is left for inspection and the next run starts it afresh.
#
# The apt sources of the machine are not changed: the source package is fetched with a private
# deb-src list and a private lists/cache dir inside work/.
set -euo pipefail

readonly VERSION=1.20.2
CACHE_DIR=${WEFT_KUBE_APISERVER_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/weft/kube-apiserver-$VERSION}
# apt packages: the compiler; reflect2 >= 1.0.2 (the vendored 1.0.1 faults at run time when built
# with Go >= 1.18); etcd, openssl and curl for start.sh; the keyring to verify the source index.
readonly APT_DEPS=(golang-go golang-github-modern-go-reflect2-dev etcd-server openssl curl
  ca-certificates debian-archive-keyring)

say() { echo "kube-apiserver/build: $*" >&2; }
fail() {
  say "ERROR: $*"
  exit 1
}

built() { [[ -x $CACHE_DIR/bin/kube-apiserver && -x $CACHE_DIR/bin/etcd ]]; }

if built; then
  echo "$CACHE_DIR"
  exit 0
fi

mkdir -p "$CACHE_DIR/bin"
CACHE_DIR=$(cd "$CACHE_DIR" && pwd)
# Two builds racing for the same cache dir (two test runs at once) take turns; the second one
# then finds the finished binary.
exec {lock_fd}>"$CACHE_DIR/.lock"
flock "$lock_fd"
if built; then
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
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
missing=()
for pkg in "${APT_DEPS[@]}"; do
  installed "$pkg" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  ((EUID == 0)) || fail "missing Debian packages ${missing[*]}; run as root to install them"
  say "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt_install() {
    apt-get -o DPkg::Lock::Timeout=900 install -y -qq --no-install-recommends "${missing[@]}" {lock_fd}>&-
  }
  if ! apt_install; then
    # On a fresh machine the package lists may be missing or stale.
    apt-get -o DPkg::Lock::Timeout=900 update -qq {lock_fd}>&- || fail "apt-get update failed"
    apt_install || fail "apt-get install ${missing[*]} failed"
  fi
fi
command -v go >/dev/null || fail "no go on PATH after installing golang-go"
etcd_bin=$(command -v etcd) || fail "no etcd on PATH after installing etcd-server"
reflect2_src=/usr/share/gocode/src/github.com/modern-go/reflect2
[[ -f $reflect2_src/reflect2.go ]] || fail "$reflect2_src is missing (golang-github-modern-go-reflect2-dev)"

# --- the source package, through a private apt configuration -----------------------------------
rm -rf "$WORK"
apt_dir=$WORK/apt
mkdir -p "$apt_dir/sources.list.d" "$apt_dir/preferences.d" "$apt_dir/lists/partial" \
  "$apt_dir/cache/archives/partial" "$WORK/src"
# The Debian archive this machine already uses (its first non-security URI), so that a mirror
# or snapshot configured here is honoured.
mirror=$(sed -n 's/^URIs:[[:space:]]*//p' /etc/apt/sources.list.d/*.sources 2>/dev/null |
  tr ' ' '\n' | grep -v -e security -e '^$' | head -n1 || true)
if [[ -z $mirror && -f /etc/apt/sources.list ]]; then
  mirror=$(awk '$1 == "deb" && !/security/ { print ($2 ~ /^\[/ ? $3 : $2); exit }' /etc/apt/sources.list)
fi
[[ -n $mirror ]] || fail "found no Debian archive URI in /etc/apt/sources.list{,.d}"
cat >"$apt_dir/sources.list.d/kubernetes-src.sources" <<EOF
Types: deb-src
URIs: $mirror
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
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
# bookworm's package is versioned 1.20.5+really1.20.2: its tarball holds kubernetes-1.20.2/.
orig=$(compgen -G "$apt_dir/kubernetes_*.orig.tar.gz" | head -n1 || true)
[[ -n $orig ]] || fail "apt-get source downloaded no kubernetes_*.orig.tar.gz (see $WORK/apt.log)"
tar -xzf "$orig" -C "$WORK/src"
src=$WORK/src/kubernetes-$VERSION
[[ -d $src/cmd/kube-apiserver ]] || fail "$(basename "$orig") holds $(ls "$WORK/src"), not kubernetes-$VERSION/"

rm -rf "$src/vendor/github.com/modern-go/reflect2"
mkdir -p "$src/vendor/github.com/modern-go/reflect2"
find "$reflect2_src" -maxdepth 1 -type f \( -name '*.go' -o -name '*.s' \) ! -name '*_test.go' \
  -exec cp -t "$src/vendor/github.com/modern-go/reflect2" {} +

# --- build in GOPATH mode, offline ---------------------------------------------------------------
# Kubernetes 1.20 builds as k8s.io/kubernetes inside a GOPATH, its staging repos seen through
# vendor/ symlinks.
mkdir -p "$WORK/gopath/src/k8s.io"
ln -s "$src" "$WORK/gopath/src/k8s.io/kubernetes"
mkdir -p "$WORK/tmp"
export GOPATH=$WORK/gopath GOCACHE=$WORK/gocache GOTMPDIR=$WORK/tmp GO111MODULE=off GOFLAGS='' GOPROXY=off CGO_ENABLED=0
cd "$WORK/gopath/src/k8s.io/kubernetes"

# The source tarball lacks the generated OpenAPI definitions the apiserver links against;
# generate them for every package that opts in with a `+k8s:openapi-gen=` tag, as the upstream
# Makefile does. Staging packages are named by their vendor/ path.
say "generating OpenAPI definitions ($(go version | cut -d' ' -f3))"
go build -o "$WORK/openapi-gen" ./vendor/k8s.io/kube-openapi/cmd/openapi-gen
grep -rlE --include='*.go' '^// *\+k8s:openapi-gen=' cmd pkg plugin staging/src third_party 2>/dev/null |
  xargs -n1 dirname | sed 's|^staging/src/|vendor/|' |
  grep -vE '^vendor/k8s\.io/(code-generator|sample-apiserver)/' | LC_ALL=C sort -u >"$WORK/openapi-packages" ||
  true
(($(wc -l <"$WORK/openapi-packages") > 50)) ||
  fail "only $(wc -l <"$WORK/openapi-packages") packages carry +k8s:openapi-gen tags; the source tree looks wrong"
"$WORK/openapi-gen" \
  --input-dirs "$(sed 's|^|k8s.io/kubernetes/|' "$WORK/openapi-packages" | paste -sd,)" \
  --output-package k8s.io/kubernetes/pkg/generated/openapi \
  --output-file-base zz_generated.openapi \
  --go-header-file vendor/k8s.io/code-generator/hack/boilerplate.go.txt \
  --report-filename "$WORK/openapi-rule-violations" \
  >"$WORK/openapi-gen.log" 2>&1 ||
  { tail -n 20 "$WORK/openapi-gen.log" >&2; fail "openapi-gen failed"; }
[[ -s pkg/generated/openapi/zz_generated.openapi.go ]] || fail "openapi-gen wrote no zz_generated.openapi.go"

say "compiling kube-apiserver (a few minutes)"
ldflags="-s -w"
for pkg in k8s.io/kubernetes/vendor/k8s.io/component-base/version \
  k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=v$VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=20"
  ldflags+=" -X $pkg.gitTreeState=clean"
done
go build -ldflags "$ldflags" -o "$WORK/kube-apiserver" ./cmd/kube-apiserver
"$WORK/kube-apiserver" --version | grep -qx "Kubernetes v$VERSION" ||
  fail "the built binary reports '$("$WORK/kube-apiserver" --version)', not v$VERSION"

# --- install; the apiserver binary goes last, so its presence means a complete build ------------
cd "$CACHE_DIR"
ln -sfn "$etcd_bin" bin/etcd
cat >BUILD_INFO <<EOF
kube-apiserver v$VERSION from $(basename "$orig") (Debian bookworm source package)
vendored reflect2 replaced by golang-github-modern-go-reflect2-dev $(dpkg-query -W -f='${Version}' golang-github-modern-go-reflect2-dev)
$(go version)
etcd: $etcd_bin, etcd-server $(dpkg-query -W -f='${Version}' etcd-server)
built $(date -u +%Y-%m-%dT%H:%M:%SZ) in $((SECONDS - start_time))s
EOF
mv -f "$WORK/kube-apiserver" bin/kube-apiserver
chmod -R u+w "$WORK" # the Go build cache is read-only
rm -rf "$WORK"
say "built in $((SECONDS - start_time))s"
echo "$CACHE_DIR"
