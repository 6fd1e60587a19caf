#!/usr/bin/env bash
# Builds the release binaries into $CARGO_TARGET_DIR/release (scripts/env.sh's default, or the
# caller's): ztunnel in a cargo build of its own, as its Containerfile builds it, then the rest.
# ztunnel's is the `ztunnel` profile (built for size) and linked statically (Cargo.toml says why);
# it is linked into release/ beside the others, where `weft up`, the benches and the images look.
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
