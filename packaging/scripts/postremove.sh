#!/bin/sh
# postrm of ptmig-agent (and, as staged by scripts/build-packages.sh, of ptmig).
# deb: remove | purge | upgrade | failed-upgrade | abort-* | disappear;
# rpm: $1 = 0 erase, 1 upgrade.
set -e

unit=ptmig-agent.service
tree=/usr/lib/ptmig-agent
udev=yes  # the package ships a udev rule

case "$1" in
  remove|purge|disappear|abort-install|0) ;;
  *) exit 0 ;;
esac

# Whatever is left under the private tree is ours alone (e.g. caches written by an
# unit that ran between prerm and the removal of the files).
if [ -d "$tree" ]; then
  find "$tree" -depth -type d -name __pycache__ -exec rm -rf {} + 2>/dev/null || true
  find "$tree" -depth -type d -empty -delete 2>/dev/null || true
fi

# deb purge: forget the enablement (the unit file is gone, so by hand, not systemctl).
# Drop-ins the admin made with `systemctl edit` are the admin's: they stay.
if [ "$1" = purge ] || [ "$1" = disappear ]; then
  rm -f "/etc/systemd/system/multi-user.target.wants/$unit"
fi

if [ "$udev" = yes ] && [ -d /run/udev ] && command -v udevadm >/dev/null 2>&1; then
  udevadm control --reload || true
fi
if [ -d /run/systemd/system ] && command -v systemctl >/dev/null 2>&1; then
  systemctl daemon-reload || true
  systemctl reset-failed "$unit" >/dev/null 2>&1 || true
fi
exit 0
