#!/usr/bin/env bash
# Builds the release binaries into $CARGO_TARGET_DIR/release (scripts/env.sh's default, or the
# caller's): the workspace's binaries but ztunnel, then ztunnel in a cargo build of its own, as its
# Containerfile builds it: from the `ztunnel` profile (built for size), linked statically
# (Cargo.toml says why), and hard-linked into release/ beside the others, where `weft up`, the
# benches and the image build look.
# Built in one invocation with the controller, ztunnel gets the features the controller's crates
# turn on (regex's Unicode tables and engines, through tracing-subscriber's regex-automata): 1 MB
# more code and 1.3 MB more RSS per node (BENCHMARKS.md, L4 efficiency).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
claim_target_dir "$CARGO_TARGET_DIR"
cargo build --release --locked --workspace --exclude ztunnel --bins
cargo rustc --profile ztunnel --locked -p ztunnel --bin ztunnel -- -C target-feature=+crt-static
ln -f "$CARGO_TARGET_DIR/ztunnel/ztunnel" "$CARGO_TARGET_DIR/release/ztunnel"
