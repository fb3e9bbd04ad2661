#!/bin/sh
# postinst of ptmig-agent (and, as staged by scripts/build-packages.sh, of ptmig).
# deb: configure [old-version] | abort-*; rpm: $1 = 1 install, 2 upgrade.
# Works in a chroot (dpkg -i, debootstrap: no systemd, no udev running: enable only)
# and on a running system (apt, dnf: also (re)start).
set -e

unit=ptmig-agent.service
tree=/usr/lib/ptmig-agent
udev=yes  # the package ships a udev rule
sysuser=ptmig-agent  # the unit's system user, declared in /usr/lib/sysusers.d/$sysuser.conf

case "$1" in
  configure) if [ -z "$2" ]; then first=yes; else first=no; fi ;;
  1) first=yes ;;
  2) first=no ;;
  *) exit 0 ;;  # abort-upgrade, abort-remove...: the old version is still in place
esac

# Byte-compile the private tree afresh (caches of modules that went away go first).
# A failure only costs start-up time: it must not fail the installation.
find "$tree" -depth -type d -name __pycache__ -exec rm -rf {} + 2>/dev/null || true
if ! /usr/bin/python3 -m compileall -q "$tree" >/dev/null; then
  echo "$unit: byte-compiling $tree failed (harmless)" >&2
fi

# The unit's user exists before udev's rule hands it the channel and before the unit
# can start; systemd-sysusers reads the package's sysusers.d file (also in a chroot).
if [ -n "$sysuser" ]; then
  if command -v systemd-sysusers >/dev/null 2>&1; then
    systemd-sysusers "$sysuser.conf"
  elif ! getent passwd "$sysuser" >/dev/null; then
    useradd --system --user-group --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin "$sysuser"
  fi
fi

# Let a running udev read 60-ptmig-agent.rules (a hot-plugged channel starts the agent).
if [ "$udev" = yes ] && [ -d /run/udev ] && command -v udevadm >/dev/null 2>&1; then
  udevadm control --reload || true
fi

if ! command -v systemctl >/dev/null 2>&1; then
  exit 0
fi
# Enable on the first installation only: enabling just makes the WantedBy= symlink, which
# works offline (chroot) too.  Upgrades, and a reinstallation after "remove" (the
# symlink is kept until "purge"), leave the admin's enable/disable choice alone.
if [ "$first" = yes ]; then
  systemctl enable "$unit" >/dev/null 2>&1 || echo "$unit: could not enable it" >&2
fi
if [ -d /run/systemd/system ]; then
  systemctl daemon-reload || true
  # An enabled unit is (re)started: the new code runs at once.  The unit's conditions
  # (the agent's) make this a no-op on a machine without a ptmig channel.  A disabled one is only
  # restarted if someone started it by hand.
  if systemctl is-enabled --quiet "$unit" 2>/dev/null; then
    action=restart
  else
    action=try-restart
  fi
  systemctl "$action" "$unit" || echo "$unit: $action failed; see journalctl -u $unit" >&2
fi
exit 0
