"""The words ptmig's metadata, pools, CLI, JSON and gRPC messages share, declared once.

Each is a ``StrEnum``: its members are the strings written in XML, JSON and protobuf
string fields, so using them changes no byte on any wire."""

from __future__ import annotations

import enum


class PoolKind(enum.StrEnum):
    """What a pool holds, and so the kind of a primary plugged from it (the team
    metadata's ``<primary kind=...>``)."""

    VF_NETWORK = "vf-network"  # SR-IOV VFs behind a libvirt hostdev network
    PCI = "pci"  # whole non-SR-IOV NICs
    EMULATED = "emulated"  # emulated NICs on a bridge (the lab)
    #: mediated devices (``<hostdev type='mdev'>``) by UUID: carried by a state copy, never
    #: a team's primary (host/workflow/hybrid.py says why)
    MDEV = "mdev"


class MacPolicy(enum.StrEnum):
    """Which MAC a team's bond and its primary carry once the primary is bound (the guest
    agent's ``MacPolicy``)."""

    PRESERVE = "preserve"  # the new device gets the team's MAC before it is enslaved
    FOLLOW = "follow"  # bond fail_over_mac=active; its MAC follows the active member
    NONE = "none"  # never touch MACs (SR-IOV VF: the host programs them)
