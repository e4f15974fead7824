"""The nftables rules that keep rentals off the owner's network (issue 7).

A rental may reach the public internet and nothing else: not the owner's LAN, not the cloud
metadata service (169.254.169.254), not this machine, not another rental. The container runner
puts every rental on one engine network (a bridge with a fixed subnet, 10.213.0.0/24 unless
configured) and this module installs, checks and removes the rules that enforce it. They live in
two tables of the agent's own, so nothing else's rules are touched and a flush of them is easy
to see:

``table inet gpgpu_rentals`` (the IP layer), with base chains on the ``forward`` hook (rentals
talking to other machines) and the ``input`` hook (rentals talking to this machine, whatever its
address), at priority ``filter - 10`` so they run before the engines' own filter chains. A
``reject`` or ``drop`` in any base chain is final, so the engines' ``accept`` rules cannot undo
them; the chains' policy is ``accept`` and they never accept anything the engines would refuse.

- forward: traffic from the subnet to a private, shared, link-local, loopback, multicast or
  reserved IPv4 range (``BLOCKED_V4``) or to the subnet itself is rejected (ICMP
  admin-prohibited, so a connection fails at once rather than timing out); a new connection
  from anywhere into the subnet is dropped; public addresses stay reachable (the engine NATs
  them);
- input: traffic from the subnet to any of this machine's addresses is rejected, except DNS
  (TCP and UDP port 53) to ``dns_servers``;
- DNS: ``dns_servers`` (default: the subnet's gateway, where Podman's aardvark-dns answers) may be
  asked on port 53 even when private. Docker's embedded resolver forwards from inside the
  container, so with Docker the runner passes the host's own resolvers (often a private router);
- IPv6: the network is IPv4 only and the runner turns IPv6 off inside each container, so a
  rental has no IPv6 address at all, not even a link-local one; when the bridge's name is known,
  every IPv6 packet from it is dropped all the same (this covers ULA and link-local
  destinations and more), and so is an IPv4 packet from it whose source is not in the subnet
  (rentals have no CAP_NET_RAW to forge one; this is the second lock).

``table bridge gpgpu_rentals``: frames the bridge forwards from one rental to another (which
never reach the IP hooks unless br_netfilter is loaded) are dropped when both ends are in the
subnet. It matches addresses, not the bridge's name, because ``meta ibrname`` needs a kernel
module (CONFIG_NFT_BRIDGE_META) that many kernels lack.

Each table carries a comment with a digest of the whole ruleset: ``check`` compares it and counts
each chain's rules, so a flushed, outdated or half-deleted table is reported (and ``install``
puts it back). ``install`` replaces both tables in one ``nft -f`` transaction: there is no moment
with half a ruleset. Table comments need nftables 0.9.7 or later (Debian 11, Ubuntu 22.04).
"""

from __future__ import annotations

import hashlib
import ipaddress
import logging
import re
import subprocess
from collections.abc import Sequence

from gpgpu_agent.protocols import AgentError

log = logging.getLogger(__name__)

TABLE = "gpgpu_rentals"
COMMENT_PREFIX = "gpgpu-agent ruleset"
# IPv4 ranges a rental may not reach: "this network", RFC 1918, shared address space (CGNAT,
# Tailscale), loopback, link-local (cloud metadata at 169.254.169.254), IETF protocol
# assignments, benchmarking, multicast, reserved and broadcast. The documentation ranges
# (192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24) are not routed on the internet and stay open,
# so tests can play "the internet" with them.
BLOCKED_V4 = (
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "224.0.0.0/4",
    "240.0.0.0/4",
)
BRIDGE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
TABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
REJECT = "reject with icmpx type admin-prohibited"


class FirewallError(AgentError):
    """The rules could not be installed or removed; the sentence says why and what to do."""


class Firewall:
    """The agent's nftables rules for the rentals network ``subnet`` (see the module docstring).

    ``bridge``: the network's bridge interface, when known (the runner tells it with
    ``adopt_network`` once the engine has made the network). ``dns_servers``: IPv4 addresses
    rentals may ask on port 53; None means the subnet's gateway. ``table``: the tables' name
    (tests use their own). Every ``nft`` call has ``timeout_s``.
    """

    def __init__(
        self,
        *,
        subnet: str,
        bridge: str | None = None,
        nft_bin: str = "nft",
        dns_servers: Sequence[str] | None = None,
        table: str = TABLE,
        timeout_s: float = 10.0,
    ):
        try:
            network = ipaddress.ip_network(subnet, strict=True)
        except ValueError as exc:
            raise ValueError(f"subnet must be an IPv4 network such as 10.213.0.0/24, not {subnet!r}") from exc
        if not isinstance(network, ipaddress.IPv4Network) or network.prefixlen > 29:
            raise ValueError(f"subnet must be an IPv4 network of at least 8 addresses, not {subnet!r}")
        if not TABLE_NAME.match(table):
            raise ValueError(f"{table!r} is not an nftables table name")
        self.subnet = network
        self.gateway = next(network.hosts())
        self.nft_bin = nft_bin
        self.table = table
        self.timeout_s = timeout_s
        self.bridge: str | None = None
        self.dns_servers: tuple[ipaddress.IPv4Address, ...] = ()
        self.adopt_network(bridge=bridge, dns_servers=dns_servers)

    def adopt_network(self, *, bridge: str | None, dns_servers: Sequence[str] | None = None) -> None:
        """Set the bridge's name and the resolvers rentals may ask (None: the gateway). This
        changes the expected ruleset: ``check`` reports the installed one as outdated until
        ``install`` runs again."""
        if bridge is not None and not BRIDGE_NAME.match(bridge):
            raise ValueError(f"{bridge!r} is not a network interface name")
        servers = [self.gateway] if dns_servers is None else [ipaddress.ip_address(s) for s in dns_servers]
        ipv4 = [s for s in servers if isinstance(s, ipaddress.IPv4Address)]
        if len(ipv4) != len(servers):
            raise ValueError("dns_servers must be IPv4 addresses")
        self.bridge = bridge
        self.dns_servers = tuple(sorted(set(ipv4)))

    # --- the ruleset ----------------------------------------------------------------------

    def _chains(self) -> dict[str, dict[str, list[str]]]:
        """Family → chain → rules: what ``ruleset`` writes and ``check`` counts."""
        net = str(self.subnet)
        dns = "{ " + ", ".join(str(s) for s in self.dns_servers) + " }" if self.dns_servers else None
        guard: list[str] = []
        if self.bridge:
            guard = [
                f'iifname "{self.bridge}" meta nfproto ipv6 drop',
                f'iifname "{self.bridge}" ip saddr != {net} drop',
            ]
        allow_dns = [f"ip saddr {net} ip daddr {dns} meta l4proto {{ tcp, udp }} th dport 53 accept"] if dns else []
        forward = [
            *guard,
            *allow_dns,
            f"ip saddr {net} ip daddr {net} {REJECT}",
            f"ip saddr {net} ip daddr @blocked4 {REJECT}",
            f"ip daddr {net} ct state new drop",
        ]
        input_ = [*guard, *allow_dns, f"ip saddr {net} {REJECT}"]
        bridge = [f"ip saddr {net} ip daddr {net} drop"]
        return {"inet": {"forward": forward, "input": input_}, "bridge": {"forward": bridge}}

    def _body(self) -> str:
        chains = self._chains()
        lines: list[str] = []
        for family, family_chains in chains.items():
            lines.append(f"table {family} {self.table} {{")
            lines.append("\tcomment @COMMENT@")
            if family == "inet":
                lines.append(_set("blocked4", "ipv4_addr", BLOCKED_V4))
            for name, rules in family_chains.items():
                lines.append(f"\tchain {name} {{")
                lines.append(f"\t\ttype filter hook {name} priority filter - 10; policy accept;")
                lines.extend(f"\t\t{rule}" for rule in rules)
                lines.append("\t}")
            lines.append("}")
        return "\n".join(lines) + "\n"

    @property
    def digest(self) -> str:
        return hashlib.sha256(self._body().encode()).hexdigest()[:16]

    def ruleset(self) -> str:
        """The text ``install`` gives ``nft -f``: both tables replaced in one transaction (each
        is declared first so that deleting it cannot fail on a machine that lacks it)."""
        head = "".join(f"table {f} {self.table}\ndelete table {f} {self.table}\n" for f in ("inet", "bridge"))
        return head + self._body().replace("@COMMENT@", f'"{COMMENT_PREFIX} {self.digest}"')

    # --- install, check, remove -----------------------------------------------------------

    def install(self) -> None:
        """Put the rules in place (idempotent; replaces an outdated or damaged table). Raises
        FirewallError with a sentence when nft is missing or refuses."""
        done = self._nft(["-f", "-"], stdin=self.ruleset())
        if done.returncode != 0:
            raise FirewallError(f"could not install the rentals firewall rules: {_message(done.stderr)}")
        log.info("installed the rentals firewall rules for %s (tables %s)", self.subnet, self.table)

    def check(self) -> list[str]:
        """What is missing or wrong, one sentence each; an empty list when every rule is in
        place. Never raises: nft itself missing or refusing is a problem in the list."""
        problems: list[str] = []
        chains = self._chains()
        for family, family_chains in chains.items():
            try:
                done = self._nft(["list", "table", family, self.table])
            except FirewallError as exc:
                return [str(exc)]
            if done.returncode != 0:
                if "No such file or directory" in done.stderr:
                    problems.append(f"the nftables table {family} {self.table} is missing")
                else:
                    problems.append(f"`nft list table {family} {self.table}` failed: {_message(done.stderr)}")
                continue
            if f'comment "{COMMENT_PREFIX} {self.digest}"' not in done.stdout:
                problems.append(f"the nftables table {family} {self.table} holds other rules than this agent's")
                continue
            listed = _chain_rule_counts(done.stdout)
            for name, rules in family_chains.items():
                if listed.get(name) != len(rules):
                    problems.append(f"chain {name} of table {family} {self.table} is missing rules")
        return problems

    def remove(self) -> None:
        """Delete both tables (nothing else); removing rules that are not there is fine."""
        script = "".join(f"table {f} {self.table}\ndelete table {f} {self.table}\n" for f in ("inet", "bridge"))
        done = self._nft(["-f", "-"], stdin=script)
        if done.returncode != 0:
            raise FirewallError(f"could not remove the rentals firewall rules: {_message(done.stderr)}")

    def _nft(self, args: Sequence[str], *, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        try:
            done = subprocess.run(  # noqa: S603 - argv, no shell
                [self.nft_bin, *args],
                input=stdin,
                stdin=None if stdin is not None else subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=self.timeout_s,
                check=False,
            )
        except FileNotFoundError as exc:
            raise FirewallError(
                f"nftables is not installed (no `{self.nft_bin}` command); install it (apt-get install nftables)"
            ) from exc
        except PermissionError as exc:
            raise FirewallError(f"the agent may not run {self.nft_bin}: {exc.strerror}") from exc
        except subprocess.TimeoutExpired as exc:
            raise FirewallError(f"`nft` did not answer within {self.timeout_s:g} s") from exc
        if done.returncode != 0 and "Operation not permitted" in done.stderr:
            raise FirewallError(
                "the agent may not change the firewall (nft: Operation not permitted); it must run as root"
            )
        return done


def _set(name: str, kind: str, elements: Sequence[str]) -> str:
    return f"\tset {name} {{ type {kind}; flags interval; elements = {{ {', '.join(elements)} }} }}"


def _chain_rule_counts(listing: str) -> dict[str, int]:
    """Rules per chain in ``nft list table`` output (the hook line and blank lines not counted)."""
    counts: dict[str, int] = {}
    chain: str | None = None
    for raw in listing.splitlines():
        line = raw.strip()
        m = re.match(r"^chain (\S+) \{$", line)
        if m:
            chain = m.group(1)
            counts[chain] = 0
        elif chain is not None:
            if line == "}":
                chain = None
            elif line and not line.startswith("type "):
                counts[chain] += 1
    return counts


def _message(stderr: str) -> str:
    text = " ".join(stderr.split())
    return text[-400:] if len(text) > 400 else text or "nft gave no reason"
