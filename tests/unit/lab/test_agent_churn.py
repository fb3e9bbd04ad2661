"""agent-churn's parsing of the guest's figures (the rounds themselves need the lab)."""

from __future__ import annotations

from lab.agent_churn import drop_in, parse_sample, summarise_maps


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


def test_mappings_are_summed_by_kind() -> None:
    # As MAPS prints them for a Python with two threads (glibc 2.36): each thread's arena
    # heap (132 kB made accessible + the ---p rest of its 64 MiB), its stack and guard.
    text = (
        "1600 1548 rw-p [heap]\n"
        "132 100 rw-p\n65404 0 ---p\n"
        "132 60 rw-p\n65404 0 ---p\n"
        "4 0 ---p\n8192 8 rw-p\n"
        "4 0 ---p\n8192 12 rw-p\n"
        "3072 2976 rw-p\n"
        "296 296 rw-p\n"
        "132 40 rw-p [stack]\n"
        "2184 1500 r-xp /usr/bin/python3.11\n"
        "4 4 rw-p /usr/lib/x86_64-linux-gnu/libc.so.6\n"
    )
    assert summarise_maps(text) == {
        "heap": 1548,
        "thread_arenas": 160,
        "stacks": 20,
        "other_anon": 2976 + 296 + 40,
        "files": 1504,
    }


def test_an_anonymous_mapping_beside_a_smaller_guard_is_no_arena() -> None:
    text = "132 100 rw-p\n4 0 ---p\n8192 8 rw-p\n"
    assert summarise_maps(text)["thread_arenas"] == 0
    assert summarise_maps(text)["other_anon"] == 100


def test_the_drop_in_sets_what_is_asked_and_nothing_else() -> None:
    assert drop_in(0, 0) is None
    assert drop_in(2, 0) == "[Service]\nEnvironment=PTMIG_AGENT_TRACEMALLOC=2\n"
    assert drop_in(0, 2) == "[Service]\nEnvironment=MALLOC_ARENA_MAX=2\n"
    assert drop_in(1, 4) == (
        "[Service]\nEnvironment=PTMIG_AGENT_TRACEMALLOC=1\nEnvironment=MALLOC_ARENA_MAX=4\n"
    )
