# Sourced by the scripts: where builds go. The target directory lives under ~/.cache so that a
# fresh clone (CI) reuses compiled dependencies from the previous run.
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/weft/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# Incremental compilation state grew to tens of GiB in that shared directory (and filled the
# disk); whole-crate rebuilds of Weft's own crates are quick, so it is off.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

# claim_target_dir DIR: makes DIR's artifacts of the workspace's own crates this checkout's. They
# carry the path they were built at (`env!("CARGO_MANIFEST_DIR")`: the tests' data files, the
# demo's manifests), yet cargo counts them fresh for another checkout of the same sources in the
# shared directory: a test built at /a/weft then reads /a/weft's files when run from /b/weft, and
# fails once /a is gone. So the first build after the checkout moved rebuilds those crates (the
# dependencies stay built).
claim_target_dir() {
  local repo mark
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
  mark="$1/weft-checkout"
  local last=''
  if [[ -f $mark ]]; then last=$(<"$mark"); fi
  if [[ -d $1 && $last != "$repo" ]]; then
    echo "env: $1 was last built from ${last:-an unrecorded checkout}: rebuilding the workspace's crates for $repo" >&2
    local profile
    for profile in dev release ztunnel; do
      CARGO_TARGET_DIR="$1" cargo clean --manifest-path "$repo/Cargo.toml" --profile "$profile" \
        -p weft-core -p weft-config -p ztunnel -p ebpf -p waypoint -p controller -p weft -p e2e
    done
  fi
  mkdir -p "$1" && echo "$repo" >"$mark"
}
