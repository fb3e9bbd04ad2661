"""Whether a device of a pool can join a team's bond as the guest has it, under the
team's MAC policy: asked before anything is unplugged, since the agent would refuse only
at the bind."""

from __future__ import annotations

from host.agent_client import TeamState
from host.domain.kinds import MacPolicy
from host.domain.pools import Pool, VfNetworkPool
from host.domain.teams import Team


def mac_policy_refusal(team: Team, pool: Pool | None, state: TeamState) -> str | None:
    """Why a device of *pool* could not join *team*'s bond (*state*, the agent's), or None.

    Policy follow needs a bond whose MAC follows its active member (fail_over_mac active).
    A VF keeps the MAC libvirt set through its PF (the team's, else the standby's): the PF
    refuses any other from the guest ("attempted to override administratively set MAC
    address").  A fail_over_mac=none bond gives each member its own MAC as it joins, so a
    VF can join it only when the bond's MAC is that one; an active bond takes the VF's.
    """
    if not state.mac:
        return None
    if team.mac_policy == MacPolicy.FOLLOW and state.fail_over_mac != "active":
        return (
            f"team {team.name}: MAC policy follow needs bond {state.bond} with fail_over_mac "
            f"active, it has {state.fail_over_mac or 'none'}: set the bond's fail_over_mac to "
            "active, or the team's policy to preserve (ptmig team-set --mac-policy preserve)"
        )
    if not isinstance(pool, VfNetworkPool) or state.fail_over_mac != "none":
        return None
    vf_mac = (team.team_mac or team.standby_mac).lower()
    if vf_mac == state.mac.lower():
        return None
    return (
        f"team {team.name}: a VF of pool {team.pool} gets MAC {vf_mac} through its PF and "
        f"cannot change it in the guest, but bond {state.bond} (fail_over_mac none) gives "
        f"its members its own MAC {state.mac.lower()}: set the team's MAC to the bond's "
        f"(ptmig team-set --team-mac {state.mac.lower()}), or give the bond {vf_mac}"
    )
