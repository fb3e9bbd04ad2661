"""The fault matrix's rows, filled by test_fault_matrix.py and printed by conftest.py."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Row:
    case: str
    result: str
    lost: dict[str, int]


ROWS: list[Row] = []


def table() -> list[str]:
    lines = [f"{'case':44} {'result':42} lost lan/wan (packets at 1000/s)"]
    lines += [
        f"{r.case:44} {r.result:42} {r.lost.get('lan', '?')}/{r.lost.get('wan', '?')}" for r in ROWS
    ]
    return lines
