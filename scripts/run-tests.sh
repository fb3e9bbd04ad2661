#!/usr/bin/env bash
# The whole test suite: lint and format, types, unit tests, the bounded fuzz runs
# (PTMIG_FUZZ_SECONDS per target, default 20), then the lab e2e tests (real libvirt, QEMU
# and guest kernel; needs root).  Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
venv=${PTMIG_VENV:-$PWD/.venv}
export PATH=$venv/bin:$PATH

echo "== ruff"; ruff check .; ruff format --check .
echo "== mypy"; mypy
echo "== pytest"
# The nested vfio lab's tests are not in the default run (docs/lab.md: how long they take);
# `-m vfio` after the other arguments selects them.
pytest -p no:cacheprovider tests/unit tests/fuzz tests/e2e -m "not vfio" "$@"
