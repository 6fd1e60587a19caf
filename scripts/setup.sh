#!/usr/bin/env bash
# Installs what building and testing Weft needs on Debian 12, as root. Idempotent: installs only
# what is missing, so a second run touches nothing and needs no network.
set -euo pipefail

# clang, llvm and libbpf-dev build the eBPF programs; iproute2 and bpftool make and inspect the local
# cluster; the rest are the real clients and the Prometheus server the end-to-end tests drive.
APT_PACKAGES=(build-essential pkg-config ca-certificates git curl clang llvm libbpf-dev bpftool iproute2
  iperf3 tcpdump nghttp2-client wrk prometheus)

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
