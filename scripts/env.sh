# Sourced by the scripts: where builds go. The target directory lives under ~/.cache so that a
# fresh clone (CI) reuses compiled dependencies from the previous run.
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/weft/target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"
# Incremental compilation state grew to tens of GiB in that shared directory (and filled the
# disk); whole-crate rebuilds of Weft's own crates are quick, so it is off.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"
