"""The benchmark's arithmetic: medians per case, and issue 13's goals judged from them."""

from __future__ import annotations

from lab.bench_migration import Goal, Sample, format_summary, goals, summarize
from lab.traffic import Phase
from lab.traffic.tcp import TcpReport


def sample(
    case: str,
    lan: int,
    wan: int,
    wall: float,
    back: float | None = None,
    *,
    switch: int = 0,
    preflight: float = 0.5,
) -> Sample:
    phases = [Phase("migrate", 10.0, 11.0)]
    lost = {"lan": {"migrate": lan}, "wan": {"migrate": wan}}
    if case == "ptmig":
        phases = [
            Phase("preflight", 0.0, preflight),
            Phase("switch", 1.0, 2.0),
            Phase("unplug", 2.0, 2.5),
            *phases,
            Phase("bind", 11.0, 11.0 + (back or 0.0)),
        ]
        lost = {t: {"switch": switch, **v} for t, v in lost.items()}
    return Sample(
        case,
        "hosta->hostb",
        phases,
        lost,
        {t: {p: float(n) for p, n in v.items()} for t, v in lost.items()},
        wall,
        back_on_primary_s=back,
        tcp=TcpReport(700.0, "migrate", 3, 1 << 20, 12.0),
    )


def by_figure(result: list[Goal]) -> dict[str, Goal]:
    return {g.figure: g for g in result}


def test_medians_and_spread_per_case_and_team() -> None:
    samples = [
        sample("floor", 100, 110, 3.0),
        sample("floor", 300, 310, 4.0),
        sample("floor", 200, 210, 5.0),
    ]
    summary = summarize(samples, bare=[2.0, 3.0])
    floor = summary["cases"]["floor"]
    assert floor["lan"]["total_lost"] == {"median": 200.0, "min": 100.0, "max": 300.0, "n": 3}
    assert floor["wall_s"]["median"] == 4.0
    assert floor["tcp"]["longest_stall_ms"]["median"] == 700.0
    assert summary["bare_hotplug_probe_s"]["median"] == 2.5


def test_goals_met_and_not_met_are_told_apart() -> None:
    samples = [
        sample("ptmig", 200, 260, 6.0, back=1.2, switch=1, preflight=2.0),
        sample("ptmig", 205, 260, 6.0, back=1.2, switch=5, preflight=0.5),
        sample("floor", 200, 200, 3.0),
        sample("floor", 210, 300, 3.0),
        sample("upstream", 2000, 0, 3.0),
    ]
    summary = summarize(samples, bare=[1.0], agent={"vmrss_mib": 35.0, "startup_s": 1.4})
    result = by_figure(goals(summary, samples))
    assert result["lan: lost, ptmig / floor"].met is True  # 202.5 / 205 and 205 <= 210
    assert result["wan: lost, ptmig / floor"].met is False  # 260 / 250 = 1.04x
    assert result["lan: lost, ptmig / upstream net_failover"].met is True  # 0.10x
    assert result["lan: lost in switch to standby, 90th percentile"].met is False  # 5 > 2
    assert result["back on the passthrough device"].met is True  # 1.2 <= 1.3
    assert result["whole ptmig migrate, wall"].met is False  # 6.0 > 1.2 * (3 + 0.5 + 1)
    assert result["first migration of the run"].met is False  # preflight 2 s, 4x the second's
    assert result["agent idle memory"].met is True
    assert result["agent start to serving (median)"].met is False
    text = format_summary(summary, list(result.values()))
    assert "not met" in text and "tcp   longest stall" in text


def test_back_on_primary_is_judged_against_one_nic_and_shown_against_both_at_once() -> None:
    samples = [sample("ptmig", 200, 250, 6.0, back=3.0)]
    summary = summarize(samples, bare=[2.0], bare_pair=[2.5])
    result = by_figure(goals(summary, samples))["back on the passthrough device"]
    assert result.met is False  # 1.5x the one NIC's 2.0 s: the goal's figure
    assert "= 1.50x (both teams' two at once: 2.50 s, 1.20x)" in result.measured
    text = format_summary(summary, [result])
    assert "bare hotplug + probe of two e1000e at once, under traffic: median 2.50 s" in text


def test_what_a_run_did_not_measure_is_not_claimed() -> None:
    samples = [sample("ptmig", 200, 250, 6.0, back=3.0)]
    result = by_figure(goals(summarize(samples, bare=[2.5]), samples))
    assert result["lan: lost, ptmig / upstream net_failover"].met is None
    assert result["lan: lost, ptmig / floor"].met is None
    assert result["agent idle memory"].met is None
    assert result["first migration of the run"].met is None  # one ptmig sample: no second
    assert result["agent idle memory"].verdict == "not measured"


def test_the_90th_percentile_of_six_switches_is_the_largest() -> None:
    samples = [sample("ptmig", 200, 200, 6.0, back=1.0, switch=n) for n in (0, 0, 1, 1, 2, 3)]
    result = by_figure(goals(summarize(samples, bare=[1.0]), samples))
    assert result["wan: lost in switch to standby, 90th percentile"].measured.startswith("3 ")


def test_each_floor_choice_is_compared_with_libvirts_defaults_and_the_stretch_judged() -> None:
    samples = [
        sample("floor", 200, 200, 4.0),
        sample("floor", 220, 220, 4.0),
        sample("floor-ptmig", 80, 80, 4.0),
        sample("floor-ptmig", 90, 90, 4.0),
        sample("floor-postcopy", 210, 210, 3.0),
    ]
    summary = summarize(samples, bare=[])
    choices = summary["floor_choices"]
    assert choices["floor-ptmig"]["ratio_to_floor"] == round(85 / 210, 3)
    assert choices["floor-postcopy"]["ratio_to_floor"] == 1.0
    stretch = next(g for g in goals(summary, samples) if g.figure.startswith("stretch"))
    assert stretch.met is True and stretch.measured == "85 / 210 = 0.40x"
    assert "floor-ptmig: ptmig's default" in format_summary(summary, [])

    worse = [sample("floor", 200, 200, 4.0), sample("floor-ptmig", 120, 120, 4.0)]
    summary = summarize(worse, bare=[])
    stretch = next(g for g in goals(summary, worse) if g.figure.startswith("stretch"))
    assert stretch.met is False


def test_cases_are_chosen_by_name_in_the_benchmarks_order() -> None:
    import pytest

    from lab.bench_migration import CASES, parse_cases
    from lab.vmlab import LabError

    assert parse_cases(None) == CASES
    assert parse_cases("floor-ptmig, floor") == ("floor", "floor-ptmig")
    with pytest.raises(LabError, match="unknown flor"):
        parse_cases("floor,flor")
    with pytest.raises(LabError, match="none given"):
        parse_cases(" , ")


def test_a_binds_breakdown_lines_up_both_sides_from_the_attach_call() -> None:
    """The coordinator's times and the guest's log lines of one team, in seconds from its
    attach call; the other team's lines and earlier lines are not taken for its own."""
    from host.workflow.model import BindTiming
    from lab.bench_migration import bind_breakdown, breakdown_summary

    t0 = 1000.0
    agent = "2026-12-05 22:27:01,123 INFO guest_agent.teams: "
    log = [
        (t0 - 5.0, "bond0: (slave enp3s0): making interface enp3s0 the new active one"),
        (t0 + 0.4, "pci 0000:03:00.0: [8086:10d3] type 00 class 0x020000"),
        (t0 + 0.5, "pci 0000:04:00.0: [8086:10d3] type 00 class 0x020000"),
        (t0 + 1.2, "e1000e 0000:03:00.0 eth0: (PCI Express:2.5GT/s:Width x1) 52:54:00:bb:00:01"),
        (t0 + 1.5, agent + "team lan: eth0 is there; waiting for udev"),
        (t0 + 1.6, "e1000e 0000:03:00.0 enp3s0: renamed from eth0"),
        (
            t0 + 1.7,
            agent + "team wan: binding enp4s0 (device with pci 0000:04:00.0), MAC policy follow",
        ),
        (
            t0 + 1.8,
            agent + "team lan: binding enp3s0 (device with pci 0000:03:00.0 and mac "
            "52:54:00:bb:00:01), MAC policy preserve",
        ),
        (t0 + 1.9, agent + "team lan: enp3s0 in bond0 and up; waiting for its carrier"),
        (t0 + 2.6, agent + "team lan: enp3s0 has carrier"),
        (t0 + 2.7, "bond0: (slave enp3s0): making interface the new active one"),
        (t0 + 2.95, agent + "team lan: enp3s0 bound and active"),
    ]
    timing = BindTiming(t0, t0 + 0.1, t0 + 0.12, t0 + 0.3, t0 + 3.0)

    lan = bind_breakdown("lan", "hosta->hostb", timing, log)

    assert (lan.device, lan.attach_returned, lan.device_added, lan.bind_called) == (
        "enp3s0",
        0.1,
        0.12,
        0.3,
    )
    assert (lan.agent_saw, lan.bind_reply) == (1.5, 3.0)
    assert (lan.pci_found, lan.netdev, lan.renamed, lan.agent_found) == (0.4, 1.2, 1.6, 1.8)
    assert (lan.enslaved_up, lan.carrier, lan.made_active, lan.active) == (1.9, 2.6, 2.7, 2.95)
    wan = bind_breakdown("wan", "hosta->hostb", timing, log)
    assert (wan.device, wan.pci_found, wan.netdev, wan.carrier) == ("enp4s0", 0.5, None, None)
    assert wan.agent_saw is None
    summary = breakdown_summary([lan, wan])
    assert summary["pci_found"]["median"] == 0.45 and "netdev" in summary
    assert summary["carrier"]["n"] == 1
