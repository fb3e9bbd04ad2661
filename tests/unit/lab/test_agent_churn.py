"""agent-churn's parsing of the guest's figures (the rounds themselves need the lab)."""

from __future__ import annotations

from lab.agent_churn import parse_sample


def test_a_sample_reads_every_figure_as_an_integer() -> None:
    text = (
        "pid 412\nVmRSS:\t   37964 kB\nThreads:\t9\n"
        "Pss:               36112 kB\nPrivate_Dirty:     30100 kB\nAnonymous:  29800 kB\nfds 16\n"
    )
    assert parse_sample(text) == {
        "pid": 412,
        "VmRSS": 37964,
        "Threads": 9,
        "Pss": 36112,
        "Private_Dirty": 30100,
        "Anonymous": 29800,
        "fds": 16,
    }
