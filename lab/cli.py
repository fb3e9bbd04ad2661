"""``ptmig-lab``: the VM lab from the command line.

Exit codes: 0 success; 1 a lab step failed (the message names its logs); 2 bad usage;
for ``exec``, the guest command's own exit status.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from lab.console import ConsoleError
from lab.image import DEFAULT_SUITE, GUEST_SUITES, lab_recipe
from lab.run import CommandError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ptmig-lab", description=__doc__.splitlines()[0])
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="build or reuse the guest image, start hosts, fabric and guest")
    up.add_argument(
        "--suite",
        choices=sorted(GUEST_SUITES),
        default=DEFAULT_SUITE,
        help="the guest's Debian suite (default %(default)s)",
    )
    up.add_argument(
        "--no-primary",
        action="store_true",
        help="define the guest with its virtio NIC only (no e1000e)",
    )
    up.add_argument(
        "--guests",
        type=int,
        default=1,
        metavar="N",
        help="N guests in all: the main one and N-1 smaller extra guests (default 1)",
    )
    up.add_argument(
        "--no-guest", action="store_true", help="--vfio: start L1 and its hosts but do not boot L2"
    )
    dn = sub.add_parser("down", help="stop and remove everything the lab started")
    st = sub.add_parser("status", help="what runs where")
    st.add_argument("--json", action="store_true")
    ex = sub.add_parser("exec", help="run a command in the guest over its serial console")
    ex.add_argument("--timeout", type=float, default=60.0)
    ex.add_argument("--l1", action="store_true", help="--vfio: run it in L1, not in L2")
    for cmd in (up, dn, st, ex):
        cmd.add_argument(
            "--vfio",
            action="store_true",
            help="the nested vfio lab (hosts in an L1 VM, real vfio-pci devices)",
        )
    ex.add_argument("argv", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    mig = sub.add_parser("migrate", help="live-migrate the guest with libvirt")
    mig.add_argument("destination", choices=["hosta", "hostb"])
    sub.add_parser("check", help="check the guest's health (console, kernel log, taint)")
    bench = sub.add_parser(
        "bench-agent", help="the guest agent's start-up time, memory and call round trip"
    )
    bench.add_argument("--json", action="store_true")
    bench.add_argument(
        "--baseline", metavar="FILE", help="an earlier --json output: print both side by side"
    )
    churn = sub.add_parser(
        "agent-churn",
        help="the calls of many migrations to the guest's agent, its memory sampled",
    )
    churn.add_argument("--rounds", type=int, default=300)
    churn.add_argument("--every", type=int, default=25, help="sample every N rounds")
    churn.add_argument(
        "--refused", action="store_true", help="rounds of calls the agent refuses instead"
    )
    churn.add_argument(
        "--trace",
        type=int,
        default=0,
        metavar="FRAMES",
        help="run the agent with PTMIG_AGENT_TRACEMALLOC=FRAMES and report what grew",
    )
    churn.add_argument(
        "--malloc-arena-max",
        type=int,
        default=0,
        metavar="N",
        help="run the agent with glibc's MALLOC_ARENA_MAX=N (default: glibc's own)",
    )
    churn.add_argument("--json", action="store_true")
    bm = sub.add_parser(
        "bench-migration", help="downtime benchmark: floor, naive and ptmig, repeated"
    )
    bm.add_argument("--reps", type=int, default=3)
    bm.add_argument("--out", default="docs/benchmarks", help="where the JSON and PNG go")
    bm.add_argument("--json", action="store_true")
    bm.add_argument(
        "--cases",
        metavar="A,B",
        help="only these cases, comma-separated (default: all; ptmig naive floor "
        "floor-postcopy floor-downtime100 floor-downtime20 floor-ptmig upstream)",
    )
    be = sub.add_parser(
        "bench-evacuate",
        help="lab up with N guests; evacuate hosta -> hostb with --parallel 1, then N, and the "
        "plain-libvirt drain of the same guests with N, under ping",
    )
    be.add_argument("--guests", type=int, default=3, metavar="N")
    be.add_argument("--out", default=None, help="write the runs' JSON here")
    be.add_argument("--json", action="store_true")
    bv = sub.add_parser(
        "bench-vfio",
        help="nested lab: VF, whole NIC and plain virtio migrations under ping, with plug times",
    )
    bv.add_argument("--rates", default="100,200,500,1000", help="echo rates to search, per team")
    bv.add_argument("--out", default=None, help="write the run's JSON here")
    bv.add_argument("--json", action="store_true")
    bc = sub.add_parser(
        "bench-coordinator",
        help="the coordinator's own cost for 1..1000 domains, over the unit tests' fakes (no VM)",
    )
    bc.add_argument("--sizes", default="1,10,100,300,1000", help="domain counts (comma-separated)")
    bc.add_argument("--parallel", default="1,8", help="worker counts (comma-separated)")
    bc.add_argument(
        "--crowded",
        default="10,100,300,1000",
        help="domain counts for the layout where two targets receive everything "
        "(each destination takes half; empty: not run)",
    )
    bc.add_argument("--json", action="store_true")
    sk = sub.add_parser(
        "soak",
        help="N migrations back and forth under ping (failovers and cancels among them), "
        "then each resource figure's growth and verdict",
    )
    sk.add_argument("--migrations", type=int, default=100, metavar="N", help="even")
    sk.add_argument("--sample-every", type=int, default=10, metavar="K", help="even")
    sk.add_argument("--failover-every", type=int, default=10, metavar="K", help="0: none")
    sk.add_argument("--cancel-every", type=int, default=10, metavar="K", help="0: none")
    sk.add_argument("--rate", type=float, default=100.0, help="pings/s per team")
    sk.add_argument("--out", default=None, help="write the run's JSON here")
    sk.add_argument("--json", action="store_true")
    sk.add_argument("--keep", action="store_true", help="leave a lab it started up afterwards")
    demo = sub.add_parser("demo", help="lab up, then migrate hosta -> hostb -> hosta under ping")
    demo.add_argument("--json", action="store_true", help="machine-readable report")
    demo.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.command == "bench-coordinator":  # no lab: the fakes, in this process's children
        from lab import bench_coordinator

        def counts(text: str) -> tuple[int, ...]:
            return tuple(int(n) for n in text.split(",") if n.strip())

        return bench_coordinator.run(
            as_json=args.json,
            sizes=counts(args.sizes),
            parallel=counts(args.parallel),
            crowded=counts(args.crowded),
        )
    from lab.vmlab import LabError, VmLab

    if args.command == "bench-vfio":  # the nested lab, not the emulated one
        from pathlib import Path

        from lab.nested import bench

        return bench.main(
            rates=tuple(int(r) for r in args.rates.split(",") if r.strip()),
            out=Path(args.out) if args.out else None,
            as_json=args.json,
        )
    if getattr(args, "vfio", False):
        return _vfio(args)
    try:
        lab = VmLab()
        if args.command == "up":
            lab.up(lab_recipe(args.suite), with_primary=not args.no_primary, guests=args.guests)
            print(f"lab up; guest on {lab.where()}")
            for guest in lab.extra_guests():
                print(f"{guest.name} ({guest.ip}) on {lab.where(guest.name)}")
        elif args.command == "down":
            for line in lab.down():
                print(line)
        elif args.command == "status":
            return _status(lab, as_json=args.json)
        elif args.command == "exec":
            cmd = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
            if not cmd:
                print("ptmig-lab exec: give a command after --", file=sys.stderr)
                return 2
            result = lab.exec(" ".join(cmd), timeout=args.timeout)
            sys.stdout.write(result.output)
            return result.status
        elif args.command == "migrate":
            print(json.dumps(lab.migrate(args.destination).to_dict()))
            lab.check_health()
        elif args.command == "check":
            lab.check_health()
            print(f"guest healthy on {lab.where()}")
        elif args.command == "bench-agent":
            from pathlib import Path

            from lab import bench_agent

            baseline = Path(args.baseline) if args.baseline else None
            return bench_agent.main(as_json=args.json, baseline=baseline)
        elif args.command == "agent-churn":
            from lab import agent_churn

            return agent_churn.main(
                args.rounds,
                args.every,
                args.refused,
                args.trace,
                args.json,
                malloc_arena_max=args.malloc_arena_max,
            )
        elif args.command == "bench-migration":
            from pathlib import Path

            from lab import bench_migration

            cases = bench_migration.parse_cases(args.cases)
            return bench_migration.main(
                reps=args.reps, out_dir=Path(args.out), as_json=args.json, cases=cases
            )
        elif args.command == "bench-evacuate":
            from pathlib import Path

            from lab import bench_evacuate

            return bench_evacuate.main(
                guests=args.guests,
                out=Path(args.out) if args.out else None,
                as_json=args.json,
            )
        elif args.command == "soak":
            from pathlib import Path

            from lab import soak

            return soak.main(
                migrations=args.migrations,
                out=Path(args.out) if args.out else None,
                as_json=args.json,
                sample_every=args.sample_every,
                failover_every=args.failover_every,
                cancel_every=args.cancel_every,
                rate=args.rate,
                keep=args.keep,
            )
        elif args.command == "demo":
            from lab import demo

            return demo.main(as_json=args.json, keep=args.keep)
    except (LabError, ConsoleError, CommandError) as exc:
        print(f"ptmig-lab {args.command}: {exc}", file=sys.stderr)
        return 1
    return 0


def _vfio(args: argparse.Namespace) -> int:
    """The nested vfio lab's up, down, status and exec (lab/nested/)."""
    import libvirt

    from lab.nested.vlab import VfioLab, VfioLabError

    lab = VfioLab()
    try:
        if args.command == "up":
            lab.up(boot_guest=not args.no_guest)
            print(json.dumps(lab.status(), indent=1))
        elif args.command == "down":
            for line in lab.down():
                print(line)
        elif args.command == "status":
            info = lab.status()
            if args.json:
                print(json.dumps(info, indent=1))
            else:
                for k, v in info.items():
                    print(f"{k}: {v}")
        elif args.command == "exec":
            cmd = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
            if not cmd:
                print("ptmig-lab exec: give a command after --", file=sys.stderr)
                return 2
            if args.l1:
                result = lab.l1_exec(" ".join(cmd), timeout=args.timeout)
            else:
                result = lab.exec(" ".join(cmd), timeout=args.timeout)
            sys.stdout.write(result.output)
            return result.status
    except (VfioLabError, ConsoleError, CommandError, libvirt.libvirtError, RuntimeError) as exc:
        print(f"ptmig-lab {args.command} --vfio: {exc}", file=sys.stderr)
        return 1
    return 0


def _status(lab: object, *, as_json: bool) -> int:
    from lab.vmlab import GuestHealthError, LabState, VmLab

    assert isinstance(lab, VmLab)
    state = LabState.load()
    info: dict[str, object] = {"up": state is not None}
    if state is not None:
        info["daemons"] = state.pids
        info["netns"] = state.netns
        info["image"] = state.image
        try:
            info["guest_on"] = lab.where()
        except GuestHealthError as exc:
            info["guest_on"] = None
            info["problem"] = str(exc)
        for guest in lab.extra_guests():
            try:
                info[f"{guest.name}_on"] = lab.where(guest.name)
            except GuestHealthError as exc:
                info[f"{guest.name}_on"] = None
                info[f"{guest.name}_problem"] = str(exc)
    if as_json:
        print(json.dumps(info, indent=1))
    else:
        for k, v in info.items():
            print(f"{k}: {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
