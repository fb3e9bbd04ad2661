"""The ptmig VM lab: two libvirt hosts in network namespaces and a Debian guest under TCG.

Product code never imports this package; the lab drives the product from outside, as a
user would.  The addresses below are the lab's own: TEST-NET-1 for the link between the
hosts and a private /24 that exists only inside the lab's namespaces.
"""

#: The guest's LAN, reachable only inside the lab's namespaces.
GUEST_IP = "192.168.77.10"
CLIENT_IP = "192.168.77.2"
GUEST_PREFIX = 24

#: MACs of the lab guest's NICs.  Team "lan" (bond0, admin-owned, MAC policy preserve)
#: keeps its standby's MAC; team "wan" (bond1, agent-owned, MAC policy follow) takes the
#: MAC of whichever member is active.
STANDBY_MAC = "52:54:00:aa:00:01"
TEAM_MAC = STANDBY_MAC
PRIMARY_MAC = "52:54:00:bb:00:01"
WAN_STANDBY_MAC = "52:54:00:aa:00:02"
WAN_PRIMARY_MAC = "52:54:00:bb:00:02"
#: Team wan's subnet: a second /24 on the same L2 (one subnet per bond avoids ARP flux).
WAN_GUEST_IP = "192.168.78.10"
WAN_CLIENT_IP = "192.168.78.2"
