"""The private-address guard (SSRF): which URLs moerag may fetch on a user's behalf.

A URL passes when its scheme is http(s) and every address its host resolves to is a public
unicast address, or the host or address is on the administrator's allowlist. Numeric hosts in
any form the resolver accepts (decimal 2130706433, octal 0177.0.0.1, hex 0x7f.1, short 127.1)
are resolved, not parsed, so they are judged by the address they really mean; IPv6 addresses
that embed an IPv4 one (mapped ::ffff:a.b.c.d, 6to4, Teredo, NAT64 64:ff9b::/96) are judged by
that IPv4 address too. The caller connects to the address returned here, never resolving again.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from retrieval.web.errors import RefusedAddressError

IP = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], list[str]]
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_CGNAT = ipaddress.ip_network("100.64.0.0/10")


def resolve(host: str, port: int) -> list[str]:
    """Every address of `host` (numeric forms included), as strings."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise RefusedAddressError(f"cannot resolve host {host!r}: {exc}") from exc
    return list(dict.fromkeys(info[4][0] for info in infos))


def why_refused(ip: IP) -> str | None:
    """The rule an address breaks, in words, or None for a public unicast address."""
    if isinstance(ip, ipaddress.IPv6Address):
        embedded = ip.ipv4_mapped or (ip.sixtofour) or (ip.teredo[1] if ip.teredo else None)
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            inner = why_refused(embedded)
            if inner:
                return f"an IPv6 address embedding {embedded} ({inner})"
        if ip.scope_id:
            return "a scoped (link-local) IPv6 address"
    checks = (
        ("is_unspecified", "an unspecified address"),
        ("is_loopback", "a loopback address"),
        ("is_link_local", "a link-local address (this includes cloud metadata endpoints)"),
        ("is_multicast", "a multicast address"),
    )
    for attr, words in checks:
        if getattr(ip, attr):
            return words
    if isinstance(ip, ipaddress.IPv4Address) and ip == ipaddress.IPv4Address("255.255.255.255"):
        return "the broadcast address"
    if isinstance(ip, ipaddress.IPv4Address) and ip in _CGNAT:
        return "a carrier-grade NAT (shared) address"
    if ip.is_reserved:
        return "a reserved address"
    if ip.is_private:
        return "a private address"
    if not ip.is_global:
        return "not a public address"
    return None


@dataclass(frozen=True)
class Allowlist:
    """Hosts and networks an administrator trusts (MOERAG_WEB_ALLOWLIST: "wiki.corp, 10.2.0.0/16")."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()

    @classmethod
    def parse(cls, entries: str | Sequence[str]) -> Allowlist:
        items = [e.strip() for e in (entries.split(",") if isinstance(entries, str) else entries) if e.strip()]
        hosts, networks = set(), []
        for item in items:
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                hosts.add(item.lower().rstrip("."))
        return cls(frozenset(hosts), tuple(networks))

    def allows_host(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.hosts

    def allows_ip(self, ip: IP) -> bool:
        return any(ip.version == n.version and ip in n for n in self.networks)


@dataclass(frozen=True)
class Target:
    """A URL that passed the guard, and the address to connect to."""

    scheme: str
    host: str
    port: int
    ip: str


def check(url: str, allow: Allowlist = Allowlist(), *, resolver: Resolver = resolve) -> Target:
    """The connection target for `url`, or RefusedAddressError naming the rule that refuses it."""
    try:
        parts = urlsplit(url)
        host, port = parts.hostname, parts.port
    except ValueError as exc:
        raise RefusedAddressError(f"not a valid URL: {exc}") from exc
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise RefusedAddressError(f"scheme {scheme or '(none)'!r} is not http or https")
    if not host:
        raise RefusedAddressError("the URL has no host")
    port = port or (443 if scheme == "https" else 80)
    addresses = resolver(host, port)
    if not addresses:
        raise RefusedAddressError(f"host {host!r} resolves to no address")
    if allow.allows_host(host):
        return Target(scheme, host, port, addresses[0])
    for raw in addresses:
        ip = ipaddress.ip_address(raw.split("%", 1)[0])
        if allow.allows_ip(ip):
            continue
        reason = why_refused(ip)
        if reason:
            literal = host.strip("[]").lower() == str(ip)
            raise RefusedAddressError(f"{ip} is {reason}" if literal else f"{host} resolves to {ip}, {reason}")
    return Target(scheme, host, port, addresses[0])
