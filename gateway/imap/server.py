"""Listening, connections and command dispatch: where errors become IMAP replies."""

from __future__ import annotations

import asyncio
import logging
import ssl
from argparse import Namespace
from contextlib import AsyncExitStack, closing

from proxyprotocol.reader import ProxyProtocolReader
from proxyprotocol.sock import SocketInfo
from proxyprotocol.version import ProxyProtocolVersion
from pymap.concurrent import Subsystem
from pymap.config import BackendCapability, IMAPConfig
from pymap.context import connection_exit
from pymap.exceptions import ResponseError
from pymap.imap import IMAPConnection, IMAPServer
from pymap.imap.state import ConnectionState
from pymap.parsing import Params
from pymap.parsing.command import Command
from pymap.parsing.command.nonauth import AuthenticateCommand, LoginCommand
from pymap.parsing.commands import Commands, InvalidCommand
from pymap.parsing.exceptions import NotParseable
from pymap.parsing.response import (
    CommandResponse,
    Response,
    ResponseCode,
    ResponseNo,
    ResponseOk,
)
from pymap.parsing.specials import Tag
from pysasl.creds.server import ServerCredentials
from pysasl.hashing import BuiltinHash

from gateway.imap.hub import Hub
from gateway.imap.login import Login, client_address
from gateway.replies import ImapReply, imap_reply, unexpected_imap_reply
from gateway.throttle import LoginThrottle
from onionpost.config import GatewayConfig
from onionpost.errors import OnionpostError
from onionpost.store.accounts import AccountStore
from onionpost.store.mailbox import MailboxStore

log = logging.getLogger(__name__)

GREETING = b"onionpost IMAP gateway ready."


class ImapServer:
    """A running IMAP server; ``port`` is the one actually bound (useful with port 0)."""

    def __init__(self, server: asyncio.Server, hub: Hub) -> None:
        self._server = server
        self._hub = hub
        self.port: int = server.sockets[0].getsockname()[1]
        self.host: str = server.sockets[0].getsockname()[0]

    def close(self) -> None:
        """Stop accepting connections and end the open sessions."""
        self._server.close()
        for writer in list(self._hub.writers):
            writer.close()
        self._hub.close()

    async def wait_closed(self) -> None:
        await self._hub.warmer.stop()
        tasks = list(self._hub.sessions)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=5)
            for task in pending:
                task.cancel()
        await self._server.wait_closed()

    async def stop(self) -> None:
        self.close()
        await self.wait_closed()


async def start_imap(
    cfg: GatewayConfig,
    mailbox: MailboxStore,
    accounts: AccountStore,
    tls: ssl.SSLContext | None,
    throttle: LoginThrottle | None = None,
) -> ImapServer:
    """Listen on ``cfg.listen_host:cfg.imap_port`` (port 0: any free port).

    ``throttle`` is shared with the SMTP server in a running node, so failed logins over
    either protocol slow down both.
    """
    _quiet_protocol_log()
    from gateway.imap import speedups

    speedups.install()
    config = _Config(cfg, tls)
    config.apply_context()
    hub = Hub(mailbox, asyncio.get_running_loop())
    login = Login(config, accounts, mailbox, hub, throttle)
    handler = _Server(login, config, hub)
    reader = ProxyProtocolReader(ProxyProtocolVersion.get(None))
    server = await asyncio.start_server(
        reader.get_callback(handler), host=cfg.listen_host, port=cfg.imap_port
    )
    running = ImapServer(server, hub)
    hub.warmer.start()
    log.info("IMAP gateway listening on %s:%d", running.host, running.port)
    return running


class _ProtocolLineFilter(logging.Filter):
    """pymap logs every protocol line at DEBUG: passwords and decrypted mail. Never keep those."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg not in ("%s -->| %s", "%s <--| %s")


def _quiet_protocol_log() -> None:
    logger = logging.getLogger("pymap.imap")
    if not any(isinstance(f, _ProtocolLineFilter) for f in logger.filters):
        logger.addFilter(_ProtocolLineFilter())


class _Config(IMAPConfig):
    def __init__(self, cfg: GatewayConfig, tls: ssl.SSLContext | None) -> None:
        args = Namespace(passlib_cfg=None, proxy_protocol=None, debug=False, inherited_sockets=None)
        super().__init__(
            args,
            host=cfg.listen_host,
            port=cfg.imap_port,
            ssl_context=tls or ssl.create_default_context(ssl.Purpose.CLIENT_AUTH),
            tls_enabled=tls is not None,
            hash_context=BuiltinHash(),
            cpu_subsystem=Subsystem.for_asyncio(),
            proxy_protocol=ProxyProtocolVersion.get(None),
            reject_dnsbl=False,
            invalid_user_sleep=0,
            max_append_len=cfg.max_message_bytes,
        )
        self.require_tls = cfg.require_tls and tls is not None

    @property
    def backend_capability(self) -> BackendCapability:
        return BackendCapability(
            idle=True, object_id=True, multi_append=True, custom=[b"SPECIAL-USE"]
        )

    @property
    def greeting(self) -> bytes:
        return GREETING  # pymap's default names the host (socket.getfqdn())

    @property
    def commands(self) -> Commands:
        return _Commands()


class _Commands(Commands):
    """A mailbox name in broken modified UTF-7 is a bad command, not a crashed session."""

    def parse(self, buf: memoryview, params: Params) -> tuple[Command, memoryview]:
        try:
            return super().parse(buf, params)
        except UnicodeError:
            try:
                tag, _ = Tag.parse(buf, params)
                params = params.copy(tag=tag.value)
            except NotParseable:
                pass
            return InvalidCommand(params, NotParseable(buf)), buf[0:0]


class _Coalescing:
    """pymap writes a response in many small pieces; hand them to the socket in big ones."""

    FLUSH_AT = 64 * 1024

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._parts: list[bytes] = []
        self._size = 0

    def write(self, data: bytes) -> None:
        self._parts.append(data)
        self._size += len(data)
        if self._size >= self.FLUSH_AT:
            self.flush()

    def flush(self) -> None:
        if self._parts:
            self._writer.write(b"".join(self._parts))
            self._parts.clear()
            self._size = 0


class _Connection(IMAPConnection):
    """pymap's connection, writing each response once, in large pieces.

    pymap renders every response a second time (``bytes(resp)``) for a DEBUG protocol log
    that onionpost drops anyway (:class:`_ProtocolLineFilter`).
    """

    store: MailboxStore | None = None

    async def write_response(self, resp: Response) -> None:
        out = _Coalescing(self.writer)
        try:
            await resp.async_write(out)
            out.flush()
            await self.writer.drain()
        except ConnectionError:
            pass
        finally:
            if self.store is not None:
                self.store.flush_cache()


class _Server(IMAPServer):
    def __init__(self, login: Login, config: _Config, hub: Hub) -> None:
        super().__init__(login, config)
        self._state_login = login
        self._state_config = config
        self._hub = hub

    async def __call__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, sock_info: SocketInfo
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._hub.sessions.add(task)
        self._hub.writers.add(writer)
        peer = writer.get_extra_info("peername")
        client_address.set(str(peer[0]) if isinstance(peer, tuple) and peer else "unknown")
        conn = _Connection(self.commands, self._state_config, reader, writer, sock_info)
        conn.store = self._hub.store
        state = _State(self._state_login, self._state_config)
        try:
            async with AsyncExitStack() as stack:
                connection_exit.set(stack)
                stack.enter_context(closing(conn))
                await conn.run(state)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError) as exc:
            log.debug("IMAP connection ended: %s", exc)
        except Exception:
            log.exception("IMAP session ended by an internal error")
        finally:
            self._hub.writers.discard(writer)
            if task is not None:
                self._hub.sessions.discard(task)


def _no(tag: bytes, reply: ImapReply) -> ResponseNo:
    code = ResponseCode.of(reply.code.encode("ascii")) if reply.code else None
    return ResponseNo(tag, reply.text.encode("ascii"), code)


class _State(ConnectionState):
    """pymap's command dispatch, with onionpost's errors worded for the client."""

    def __init__(self, login: Login, config: _Config) -> None:
        super().__init__(login, config)
        self._require_tls = config.require_tls

    async def do_greeting(self) -> CommandResponse:
        if self._require_tls:
            # pymap would offer plaintext LOGIN to loopback peers; here STARTTLS comes first.
            return ResponseOk(b"*", self.config.greeting, self.capability)
        return await super().do_greeting()

    async def do_command(self, cmd: Command) -> CommandResponse:
        try:
            return await super().do_command(cmd)
        except ResponseError:
            raise
        except OnionpostError as exc:
            return _no(cmd.tag, imap_reply(exc))
        except Exception:
            log.exception("IMAP command %s failed", cmd.command.decode("ascii", "replace"))
            return _no(cmd.tag, unexpected_imap_reply())

    async def do_authenticate(
        self,
        cmd: AuthenticateCommand | LoginCommand,
        creds: ServerCredentials | None,
    ) -> CommandResponse:
        try:
            return await super().do_authenticate(cmd, creds)
        except ResponseError:
            raise
        except OnionpostError as exc:
            return _no(cmd.tag, imap_reply(exc))
