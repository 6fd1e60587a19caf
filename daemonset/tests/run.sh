#!/usr/bin/env bash
# Runs the chart's tests (daemonset/tests/test_*.py) with pytest: the committed manifests are what
# the chart renders (helm), they pass kubernetes-validate --strict, they are accepted by a
# server-side dry-run on a private kube-apiserver (scripts/kube-apiserver), the chart's values
# schema and toggles, least-privilege RBAC, and the Containerfiles' paths and targets.
# scripts/test.sh runs it; with CI=true a missing tool or apiserver fails instead of skipping.
#
#   daemonset/tests/run.sh [PYTEST ARGS...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
exec python3 -m pytest -p no:cacheprovider -q -rs "$@" .
