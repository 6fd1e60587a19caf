#!/usr/bin/env bash
# The main job: builds Weft and runs `weft demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
source scripts/env.sh
scripts/release.sh
exec "$CARGO_TARGET_DIR/release/weft" demo --bin-dir "$CARGO_TARGET_DIR/release" "$@"
