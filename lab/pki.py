"""The lab's migration TLS: its own CA, made at lab start, and each host's certificates.

libvirt's ``VIR_MIGRATE_TLS`` has QEMU open the migration stream (and an NBD storage copy)
with the x509 files in qemu.conf's ``migrate_tls_x509_cert_dir``: ``ca-cert.pem``, and
``server-cert.pem``/``server-key.pem`` for the destination's end, ``client-cert.pem``/
``client-key.pem`` for the source's (``migrate_tls_x509_verify`` defaults to on, so the
destination checks the client's too).  The source's QEMU checks the server certificate
against the host it connects to, which the destination advertises as its
``migration_host``, an IP here: so that IP is in the certificate's subjectAltName.

Made with the openssl CLI (ca-certificates depends on it), EC P-256, valid two days; the
CA's key stays in the run directory, so each lab has a CA of its own.  A second CA, the
*foreign* one, lets a test give a host a CA that did not sign its peer's certificates.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

from lab.paths import run_dir

#: The directory as each host's libvirtd sees it (inside its private /etc/libvirt).
CERT_DIR = "/etc/libvirt/pki/migrate"
DAYS = "2"


class PkiError(RuntimeError):
    """openssl failed; the message has its output."""


def pki_dir() -> Path:
    return run_dir() / "pki"


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )
    if proc.returncode != 0:
        raise PkiError(f"openssl {args[0]}: {proc.stderr.strip()}")


def _key_args(name: str) -> list[str]:
    return ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}-key.pem"]  # fmt: skip


def make_ca(name: str) -> Path:
    """A CA under the run directory: ``NAME-cert.pem`` and ``NAME-key.pem``."""
    cwd = pki_dir()
    cwd.mkdir(parents=True, exist_ok=True)
    if not (cwd / f"{name}-cert.pem").exists():
        _openssl(
            "req", "-x509", *_key_args(name), "-days", DAYS,
            "-subj", f"/O=ptmig lab/CN={name}", "-out", f"{name}-cert.pem",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=cwd,
        )  # fmt: skip
    return cwd / f"{name}-cert.pem"


def _leaf(ca: str, name: str, cn: str, extensions: str) -> None:
    cwd = pki_dir()
    (cwd / f"{name}.ext").write_text(extensions + "\n")
    _openssl(
        "req", *_key_args(name), "-subj", f"/O=ptmig lab/CN={cn}", "-out", f"{name}.csr",
        cwd=cwd,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}-cert.pem", "-CAkey", f"{ca}-key.pem",
        "-CAcreateserial", "-days", DAYS, "-out", f"{name}-cert.pem",
        "-extfile", f"{name}.ext",
        cwd=cwd,
    )  # fmt: skip


def install(hosts: Iterable[tuple[str, str, Path]]) -> None:
    """The lab CA, and for each (name, migration IP, host's /etc/libvirt in the root
    namespace) a server and a client certificate in its ``CERT_DIR``."""
    make_ca("ca")
    cwd = pki_dir()
    for name, ip, etc in hosts:
        server, client = f"{name}-server", f"{name}-client"
        _leaf(
            "ca",
            server,
            f"lab-{name}",
            f"subjectAltName=IP:{ip},DNS:lab-{name}\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
            "extendedKeyUsage=serverAuth",
        )
        _leaf(
            "ca",
            client,
            f"lab-{name}",
            "keyUsage=critical,digitalSignature,keyEncipherment\nextendedKeyUsage=clientAuth",
        )
        target = cert_dir(etc)
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(cwd / "ca-cert.pem", target / "ca-cert.pem")
        for role, leaf in (("server", server), ("client", client)):
            shutil.copy(cwd / f"{leaf}-cert.pem", target / f"{role}-cert.pem")
            shutil.copy(cwd / f"{leaf}-key.pem", target / f"{role}-key.pem")
            (target / f"{role}-key.pem").chmod(0o600)


def cert_dir(etc: Path) -> Path:
    """``CERT_DIR`` under a host's /etc/libvirt as the root namespace sees it."""
    return etc / Path(CERT_DIR).relative_to("/etc/libvirt")


def trust(etc: Path, ca_cert: Path) -> None:
    """Make a host trust *ca_cert* only (QEMU reads the files at each migration)."""
    shutil.copy(ca_cert, cert_dir(etc) / "ca-cert.pem")


def lab_ca() -> Path:
    return pki_dir() / "ca-cert.pem"
