"""One libvirt host, by URI: its domains and its networks (where pools are defined)."""

from __future__ import annotations

import contextlib
from contextlib import suppress

import libvirt

from host.domain.errors import DomainModelError
from host.domain.networks import keep_network_uuid
from host.domain.xmltree import parse_xml
from host.hypervisor.domain import Domain
from host.hypervisor.errors import DomainNotFound, HypervisorError, wrap
from host.hypervisor.events import ensure_event_loop


class Hypervisor:
    """One libvirt host, by URI."""

    def __init__(self, uri: str) -> None:
        ensure_event_loop()
        self.uri = uri
        try:
            self._conn = libvirt.open(uri)
        except libvirt.libvirtError as exc:
            raise wrap(f"cannot connect to {uri}", exc, connecting=True) from exc
        # Notice a dead peer in about 15 s instead of waiting on TCP; a daemon that does
        # not support keepalives is still usable.
        with contextlib.suppress(libvirt.libvirtError):
            self._conn.setKeepAlive(5, 3)

    def close(self) -> None:
        with suppress(libvirt.libvirtError):
            self._conn.close()

    def is_alive(self) -> bool:
        """Whether the connection still stands (a libvirtd restarted or a client the
        daemon closed ends it for good: open the host again)."""
        try:
            return bool(self._conn.isAlive())
        except libvirt.libvirtError:
            return False

    def __enter__(self) -> Hypervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- host ------------------------------------------------------------------------

    def host_uuid(self) -> str:
        try:
            caps = parse_xml(self._conn.getCapabilities(), f"{self.uri}: capabilities")
        except libvirt.libvirtError as exc:
            raise wrap(f"{self.uri}: capabilities", exc) from exc
        except DomainModelError as exc:
            raise HypervisorError(str(exc)) from exc
        return caps.findtext("host/uuid") or ""

    # -- domains ---------------------------------------------------------------------

    def domain(self, ident: str) -> Domain:
        """A domain by name or UUID, as virsh takes it."""
        try:
            if len(ident) == 36 and ident.count("-") == 4:
                return Domain(self, self._conn.lookupByUUIDString(ident))
            return Domain(self, self._conn.lookupByName(ident))
        except libvirt.libvirtError as exc:
            raise wrap(f"{self.uri}: domain {ident!r}", exc) from exc

    def has_domain(self, ident: str) -> bool:
        """Whether this host defines the domain; a host that cannot answer raises
        (HostUnreachable...): "no" would send a caller after a VM that may well be there."""
        try:
            self.domain(ident)
            return True
        except DomainNotFound:
            return False

    def all_domain_xml(self) -> list[str]:
        """The live XML of every active domain and the persistent XML of inactive ones."""
        try:
            domains = self._conn.listAllDomains()
        except libvirt.libvirtError as exc:
            raise wrap(f"{self.uri}: list domains", exc) from exc
        out = []
        for dom in domains:
            try:
                out.append(str(dom.XMLDesc(0)))
            except libvirt.libvirtError:
                continue  # vanished while we listed
        return out

    # -- networks (pool definitions) -------------------------------------------------

    def network_xml(self, name: str) -> str | None:
        try:
            return str(self._conn.networkLookupByName(name).XMLDesc(0))
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_NETWORK:
                return None
            raise wrap(f"{self.uri}: network {name}", exc) from exc

    def network_names(self) -> list[str]:
        try:
            return [str(n.name()) for n in self._conn.listAllNetworks()]
        except libvirt.libvirtError as exc:
            raise wrap(f"{self.uri}: list networks", exc) from exc

    def define_network(self, xml: str, *, start: bool = False) -> None:
        """Define (or redefine) a network; *start* it and mark it autostart (VF pools).

        Inert pool definitions (PCI, emulated) are only defined: libvirt is their
        store, and starting them would make a bridge nobody uses.
        """
        try:
            xml = keep_network_uuid(xml, self._network_uuid)
        except DomainModelError as exc:
            raise HypervisorError(f"{self.uri}: define network: {exc}") from exc
        try:
            net = self._conn.networkDefineXML(xml)
            if start:
                if not net.isActive():
                    net.create()
                net.setAutostart(1)
        except libvirt.libvirtError as exc:
            raise wrap(f"{self.uri}: define network", exc) from exc

    def _network_uuid(self, name: str) -> str | None:
        try:
            return str(self._conn.networkLookupByName(name).UUIDString())
        except libvirt.libvirtError:
            return None

    def undefine_network(self, name: str) -> None:
        try:
            net = self._conn.networkLookupByName(name)
            if net.isActive():
                net.destroy()
            net.undefine()
        except libvirt.libvirtError as exc:
            raise wrap(f"{self.uri}: undefine network {name}", exc) from exc
