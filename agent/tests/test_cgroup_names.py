"""Agents sharing a host never share their lease cgroups: the system agent keeps
``gpgpu-rentals``, any other agent (simulated, tests) gets a name of its own state directory."""

from __future__ import annotations

from pathlib import Path

from gpgpu_agent.runners.cgroups import GROUP_NAME, group_name_for


def test_the_system_agent_keeps_the_documented_name(tmp_path: Path) -> None:
    system = tmp_path / "var-lib-gpgpu-agent"
    system.mkdir()
    assert group_name_for(system, system_state_dir=system) == GROUP_NAME


def test_two_other_agents_get_two_stable_names_of_their_own(tmp_path: Path) -> None:
    system, one, two = tmp_path / "system", tmp_path / "one", tmp_path / "two"
    names = {group_name_for(d, system_state_dir=system) for d in (one, two)}
    assert len(names) == 2 and GROUP_NAME not in names
    assert all(name.startswith(f"{GROUP_NAME}-") for name in names)
    assert group_name_for(one, system_state_dir=system) == group_name_for(one, system_state_dir=system)
