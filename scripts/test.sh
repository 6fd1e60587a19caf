#!/usr/bin/env bash
# Every test Weft has: formatting, lints, unit and integration tests. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --locked --workspace --all-targets -- -D warnings
echo "== cargo nextest"
cargo nextest run --locked --workspace --no-fail-fast
