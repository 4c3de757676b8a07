"""LAN access: the gateway on every address of this machine, TLS required for every login.

Off by default (``[gateway] lan = false``): the gateway listens on 127.0.0.1 only.
``onionpost lan on`` sets ``lan = true``; at its next start the node then

* listens for IMAP and SMTP on ``0.0.0.0`` (and ``::`` where this machine has IPv6), so
  loopback keeps working and other computers on the LAN can connect;
* requires TLS for every login, loopback included: SMTP refuses anything but EHLO, STARTTLS,
  NOOP and QUIT from a non-loopback client until STARTTLS (530 5.7.0), and Dovecot runs with
  ``ssl = required``;
* offers a certificate from a separate, constrained LAN CA (:mod:`gateway.tls`) naming this
  machine's host names (``<hostname>``, ``<hostname>.local``, its FQDN) and its LAN
  addresses, reissued at start when they changed.

The autoconfig server stays on loopback: its answer names the node's onion domains.

Addresses are read from ``/proc/net/fib_trie`` (IPv4) and ``/proc/net/if_inet6`` (IPv6), which
every Linux has, with the host name's own addresses as the fallback elsewhere.  No program is
run (only :mod:`gateway.dovecot` does that).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from gateway.tls import LAN_CERT_FILE, IPAddress, certificate_names, nameable
from onionpost.base.config import GatewayConfig

__all__ = [
    "LanNames",
    "certificate_gaps",
    "connect_host",
    "describe",
    "dovecot_listen",
    "ipv6_available",
    "listen_hosts",
    "local_addresses",
    "tls_names",
]

WILDCARD_V4 = "0.0.0.0"  # noqa: S104 - listening everywhere is what LAN access is
WILDCARD_V6 = "::"
_FIB_TRIE = Path("/proc/net/fib_trie")
_IF_INET6 = Path("/proc/net/if_inet6")


def ipv6_available() -> bool:
    """Whether this machine can listen on IPv6 (a kernel booted with ipv6.disable=1 cannot)."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def listen_hosts(cfg: GatewayConfig) -> list[str]:
    """Where the gateway's IMAP and SMTP listen: ``listen_host``, or every address with LAN
    access on (``0.0.0.0`` and, with IPv6, ``::`` as a separate IPv6-only socket)."""
    if not cfg.lan:
        return [cfg.listen_host]
    return [WILDCARD_V4, WILDCARD_V6] if ipv6_available() else [WILDCARD_V4]


def dovecot_listen(cfg: GatewayConfig) -> str:
    """The value for Dovecot's ``listen`` (``gateway.dovecot.Settings.host``)."""
    return ", ".join(listen_hosts(cfg))


def connect_host(host: str) -> str:
    """An address to reach a server listening on ``host`` from this machine (a wildcard or a
    list of them is reached over loopback)."""
    first = host.split(",", maxsplit=1)[0].strip()
    if first in (WILDCARD_V4, "*", ""):
        return "127.0.0.1"
    if first == WILDCARD_V6:
        return "::1"
    return first


@dataclass(frozen=True)
class LanNames:
    """What the LAN certificate should name, and the addresses it cannot."""

    dns: tuple[str, ...]
    ips: tuple[IPAddress, ...]
    unnamed: tuple[IPAddress, ...] = ()  # global (internet) addresses the LAN CA may not sign

    def describe(self) -> str:
        return ", ".join([*self.dns, *(str(a) for a in self.ips)])


def _fib_trie_addresses(text: str) -> list[ipaddress.IPv4Address]:
    """The local IPv4 addresses in ``/proc/net/fib_trie``: a ``|-- a.b.c.d`` line followed by
    ``/32 host LOCAL``."""
    found: list[ipaddress.IPv4Address] = []
    last: str | None = None
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith(("|--", "+--")):
            last = stripped[3:].split()[0] if stripped[3:].split() else None
        elif stripped.startswith("/32 host LOCAL") and last is not None:
            with contextlib.suppress(ValueError):
                address = ipaddress.IPv4Address(last)
                if address not in found:
                    found.append(address)
    return found


def _if_inet6_addresses(text: str) -> list[ipaddress.IPv6Address]:
    """``/proc/net/if_inet6``: 32 hex digits, then ifindex, prefix length, scope, flags, name."""
    found: list[ipaddress.IPv6Address] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 4 and len(fields[0]) == 32:
            with contextlib.suppress(ValueError):
                address = ipaddress.IPv6Address(int(fields[0], 16))
                if address not in found:
                    found.append(address)
    return found


def _resolved(hostname: str) -> list[IPAddress]:
    try:
        infos = socket.getaddrinfo(hostname, None, type=socket.SOCK_STREAM)
    except OSError:
        return []
    out: list[IPAddress] = []
    for info in infos:
        with contextlib.suppress(ValueError):
            out.append(ipaddress.ip_address(str(info[4][0]).split("%")[0]))
    return out


def local_addresses() -> list[IPAddress]:
    """This machine's own addresses, loopback and link-local left out."""
    addresses: list[IPAddress] = []
    for path, parse in ((_FIB_TRIE, _fib_trie_addresses), (_IF_INET6, _if_inet6_addresses)):
        with contextlib.suppress(OSError):
            addresses.extend(parse(path.read_text()))
    if not any(a.version == 4 and not a.is_loopback for a in addresses):
        addresses.extend(_resolved(socket.gethostname()))
    out: list[IPAddress] = []
    for a in addresses:
        if a.is_loopback or a.is_link_local or a.is_unspecified or a.is_multicast:
            continue
        if a not in out:
            out.append(a)
    return out


def _host_names(hostname: str, fqdn: str) -> list[str]:
    names: list[str] = []
    short = hostname.split(".", maxsplit=1)[0]
    for raw in (hostname, f"{short}.local" if short else "", fqdn):
        name = raw.lower().rstrip(".")
        if not name or name == "localhost" or name.startswith("localhost."):
            continue
        if name not in names:
            names.append(name)
    return names


def tls_names(
    *,
    hostname: str | None = None,
    fqdn: str | None = None,
    addresses: Iterable[IPAddress] | None = None,
) -> LanNames:
    """This machine's LAN names: its host name, ``<hostname>.local`` (mDNS), its FQDN, and
    its non-loopback addresses (the arguments are for tests)."""
    hostname = socket.gethostname() if hostname is None else hostname
    fqdn = socket.getfqdn() if fqdn is None else fqdn
    found = local_addresses() if addresses is None else list(addresses)
    named = tuple(sorted((a for a in found if nameable(a)), key=lambda a: (a.version, a)))
    unnamed = tuple(a for a in found if not nameable(a))
    return LanNames(tuple(_host_names(hostname, fqdn)), named, unnamed)


def certificate_gaps(tls_dir: Path, names: LanNames) -> list[str]:
    """The names and addresses of this machine that the LAN certificate in ``tls_dir`` does
    not carry (all of them if there is none yet); empty when it covers everything."""
    dns, ips = certificate_names(tls_dir / LAN_CERT_FILE)
    return [h for h in names.dns if h not in dns] + [str(a) for a in names.ips if a not in ips]


def describe(cfg: GatewayConfig) -> str:
    """One line for ``onionpost status`` and ``onionpost lan``."""
    if not cfg.lan:
        return f"off (IMAP and SMTP on {cfg.listen_host} only)"
    hosts = listen_hosts(cfg)
    where = "/".join(f"[{h}]" if ":" in h else h for h in hosts)
    return (
        f"ON (IMAP {where}:{cfg.imap_port} TLS required, SMTP {where}:{cfg.smtp_port} "
        "STARTTLS required; reachable from other computers)"
    )
