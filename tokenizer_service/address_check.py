"""Whether a media URL's host may be fetched: every address it resolves to must be globally
routable.

Address rule (SSRF): unless the server allows private media URLs, every address a URL's host
resolves to must be globally routable: private, loopback, link-local (cloud metadata at
169.254.169.254), CGNAT, unspecified, reserved and multicast are refused, also when wrapped in
IPv6 (IPv4-mapped, NAT64, 6to4). The check resolves the host, then httpx resolves it again to
connect: a DNS server the attacker controls may answer a public address to the first query and a
private one to the second (DNS rebinding). We accept that window: it needs an attacker-run DNS
zone with TTL 0 and a racing answer, while the check still stops literal addresses, names of
internal hosts and redirects to them. Closing it means connecting to the checked address itself
(an httpx transport that pins the resolved IP, with the Host header and TLS SNI kept) or
fetching through an egress proxy that enforces the rule; deployments serving untrusted clients
should have egress filtering anyway. Environment proxies are ignored (`trust_env=False`): a
proxy would connect on our behalf and make the local address check meaningless.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def is_public(address: Address) -> bool:
    """Globally routable, and so is any IPv4 address it wraps."""
    if isinstance(address, ipaddress.IPv6Address):
        # IPv4-mapped and NAT64 addresses reach the IPv4 address they embed, and only that one
        # counts (::/8, which holds both, is reserved as a whole). 6to4 must pass both ways.
        embedded = address.ipv4_mapped
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            return is_public(embedded)
        if address.sixtofour is not None and not is_public(address.sixtofour):
            return False
    # is_global alone lets multicast (224/4, ff00::/8) through on Python 3.11.
    return address.is_global and not address.is_multicast and not address.is_reserved


async def host_refusal(host: str, noun: str) -> str | None:
    """Why a `noun` URL with this host may not be fetched (every address it resolves to must
    be public), or None when it may."""
    if not host:
        return f"{noun} URL has no host"
    try:
        addresses: list[Address] = [ipaddress.ip_address(host)]
    except ValueError:
        addresses = await resolve(host)
        if not addresses:
            return f"{noun} URL host {host} could not be resolved"
    for address in addresses:
        if not is_public(address):
            return (
                f"{noun} URL host {host} resolves to a private or local address ({address}); "
                "start the server with --allow-private-media-urls to allow it"
            )
    return None


async def resolve(host: str) -> list[Address]:
    """Every address `host` resolves to (none when it does not resolve)."""
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        infos = []
    # A scope id (fe80::1%eth0) is dropped: it does not change the address's class.
    return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
