"""The whole lab as one object: build or reuse, start, drive, check and tear down.

Everything ``up`` starts is written to ``state.json`` in the run directory before it is
started, so ``down`` (even from another process, even after a crash half-way through
``up``) stops exactly that, by PID and by name of the namespaces it made, and nothing else.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import libvirt

from host.domain.domain_xml import device_aliases
from lab import fabric, pki
from lab.console import ConsoleError, ExecResult, GuestConsole, GuestStopped, log_tail
from lab.guest import (
    CONSOLE_LOG,
    CONSOLE_SOCKET,
    DOMAIN_NAME,
    EXTRA_MEMORY_MIB,
    ExtraGuest,
    Nic,
    domain_xml,
    extra_domain_xml,
)
from lab.hosts import PRIVATE_DIRS, LabHost, is_alive, stop_pid
from lab.image import GuestImage, ImageRecipe, build_image, lab_recipe, suite_images_dir
from lab.migration import libvirt_migrate
from lab.paths import run_dir

log = logging.getLogger(__name__)


def _ignore_libvirt_error(_ctx: object, _err: object) -> None:
    """libvirt prints every error to stderr by default; ours are raised and reported."""


libvirt.registerErrorHandler(_ignore_libvirt_error, None)

BOOT_TIMEOUT = 240.0
#: QEMU's own assertion failing, as it prints it to the domain's log before it aborts.
QEMU_ABORT = re.compile(r"^qemu-system-\S+: (.*Assertion .* failed\.)$", re.MULTILINE)
#: Boots of one guest when QEMU aborted on its own assertion before the shell came up.
BOOT_ATTEMPTS = 2
#: Kernel log lines that mean the guest is damaged (a migration corrupted its memory, say).
BAD_KERNEL_LINES = r"BUG:|Oops|corrupt|Kernel panic|WARNING:|general protection|Call Trace"
#: A disk local to each host: the same path, a different file on each (private mounts).
DATA_DISK = "/var/lib/libvirt/images/ptmig-data.qcow2"


class LabError(RuntimeError):
    """A lab step failed; the message says which and where its logs are."""


class GuestHealthError(LabError):
    """The guest is dead or damaged."""


@dataclass
class LabState:
    """What a running lab consists of (persisted so ``down`` can find it)."""

    netns: list[str] = field(default_factory=list)
    pids: dict[str, int] = field(default_factory=dict)
    mountpoints: list[str] = field(default_factory=list)
    image: str = ""
    disk: str = ""
    dmesg_baseline: int = 0
    #: Extra guests (lab.guest.ExtraGuest) by index, recorded before each is defined.
    extra_guests: list[int] = field(default_factory=list)
    extra_dmesg_baselines: dict[str, int] = field(default_factory=dict)
    #: QEMU's own assertions that aborted a boot (each booted again: `VmLab._await_shell`).
    qemu_aborts: list[str] = field(default_factory=list)

    @staticmethod
    def path() -> Path:
        return run_dir() / "state.json"

    @classmethod
    def load(cls) -> LabState | None:
        try:
            return cls(**json.loads(cls.path().read_text()))
        except FileNotFoundError:
            return None

    def save(self) -> None:
        self.path().parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path().with_suffix(".tmp")
        tmp.write_text(json.dumps(asdict(self), indent=1))
        tmp.rename(self.path())


@dataclass(frozen=True)
class MigrationResult:
    source: str
    destination: str
    wall_s: float
    downtime_ms: int | None
    total_ms: int | None
    data_mib: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class VmLab:
    """Two libvirt hosts, the L2 fabric and the guest."""

    def __init__(self) -> None:
        self.hosts = {net.name: LabHost(net) for net in fabric.HOSTS}
        self._conns: dict[str, libvirt.virConnect] = {}
        self.state = LabState.load() or LabState()

    # -- lifecycle -------------------------------------------------------------------

    def up(
        self, recipe: ImageRecipe | None = None, *, with_primary: bool = True, guests: int = 1
    ) -> None:
        """Start the lab (building the image if needed) and boot the guest on hosta, and
        ``guests - 1`` extra guests beside it."""
        if guests < 1:
            raise LabError(f"the lab runs at least one guest, not {guests}")
        old = LabState.load()
        if old is not None:
            if any(is_alive(pid) for pid in old.pids.values()):
                raise LabError(
                    f"a lab is already up ({LabState.path()}): run 'ptmig-lab down' first"
                )
            log.info("cleaning up a lab whose daemons are gone")
            self.down()
        recipe = recipe or lab_recipe()
        image = build_image(recipe, suite_images_dir(recipe.suite))
        if run_dir().exists():
            shutil.rmtree(run_dir())
        run_dir().mkdir(parents=True)
        self.state = LabState(image=str(image.directory))
        self.state.save()
        try:
            self._make_mountpoints()
            self.state.netns = fabric.all_netns()  # recorded first: down deletes what exists
            self.state.save()
            fabric.create()
            # Migration TLS: the lab's own CA and each host's certificates, before the
            # daemons read qemu.conf (which names them only when they exist).
            pki.install(
                (h.name, h.net.migration_ip, h.path_inside("/etc/libvirt"))
                for h in self.hosts.values()
            )
            for host in self.hosts.values():
                self.state.pids[host.name] = host.start()
                self.state.save()
            warming = threading.Thread(
                target=self.warm_capabilities, name="warm-capabilities", daemon=True
            )
            warming.start()
            self.boot_guest(image, with_primary=with_primary)
            if guests > 1:
                self.boot_extra_guests(guests - 1)
            warming.join()
        except BaseException:
            log.error("lab start failed; logs under %s", run_dir())
            raise

    def warm_capabilities(self) -> None:
        """Have each host's libvirtd probe its QEMU binaries now, while the guest boots.

        libvirt probes a QEMU binary's capabilities on the first call that needs them and
        keeps them on disk (here ``~/.cache/ptmig/libvirt-cache/HOST``).  On a machine's
        first lab nobody has: the first ``ptmig migrate``'s preflight asks both hosts for
        their capabilities (for the host UUIDs), and libvirt probed qemu-system-i386 on
        hosta and both binaries on hostb then, 11.7 of that preflight's 12.1 s
        (docs/benchmarks/cold-first-migration.md).  A real host has done this long before
        a VM migrates to it; the lab does it here, so its first migration measures ptmig.
        With the probes on disk this costs a few hundred ms.
        """
        started = time.monotonic()
        for host in self.hosts.values():
            try:
                conn = libvirt.open(host.uri)
            except libvirt.libvirtError as exc:
                log.warning("%s: no connection to warm its capabilities: %s", host.name, exc)
                continue
            try:
                conn.getCapabilities()
            except libvirt.libvirtError as exc:
                log.warning("%s: getCapabilities failed: %s", host.name, exc)
            finally:
                conn.close()
        log.info("QEMU capabilities of both hosts ready in %.1f s", time.monotonic() - started)

    def _make_mountpoints(self) -> None:
        """libvirtd's private bind mounts need mount points; make the missing ones, note them."""
        for mnt in [*PRIVATE_DIRS, "/var/cache/libvirt"]:
            p = Path(mnt)
            if not p.exists():
                p.mkdir(parents=True)
                self.state.mountpoints.append(mnt)
        self.state.save()

    def boot_guest(
        self,
        image: GuestImage,
        *,
        with_primary: bool = True,
        definition: Callable[[Path], str] | None = None,
    ) -> None:
        """Boot the guest on hosta from a fresh overlay; *definition* maps the overlay's
        path to another domain XML for it (the benchmark's upstream variant)."""
        disk = run_dir() / "guest" / "disk.qcow2"
        disk.parent.mkdir(parents=True, exist_ok=True)
        disk.unlink(missing_ok=True)
        _overlay(image, disk)
        self.state.disk = str(disk)
        self.state.save()
        host = self.hosts["hosta"]
        dom = self.conn(host.name).defineXML(
            definition(disk) if definition else domain_xml(image, disk, with_primary=with_primary)
        )
        boot = self._start(host, DOMAIN_NAME, dom, image, disk)
        uptime = self._await_shell(boot)
        log.info(
            "guest booted on %s in %.1f s (guest uptime %.1f s)",
            host.name,
            time.monotonic() - boot.started,
            uptime,
        )
        self.state.dmesg_baseline = self._bad_kernel_lines()
        self.state.save()

    def boot_extra_guests(self, n: int, *, memory_mib: int = EXTRA_MEMORY_MIB) -> list[ExtraGuest]:
        """Boot *n* more guests on hosta beside the running ones (lab.guest.ExtraGuest), each
        on its own overlay of the lab's image; returns them once every one has its shell.

        They boot at once: on two cores that is faster than one after the other.
        """
        image = GuestImage(Path(self.state.image))
        first = max([1, *self.state.extra_guests]) + 1
        guests = [ExtraGuest(i, memory_mib) for i in range(first, first + n)]
        host = self.hosts["hosta"]
        started = []
        for guest in guests:
            disk = _extra_disk(guest)
            disk.parent.mkdir(parents=True, exist_ok=True)
            disk.unlink(missing_ok=True)
            _overlay(image, disk)
            self.state.extra_guests.append(guest.index)  # recorded first: down removes it
            self.state.save()
            dom = self.conn(host.name).defineXML(extra_domain_xml(image, disk, guest))
            started.append((guest, self._start(host, guest.name, dom, image, disk)))
        for guest, boot in started:
            uptime = self._await_shell(boot)
            log.info(
                "%s booted on %s in %.1f s (guest uptime %.1f s, %d MiB)",
                guest.name,
                host.name,
                time.monotonic() - boot.started,
                uptime,
                guest.memory_mib,
            )
            self.state.extra_dmesg_baselines[guest.name] = self._bad_kernel_lines(guest.name)
            self.state.save()
        return guests

    def _start(
        self, host: LabHost, name: str, dom: libvirt.virDomain, image: GuestImage, disk: Path
    ) -> _Boot:
        """Start defined domain *name* (its overlay *disk* over *image*) on *host*, noting
        where its logs stood."""
        qemu_log = host.qemu_log(name)
        console = self.console(host.name, name)
        boot = _Boot(
            name,
            host,
            dom,
            image,
            disk,
            console,
            console.log_size(),
            qemu_log.stat().st_size if qemu_log.exists() else 0,
            time.monotonic(),
        )
        dom.create()
        return boot

    def _await_shell(self, boot: _Boot) -> float:
        """The guest's uptime once its shell is up.  A guest whose QEMU aborted on one of
        QEMU's own assertions before then is booted once more from a fresh overlay: that
        is a QEMU fault (docs/lab.md, "QEMU's own faults"), and nothing of ptmig ran yet.
        Any other end of the guest raises at once, with its QEMU log."""
        dom = boot.dom
        for attempt in range(1, BOOT_ATTEMPTS + 1):
            try:
                return boot.console.wait_for_shell(
                    boot.console_since, BOOT_TIMEOUT, running=lambda: _is_active(dom)
                )
            except GuestStopped as exc:
                qemu_log = _read_from(boot.host.qemu_log(boot.name), boot.qemu_log_since)
                abort = QEMU_ABORT.search(qemu_log)
                if abort is None or attempt == BOOT_ATTEMPTS:
                    raise GuestStopped(
                        f"{boot.name} on {boot.host.name}: {exc}\n--- its QEMU log since "
                        f"the boot ---\n{qemu_log[-3000:]}"
                    ) from exc
                log.warning(
                    "%s: QEMU aborted before the guest's shell came up (%s); booting it "
                    "again from a fresh overlay",
                    boot.name,
                    abort.group(1),
                )
                self.state.qemu_aborts.append(f"{boot.name}: {abort.group(1)}")
                self.state.save()
                _overlay(boot.image, boot.disk)
                boot = self._start(boot.host, boot.name, dom, boot.image, boot.disk)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def extra_guests(self) -> list[ExtraGuest]:
        return [ExtraGuest(i) for i in self.state.extra_guests]

    def guest_names(self) -> list[str]:
        """Every guest's domain name, the main guest's first."""
        return [DOMAIN_NAME, *(g.name for g in self.extra_guests())]

    def down(self) -> list[str]:
        """Stop everything the lab started; return what was done, for the user."""
        state = LabState.load() or self.state
        done: list[str] = []
        for name, host in self.hosts.items():
            if name in state.pids and host.socket.exists():
                done += self._destroy_domains(name)
        for name in list(self._conns):
            self._close(name)
        for name, pid in state.pids.items():
            stop_pid(pid)
            done.append(f"stopped libvirtd of {name} (pid {pid})")
        present = fabric.existing_netns()
        for ns in state.netns:
            if ns not in present:
                continue
            for pid in fabric.pids_in(ns):  # QEMU of a host whose libvirtd died, pingers
                stop_pid(pid, timeout=5)
                done.append(f"stopped pid {pid} left in {ns}")
        fabric.delete(state.netns)
        done += [f"deleted netns {ns}" for ns in state.netns if ns in present]
        for mnt in state.mountpoints:
            with suppress(OSError):
                Path(mnt).rmdir()
        if state.disk:
            Path(state.disk).unlink(missing_ok=True)
        for index in state.extra_guests:
            guest = ExtraGuest(index)
            shutil.rmtree(_extra_disk(guest).parent, ignore_errors=True)
            for h in self.hosts.values():
                for inside in (guest.console_socket, guest.console_log, guest.agent_socket):
                    h.path_inside(inside).unlink(missing_ok=True)
                h.qemu_log(guest.name).unlink(missing_ok=True)
            done.append(f"removed the files of {guest.name}")
        with suppress(OSError):
            (run_dir() / "guests").rmdir()
        LabState.path().unlink(missing_ok=True)
        self.state = LabState()
        return done

    def _destroy_domains(self, host: str) -> list[str]:
        done = []
        try:
            conn = self.conn(host)
            for dom in conn.listAllDomains():
                if dom.isActive():
                    dom.destroy()
                    done.append(f"destroyed {dom.name()} on {host}")
                if dom.isPersistent():
                    dom.undefine()
        except libvirt.libvirtError as exc:
            log.warning("%s: %s", host, exc)
        return done

    def remove_guest(self) -> None:
        """Destroy and undefine the guest wherever it is (to boot another definition)."""
        for name in self.hosts:
            try:
                dom = self.conn(name).lookupByName(DOMAIN_NAME)
            except libvirt.libvirtError:
                continue
            if dom.isActive():
                dom.destroy()
            if dom.isPersistent():
                dom.undefine()

    def kill_host(self, name: str) -> None:
        """SIGKILL a host's libvirtd (a crashed or unreachable destination); QEMU stays."""
        import signal

        self._close(name)
        pid = self.state.pids[name]
        os.kill(pid, signal.SIGKILL)
        stop_pid(pid, timeout=10)

    def restart_host(self, name: str) -> None:
        """Restart a host's libvirtd as ``systemctl restart libvirtd`` does: SIGTERM to its
        PID, wait for it to exit, start it again; QEMU stays, and the daemon reconnects to
        it.  Every client connection it had is gone."""
        self._close(name)
        stop_pid(self.state.pids[name])
        self.start_host(name)

    def disconnect_clients(self, name: str, pid: int) -> list[str]:
        """Have host *name*'s libvirtd close every connection process *pid* holds to it
        (the lab's own first, which it opens again when next asked); the clients' ids."""
        self._close(name)
        return self.hosts[name].disconnect_clients_of(pid)

    def start_host(self, name: str) -> None:
        """(Re)start a host's libvirtd; it reconnects to the QEMU processes it knows."""
        self.state.pids[name] = self.hosts[name].start()
        self.state.save()

    # -- access ----------------------------------------------------------------------

    def conn(self, host: str) -> libvirt.virConnect:
        c = self._conns.get(host)
        if c is None or not c.isAlive():
            c = libvirt.open(self.hosts[host].uri)
            self._conns[host] = c
        return c

    def _close(self, host: str) -> None:
        c = self._conns.pop(host, None)
        if c is not None:
            with suppress(libvirt.libvirtError):
                c.close()

    def where(self, name: str = DOMAIN_NAME) -> str:
        """The host guest *name* (default the main guest) runs on now."""
        running = []
        for host in self.hosts:
            try:
                dom = self.conn(host).lookupByName(name)
                if dom.isActive():
                    running.append(host)
            except libvirt.libvirtError:
                continue
        if len(running) != 1:
            guest = "the guest" if name == DOMAIN_NAME else name
            raise GuestHealthError(f"{guest} runs on {running or 'no host'}, not on exactly one")
        return running[0]

    def domain(self, host: str | None = None, name: str = DOMAIN_NAME) -> libvirt.virDomain:
        return self.conn(host or self.where(name)).lookupByName(name)

    def console(self, host: str | None = None, name: str = DOMAIN_NAME) -> GuestConsole:
        h = self.hosts[host or self.where(name)]
        socket, log_file = _console_paths(name)
        return GuestConsole(h.path_inside(socket), h.path_inside(log_file))

    def exec(self, command: str, timeout: float = 60.0, name: str = DOMAIN_NAME) -> ExecResult:
        return self.console(name=name).run(command, timeout)

    def logs(self) -> list[Path]:
        """Where to look when something failed."""
        out = [run_dir() / "state.json"]
        for h in self.hosts.values():
            out += [h.log_file, h.qemu_log(DOMAIN_NAME), h.path_inside(CONSOLE_LOG)]
            for guest in self.extra_guests():
                out += [h.qemu_log(guest.name), h.path_inside(guest.console_log)]
        return out

    # -- actions ---------------------------------------------------------------------

    def migrate(self, destination: str) -> MigrationResult:
        """Live-migrate the guest with libvirt alone (lab.migration.libvirt_migrate)."""
        source = self.where()
        if source == destination:
            raise LabError(f"the guest already runs on {destination}")
        try:
            done = libvirt_migrate(
                self.domain(source), self.conn(destination), self.hosts[destination].tcp_uri
            )
        except libvirt.libvirtError as exc:
            raise LabError(
                f"migration {source} -> {destination} failed: {exc}; "
                f"logs: {', '.join(map(str, self.logs()))}"
            ) from exc
        return MigrationResult(
            source,
            destination,
            round(done.wall_s, 3),
            done.downtime_ms,
            done.elapsed_ms,
            round(done.data_total / 2**20, 1) if done.data_total is not None else None,
        )

    def make_local_disk(self, host: str, path: str = DATA_DISK, size_mib: int = 64) -> Path:
        """A fresh empty qcow2 at *path* in *host*'s private /var/lib/libvirt (what an
        operator pre-creates for ``--copy-storage-all``: libvirt creates a destination
        file itself only inside a storage pool); returns it as the root namespace sees it."""
        file = self.hosts[host].path_inside(path)
        file.parent.mkdir(parents=True, exist_ok=True)
        file.unlink(missing_ok=True)
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", str(file), f"{size_mib}M"], check=True
        )
        return file

    def attach_disk(self, path: str, target: str, alias: str) -> None:
        """Hot-plug a virtio disk (live and persistent, so it migrates)."""
        xml = (
            "<disk type='file' device='disk'>"
            "<driver name='qemu' type='qcow2' cache='unsafe'/>"
            f"<source file='{path}'/><target dev='{target}' bus='virtio'/>"
            f"<alias name='{alias}'/></disk>"
        )
        self.domain().attachDeviceFlags(
            xml, libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG
        )

    def attach_nic(self, nic: Nic) -> None:
        self.domain().attachDeviceFlags(nic.xml(), libvirt.VIR_DOMAIN_AFFECT_LIVE)

    def detach_nic(self, alias: str, timeout: float = 20.0, *, config: bool = True) -> float:
        """Unplug a NIC of the main guest (:func:`detach_device`); the seconds taken."""
        return detach_device(self.domain(), alias, timeout, config=config)

    def guest_links(self) -> dict[str, dict[str, Any]]:
        """The guest's links by name, from ``ip -j link``."""
        out = self.exec("ip -j link show").check()
        return {link["ifname"]: link for link in json.loads(out)}

    def wait_for_guest_mac(self, mac: str, timeout: float = 30.0) -> str:
        """Wait until a guest link with permanent MAC *mac* exists; returns its name."""
        script = (
            f"for i in $(seq {int(timeout * 10)}); do "
            f"for d in /sys/class/net/*; do "
            f"[ \"$(ethtool -P ${{d##*/}} 2>/dev/null | awk '{{print $3}}')\" = {mac} ] "
            f"&& {{ echo ${{d##*/}}; exit 0; }}; done; sleep 0.1; done; exit 1"
        )
        result = self.exec(f"bash -c {_shquote(script)}", timeout=timeout + 10)
        if result.status != 0:
            raise LabError(f"no link with MAC {mac} appeared in the guest in {timeout:.0f} s")
        return result.output.strip().splitlines()[-1]

    def link_drops(self) -> dict[str, int]:
        """The guest's and the fabric's nonzero link drop counters (:func:`fabric.drop_counters`);
        compare two readings to see where lost frames died."""
        guest = fabric.drop_counters(self.exec("ip -s -j link").check(), "guest")
        return guest | fabric.fabric_drops()

    # -- health ----------------------------------------------------------------------

    def await_reboot(self, host: str, since: int, name: str = DOMAIN_NAME) -> float:
        """Once guest *name* rebooted on *host*: wait for its shell (printed after console
        log offset *since*), then count its new kernel's bad lines as the baseline, as a
        boot does.  Its uptime then."""
        dom = self.domain(host, name)
        uptime = self.console(host, name).wait_for_shell(
            since, BOOT_TIMEOUT, running=lambda: _is_active(dom)
        )
        baseline = self._bad_kernel_lines(name)
        if name == DOMAIN_NAME:
            self.state.dmesg_baseline = baseline
        else:
            self.state.extra_dmesg_baselines[name] = baseline
        self.state.save()
        return uptime

    def _bad_kernel_lines(self, name: str = DOMAIN_NAME) -> int:
        out = self.exec(f"dmesg | grep -cE '{BAD_KERNEL_LINES}' || true", name=name).check()
        return int(out.strip().splitlines()[-1])

    def check_health(self, name: str = DOMAIN_NAME) -> None:
        """Fail loudly if guest *name* (default the main one) is dead or damaged; the error
        carries its console log."""
        baseline = (
            self.state.dmesg_baseline
            if name == DOMAIN_NAME
            else self.state.extra_dmesg_baselines.get(name, 0)
        )
        try:
            host = self.where(name)
            console = self.console(host, name)
            result = console.run(
                "echo taint=$(cat /proc/sys/kernel/tainted); "
                f"echo bad=$(dmesg | grep -cE '{BAD_KERNEL_LINES}'); "
                f"dmesg | grep -E '{BAD_KERNEL_LINES}' | tail -n 20",
                timeout=30,
            )
        except (ConsoleError, LabError) as exc:
            raise GuestHealthError(
                f"guest health check failed: {exc}\nlogs: {', '.join(map(str, self.logs()))}"
            ) from exc
        taint = re.search(r"taint=(\d+)", result.output)
        bad = re.search(r"bad=(\d+)", result.output)
        if not taint or not bad:
            raise GuestHealthError(f"unreadable health report:\n{result.output}")
        if int(taint.group(1)) != 0 or int(bad.group(1)) > baseline:
            label = "guest" if name == DOMAIN_NAME else name
            raise GuestHealthError(
                f"{label} kernel damaged on {host} (taint={taint.group(1)}, "
                f"{int(bad.group(1)) - baseline} new bad lines):\n"
                f"{result.output}\n{log_tail(console.log_file)}"
            )

    @contextmanager
    def connected(self) -> Iterator[VmLab]:
        try:
            yield self
        finally:
            for name in list(self._conns):
                self._close(name)


def detach_device(
    dom: libvirt.virDomain, alias: str, timeout: float = 20.0, *, config: bool = True
) -> float:
    """Unplug a device (from the persistent definition too, where it is there, unless not
    *config*: what ``virsh detach-device-alias`` does by default) and wait until it has
    left the live XML; returns the seconds taken.

    libvirt's detach returns before the guest has released the device; only the
    device's absence from the live definition means it is gone.
    """
    t0 = time.monotonic()
    flags = libvirt.VIR_DOMAIN_AFFECT_LIVE
    if config and alias in device_aliases(dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE)):
        flags |= libvirt.VIR_DOMAIN_AFFECT_CONFIG
    dom.detachDeviceAlias(alias, flags)
    while time.monotonic() - t0 < timeout:
        if alias not in device_aliases(dom.XMLDesc(0)):
            return time.monotonic() - t0
        time.sleep(0.02)
    raise LabError(f"{alias} still present {timeout:.0f} s after detach")


def _overlay(image: GuestImage, disk: Path) -> None:
    """A fresh qcow2 overlay over the cached raw image (never written to)."""
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(image.disk), "-F", "raw", str(disk)],
        check=True,
    )


def _extra_disk(guest: ExtraGuest) -> Path:
    return run_dir() / "guests" / f"g{guest.index}" / "disk.qcow2"


def _console_paths(name: str) -> tuple[str, str]:
    """(console socket, console log) of guest *name*, inside its host."""
    if name == DOMAIN_NAME:
        return CONSOLE_SOCKET, CONSOLE_LOG
    prefix = DOMAIN_NAME
    if not name.startswith(prefix) or not name[len(prefix) :].isdigit():
        raise LabError(f"no lab guest named {name!r}")
    guest = ExtraGuest(int(name[len(prefix) :]))
    return guest.console_socket, guest.console_log


def _shquote(s: str) -> str:
    return "'" + s.replace("'", "'\"'\"'") + "'"


@dataclass
class _Boot:
    """A guest being booted: its domain and overlay, its console, and where its logs stood
    at start."""

    name: str
    host: LabHost
    dom: libvirt.virDomain
    image: GuestImage
    disk: Path
    console: GuestConsole
    console_since: int
    qemu_log_since: int
    started: float


def _is_active(dom: libvirt.virDomain) -> bool:
    try:
        return bool(dom.isActive())
    except libvirt.libvirtError:
        return False


def _read_from(path: Path, offset: int) -> str:
    """*path*'s text from byte *offset* on ("" if it is not there)."""
    try:
        with path.open("rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except FileNotFoundError:
        return ""
