#!/usr/bin/env bash
# Set a fresh Debian 12 machine up for ptmig and run one job.
#
#   scripts/bootstrap.sh demo    # install, build the lab, run the live-migration demo
#   scripts/bootstrap.sh test    # install, then run the whole test suite (unit + lab e2e)
#   scripts/bootstrap.sh setup   # install only
#
# Idempotent: every step is skipped when its result is already there.
# Must run as root (it installs Debian packages and builds network namespaces).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${PTMIG_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ptmig}
venv=${PTMIG_VENV:-$here/.venv}
job=${1:-setup}
shift || true

log() { printf '\033[1m== %s\033[0m\n' "$*" >&2; }

[ "$(id -u)" = 0 ] || { echo "bootstrap: run as root" >&2; exit 2; }

# QEMU 10 / libvirt 11 come from bookworm-backports: Debian 12's QEMU 7.2 corrupts TCG
# guests' memory in some live migrations (docs/lab.md).  The backports source is kept in
# a private apt state directory so the machine's apt sources are left as they were.
install_debian_packages() {
  # The stamp is keyed by this function's text: a changed package list reinstalls.
  local stamp
  stamp=$cache/apt/installed-$(declare -f install_debian_packages | sha256sum | cut -c1-12)
  [ -f "$stamp" ] && return 0
  log "installing Debian packages (QEMU and libvirt from bookworm-backports)"
  mkdir -p "$cache/apt/lists/partial"
  local mirror
  mirror=$(sed -n 's/^URIs: *//p' /etc/apt/sources.list.d/debian.sources 2>/dev/null | head -n1)
  mirror=${mirror:-http://deb.debian.org/debian}
  local suites=(bookworm-backports)
  # Sources in /etc/apt/sources.list (which this private list replaces) rather than in
  # sources.list.d: list bookworm itself too, so every package is still found.
  [ -f /etc/apt/sources.list.d/debian.sources ] || suites+=(bookworm bookworm-updates)
  for suite in "${suites[@]}"; do echo "deb $mirror $suite main"; done \
    > "$cache/apt/backports.list"
  local apto=(-o "Dir::Etc::SourceList=$cache/apt/backports.list" -o "Dir::State::Lists=$cache/apt/lists")
  export DEBIAN_FRONTEND=noninteractive
  apt-get "${apto[@]}" update -q
  apt-get "${apto[@]}" install -y -q --no-install-recommends \
    debootstrap e2fsprogs iproute2 iputils-ping procps psmisc kmod ca-certificates \
    python3 python3-venv python3-dev gcc pkg-config make git \
    python3-grpcio python3-protobuf python3-pyroute2 rpm
  apt-get "${apto[@]}" -t bookworm-backports install -y -q --no-install-recommends \
    qemu-system-x86 qemu-utils qemu-system-common libvirt-daemon libvirt-daemon-driver-qemu \
    libvirt-daemon-driver-network \
    libvirt-clients libvirt-dev \
    python3-libvirt python3-rich python3-prometheus-client man-db
  touch "$stamp"
}

# promtool tests the alerting rules the host package ships.  Debian has it only in the
# prometheus package, whose install would also enable and start a Prometheus server: its
# .deb is unpacked into the cache instead and promtool run from there.
install_promtool() {
  local dir=$cache/promtool
  [ -x "$dir/usr/bin/promtool" ] && return 0
  log "unpacking promtool from Debian's prometheus package"
  rm -rf "$dir" && mkdir -p "$dir/deb"
  (cd "$dir/deb" && apt-get -o APT::Sandbox::User=root -o "Dir::State::Lists=$cache/apt/lists" \
     -o "Dir::Etc::SourceList=$cache/apt/backports.list" download prometheus)
  dpkg-deb -x "$dir"/deb/prometheus_*.deb "$dir/unpacked"
  mkdir -p "$dir/usr/bin"
  mv "$dir/unpacked/usr/bin/promtool" "$dir/usr/bin/promtool"
  rm -rf "$dir/deb" "$dir/unpacked"
}

install_python_env() {
  local stamp=$venv/.ptmig-installed
  if [ -f "$stamp" ] && [ "$stamp" -nt "$here/pyproject.toml" ]; then return 0; fi
  log "creating the virtualenv $venv"
  /usr/bin/python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip
  "$venv/bin/pip" install -q -e "$here[host,agent,lab,dev]"
  touch "$stamp"
}

# The editable install leaves the checkout without bytecode, and where Python may not
# write it (PYTHONDONTWRITEBYTECODE, a read-only checkout) every ptmig process compiles
# host/ again (about 0.05 s a process here; docs/benchmarks/cold-first-migration.md).
# compileall writes it whatever the environment says and skips what is up to date;
# Python reads it while its source is unchanged (an edited module is compiled in memory
# until the next bootstrap).
compile_checkout() {
  "$venv/bin/python" -m compileall -q -j 0 "$here/host" "$here/guest_agent" "$here/lab" \
    "$here/protos/ptmig" >/dev/null || log "byte-compiling the checkout failed (harmless)"
}

install_debian_packages
install_promtool
install_python_env
compile_checkout
export PATH=$venv/bin:$cache/promtool/usr/bin:$PATH

case "$job" in
  setup) log "ready: . $venv/bin/activate" ;;
  demo)  exec ptmig-lab demo "$@" ;;
  test)  exec "$here/scripts/run-tests.sh" "$@" ;;
  *) echo "bootstrap: unknown job '$job' (setup, demo, test)" >&2; exit 2 ;;
esac
