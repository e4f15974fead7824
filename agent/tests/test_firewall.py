"""The rentals firewall: the nftables ruleset it writes, how it checks it, and (as root, with nft)
the real kernel accepting, reporting and removing it.

What the rules do to real traffic is test_container_engine.py's job (a rental tries the LAN, the
metadata service, this machine and another rental); here: that the text says what the module
docstring promises, and that a flushed or damaged table is noticed.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess

import pytest

from gpgpu_agent.runners import Firewall, FirewallError
from gpgpu_agent.runners import firewall as firewall_module

SUBNET = "10.213.0.0/24"
NFT = shutil.which("nft") or "/usr/sbin/nft"


def blocked_networks(ruleset: str) -> list[ipaddress.IPv4Network]:
    elements = re.search(r"set blocked4 \{[^}]*elements = \{ ([^}]*) \}", ruleset).group(1)
    return [ipaddress.ip_network(e.strip()) for e in elements.split(",")]


def chain(ruleset: str, family: str, name: str) -> list[str]:
    table = ruleset[ruleset.index(f"table {family} gpgpu_rentals {{") :]
    lines = [line.strip() for line in table[table.index(f"chain {name} {{") :].splitlines()[1:]]
    return lines[: lines.index("}")]


def completed(stdout: str = "", stderr: str = "", rc: int = 0) -> subprocess.CompletedProcess[str]:
    return subprocess.CompletedProcess([], rc, stdout, stderr)


BLOCKED = ("192.168.1.1", "10.0.0.1", "172.16.5.4", "169.254.169.254", "100.64.1.1", "127.0.0.1", "224.0.0.251")


@pytest.mark.parametrize("address", [*BLOCKED, "255.255.255.255", "0.1.2.3", "198.18.0.1", "192.0.0.8"])
def test_private_link_local_loopback_multicast_and_reserved_addresses_are_blocked(address):
    networks = blocked_networks(Firewall(subnet=SUBNET).ruleset())

    assert any(ipaddress.ip_address(address) in n for n in networks)


@pytest.mark.parametrize("address", ["8.8.8.8", "1.1.1.1", "151.101.1.69", "198.51.100.2", "203.0.113.9"])
def test_public_addresses_stay_reachable(address):
    networks = blocked_networks(Firewall(subnet=SUBNET).ruleset())

    assert not any(ipaddress.ip_address(address) in n for n in networks)


def test_rentals_are_rejected_towards_blocked_ranges_each_other_and_this_machine():
    ruleset = Firewall(subnet=SUBNET).ruleset()

    forward, input_ = chain(ruleset, "inet", "forward"), chain(ruleset, "inet", "input")
    assert forward[0] == "type filter hook forward priority filter - 10; policy accept;"  # before the engines'
    assert f"ip saddr {SUBNET} ip daddr @blocked4 reject with icmpx type admin-prohibited" in forward
    assert f"ip saddr {SUBNET} ip daddr {SUBNET} reject with icmpx type admin-prohibited" in forward
    assert f"ip daddr {SUBNET} ct state new drop" in forward  # nothing outside opens a connection to one
    assert input_[0] == "type filter hook input priority filter - 10; policy accept;"
    assert input_[-1] == f"ip saddr {SUBNET} reject with icmpx type admin-prohibited"  # every host address
    assert chain(ruleset, "bridge", "forward")[1:] == [f"ip saddr {SUBNET} ip daddr {SUBNET} drop"]


def test_dns_to_the_gateway_is_the_only_way_to_this_machine_by_default():
    input_ = chain(Firewall(subnet=SUBNET).ruleset(), "inet", "input")

    allowed = [rule for rule in input_ if rule.endswith("accept") and "policy" not in rule]
    assert allowed == [f"ip saddr {SUBNET} ip daddr {{ 10.213.0.1 }} meta l4proto {{ tcp, udp }} th dport 53 accept"]
    assert input_.index(allowed[0]) < input_.index(f"ip saddr {SUBNET} reject with icmpx type admin-prohibited")


def test_the_hosts_resolvers_may_be_asked_on_port_53_only_when_named():
    firewall = Firewall(subnet=SUBNET, dns_servers=["10.255.255.53", "192.168.1.1"])

    forward = chain(firewall.ruleset(), "inet", "forward")

    dns = f"ip saddr {SUBNET} ip daddr {{ 10.255.255.53, 192.168.1.1 }} meta l4proto {{ tcp, udp }} th dport 53 accept"
    assert dns in forward
    assert forward.index(dns) < forward.index(
        f"ip saddr {SUBNET} ip daddr @blocked4 reject with icmpx type admin-prohibited"
    )
    assert "10.213.0.1" not in firewall.ruleset()


def test_a_known_bridge_may_send_no_ipv6_and_no_forged_source():
    forward = chain(Firewall(subnet=SUBNET, bridge="podman3").ruleset(), "inet", "forward")

    assert forward[1:3] == ['iifname "podman3" meta nfproto ipv6 drop', f'iifname "podman3" ip saddr != {SUBNET} drop']


def test_install_replaces_both_tables_in_one_transaction():
    firewall = Firewall(subnet=SUBNET, table="gpgpu_x")

    head = firewall.ruleset().splitlines()[:4]

    # declared first, so deleting cannot fail on a machine without them; one `nft -f` batch
    assert head == [
        "table inet gpgpu_x",
        "delete table inet gpgpu_x",
        "table bridge gpgpu_x",
        "delete table bridge gpgpu_x",
    ]


def test_the_ruleset_digest_changes_with_what_the_rules_say():
    plain = Firewall(subnet=SUBNET)
    other = Firewall(subnet=SUBNET)
    other.adopt_network(bridge="podman1")

    assert plain.digest == Firewall(subnet=SUBNET).digest
    assert plain.digest != other.digest
    assert f'comment "gpgpu-agent ruleset {other.digest}"' in other.ruleset()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"subnet": "fd00::/64"}, "IPv4 network"),
        ({"subnet": "10.213.0.0/30"}, "at least 8 addresses"),
        ({"subnet": SUBNET, "bridge": 'br0" accept'}, "not a network interface name"),
        ({"subnet": SUBNET, "dns_servers": ["fd00::53"]}, "IPv4"),
        ({"subnet": SUBNET, "table": "x; flush ruleset"}, "not an nftables table name"),
    ],
)
def test_settings_that_would_inject_or_break_rules_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Firewall(**kwargs)


# --- check, with nft's answers played -----------------------------------------------------------


def listing(firewall: Firewall, family: str, *, drop_rule: str | None = None, digest: str | None = None) -> str:
    """What `nft list table` prints for the installed table (sets and rules as written)."""
    body = firewall.ruleset().split("\n", 4)[4]
    start = body.index(f"table {family} {firewall.table} {{")
    text = body[start : body.index("\n}\n", start) + 3]
    text = text.replace(firewall.digest, digest or firewall.digest)
    if drop_rule:
        text = "\n".join(line for line in text.splitlines() if line.strip() != drop_rule)
    return text


def test_check_finds_nothing_missing_when_the_tables_are_as_written(monkeypatch):
    firewall = Firewall(subnet=SUBNET)
    monkeypatch.setattr(firewall, "_nft", lambda args, stdin=None: completed(listing(firewall, args[2])))

    assert firewall.check() == []


def test_check_reports_a_flushed_an_outdated_and_a_damaged_table(monkeypatch):
    firewall = Firewall(subnet=SUBNET)
    input_reject = f"ip saddr {SUBNET} reject with icmpx type admin-prohibited"

    def nft(args, stdin=None):
        if args[2] == "bridge":
            return completed(stderr="Error: No such file or directory\nlist table bridge gpgpu_rentals", rc=1)
        return completed(listing(firewall, "inet", drop_rule=input_reject))

    monkeypatch.setattr(firewall, "_nft", nft)
    assert firewall.check() == [
        "chain input of table inet gpgpu_rentals is missing rules",
        "the nftables table bridge gpgpu_rentals is missing",
    ]
    monkeypatch.setattr(
        firewall, "_nft", lambda args, stdin=None: completed(listing(firewall, args[2], digest="0" * 16))
    )
    assert firewall.check() == [
        "the nftables table inet gpgpu_rentals holds other rules than this agent's",
        "the nftables table bridge gpgpu_rentals holds other rules than this agent's",
    ]


def test_without_nft_install_fails_with_a_sentence_and_check_says_so(tmp_path):
    firewall = Firewall(subnet=SUBNET, nft_bin=str(tmp_path / "no-nft"))

    with pytest.raises(FirewallError, match=r"nftables is not installed .*apt-get install nftables"):
        firewall.install()
    assert firewall.check() == [
        f"nftables is not installed (no `{tmp_path / 'no-nft'}` command); install it (apt-get install nftables)"
    ]


def test_an_agent_that_is_not_root_is_told_so(tmp_path):
    nft = tmp_path / "nft"
    nft.write_text("#!/bin/sh\necho 'Error: Could not process rule: Operation not permitted' >&2\nexit 1\n")
    nft.chmod(0o755)

    with pytest.raises(FirewallError, match="it must run as root"):
        Firewall(subnet=SUBNET, nft_bin=str(nft)).install()


# --- the real kernel --------------------------------------------------------------------------


@pytest.fixture
def real_nft():
    if os.geteuid() != 0 or shutil.which("nft") is None:
        if os.environ.get("GPGPU_REQUIRE_CONTAINER_ENGINE"):
            pytest.fail("root and nft are required here (GPGPU_REQUIRE_CONTAINER_ENGINE)")
        pytest.skip("needs root and nft (nftables)")
    firewalls: list[Firewall] = []

    def make(**kwargs) -> Firewall:
        firewall = Firewall(subnet="10.213.247.0/24", table="gpgpu_test_fw", **kwargs)
        firewalls.append(firewall)
        return firewall

    yield make
    for firewall in firewalls:
        firewall.remove()


@pytest.mark.parametrize("kwargs", [{}, {"bridge": "podman9"}, {"dns_servers": ["10.255.255.53", "8.8.8.8"]}])
def test_the_kernel_takes_the_rules_and_check_sees_them_whole(real_nft, kwargs):
    firewall = real_nft(**kwargs)

    firewall.install()
    firewall.install()  # idempotent

    assert firewall.check() == []


def test_a_deleted_rule_is_noticed_and_install_puts_it_back(real_nft):
    firewall = real_nft()
    firewall.install()
    listed = subprocess.run(  # noqa: S603
        [NFT, "-a", "list", "chain", "inet", "gpgpu_test_fw", "input"], capture_output=True, text=True, check=True
    ).stdout
    handle = re.search(r"reject with icmpx admin-prohibited # handle (\d+)", listed).group(1)
    subprocess.run([NFT, "delete", "rule", "inet", "gpgpu_test_fw", "input", "handle", handle], check=True)  # noqa: S603

    assert firewall.check() == ["chain input of table inet gpgpu_test_fw is missing rules"]
    firewall.install()
    assert firewall.check() == []


def test_remove_takes_both_tables_and_is_harmless_twice(real_nft):
    firewall = real_nft()
    firewall.install()

    firewall.remove()
    firewall.remove()

    assert firewall.check() == [
        "the nftables table inet gpgpu_test_fw is missing",
        "the nftables table bridge gpgpu_test_fw is missing",
    ]
    assert firewall_module.TABLE == "gpgpu_rentals"  # the real agent's tables were never touched
