"""The benchmark's arithmetic: medians per case, and goals judged from them."""

from __future__ import annotations

from lab.bench_migration import Sample, format_summary, goals, summarize
from lab.traffic import Phase


def sample(case: str, lan: int, wan: int, wall: float, back: float | None = None) -> Sample:
    phases = [Phase("migrate", 0.0, 1.0)]
    return Sample(
        case,
        "hosta->hostb",
        phases,
        {"lan": {"migrate": lan}, "wan": {"migrate": wan}},
        {"lan": {"migrate": float(lan)}, "wan": {"migrate": float(wan)}},
        wall,
        back_on_primary_s=back,
    )


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
    assert summary["bare_hotplug_probe_s"]["median"] == 2.5


def test_goals_met_and_not_met_are_told_apart() -> None:
    samples = [
        sample("floor", 200, 200, 4.0),
        sample("naive", 300, 300, 5.0, back=4.0),
        sample("ptmig", 205, 260, 6.0, back=2.9),
    ]
    result = goals(summarize(samples, bare=[2.5]))
    assert result["lan: ptmig loses no more than the floor (+20 noise)"].startswith("met")
    assert result["wan: ptmig loses no more than the floor (+20 noise)"].startswith("not met")
    assert result["lan: ptmig loses fewer than naive"].startswith("met")
    assert result["back on primary within 1.2x of bare hotplug+probe"].startswith("met")
    assert result["whole migration within 1.3x of the floor's wall time"].startswith("not met")
    assert not any("upstream" in k for k in result)  # not measured, not claimed
    assert "ptmig" in format_summary(summarize(samples, bare=[2.5]), result)


def test_a_case_without_a_team_is_not_compared_for_it() -> None:
    upstream = sample("upstream", 3000, 0, 4.0)
    del upstream.lost["wan"]
    samples = [sample("ptmig", 200, 250, 6.0, back=3.0), upstream]
    summary = summarize(samples, bare=[2.5])
    assert "wan" not in summary["cases"]["upstream"]
    result = goals(summary)
    assert result["lan: ptmig loses no more than upstream net_failover"].startswith("met")
    assert not any(k.startswith("wan") and "upstream" in k for k in result)
