"""Exercise guest_agent.netlink against the real kernel; run inside `unshare -n`.

Usage: PYTHON -I agent_netlink_probe.py REPO_ROOT RUN_ROOT
Creates veths with iproute2 in the private network namespace (this machine may
have no bonding or dummy driver), prints one JSON line of findings, exits 0.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

sys.path[:0] = [sys.argv[1]]

from guest_agent import netlink  # noqa: E402
from guest_agent.links import (  # noqa: E402
    BondingUnavailable,
    FailOverMac,
    Link,
    LinkError,
    LinkRefused,
    NoSuchLink,
    WaitTimeout,
    by_name,
)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True)


def later(delay: float, func: object) -> None:
    threading.Timer(delay, func).start()  # type: ignore[arg-type]


def main() -> None:
    links = netlink.NetlinkLinks(run_root=sys.argv[2])
    out: dict[str, object] = {"lo": by_name(links.list_links(), "lo") is not None}
    # IPRoute alone, imported by the first dump: without pyroute2.lab's unittest.mock
    out["mock_imported"] = "unittest.mock" in sys.modules
    out["pyroute2"] = __import__("pyroute2").__version__  # the whole package still imports
    lab = sys.modules.get("pyroute2.lab")
    out["lab_after_import"] = None if lab is None else lab.__file__ is not None

    later(0.3, lambda: ip("link", "add", "va", "type", "veth", "peer", "name", "vb"))
    started = time.monotonic()
    va = links.wait_for(lambda ls: by_name(ls, "va"), time.monotonic() + 5)
    out["appeared_after_s"] = round(time.monotonic() - started, 2)
    out["kind"] = va.kind
    vb = by_name(links.list_links(), "vb")
    assert vb is not None

    links.set_mac(va.index, "02:00:00:00:00:0a")
    out["mac"] = by_name(links.list_links(), "va").mac  # type: ignore[union-attr]
    try:
        links.set_mac(va.index, "01:00:5e:00:00:01")
    except LinkRefused as exc:
        out["multicast_mac"] = f"LinkRefused errno={exc.errno}"

    links.set_up(va.index, True)
    out["carrier_with_peer_down"] = by_name(links.list_links(), "va").carrier  # type: ignore[union-attr]
    later(0.3, lambda: links.set_up(vb.index, True))
    started = time.monotonic()
    links.wait_for(lambda ls: (by_name(ls, "va") or va).carrier or None, time.monotonic() + 5)
    out["carrier_after_s"] = round(time.monotonic() - started, 2)

    (alone,) = links.get_links([va.index])
    out["read_alone"] = [alone.name, alone.carrier, alone.mac]
    try:
        links.get_links([va.index, 99999])
    except NoSuchLink as exc:
        out["read_missing"] = f"NoSuchLink errno={exc.errno}"
    # A wait on one link: woken by that link's event, not by another link's.
    later(0.2, lambda: ip("link", "set", "vb", "mtu", "1400"))  # vb's event only
    later(0.6, lambda: ip("link", "set", "va", "mtu", "1300"))
    seen: list[list[str]] = []

    def va_mtu_event(ls: list[Link]) -> bool | None:
        seen.append([ln.name for ln in ls])
        return True if len(seen) > 1 else None

    started = time.monotonic()
    links.wait_for(va_mtu_event, time.monotonic() + 5, only=[va.index])
    out["only_woken_after_s"] = round(time.monotonic() - started, 2)
    out["only_reads"] = seen

    started = time.monotonic()
    try:
        links.wait_for(lambda ls: None, time.monotonic() + 0.3)
    except WaitTimeout:
        out["timeout_after_s"] = round(time.monotonic() - started, 2)

    try:
        links.set_up(99999, True)
    except NoSuchLink as exc:
        out["missing_link"] = f"NoSuchLink errno={exc.errno}"
    try:
        links.set_active_slave(va.index, vb.index)
    except LinkError as exc:
        out["active_slave_on_veth"] = f"{type(exc).__name__} errno={exc.errno}"

    try:
        bond = links.create_bond("ptbond0", FailOverMac.ACTIVE, 1)
    except BondingUnavailable as exc:
        out["bond"] = f"BondingUnavailable errno={exc.errno}"
    else:
        links.enslave(va.index, bond)
        links.set_up(bond, True)
        links.wait_for(lambda ls: (by_name(ls, "va") or va).carrier or None, time.monotonic() + 5)
        links.set_active_slave(bond, va.index)
        info = by_name(links.list_links(), "ptbond0").bond  # type: ignore[union-attr]
        out["bond"] = {
            "active_is_va": info.active_slave == va.index,  # type: ignore[union-attr]
            "fail_over_mac": info.fail_over_mac.name,
        }  # type: ignore[union-attr]
        links.release(va.index)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
