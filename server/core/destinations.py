"""Where the server may send webhooks: https (http only where allowed), never to an address inside the network.

A webhook URL (a job's `webhook_url`, `ALERT_WEBHOOK_URL`) is checked when it is given (422, or a start that fails)
and again at every send, once its host is resolved: every address the host resolves to must be public. Loopback,
private, link-local (cloud metadata services live there), multicast, reserved, unspecified and shared (CGNAT)
addresses are refused, IPv4 and IPv6 alike, an IPv4-mapped IPv6 address judged as the IPv4 address it holds, unless
the host or the address is allowlisted (`WEBHOOK_ALLOWED_HOSTS`: names, addresses or networks). The request then
goes to the address that was checked (pinned: a DNS answer that changes between the check and the connection cannot
steer it elsewhere), with the URL's host as its Host header and TLS server name, and a redirect is never followed:
it is an answer like any other non-2xx one.

Answers and logs show a webhook URL as `public_form(url)`: scheme and host only, since its path or query may hold a
token.
"""

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

import httpx

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
DEFAULT_PORTS = {"http": 80, "https": 443}


class RefusedDestination(ValueError):
    """The URL may not be used as a webhook; the message says why (it never repeats the URL's path or query)."""


def parse_allowlist(text: str) -> tuple[frozenset[str], tuple[IPNetwork, ...]]:
    """WEBHOOK_ALLOWED_HOSTS: host names (compared case-insensitively), addresses and CIDR networks."""
    names: set[str] = set()
    networks: list[IPNetwork] = []
    for entry in filter(None, (part.strip() for part in text.split(","))):
        try:
            networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
        except ValueError:
            if not all(label and len(label) <= 63 for label in entry.rstrip(".").split(".")) or "/" in entry:
                raise ValueError(f"{entry!r} is neither a host name, an address nor a network (CIDR)") from None
            names.add(entry.rstrip(".").lower())
    return frozenset(names), tuple(networks)


def public_form(url: str | None) -> str | None:
    """The URL without its path, query, fragment or credentials: what answers and logs may show."""
    if url is None:
        return None
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return "(unparsable URL)"
    shown = f"[{host}]" if ":" in host else host
    return f"{parts.scheme}://{shown}" + (f":{port}" if port is not None else "")


def internal(address: IPAddress) -> bool:
    """Whether an address is anything but a public unicast one."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return (
        not address.is_global
        or address.is_multicast
        or address.is_reserved
        or address.is_unspecified
        or address.is_loopback
        or address.is_link_local
        or address.is_private
    )


@dataclass(frozen=True)
class Target:
    """A checked URL and the address to connect to."""

    url: str
    host: str
    port: int
    address: str


@dataclass(frozen=True)
class DestinationPolicy:
    allow_http: bool = False
    allowed_names: frozenset[str] = frozenset()
    allowed_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_settings(cls, allow_http: bool, allowed_hosts: str) -> "DestinationPolicy":
        names, networks = parse_allowlist(allowed_hosts)
        return cls(allow_http, names, networks)

    def check(self, url: str) -> tuple[str, int]:
        """The URL's host and port, if its form is acceptable (and, for an address, the address is); else
        `RefusedDestination`. Host names are judged when they are resolved (`resolve`)."""
        try:
            parts = urlsplit(url)
            host, port = parts.hostname, parts.port
        except ValueError as exc:
            raise RefusedDestination(f"not a usable URL: {exc}") from None
        if parts.scheme not in DEFAULT_PORTS:
            raise RefusedDestination("a webhook URL must start with https://")
        if parts.scheme == "http" and not self.allow_http:
            raise RefusedDestination("a webhook URL must use https (http:// needs WEBHOOK_ALLOW_HTTP=true)")
        if not host:
            raise RefusedDestination("a webhook URL needs a host")
        if parts.username is not None or parts.password is not None:
            raise RefusedDestination("a webhook URL must not carry credentials (user:password@)")
        if any(ord(character) < 33 for character in url):
            raise RefusedDestination("a webhook URL must not contain spaces or control characters")
        try:
            # What the sender cannot parse would stay pending forever: refused when it is given.
            httpx.URL(url)
        except httpx.InvalidURL as exc:
            raise RefusedDestination(f"not a usable URL: {exc}") from None
        try:
            address = ipaddress.ip_address(host)
        except ValueError:
            address = None
        if address is not None:
            self._judge(host, [address])
        return host, port or DEFAULT_PORTS[parts.scheme]

    async def resolve(self, url: str) -> Target:
        """Check the URL, resolve its host and check every address; the first address to connect to."""
        host, port = self.check(url)
        try:
            found = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise RefusedDestination(f"its host {host} does not resolve: {exc.strerror or exc}") from None
        # typeshed allows an int here for non-IP families; a host name resolves to IP addresses, given as text.
        addresses = [ipaddress.ip_address(str(entry[4][0]).split("%")[0]) for entry in found]
        if not addresses:
            raise RefusedDestination(f"its host {host} resolves to no address")
        self._judge(host, addresses)
        return Target(url, host, port, str(addresses[0]))

    def _judge(self, host: str, addresses: list[IPAddress]) -> None:
        if host.rstrip(".").lower() in self.allowed_names:
            return
        for address in addresses:
            plain = address.ipv4_mapped if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped else None
            allowed = any(
                address in network or (plain is not None and plain in network) for network in self.allowed_networks
            )
            if internal(address) and not allowed:
                shown = host if str(address) == host.strip("[]") else f"{host} ({address})"
                raise RefusedDestination(
                    f"{shown} is an internal address (loopback, private, link-local, "
                    "multicast or reserved); list it in WEBHOOK_ALLOWED_HOSTS to allow it"
                )
