"""``onionpost doctor``: what a person can get wrong, checked, each with what to do.

Every check is independent and never raises: a check that cannot run says why.  The probe of
the onion service goes through tor on a circuit of its own (its own SOCKS isolation), so
"reachable" means a stranger's tor could reach it, not that the node can talk to itself.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import socket
import stat
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from onionpost.base.config import Config
from onionpost.core.address import Address
from onionpost.core.errors import OnionpostError
from onionpost.core.quota import short_of_disk
from onionpost.device.joining import inbox_dialer, running_status
from onionpost.net.client import InboxClient
from onionpost.net.tor.process import preflight
from onionpost.store.keystore import AccountFiles, KeyStore

MiB = 1 << 20
_SKEW = re.compile(r"clock (?:skew|is .* (?:behind|ahead))|Our clock is", re.IGNORECASE)


@dataclass(frozen=True)
class Finding:
    check: str
    ok: bool
    detail: str
    fix: str = ""


async def _tor(config: Config) -> Finding:
    if config.tor.mode == "off":
        return Finding("tor", True, "off in the configuration (only local delivery)")
    try:
        await preflight(config.tor)
    except OnionpostError as exc:
        return Finding("tor", False, str(exc), "sudo apt-get install tor (Debian 12 or newer)")
    return Finding("tor", True, f"{config.tor.mode} mode; the tor program is present and recent")


async def _onion(config: Config, info: dict[str, object] | None) -> Finding:
    keys = KeyStore(config.data_dir)
    if not keys.has_server():
        return Finding("onion service", True, "this machine runs no inbox (its inbox is elsewhere)")
    if config.tor.mode == "off":
        return Finding("onion service", True, "tor is off: no onion service")
    if info is None:
        return Finding("onion service", False, "the node is not running", "start it: onionpost run")
    tor = info.get("tor")
    if not isinstance(tor, dict) or not tor.get("published"):
        return Finding(
            "onion service",
            False,
            "not published yet",
            "wait for tor to connect (onionpost status shows its progress); check the network",
        )
    onion = Address.for_key("x", keys.load_server().onion_pk).onion
    try:
        async with asyncio.timeout(150), inbox_dialer(config, say=lambda _: None) as dialer:
            client = InboxClient(
                dialer, onion, port=config.tor.onion_port, isolation="doctor", timeout=120
            )
            ok = await client.health()
    except (OnionpostError, TimeoutError) as exc:
        return Finding(
            "onion service",
            False,
            f"published, but not reachable through tor: {exc}",
            "wait a few minutes and run doctor again; if it persists, restart the node",
        )
    return Finding("onion service", ok, f"{onion}.onion answers through a separate circuit")


def _ports(config: Config, info: dict[str, object] | None) -> Finding:
    gw = config.gateway
    wanted = {"smtp": gw.smtp_port, "imap": gw.imap_port, "autoconfig": gw.autoconfig_port}
    ours = info.get("gateway") if info else None
    busy = []
    for name, port in wanted.items():
        if port == 0 or (isinstance(ours, dict) and ours.get(name) == port):
            continue
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((gw.listen_host, port))
            except OSError:
                busy.append(f"{name} {port}")
    if not AccountFiles(KeyStore(config.data_dir)).users():
        return Finding("ports", True, "no mail-client gateway on this machine (inbox only)")
    if busy and info is None:
        return Finding(
            "ports",
            False,
            f"in use by another program: {', '.join(busy)}",
            "stop that program, or choose other ports in [gateway] of onionpost.toml",
        )
    return Finding("ports", True, ", ".join(f"{k} {v}" for k, v in wanted.items()))


def _lan(config: Config) -> Finding:
    """LAN access: off is fine; on, the LAN certificate must name this machine as it is now."""
    from gateway.lan import certificate_gaps, tls_names
    from gateway.tls import lan_ca_fits

    if not config.gateway.lan:
        return Finding("LAN access", True, "off: the gateway listens on 127.0.0.1 only")
    tls_dir = config.data_dir / "tls"
    names = tls_names()
    detail = f"ON: IMAP and SMTP reachable from the LAN as {names.describe() or '(no names)'}"
    if names.unnamed:
        detail += f"; not in the certificate: {', '.join(map(str, names.unnamed))} (internet)"
    if not lan_ca_fits(tls_dir, names.dns):
        return Finding(
            "LAN access",
            False,
            f"{detail}; the LAN CA was made for another host name",
            "restart the node: it makes a new LAN CA, which the other computers must import "
            "again (onionpost lan shows where it is)",
        )
    gaps = certificate_gaps(tls_dir, names)
    if gaps:
        return Finding(
            "LAN access",
            False,
            f"{detail}; the LAN certificate does not cover {', '.join(gaps)}",
            "restart the node: it reissues the certificate (same LAN CA) at start",
        )
    return Finding("LAN access", True, detail)


def _mailbox(config: Config, info: dict[str, object] | None) -> Finding:
    """The private Dovecot: installed, running, taking the mail the node files."""
    from gateway.dovecot import find_installation

    if not AccountFiles(KeyStore(config.data_dir)).users():
        return Finding("mailbox", True, "no mailbox on this machine (inbox only)")
    try:
        inst = find_installation()
    except OnionpostError as exc:
        return Finding("mailbox", False, str(exc), "sudo scripts/system-deps.sh run (or make run)")
    where = f"Dovecot {inst.version_text.split()[0]}"
    if info is None:
        return Finding("mailbox", True, f"{where} installed; the node is not running")
    server = info.get("mail_server")
    status = server.get("status") if isinstance(server, dict) else None
    waiting = info.get("filing")
    if status != "running":
        return Finding(
            "mailbox",
            False,
            f"{where} is {status or 'not started'}",
            f"see {config.data_dir / 'dovecot' / 'dovecot.log'} and the node's log; mail "
            "waits in the filing queue meanwhile, nothing is lost",
        )
    if isinstance(waiting, int) and waiting:
        return Finding(
            "mailbox",
            True,
            f"{where} running; {waiting} message(s) waiting to be filed (a Sent copy waits a "
            "minute for the mail client's own)",
        )
    return Finding("mailbox", True, f"{where} running")


_SECRETS = re.compile(r"(\.key|\.db|^account|^device-list|^passwd)$")


def _permissions(data_dir: Path) -> Finding:
    """Directories must keep others out; secrets must be the owner's alone.  Other files
    (tor's and the node's logs) are private as long as their directories are."""
    loose = []
    for path in [data_dir, *data_dir.rglob("*")]:
        try:
            st = path.lstat()
        except OSError:
            continue
        mode = stat.S_IMODE(st.st_mode)
        if stat.S_ISDIR(st.st_mode):
            if mode & 0o027:  # others may enter or list, or the group may write
                loose.append(f"{path} ({oct(mode)})")
        elif stat.S_ISREG(st.st_mode) and _SECRETS.search(path.name) and mode & 0o077:
            loose.append(f"{path} ({oct(mode)})")
        if st.st_uid != os.geteuid():
            loose.append(f"{path} belongs to another user")
        if len(loose) > 5:
            break
    if loose:
        return Finding(
            "permissions",
            False,
            "; ".join(loose[:5]),
            f"chmod -R go-rwx {data_dir} (and chown it to the user that runs the node)",
        )
    return Finding("permissions", True, "keys and databases are readable by this user only")


def _clock(data_dir: Path) -> Finding:
    log = data_dir / "tor" / "notice.log"
    try:
        tail = log.read_text(errors="replace")[-200_000:]
    except OSError:
        return Finding("clock", True, "no tor log yet to compare with")
    hits = [line for line in tail.splitlines() if _SKEW.search(line)]
    if hits:
        return Finding(
            "clock",
            False,
            "tor reports a wrong system clock: " + hits[-1][-160:],
            "set the clock right (sudo timedatectl set-ntp true); tor and signatures need it",
        )
    return Finding("clock", True, "tor reports no clock skew")


def _disk(data_dir: Path, min_free_mib: int) -> Finding:
    free_bytes = shutil.disk_usage(data_dir).free
    free = free_bytes // MiB
    # The node's own rule (Inbox.accept, Submissions): short even for a message of no size.
    if short_of_disk(free=free_bytes, incoming=0, reserve=min_free_mib * MiB):
        return Finding(
            "disk",
            False,
            f"only {free} MiB free: new mail is refused until {min_free_mib} MiB are free",
            "free disk space now: senders keep retrying, but only for the messages' lifetime",
        )
    if free < max(1024, 2 * min_free_mib):
        return Finding("disk", False, f"{free} MiB free", "free some disk space soon")
    return Finding("disk", True, f"{free // 1024} GiB free")


def _nodes(data_dir: Path) -> Finding:
    me = str(data_dir.resolve())
    pids = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in argv]
        if "run" in words and any("onionpost" in w for w in words[:3]):
            env_home = ""
            try:
                env = (proc / "environ").read_bytes().split(b"\0")
                env_home = next(
                    (e[15:].decode() for e in env if e.startswith(b"ONIONPOST_HOME=")), ""
                )
            except OSError:
                pass
            dirs = [words[i + 1] for i, w in enumerate(words[:-1]) if w == "--data-dir"]
            target = dirs[0] if dirs else env_home
            if target and str(Path(target).resolve()) == me:
                pids.append(proc.name)
    # a node's child between fork and exec still shows the node's command line
    pids = [p for p in pids if _parent(p) not in pids]
    if len(pids) > 1:
        return Finding(
            "one node",
            False,
            f"{len(pids)} nodes run on this data directory (pids {', '.join(pids)})",
            "stop all but one (kill PID); two nodes on one directory fight over the queue",
        )
    return Finding("one node", True, f"{len(pids)} node running on this data directory")


def _parent(pid: str) -> str:
    try:
        stat_line = (Path("/proc") / pid / "stat").read_text()
    except OSError:
        return ""
    return stat_line.rsplit(")", 1)[-1].split()[1]


async def examine(config: Config) -> list[Finding]:
    data_dir = config.data_dir
    keys = KeyStore(data_dir)
    if not keys.has_server() and not AccountFiles(keys).users():
        return [
            Finding(
                "set up",
                False,
                f"{data_dir} holds no onionpost identity",
                "onionpost init (or init --invite CODE / --join CODE)",
            )
        ]
    info = running_status(config.data_dir)

    async def now(finding: Callable[[], Finding]) -> Finding:
        return finding()

    checks: list[Callable[[], Awaitable[Finding]]] = [
        lambda: _tor(config),
        lambda: _onion(config, info),
        lambda: now(lambda: _ports(config, info)),
        lambda: now(lambda: _mailbox(config, info)),
        lambda: now(lambda: _lan(config)),
        lambda: now(lambda: _permissions(data_dir)),
        lambda: now(lambda: _clock(data_dir)),
        lambda: now(lambda: _disk(data_dir, config.min_free_mib)),
        lambda: now(lambda: _nodes(data_dir)),
    ]
    found = []
    for check in checks:
        try:
            found.append(await check())
        except Exception as exc:
            found.append(Finding("check", False, f"a check could not run: {exc}"))
    return found
