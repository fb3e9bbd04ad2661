"""ptmigd's log lines: one event per line, with the workflow's fields wherever it logs."""

from __future__ import annotations

import logging
import threading

import pytest

from host.logfields import LogfmtFormatter, current_fields, in_this_context, log_fields


def line(message: str, *args: object, exc: bool = False) -> str:
    record = logging.LogRecord(
        "host.workflow.steps", logging.INFO, __file__, 1, message, args, None
    )
    if exc:
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            import sys

            record.exc_info = sys.exc_info()
    return LogfmtFormatter(timestamps=False).format(record)


def test_a_line_carries_the_fields_of_its_context_in_a_fixed_order() -> None:
    assert line("no context") == 'level=info logger=host.workflow.steps msg="no context"'
    with log_fields(workflow="3f2a", domain="web1"), log_fields(phase="unplug"):
        assert line("detached %s", "ua-ptmig-lan-1") == (
            "level=info logger=host.workflow.steps domain=web1 workflow=3f2a phase=unplug "
            'msg="detached ua-ptmig-lan-1"'
        )
    assert current_fields() == {}


def test_values_that_need_it_are_quoted_and_a_traceback_stays_on_one_line() -> None:
    with log_fields(domain='my "vm" one'):
        text = line("two\nlines", exc=True)
    assert text.count("\n") == 0
    assert 'domain="my \\"vm\\" one"' in text
    assert 'msg="two\\nlines\\nTraceback' in text and "RuntimeError: boom" in text


def test_threads_get_the_fields_only_when_handed_them() -> None:
    seen: dict[str, dict[str, str]] = {}
    with log_fields(domain="web1", workflow="w1"):
        plain = threading.Thread(target=lambda: seen.update(plain=current_fields()))
        handed = threading.Thread(
            target=in_this_context(lambda: seen.update(handed=current_fields()))
        )
        plain.start(), handed.start()
        plain.join(), handed.join()
    assert seen == {"plain": {}, "handed": {"domain": "web1", "workflow": "w1"}}


@pytest.mark.parametrize(("env", "stamped"), [({}, True), ({"JOURNAL_STREAM": "8:1234"}, False)])
def test_the_journal_stamps_lines_itself(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], stamped: bool
) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    record = logging.LogRecord("ptmigd", logging.WARNING, __file__, 1, "x", (), None)
    assert LogfmtFormatter().format(record).startswith("time=") is stamped
