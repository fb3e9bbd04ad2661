"""The coordinator-scale benchmark's harness at small sizes (what it counts, not how fast)."""

from __future__ import annotations

import os

from lab import bench_coordinator as bc


def test_fleet_gives_each_group_of_domains_its_own_pool_and_target() -> None:
    world, targets = bc.fleet(17)
    assert targets == ("fake://t0", "fake://t1", "fake://t2")
    assert len(world.hosts[bc.SOURCE].domains) == 17
    assert "ptmig-pool-p2" in world.hosts[bc.SOURCE].networks
    assert set(world.hosts["fake://t1"].networks) >= {"ptmig-pool-p1"}
    assert "ptmig-pool-p0" not in world.hosts["fake://t1"].networks


def test_one_run_moves_every_domain_and_counts_the_journal() -> None:
    r = bc.run_one(9, 2, trace=True)
    assert r["outcomes"] == {"done": 9} and (r["parallel"], r["targets"]) == (2, 2)
    # A migration's journal: its workflow row and two rows (started, done) per step.
    assert r["journal_rows"] == 9 * 11
    assert r["journal_bytes"] > 0 and r["journal_wal_bytes"] > 0
    assert r["tracemalloc_peak_kib"] > 0 and r["wall_s"] > 0 and r["cpu_s"] > 0


def test_bench_reports_ratios_verdicts_and_speedup_from_its_runs() -> None:
    result = bc.bench(
        sizes=(1, 10, 12), parallel=(1,), through=(4, 0.05, (1, 4)), crowded=(10, 12), child=False
    )
    assert [(r["domains"], r["parallel"]) for r in result["runs"]] == [(1, 1), (10, 1), (12, 1)]
    assert [(r["domains"], r["targets"]) for r in result["crowded"]] == [(10, 2), (12, 2)]
    assert all(r["outcomes"] == {"done": r["domains"]} for r in result["runs"] + result["crowded"])
    spread, crowded = result["layouts"]
    assert crowded["layout"] == "two targets receive everything, 1 worker"
    for layout, runs in ((spread, result["runs"]), (crowded, result["crowded"])):
        own = {r["domains"]: r["coordinator_cpu_per_domain_ms"] for r in runs}
        assert layout["ratio"] == round(own[12] / own[10], 2)  # from 10 up, not from 1
        assert layout["met"] == (layout["ratio"] <= bc.GOAL_RATIO)
    assert result["goal"]["met"] == (spread["met"] and crowded["met"])
    one, four = result["throughput"]
    assert (one["parallel"], four["parallel"], four["domains"]) == (1, 4, 4)
    assert result["speedup"] == {
        "4 vs 1": round(four["domains_per_s"] / one["domains_per_s"], 2)
    }  # how fast, the benchmark says (docs/benchmarks/coordinator-scale.md); not a test's job
    assert result["machine_load"]["cpus"] == os.cpu_count()  # lab.load's record of the run
    assert "two targets receive everything, 1 worker: coordinator CPU" in bc.render(result)


def test_the_fakes_cpu_is_counted_apart_from_the_coordinators() -> None:
    r = bc.run_one(3, 1, crowded=True)
    # Every migration reads the destination's domains (fake libvirt) and asks the agent.
    assert r["fake_libvirt_cpu_s"] > 0 and r["fake_agent_cpu_s"] > 0
    assert r["fake_libvirt_cpu_s"] + r["fake_agent_cpu_s"] < r["cpu_s"]
    run = bc.scale_run(3, 1, crowded=True, child=False, memory=False)
    own = run.cpu_s - run.fake_libvirt_cpu_s - run.fake_agent_cpu_s
    assert abs(run.coordinator_cpu_s - own) <= 0.002


def test_a_configuration_runs_in_its_own_interpreter() -> None:
    r = bc._in_child(2, 1)
    assert r["outcomes"] == {"done": 2} and r["rss_growth_kib"] >= 0
