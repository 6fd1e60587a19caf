#!/usr/bin/env bash
# Every test Weft has: formatting, lints, unit and integration tests. CI runs exactly this.
# The controller's integration tests also talk to a real kube-apiserver (v1.20.2, built once into
# ~/.cache/weft by scripts/kube-apiserver/build.sh), started here for the test run and stopped on
# exit. Where it cannot be built or started, CI (CI=true) fails; elsewhere those tests skip.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh

kube_state='' kube_keep_state=''
stop_kube_apiserver() {
  local rc=$?
  [[ -n $kube_state ]] || return 0
  if scripts/kube-apiserver/stop.sh "$kube_state" && ((rc == 0)) && [[ -z $kube_keep_state ]]; then
    rm -rf "$kube_state"
  else
    echo "test: the kube-apiserver's state and logs are kept in $kube_state" >&2
  fi
}
trap stop_kube_apiserver EXIT
kube_apiserver_missing() {
  if [[ ${CI:-} == true ]]; then
    echo "test: ERROR: $1; CI requires the real Kubernetes binaries" >&2
    exit 1
  fi
  echo "test: WARNING: $1; the tests against a real kube-apiserver or cluster will be SKIPPED" >&2
}

# Cargo never deletes outputs that a rebuild superseded, and the cached target directories collect
# them (a profile or build-configuration change supersedes everything at once). With less than
# 40 GB free, outputs untouched for a day go; what is still needed is rebuilt.
free_gb=$(df -P --block-size=1G "$HOME" | awk 'NR == 2 { print $4 }')
if ((free_gb < 40)); then
  echo "== pruning build outputs older than a day (${free_gb} GB free)"
  for dir in "$HOME"/.cache/weft/target*/{debug,release,ztunnel}/{deps,build}; do
    if [[ -d $dir ]]; then find "$dir" -mindepth 1 -maxdepth 1 -mmin +1440 -exec rm -rf {} +; fi
  done
fi
echo "== kube-apiserver build (cached)"
kube_built=''
if scripts/kube-apiserver/build.sh >/dev/null; then
  kube_built=1
else
  kube_apiserver_missing "scripts/kube-apiserver/build.sh failed"
fi
echo "== Kubernetes node binaries build (cached)"
# kubelet, kube-controller-manager, kube-scheduler, kube-proxy and pause, from the same source
# package (scripts/kube-cluster/build.sh); tests/kubernetes.rs runs a two-node cluster of them.
if ! scripts/kube-cluster/build.sh >/dev/null; then
  kube_apiserver_missing "scripts/kube-cluster/build.sh failed"
fi
claim_target_dir "$CARGO_TARGET_DIR"
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --locked --workspace --all-targets -- -D warnings
if [[ -n $kube_built ]]; then
  echo "== kube-apiserver start"
  kube_state=$(mktemp -d "${TMPDIR:-/tmp}/weft-kube-apiserver.XXXXXX")
  if scripts/kube-apiserver/start.sh "$kube_state" >/dev/null; then
    export WEFT_TEST_KUBECONFIG=$kube_state/kubeconfig
  else
    kube_keep_state=1
    kube_apiserver_missing "scripts/kube-apiserver/start.sh failed (logs in $kube_state)"
  fi
fi
# --- daemonset/: the Helm chart and the manifests rendered from it (pytest, daemonset/tests) ---------
# The committed manifests equal `helm template` of the chart, pass kubernetes-validate --strict and
# a server-side dry-run on a private kube-apiserver the tests start and stop themselves (from
# scripts/kube-apiserver); CI=true fails on a missing tool or apiserver instead of skipping.
# The release binaries the images are built from (daemonset/tests, tests/kubernetes.rs), in the
# release target directory the benchmarks use too.
echo "== cargo build --release (the images' binaries)"
CARGO_TARGET_DIR="$HOME/.cache/weft/target-release" scripts/release.sh
export WEFT_BIN_DIR="$HOME/.cache/weft/target-release/release"
echo "== daemonset tests (chart, manifests, Containerfiles)"
daemonset/tests/run.sh
# The end-to-end tests run the workspace's binaries (tests/e2e_support): `cargo test` builds a
# package's binaries only for that package's own integration tests, so the waypoint's (a package
# without any) would be missing from a fresh target directory, or stale in a cached one.
echo "== cargo build --workspace --bins (what the end-to-end tests run)"
cargo build --locked --workspace --bins
echo "== cargo nextest"
cargo nextest run --locked --workspace --no-fail-fast
# The capture's other attach mode (clsact qdisc + tc filters, what kernels 5.10-6.5 get; the run
# above used TCX, this kernel's default): the ebpf crate's tests run both modes themselves, the
# end-to-end capture tests (the local mesh's ztunnels read WEFT_CAPTURE_ATTACH) again here.
echo "== cargo nextest, capture attached with tc filters"
WEFT_CAPTURE_ATTACH=tc cargo nextest run --locked -p e2e --test e2e --test l4_security --no-fail-fast
