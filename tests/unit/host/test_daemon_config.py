"""ptmigd's /etc/ptmig/ptmigd.toml: the packaged file, bad files, and options over keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from host.daemon import config as daemon_config
from host.daemon import main as daemon
from host.daemon.config import DaemonConfigError, DaemonSettings

PACKAGED = Path(__file__).resolve().parents[3] / "packaging" / "host" / "ptmigd.toml"


def test_the_packaged_file_sets_exactly_the_options_defaults() -> None:
    settings = daemon_config.load(PACKAGED, missing_ok=False)
    defaults = daemon.build_parser().parse_args([])
    for key, value in settings.as_defaults().items():
        assert getattr(defaults, key) == value, key
    assert settings.reconcile == ()  # no reconciler unless the admin names hosts


def test_a_missing_file_is_fine_only_where_allowed(tmp_path: Path) -> None:
    assert daemon_config.load(tmp_path / "absent.toml", missing_ok=True) == DaemonSettings()
    with pytest.raises(DaemonConfigError, match="no such file"):
        daemon_config.load(tmp_path / "absent.toml", missing_ok=False)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("reconcil = []\n", "unknown key 'reconcil'"),
        ("reconcile = 'qemu:///system'\n", "reconcile must be a list"),
        ("reconcile = [1]\n", "reconcile must be a non-empty printable string"),
        ("reconcile_interval = 0\n", r"reconcile_interval must be in \(0, 86400\]"),
        ("reconcile_interval = nan\n", r"reconcile_interval must be in"),
        ("reconcile_interval = true\n", "must be a number of seconds"),
        ("socket = ''\n", "socket must be a non-empty printable string"),
        ('journal = "a\\nb"\n', "journal must be a non-empty printable string"),
        ("socket = \n", "Invalid value"),
    ],
)
def test_bad_files_are_one_line_errors(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "ptmigd.toml"
    path.write_text(text)
    with pytest.raises(DaemonConfigError, match=message) as caught:
        daemon_config.load(path, missing_ok=False)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)


def test_non_utf8_and_oversized_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "ptmigd.toml"
    path.write_bytes(b"socket = '\xff'\n")
    with pytest.raises(DaemonConfigError, match="not UTF-8"):
        daemon_config.load(path, missing_ok=False)
    path.write_bytes(b"#" * (daemon_config.MAX_CONFIG_BYTES + 1))
    with pytest.raises(DaemonConfigError, match="larger than"):
        daemon_config.load(path, missing_ok=False)


def test_ptmigd_takes_the_file_and_an_option_overrides_its_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "ptmigd.toml"
    path.write_text(f'socket = "{tmp_path}/from-file.sock"\nreconcile_interval = 3.5\n')
    assert daemon.main(["--config", str(path), "--check-config"]) == 0
    assert capsys.readouterr().out.strip() == f"{path}: OK"

    parser = daemon.build_parser()
    parser.set_defaults(**daemon_config.load(path, missing_ok=False).as_defaults())
    args = parser.parse_args(["--socket", str(tmp_path / "from-option.sock")])
    assert args.socket == tmp_path / "from-option.sock"
    assert args.reconcile_interval == 3.5


def test_ptmigd_refuses_a_bad_file_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "ptmigd.toml"
    path.write_text("listen = 1\n")
    assert daemon.main(["--config", str(path)]) == 2
    assert capsys.readouterr().err.strip() == f"ptmigd: {path}: unknown key 'listen'"
