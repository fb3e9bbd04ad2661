"""ptmig in-guest agent: keeps a guest's passthrough NIC and its virtio standby teamed.

Imports nothing heavy at package import time: the agent runs in every guest, where
importing pyroute2 alone costs seconds under TCG (see guest_agent.netlink).
"""

__version__ = "0.1.0"
