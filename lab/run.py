"""Running commands for the lab, with errors that say what failed."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Mapping, Sequence

log = logging.getLogger(__name__)


class CommandError(RuntimeError):
    """A command exited non-zero; carries its output so the failure explains itself."""

    def __init__(self, argv: Sequence[str], returncode: int, output: str) -> None:
        tail = "\n".join(output.strip().splitlines()[-20:])
        super().__init__(f"{' '.join(argv)} exited {returncode}:\n{tail}")
        self.argv = list(argv)
        self.returncode = returncode
        self.output = output


def run(
    argv: Sequence[str],
    *,
    capture: bool = False,
    check: bool = True,
    env: Mapping[str, str] | None = None,
    input: str | None = None,
    timeout: float | None = 900,
) -> str:
    """Run *argv*; return its stdout when *capture*, raise :class:`CommandError` on failure."""
    log.debug("run: %s", " ".join(argv))
    proc = subprocess.run(
        list(argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if not capture else subprocess.PIPE,
        text=True,
        env=dict(env) if env is not None else None,
        input=input,
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        output = (proc.stdout or "") + (proc.stderr or "")
        raise CommandError(argv, proc.returncode, output)
    return proc.stdout if capture else ""


def netns_exec(netns: str, argv: Sequence[str]) -> list[str]:
    """Prefix *argv* so it runs in network namespace *netns*."""
    return ["ip", "netns", "exec", netns, *argv]
