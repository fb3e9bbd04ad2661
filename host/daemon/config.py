"""ptmigd's configuration file, /etc/ptmig/ptmigd.toml (packaging/host/ptmigd.toml).

The file gives the defaults of ptmigd's command-line options, key for option, so the
unit can say only ``--config`` and an operator can still override one setting by hand.
Unknown keys and wrong types are errors: a misspelt key must not fall back to a default.
"""

from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path

DEFAULT_CONFIG = Path("/etc/ptmig/ptmigd.toml")
MAX_CONFIG_BYTES = 1 << 20


class DaemonConfigError(ValueError):
    """The file cannot be used; the message is one line naming the file and the key."""


@dataclass(frozen=True)
class DaemonSettings:
    """What the file sets; None (or empty) where it is silent.  Names are the options'."""

    socket: Path | None = None
    journal: Path | None = None
    listen_tcp: str | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    reconcile: tuple[str, ...] = ()
    reconcile_interval: float | None = None
    metrics_listen: str | None = None

    def as_defaults(self) -> dict[str, object]:
        """The settings the file gives, as argparse defaults (dest -> value)."""
        given: dict[str, object] = {}
        for field in fields(self):
            value = getattr(self, field.name)
            if value is not None and value != ():
                given[field.name] = list(value) if isinstance(value, tuple) else value
        return given


_PATH_KEYS = ("socket", "journal", "tls_cert", "tls_key", "tls_client_ca")


def load(path: Path, *, missing_ok: bool) -> DaemonSettings:
    """The settings in `path`; none at all if it is missing and `missing_ok`."""
    try:
        raw = path.read_bytes()[: MAX_CONFIG_BYTES + 1]
    except FileNotFoundError:
        if missing_ok:
            return DaemonSettings()
        raise DaemonConfigError(f"{path}: no such file") from None
    except OSError as exc:
        raise DaemonConfigError(f"{path}: {exc.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise DaemonConfigError(f"{path}: larger than {MAX_CONFIG_BYTES} bytes")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise DaemonConfigError(f"{path}: not UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise DaemonConfigError(f"{path}: {exc}") from None
    return parse(data, where=str(path))


def parse(data: dict[str, object], *, where: str) -> DaemonSettings:
    known = {f.name for f in fields(DaemonSettings)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise DaemonConfigError(f"{where}: unknown key {unknown[0]!r}")
    values: dict[str, object] = {}
    for key in _PATH_KEYS:
        if key in data:
            values[key] = Path(_string(data[key], where, key))
    for key in ("listen_tcp", "metrics_listen"):
        if key in data:
            values[key] = _string(data[key], where, key)
    if "reconcile" in data:
        hosts = data["reconcile"]
        if not isinstance(hosts, list):
            raise DaemonConfigError(f"{where}: reconcile must be a list of libvirt URIs")
        values["reconcile"] = tuple(_string(h, where, "reconcile") for h in hosts)
    if "reconcile_interval" in data:
        interval = data["reconcile_interval"]
        if isinstance(interval, bool) or not isinstance(interval, int | float):
            raise DaemonConfigError(f"{where}: reconcile_interval must be a number of seconds")
        if not (math.isfinite(interval) and 0 < interval <= 86400):
            raise DaemonConfigError(f"{where}: reconcile_interval must be in (0, 86400]")
        values["reconcile_interval"] = float(interval)
    return DaemonSettings(**values)  # type: ignore[arg-type]


def _string(value: object, where: str, key: str) -> str:
    if not isinstance(value, str) or not value or not value.isprintable():
        raise DaemonConfigError(f"{where}: {key} must be a non-empty printable string")
    return value
