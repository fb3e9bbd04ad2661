"""The fabric's drop counters, read from ``ip -s -j link`` as iproute2 prints it."""

from __future__ import annotations

import json

from lab.fabric import drop_counters


def _link(name: str, rx: int, tx: int, key: str = "stats64") -> dict[str, object]:
    return {"ifname": name, key: {"rx": {"packets": 9, "dropped": rx}, "tx": {"dropped": tx}}}


def test_drop_counters_keep_only_the_nonzero_ones_by_place_link_and_way() -> None:
    out = json.dumps([_link("lo", 0, 0), _link("ptv-standby", 0, 7), _link("enp1s0", 3, 0)])
    assert drop_counters(out, "ptmig-hosta") == {
        "ptmig-hosta:ptv-standby:tx": 7,
        "ptmig-hosta:enp1s0:rx": 3,
    }


def test_drop_counters_read_an_older_iproute2s_stats_and_a_link_without_any() -> None:
    out = json.dumps([_link("eth0", 2, 0, key="stats"), {"ifname": "bond0"}])
    assert drop_counters(out, "guest") == {"guest:eth0:rx": 2}
