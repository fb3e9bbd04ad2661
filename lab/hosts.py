"""The lab's two libvirt hosts: a ``libvirtd --listen`` each, in its own network and mount ns.

Each daemon sees private bind mounts over /etc/libvirt, /run/libvirt, /var/lib/libvirt,
/var/cache/libvirt, /var/log/libvirt and /etc/hosts, so the machine's real libvirt state is
never touched and the two hosts do not see each other's state.  From the root namespace a
host is reached through its unix socket; the hosts reach each other over TCP on ``mig0``.

Facts this relies on (measured here, see docs/lab.md): libvirt needs a ``libvirt-qemu`` user
to exist even with ``user = "root"``; identical host UUIDs make libvirt refuse to migrate;
without ``migration_host`` the destination advertises a hostname nothing resolves.
"""

from __future__ import annotations

import logging
import os
import pwd
import shlex
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from lab.fabric import HostNet
from lab.paths import cache_dir, run_dir

log = logging.getLogger(__name__)

LIBVIRTD = "/usr/sbin/libvirtd"
TCP_PORT = 16509
#: Mount points in the daemon's namespace -> subdirectory of the host's state directory.
PRIVATE_DIRS = {
    "/etc/libvirt": "etc",
    "/run/libvirt": "run",
    "/var/lib/libvirt": "lib",
    "/var/log/libvirt": "log",
}
START_TIMEOUT = 120.0


class HostError(RuntimeError):
    """A lab host failed; the message names its log."""


@dataclass(frozen=True)
class LabHost:
    """One libvirt host of the lab."""

    net: HostNet
    #: Where libvirtd listens for TCP; the nested lab also needs its port forward's address.
    listen_addr: str = ""

    @property
    def name(self) -> str:
        return self.net.name

    @property
    def state_dir(self) -> Path:
        return run_dir() / self.name

    @property
    def capability_cache(self) -> Path:
        """Kept across labs: QEMU capability probing costs about 8 s per cold start."""
        return cache_dir() / "libvirt-cache" / self.name

    @property
    def socket(self) -> Path:
        return self.state_dir / "sock" / "libvirt-sock"

    @property
    def uri(self) -> str:
        """URI from the root namespace."""
        return f"qemu+unix:///system?socket={self.socket}"

    @property
    def tcp_uri(self) -> str:
        """URI from the other host (peer-to-peer migration)."""
        return f"qemu+tcp://{self.net.migration_ip}/system"

    @property
    def host_uuid(self) -> str:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"ptmig-lab:{self.name}"))

    @property
    def log_file(self) -> Path:
        return self.state_dir / "libvirtd.log"

    def path_inside(self, path: str) -> Path:
        """Map a path as this host's daemon sees it to the root namespace's view."""
        for mount, sub in PRIVATE_DIRS.items():
            if path == mount or path.startswith(mount + "/"):
                return self.state_dir / sub / os.path.relpath(path, mount)
        if path.startswith("/var/cache/libvirt"):
            return self.capability_cache / os.path.relpath(path, "/var/cache/libvirt")
        return Path(path)

    def qemu_log(self, domain: str) -> Path:
        return self.path_inside(f"/var/log/libvirt/qemu/{domain}.log")

    def disconnect_clients_of(self, pid: int) -> list[str]:
        """Close every client connection process *pid* has to this libvirtd, from the
        daemon's side, through its admin interface (``virt-admin client-disconnect``);
        the ids of the clients closed."""
        admin = ["virt-admin", "-c", f"libvirtd:///system?socket={self.admin_socket}"]
        listing = subprocess.run(
            [*admin, "client-list", "libvirtd"], capture_output=True, text=True, check=True
        ).stdout
        ids = [line.split()[0] for line in listing.splitlines() if line.strip()[:1].isdigit()]
        closed = []
        for client in ids:
            info = subprocess.run(
                [*admin, "client-info", "libvirtd", client], capture_output=True, text=True
            ).stdout
            fields = [line.partition(":") for line in info.splitlines()]
            owner = next((v.strip() for k, _, v in fields if k.strip() == "unix_process_id"), "")
            if owner == str(pid):
                subprocess.run([*admin, "client-disconnect", "libvirtd", client], check=True)
                closed.append(client)
        return closed

    @property
    def admin_socket(self) -> Path:
        """libvirtd's admin socket, beside its main one (both in ``unix_sock_dir``)."""
        return self.socket.parent / "libvirt-admin-sock"

    # -- configuration -----------------------------------------------------------------

    def _write_config(self) -> None:
        for sub in (*PRIVATE_DIRS.values(), "sock"):
            (self.state_dir / sub).mkdir(parents=True, exist_ok=True)
        for sub in ("qemu", "ptmig"):
            (self.state_dir / "lib" / sub).mkdir(parents=True, exist_ok=True)
        self.capability_cache.mkdir(parents=True, exist_ok=True)
        ip = self.net.migration_ip
        (self.state_dir / "etc" / "libvirtd.conf").write_text(
            f"""# ptmig lab host {self.name}
listen_tls = 0
listen_tcp = 1
listen_addr = "{self.listen_addr or ip}"
tcp_port = "{TCP_PORT}"
auth_tcp = "none"
auth_unix_ro = "none"
auth_unix_rw = "none"
unix_sock_dir = "{self.socket.parent}"
unix_sock_rw_perms = "0700"
host_uuid = "{self.host_uuid}"
log_filters = "3:util 3:rpc 3:object 3:event 3:conf"
log_outputs = "2:file:{self.log_file}"
"""
        )
        (self.state_dir / "etc" / "qemu.conf").write_text(
            f"""# ptmig lab host {self.name}: no confinement, no cgroups, no virtlogd.
user = "root"
group = "root"
dynamic_ownership = 0
remember_owner = 0
security_driver = "none"
cgroup_controllers = [ ]
namespaces = [ ]
stdio_handler = "file"
migration_address = "{ip}"
migration_host = "{ip}"
migration_port_min = 49152
migration_port_max = 49215
{self._tls_config()}"""
        )
        from lab.fabric import HOSTS

        (self.state_dir / "hosts").write_text(
            "127.0.0.1 localhost\n" + "".join(f"{h.migration_ip} lab-{h.name}\n" for h in HOSTS)
        )
        self._write_accounts()

    def _tls_config(self) -> str:
        """Migration TLS (lab/pki.py), when the lab made this host its certificates (the
        nested lab's L1 makes none)."""
        from lab.pki import CERT_DIR, cert_dir

        if not (cert_dir(self.path_inside("/etc/libvirt")) / "ca-cert.pem").exists():
            return ""
        return f'migrate_tls_x509_cert_dir = "{CERT_DIR}"\nmigrate_tls_x509_verify = 1\n'

    def _write_accounts(self) -> None:
        """Private passwd and group files with a ``libvirt-qemu`` user if the machine has none."""
        try:
            pwd.getpwnam("libvirt-qemu")
            return
        except KeyError:
            pass
        passwd = Path("/etc/passwd").read_text()
        group = Path("/etc/group").read_text()
        (self.state_dir / "passwd").write_text(
            passwd + "libvirt-qemu:x:64055:64055:libvirt qemu:/var/lib/libvirt:/usr/sbin/nologin\n"
        )
        (self.state_dir / "group").write_text(group + "libvirt-qemu:x:64055:\n")

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> int:
        """Start the daemon; return its PID once it answers on its socket."""
        self._write_config()
        mounts = [
            *(f"mount --bind {self.state_dir / sub} {mnt}" for mnt, sub in PRIVATE_DIRS.items()),
            f"mount --bind {self.capability_cache} /var/cache/libvirt",
            f"mount --bind {self.state_dir / 'hosts'} /etc/hosts",
        ]
        if (self.state_dir / "passwd").exists():
            mounts += [
                f"mount --bind {self.state_dir / 'passwd'} /etc/passwd",
                f"mount --bind {self.state_dir / 'group'} /etc/group",
            ]
        script = " && ".join(
            [
                f"hostname lab-{self.name}",
                *mounts,
                f"exec {LIBVIRTD} --listen -f /etc/libvirt/libvirtd.conf "
                f"-p {shlex.quote(str(self.state_dir / 'libvirtd.pid'))}",
            ]
        )
        # ip netns exec and unshare exec rather than fork: the PID is libvirtd's.
        argv = [
            "ip",
            "netns",
            "exec",
            self.net.netns,
            "unshare",
            "-m",
            "-u",
            "--propagation",
            "private",
            "/bin/sh",
            "-c",
            script,
        ]
        out = (self.state_dir / "libvirtd.stdout").open("ab")
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True
        )
        out.close()
        self._wait_ready(proc)
        log.info("%s: libvirtd pid %d, %s", self.name, proc.pid, self.uri)
        return proc.pid

    def _wait_ready(self, proc: subprocess.Popen[bytes]) -> None:
        import libvirt

        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise HostError(
                    f"{self.name}: libvirtd exited with {proc.returncode}; "
                    f"see {self.log_file} and {self.state_dir / 'libvirtd.stdout'}:\n"
                    + self._log_tail()
                )
            if self.socket.exists():
                try:
                    conn = libvirt.open(self.uri)
                    conn.close()
                    return
                except libvirt.libvirtError:
                    pass
            time.sleep(0.1)
        raise HostError(
            f"{self.name}: libvirtd did not answer in {START_TIMEOUT:.0f} s; "
            f"see {self.log_file}:\n{self._log_tail()}"
        )

    def _log_tail(self, lines: int = 15) -> str:
        parts = []
        for f in (self.state_dir / "libvirtd.stdout", self.log_file):
            if f.exists():
                parts += f.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(parts)


def stop_pid(pid: int, timeout: float = 15.0) -> None:
    """Stop a process we started: SIGTERM, then SIGKILL after *timeout*."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_alive(pid):
            return
        time.sleep(0.05)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return


def is_alive(pid: int) -> bool:
    """True while *pid* runs; reaps it when it is our child, treats a zombie as gone."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False
