"""The mail-client gateway as part of a running node: IMAP, SMTP submission, autoconfig.

:func:`start_gateway` is a node *extension* (``Node(extensions=(start_gateway,))``): the node
calls it once its devices run and awaits the returned function on shutdown.  SMTP submission's
protocol runs in the SMTP front process (:mod:`gateway.smtpfront`), on sockets the node binds;
logins and submissions come back to the node's event loop, device database and submission
queue, so a message a client sends is durably queued before the client hears 250.  IMAP is the
node's private Dovecot (:mod:`gateway.dovecot`), in its own processes: no IMAP client can stall
the node.  The node's filer hands mail to Dovecot's LMTP, and IDLE shows it at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Protocol

from gateway import imapsession
from gateway.autoconfig import start_autoconfig
from gateway.dovecot import (
    DovecotServer,
    Identity,
    Layout,
    PasswdFile,
    Settings,
    choose_identity,
    lmtp_deliver,
)
from gateway.lan import LanNames, describe, dovecot_listen, tls_names
from gateway.mailbox_upgrade import UpgradeReport, upgrade_sqlite_mailbox
from gateway.smtpfront import SMTPFront, start_front
from gateway.throttle import LoginThrottle
from gateway.tls import LocalTLS, ensure_lan_tls, ensure_tls
from onionpost.base.clock import Clock
from onionpost.base.config import Config
from onionpost.core.address import Address
from onionpost.core.errors import FilingDeferred, ListenError, MailServerError, OnionpostError
from onionpost.device.filing import Filer
from onionpost.device.session import Device
from onionpost.device.submission import Submissions
from onionpost.store import DEVICE_COMPONENTS
from onionpost.store.accounts import AccountStore
from onionpost.store.db import Database

log = logging.getLogger(__name__)

#: The first line of every message Dovecot's LMTP files for the node (no envelope sender).
RETURN_PATH = b"Return-Path: <>\r\n"


class GatewayHost(Protocol):
    """What the gateway needs from the node that runs it."""

    config: Config
    clock: Clock
    devices: dict[str, Device]

    filer: Filer | None
    mail_server_status: Callable[[], dict[str, object]] | None

    @property
    def submissions(self) -> Submissions | None: ...

    @property
    def device_db(self) -> Database | None: ...

    gateway_ports: dict[str, int]


@contextlib.contextmanager
def _listening(host: str, port: int, setting: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise ListenError.from_os_error(exc, host, port, setting) from exc


class DovecotSink:
    """The node's filer's view of Dovecot: a kept-open IMAP session per user to file into
    INBOX, to file a message that is to be seen (a Sent copy) and to look into folders,
    LMTP to file into the others.

    Why two paths (docs/performance.md, "Filing through a kept IMAP session"): LMTP reads an
    INBOX's whole uidlist on every delivery (Dovecot's duplicate-GUID check, ~0.35 s at
    100,000 messages) where an IMAP ``APPEND`` reads none; into other folders LMTP costs the
    same as an APPEND and stays, except for a copy to be seen: LMTP cannot set a flag, and
    an ``APPEND (\\Seen)`` saves it flagged where LMTP and a ``STORE`` cost a second look
    and a rename in ``cur/``.  Both answer only after Dovecot's commit.  The looks
    (header searches from a UID floor, ``\\Seen``, UIDNEXT) were a ``doveadm`` process each,
    which opens the folder afresh (seconds at 100,000); the session keeps it open.
    """

    def __init__(self, server: DovecotServer) -> None:
        self.server = server

    def _running(self) -> None:
        if self.server.status != "running":
            raise FilingDeferred(f"Dovecot is {self.server.status}.")

    async def deliver(
        self,
        user: str,
        folder: str,
        message: Path | bytes,
        *,
        header: bytes,
        seen: bool = False,
    ) -> None:
        self._running()
        if folder != "INBOX" and not seen:
            await lmtp_deliver(self.server.lmtp_socket, user, message, folder=folder, header=header)
            return
        # The Return-Path line LMTP adds: the file is the same whichever path saved it.
        prefix = RETURN_PATH + header
        await self.server.imap_sessions.run(
            user,
            lambda s: imapsession.append(s, folder, message, prefix, seen=seen),
            idempotent=False,
        )

    async def holds(
        self, user: str, folder: str, header: str, value: str, *, from_uid: int = 1
    ) -> bool:
        self._running()
        found = await self.server.imap_sessions.run(
            user,
            lambda s: imapsession.search(s, folder, header, value, from_uid),
            idempotent=True,
        )
        return bool(found)

    async def mark_seen(
        self, user: str, folder: str, header: str, value: str, *, from_uid: int = 1
    ) -> None:
        self._running()
        await self.server.imap_sessions.run(
            user,
            lambda s: imapsession.add_seen(s, folder, header, value, from_uid),
            idempotent=True,
        )

    async def next_uid(self, user: str, folder: str) -> int:
        self._running()
        return await self.server.imap_sessions.run(
            user, lambda s: imapsession.uidnext(s, folder), idempotent=True
        )


async def _upgrade_sqlite_mailbox(data_dir: Path, layout: Layout, identity: Identity) -> None:
    """A data directory from the versions that kept mail in SQLite: move it into Dovecot's
    Maildirs before Dovecot starts (at once when there is nothing to move).  On its own
    connection in a thread: a big mailbox takes a while and the node must stay responsive."""

    def run() -> UpgradeReport:
        db = Database(data_dir / "device.db", DEVICE_COMPONENTS)
        try:
            return upgrade_sqlite_mailbox(db, layout, identity)
        finally:
            db.close()

    report = await asyncio.to_thread(run)
    if report.ran:
        log.warning(
            "moved %d message(s) of %d user(s) from the SQLite mailbox into Dovecot in %.0f s; "
            "mail clients see new UIDVALIDITYs and download the folders once",
            report.messages,
            report.users,
            report.seconds,
        )


def _dovecot_learns(
    started: asyncio.Future[DovecotServer],
) -> Callable[[str, str], Awaitable[None]]:
    """A data directory made before the node had Dovecot has no IMAP password hash for its
    users (the gateway keeps scrypt hashes, which Dovecot cannot check).  The first SMTP
    login gives Dovecot its own hash of the password, so IMAP works from then on.  The SMTP
    front answers while Dovecot still starts: a login then waits for it (``started``)."""
    known: set[str] = set()

    async def learn(user: str, password: str) -> None:
        if user in known:
            return
        dovecot = await asyncio.shield(started)
        passwd = PasswdFile(dovecot.layout)
        if user not in await asyncio.to_thread(passwd.users):
            with contextlib.suppress(OnionpostError):
                await dovecot.set_password(user, password)
                log.info("the IMAP login of %s was set from their SMTP login", user)
        known.add(user)

    return learn


def _free_port(host: str) -> int:
    """Port 0 means "any free port" (tests): Dovecot needs a number, so pick one now."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _lan_access(config: Config, tls_dir: Path) -> tuple[LanNames | None, LocalTLS | None]:
    """With LAN access on, the LAN names and certificate (reissued if the names changed)."""
    cfg = config.gateway
    if not cfg.lan:
        return None, None
    names = tls_names()
    lan_tls = ensure_lan_tls(tls_dir, names.dns, names.ips)
    log.warning("LAN access: %s; certificate names %s", describe(cfg), names.describe())
    return names, lan_tls


async def _start_dovecot(
    config: Config, clock: Clock, lan_tls: LocalTLS | None
) -> tuple[DovecotServer, int]:
    """The node's Dovecot, running, and its IMAP port."""
    cfg = config.gateway
    layout = Layout(config.data_dir)
    identity = choose_identity(config.data_dir)
    await _upgrade_sqlite_mailbox(config.data_dir, layout, identity)
    imap_port = cfg.imap_port or _free_port(cfg.listen_host)
    dovecot = DovecotServer(
        layout,
        identity=identity,
        settings=Settings(
            host=dovecot_listen(cfg),
            imap_port=imap_port,
            require_tls=cfg.require_tls or cfg.lan,
            lan_tls=lan_tls,
        ),
        clock=clock,
    )
    with _listening(cfg.listen_host, imap_port, "[gateway] imap_port"):
        await dovecot.start()
    return dovecot, imap_port


async def _start_both(
    mailbox: Awaitable[tuple[DovecotServer, int]],
    front: Awaitable[SMTPFront],
    started: asyncio.Future[DovecotServer],
    filer: Filer,
) -> tuple[DovecotServer, int, SMTPFront]:
    """Dovecot and the SMTP front, started concurrently; both running, or neither.

    Each start is waited for to its end even when the other failed (a start cut short could
    leave a process behind); then whichever did start is stopped and the first error raised.
    """
    tasks = (
        asyncio.ensure_future(mailbox),
        asyncio.ensure_future(front),
    )
    try:
        await asyncio.wait(tasks)
    finally:
        if not all(t.done() for t in tasks):  # cancelled: the node stops while starting
            for t in tasks:
                t.cancel()
            await asyncio.wait(tasks)
        errors = [t.exception() if not t.cancelled() else None for t in tasks]
        failed = any(t.cancelled() for t in tasks) or any(errors)
        if failed:
            if not started.done():  # logins and submissions that wait: the front closes
                started.set_exception(MailServerError("The mail server did not start."))
                started.exception()  # retrieved: nothing to log when no one waited
            mailbox_task, front_task = tasks
            if not mailbox_task.cancelled() and mailbox_task.exception() is None:
                filer.attach(None)
                await mailbox_task.result()[0].stop()
            if not front_task.cancelled() and front_task.exception() is None:
                await front_task.result().close()
    for error in errors:
        if error is not None:
            raise error
    if failed:
        raise asyncio.CancelledError
    dovecot, imap_port = tasks[0].result()
    return dovecot, imap_port, tasks[1].result()


async def start_gateway(node: GatewayHost) -> Callable[[], Awaitable[None]]:
    cfg = node.config.gateway
    if node.filer is None or node.submissions is None or node.device_db is None:
        log.info("no local users: the mail-client gateway is not started")

        async def nothing() -> None:
            return None

        return nothing
    filer = node.filer
    submissions = node.submissions
    accounts = AccountStore(node.device_db, clock=node.clock)
    tls_dir = node.config.data_dir / "tls"
    ensure_tls(tls_dir)
    lan_names, lan_tls = _lan_access(node.config, tls_dir)
    # Dovecot and the SMTP front start at the same time (the front's process start is most of
    # a node's start, ~0.3-0.5 s on a fast machine; Dovecot's ~0.1 s or more).  The front
    # needs nothing of Dovecot but a login's IMAP password (see _dovecot_learns) and the Sent
    # floor below, so a login or submission that comes in before Dovecot is up waits for
    # ``started``.
    started: asyncio.Future[DovecotServer] = asyncio.get_running_loop().create_future()

    async def submit(user: str, recipients: list[Address], message: bytes) -> int:
        await asyncio.shield(started)
        return await submissions.submit_async(user, recipients, message)

    async def mailbox() -> tuple[DovecotServer, int]:
        dovecot, imap_port = await _start_dovecot(node.config, node.clock, lan_tls)
        try:
            sink = DovecotSink(dovecot)
            filer.attach(sink)
            # Sent's UIDNEXT now, before any client's submission goes on (``started``): the
            # floor of the search for the client's own copy of what it sends from here on
            # (onionpost/device/filing.py).
            for user in accounts.users():
                await filer.observe(sink, user, "Sent")
        except BaseException:
            filer.attach(None)
            await dovecot.stop()
            raise
        started.set_result(dovecot)
        return dovecot, imap_port

    async def front() -> SMTPFront:
        with _listening(cfg.listen_host, cfg.smtp_port, "[gateway] smtp_port"):
            # The protocol runs in the SMTP front process; logins and submissions come
            # back here (gateway/smtpfront.py).
            return await start_front(
                cfg,
                submit=submit,
                accounts=accounts,
                tls_dir=tls_dir,
                lan_names=lan_names,
                # One for SMTP logins (Dovecot throttles IMAP logins itself, with its auth
                # penalty).
                throttle=LoginThrottle(clock=node.clock),
                on_login=_dovecot_learns(started),
            )

    dovecot, imap_port, smtp = await _start_both(mailbox(), front(), started, filer)
    missing = sorted(set(accounts.users()) - set(PasswdFile(dovecot.layout).users()))
    if missing:
        log.warning(
            "no IMAP password for %s yet: it is set at their next SMTP login, or now with "
            "`onionpost password USER`",
            ", ".join(missing),
        )
    node.mail_server_status = lambda: {
        "status": dovecot.status,
        "restarts": dovecot.restarts,
        "pid": dovecot.pid,
    }
    try:
        with _listening(cfg.listen_host, cfg.autoconfig_port, "[gateway] autoconfig_port"):
            autoconfig = await start_autoconfig(
                cfg,
                lambda: [d.address.domain for d in node.devices.values()],
                imap_port=imap_port,
                smtp_port=smtp.port,
            )
    except BaseException:
        await smtp.close()
        filer.attach(None)
        await dovecot.stop()
        raise
    node.gateway_ports = {"imap": imap_port, "smtp": smtp.port, "autoconfig": autoconfig.port}
    log.info(
        "mail-client gateway: IMAP (Dovecot) %s:%d, SMTP %s:%d",
        cfg.listen_host,
        imap_port,
        cfg.listen_host,
        smtp.port,
    )

    async def stop() -> None:
        with contextlib.suppress(Exception):
            await autoconfig.close()
        with contextlib.suppress(Exception):
            await smtp.close()
        filer.attach(None)
        with contextlib.suppress(Exception):
            await dovecot.stop()

    return stop
