"""The mail-client gateway as part of a running node: IMAP, SMTP submission, autoconfig.

:func:`start_gateway` is a node *extension* (``Node(extensions=(start_gateway,))``): the node
calls it once its devices run and awaits the returned function on shutdown.  It shares the
node's event loop, its device database and its submission queue, so a message a client sends
is durably queued before the client hears 250, and mail the node files shows up in IDLE at once.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import Protocol

from gateway.autoconfig import start_autoconfig
from gateway.imap import start_imap
from gateway.lan import describe, tls_names
from gateway.smtp import start_smtp
from gateway.throttle import LoginThrottle
from gateway.tls import ensure_tls, lan_server_context, server_context
from onionpost.config import Config
from onionpost.device import Device
from onionpost.errors import ListenError
from onionpost.store.accounts import AccountStore
from onionpost.store.db import Database
from onionpost.store.mailbox import MailboxStore
from onionpost.submission import Submissions

log = logging.getLogger(__name__)


class GatewayHost(Protocol):
    """What the gateway needs from the node that runs it."""

    config: Config
    devices: dict[str, Device]

    @property
    def mailbox(self) -> MailboxStore | None: ...

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


async def start_gateway(node: GatewayHost) -> Callable[[], Awaitable[None]]:
    cfg = node.config.gateway
    if node.mailbox is None or node.submissions is None or node.device_db is None:
        log.info("no local users: the mail-client gateway is not started")

        async def nothing() -> None:
            return None

        return nothing
    accounts = AccountStore(node.device_db)
    tls_dir = node.config.data_dir / "tls"
    ensure_tls(tls_dir)
    context = server_context(tls_dir)
    lan_context = None
    if cfg.lan:  # LAN access: the LAN certificate, reissued here if the names changed
        names = tls_names()
        lan_context = lan_server_context(tls_dir, names.dns, names.ips)
        log.warning("LAN access: %s; certificate names %s", describe(cfg), names.describe())
    # One for both protocols: a password guesser gains nothing by switching.
    throttle = LoginThrottle()
    with _listening(cfg.listen_host, cfg.imap_port, "[gateway] imap_port"):
        imap = await start_imap(cfg, node.mailbox, accounts, context, throttle)
    try:
        with _listening(cfg.listen_host, cfg.smtp_port, "[gateway] smtp_port"):
            smtp = await start_smtp(
                cfg,
                submit=node.submissions.submit,
                accounts=accounts,
                tls=context,
                throttle=throttle,
                lan_tls=lan_context,
            )
    except BaseException:
        await imap.stop()
        raise
    try:
        with _listening(cfg.listen_host, cfg.autoconfig_port, "[gateway] autoconfig_port"):
            autoconfig = await start_autoconfig(
                cfg,
                lambda: [d.address.domain for d in node.devices.values()],
                imap_port=imap.port,
                smtp_port=smtp.port,
            )
    except BaseException:
        await smtp.close()
        await imap.stop()
        raise
    node.gateway_ports = {"imap": imap.port, "smtp": smtp.port, "autoconfig": autoconfig.port}
    log.info(
        "mail-client gateway: IMAP %s:%d, SMTP %s:%d",
        cfg.listen_host,
        imap.port,
        cfg.listen_host,
        smtp.port,
    )

    async def stop() -> None:
        with contextlib.suppress(Exception):
            await autoconfig.close()
        with contextlib.suppress(Exception):
            await smtp.close()
        with contextlib.suppress(Exception):
            await imap.stop()

    return stop
