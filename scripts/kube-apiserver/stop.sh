#!/usr/bin/env bash
# Stops the etcd and kube-apiserver that start.sh STATE_DIR started: exactly the processes listed
# in STATE_DIR/pids, the apiserver first. A listed pid is signalled only while it still runs the
# executable recorded next to it, so a pid the kernel has since handed to another program is left
# alone. SIGTERM first, SIGKILL after 10 s.
#
#   scripts/kube-apiserver/stop.sh STATE_DIR
#
# Exits 0 when nothing (any more) runs, also for a missing STATE_DIR or pids file; 1 if a process
# survived SIGKILL. STATE_DIR itself is left in place (logs, keys, kubeconfig).
set -euo pipefail

say() { echo "kube-apiserver/stop: $*" >&2; }

if (($# != 1)) || [[ -z $1 ]]; then
  say "usage: stop.sh STATE_DIR"
  exit 1
fi
pids_file=$1/pids
if [[ ! -f $pids_file ]]; then
  say "nothing to stop: no $pids_file"
  exit 0
fi

# A zombie or an exited process has no readable /proc/PID/exe, so it counts as stopped. A binary
# replaced on disk while it runs (a rebuild) shows as "EXE (deleted)" and is still ours.
runs() {
  local exe
  exe=$(readlink "/proc/$1/exe" 2>/dev/null) || return 1
  [[ ${exe% (deleted)} == "$2" ]]
}
wait_gone() { # wait_gone PID EXE TENTHS_OF_A_SECOND
  local i
  for ((i = 0; i < $3; i++)); do
    runs "$1" "$2" || return 0
    sleep 0.1
  done
  ! runs "$1" "$2"
}

failed=0
for name in kube-apiserver etcd; do
  while read -r entry pid exe; do
    [[ $entry == "$name" ]] || continue
    if [[ ! $pid =~ ^[0-9]+$ || -z $exe ]]; then
      say "skipping malformed line in $pids_file: $entry $pid $exe"
      continue
    fi
    if ! runs "$pid" "$exe"; then
      say "$name (pid $pid) is not running"
      continue
    fi
    kill -TERM "$pid" 2>/dev/null || true
    if ! wait_gone "$pid" "$exe" 100; then
      say "$name (pid $pid) is still running 10 s after SIGTERM; sending SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
      if ! wait_gone "$pid" "$exe" 50; then
        say "ERROR: $name (pid $pid) survived SIGKILL"
        failed=1
        continue
      fi
    fi
    say "stopped $name (pid $pid)"
  done <"$pids_file"
done
((failed == 0)) || exit 1
rm -f "$pids_file"
