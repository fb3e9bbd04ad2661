"""A time-bounded hypothesis fuzz loop that counts what it tried.

Hypothesis has no time budget, so `fuzz` runs batches of examples, each batch a
fresh @given run with its own seed (base seed + batch number), until the budget
is spent; a failure stops the loop and is shrunk and reported by hypothesis as
usual, with the seed that reproduces it.  PTMIG_FUZZ_SECONDS sets the budget per
target (default 20), PTMIG_FUZZ_SEED the base seed (default: a random one, shown
in the summary).
"""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

DEFAULT_SECONDS = 20.0
BATCH = 50


@dataclass
class FuzzResult:
    target: str
    seed: int
    inputs: int = 0
    seconds: float = 0.0
    failures: int = 0
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        extra = "".join(f", {note}" for note in self.notes)
        return (
            f"fuzz {self.target}: {self.inputs} inputs in {self.seconds:.1f} s, "
            f"{self.failures} failures (seed {self.seed}{extra})"
        )


RESULTS: list[FuzzResult] = []


def budget() -> float:
    return float(os.environ.get("PTMIG_FUZZ_SECONDS", DEFAULT_SECONDS))


def fuzz(
    target: str,
    strategy: st.SearchStrategy[Any],
    body: Callable[[Any], None],
    seconds: float | None = None,
) -> FuzzResult:
    """Feed `body` examples of `strategy` for `seconds`; raise the first failure."""
    base = int(os.environ.get("PTMIG_FUZZ_SEED") or random.SystemRandom().randrange(2**32))
    result = FuzzResult(target, base)
    RESULTS.append(result)
    started = time.monotonic()
    deadline = started + (budget() if seconds is None else seconds)
    batch = 0
    try:
        while time.monotonic() < deadline:

            @seed(base + batch)
            @settings(
                max_examples=BATCH,
                database=None,
                derandomize=False,
                deadline=None,
                phases=[Phase.generate, Phase.shrink],
                print_blob=True,
                suppress_health_check=list(HealthCheck),
            )
            @given(strategy)
            def run(example: Any) -> None:
                if time.monotonic() >= deadline:
                    return  # the budget is spent: finish the batch without work
                result.inputs += 1
                body(example)

            run()
            batch += 1
    except BaseException:
        result.failures += 1
        raise
    finally:
        result.seconds = time.monotonic() - started
    return result


def rss_bytes() -> int:
    """This process's resident set size (the agent under test runs in it)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
