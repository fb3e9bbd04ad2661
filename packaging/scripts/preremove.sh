#!/bin/sh
# prerm of ptmig-agent (and, as staged by scripts/build-packages.sh, of ptmig).
# deb: remove | upgrade | deconfigure | failed-upgrade;
# rpm: $1 = 0 erase, 1 upgrade (rpm runs the old prerm *after* the new postinst).
set -e

unit=ptmig-agent.service
tree=/usr/lib/ptmig-agent

case "$1" in
  remove|deconfigure|0) ;;
  *) exit 0 ;;  # an upgrade: the new postinst restarts the unit on the new code
esac

if command -v systemctl >/dev/null 2>&1; then
  if [ -d /run/systemd/system ]; then
    systemctl stop "$unit" || true
  fi
  # rpm has no purge: an erased package leaves no enablement behind.  dpkg keeps it
  # until purge (postrm), as dh_installsystemd does.
  if [ "$1" = 0 ]; then
    systemctl disable "$unit" >/dev/null 2>&1 || true
  fi
fi

# The byte-code caches are not in the package: remove them so that the package manager
# can remove the package's directories.
find "$tree" -depth -type d -name __pycache__ -exec rm -rf {} + 2>/dev/null || true
exit 0
