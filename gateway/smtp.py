"""SMTP submission (RFC 6409) for the user's mail client, on 127.0.0.1.

This is the only module that imports aiosmtpd.  Its ``SMTP`` protocol runs through
``loop.create_server`` in an event loop of ours, not in aiosmtpd's ``Controller`` thread.  In a
running node that loop is the SMTP front process's (:mod:`gateway.smtpfront`), on the other
core: the protocol code asks a :class:`Backend` for logins and for the submission, and the
front's backend forwards each to the node, which answers from its :class:`LocalBackend`
(account store, login throttle, :meth:`onionpost.device.submission.Submissions.submit_async`);
only the node writes the database.  :func:`start_smtp` runs both halves in one loop (tests).

What a client may do, and why:

* Log in first (AUTH PLAIN or LOGIN with the per-user gateway password).  On loopback a
  plaintext login is allowed unless ``gateway.require_tls`` says otherwise, because mail
  clients make STARTTLS on 127.0.0.1 a chore; a listener on any other address always
  requires STARTTLS first.  With LAN access on (``gateway.lan``, :mod:`gateway.lan`) the
  server listens on every address; a client that did not connect over loopback gets the LAN
  certificate and must send STARTTLS before anything but EHLO, NOOP and QUIT (``530 5.7.0``),
  so no command of its session travels in clear.  Loopback keeps ``require_tls``.  The
  scrypt check runs in a worker thread so that one login does not stall every other
  session, and costs the same for unknown users.  Failures are logged
  and slow down further logins to that account and from that client, over SMTP and IMAP
  alike (:class:`gateway.throttle.LoginThrottle`); at most five AUTH per connection.
* Send only as itself: MAIL FROM and the From:/Sender: headers must be the address of the
  account that logged in.  Recipients must be onionpost addresses; anything else is refused
  at RCPT with the reason :meth:`Address.parse` gives, so the user reads a sentence in the
  compose window instead of a bounce later.
* The size limit is announced (EHLO SIZE), checked at MAIL FROM, and enforced while DATA
  arrives: past the limit the bytes are dropped as they come in, so memory stays bounded by
  the limit even for a 100 MiB line without a line break (which aiosmtpd 1.4's own DATA
  reader would buffer whole).  The 552 comes after the final dot, as RFC 5321 expects.
* 250 is said only after ``submit`` returned, i.e. once the message is durable and filed in
  Sent.  The node passes ``Submissions.submit_async``: the header parsing and the
  transaction run in the group commit's thread, and concurrent sessions share one commit
  (:mod:`onionpost.base.groupcommit`), so one session's fsync does not stall the others.  Every
  refusal is worded in ``gateway/replies.py``.
* As an MSA may (RFC 6409 §8), a missing Message-ID or Date is added; nothing else in the
  message is touched, and no Received: header is written (it would record the client).

Privacy: the greeting and EHLO say ``onionpost`` rather than the machine's name, the added
Date carries no time zone (``-0000``), and aiosmtpd's own INFO/DEBUG logging, which names
every sender and recipient and echoes command lines, is dropped (:class:`_QuietAiosmtpd`).

aiosmtpd is pinned below 1.5 and this module relies on a few of its internals (``_reader``,
``_writer``, ``_reset_timeout``, ``_timeout_cb``, ``_tls_protocol``,
``_handler_coroutine``, ``_call_handler_hook``); the integration tests exercise each of them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import email.utils
import inspect
import ipaddress
import logging
import re
import secrets
import socket
import ssl
import tempfile
import warnings
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import IO, Any, AnyStr, Final, Protocol

from aiosmtpd.smtp import MISSING, SMTP, AuthResult, Envelope, Session, TLSSetupException

from gateway import replies
from gateway.lan import listen_hosts
from gateway.throttle import LoginThrottle
from onionpost.base.aio import foreground
from onionpost.base.clock import Clock, SystemClock
from onionpost.base.config import GatewayConfig
from onionpost.core.address import Address
from onionpost.core.errors import (
    AddressError,
    ConfigError,
    MessageTooLarge,
    OnionpostError,
    SenderNotAllowed,
)
from onionpost.store.accounts import AccountStore, check_password

__all__ = [
    "Backend",
    "LocalBackend",
    "SMTPGateway",
    "Submit",
    "add_missing_headers",
    "serve_smtp",
    "smtp_service",
    "start_smtp",
]

log = logging.getLogger(__name__)

#: What the gateway hands accepted mail to (``Submissions.submit_async``, or the synchronous
#: ``Submissions.submit``); returns a queue id once the message is durable.
Submit = Callable[[str, list[Address], bytes], int | Awaitable[int]]

#: RFC 5321 §4.5.3.2.7 suggests at least five minutes before a server gives up on a client.
IDLE_TIMEOUT: Final = 300.0
MAX_SESSIONS: Final = 512
MAX_RECIPIENTS: Final = 1000
#: The first failed login's pause; it doubles with each further failure (gateway.throttle).
AUTH_FAILURE_DELAY: Final = 1.0
#: Per connection.  Each accepted command restarts the idle timer, so without a budget a
#: client could hold a session open for ever with NOOPs, or try passwords without end.
_CALL_LIMITS: Final = {
    "AUTH": 5,
    "EHLO": 20,
    "HELO": 20,
    "STARTTLS": 3,
    "NOOP": 100,
    "RSET": 200,
    "HELP": 20,
    "VRFY": 20,
    "*": 20_000,
}
_REFRESH_EVERY: Final = 256 * 1024  # bytes of DATA between idle-timer restarts
_SPOOL_IN_MEMORY: Final = 1 << 20  # DATA beyond this goes to a temporary file as it arrives
_HEADER_SCAN: Final = 1024 * 1024  # where a header block must have ended
_NULL_SENDER = re.compile(r"FROM:\s*<\s*>", re.IGNORECASE)
_NEWLINE = re.compile(rb"\r?\n")
#: ``<local@domain>`` of dot-atoms, the path every mail client sends (RFC 5321 §4.1.2).
_PLAIN_PATH = re.compile(
    r"\s*<([A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)>"
)
_AUTH_REQUIRE_TLS_NOTICE = "auth_required == True but auth_require_tls == False"


class _QuietAiosmtpd(logging.Filter):
    """Keeps aiosmtpd's warnings but not its chatter, nor what its warnings quote.

    At INFO and DEBUG aiosmtpd logs every command line, sender and recipient: who mails
    whom, which onionpost keeps out of its logs.  Its warnings quote command lines (an
    unknown "command" may be a pipelined password), so their string arguments are hidden.
    The notice that AUTH is allowed without TLS is the configured loopback policy.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or record.msg == _AUTH_REQUIRE_TLS_NOTICE:
            return False
        if isinstance(record.args, tuple):
            record.args = tuple(
                "<hidden>" if isinstance(a, str | bytes) else a for a in record.args
            )
        return True


_AIOSMTPD_LOG = logging.getLogger("mail.log")
_LOG_FILTER = _QuietAiosmtpd()


class _Session(Session):
    """aiosmtpd 1.4 logs a deprecation warning each time ``login_data`` is set, which its
    AUTH command does on every successful login; nothing here reads it."""

    #: (user, address) of the login, as the backend answered it (read by ``_own_address``).
    own_address: tuple[str, Address] | None = None

    @property
    def login_data(self) -> Any:  # noqa: ANN401 - aiosmtpd's own type
        return self._login_data

    @login_data.setter
    def login_data(self, value: Any) -> None:  # noqa: ANN401
        self._login_data = value


def _b64(text: str) -> bytes | None:
    if text == "=":  # RFC 4954: an empty initial response
        return b""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _header_fields(message: bytes) -> list[tuple[str, str]]:
    """The (lower-case name, unfolded value) pairs of the header block, tolerating junk."""
    if message.startswith((b"\r\n", b"\n")):
        return []
    end = re.search(rb"\r?\n\r?\n", message[:_HEADER_SCAN])
    block = message[: end.start()] if end else message[:_HEADER_SCAN]
    fields: list[tuple[str, str]] = []
    for raw in _NEWLINE.split(block):
        if raw[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, f"{value} {raw.strip().decode('utf-8', 'replace')}")
            continue
        name_bytes, colon, value_bytes = raw.partition(b":")
        if colon and name_bytes.strip():
            name = name_bytes.strip().decode("latin-1").lower()
            fields.append((name, value_bytes.strip().decode("utf-8", "replace")))
    return fields


def _is_own(address: str, own: Address) -> bool:
    try:
        return Address.parse(address) == own
    except AddressError:
        return False


def _client_address(server: SMTP) -> str:
    """The client's IP address, the key its failed logins are counted under."""
    peer: object = server.session.peer if server.session is not None else None
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer or "unknown")


def _check_author(fields: Iterable[tuple[str, str]], own: Address) -> None:
    """The From: (and any Sender:) header must name the logged-in user and nobody else."""
    fields = list(fields)
    if not any(name == "from" for name, _ in fields):
        raise SenderNotAllowed(
            f"The message has no From: header; it must be from your own address, {own}."
        )
    for header in ("from", "sender"):
        values = [value for name, value in fields if name == header]
        for _display, addr in email.utils.getaddresses(values):
            if not _is_own(addr, own):
                shown = addr or "an address that cannot be read"
                raise SenderNotAllowed(
                    f"The {header.title()}: header must be your own address, {own}; {shown} is not."
                )


def add_missing_headers(
    message: bytes,
    own: Address,
    *,
    now: int,
    token: str,
    fields: Iterable[tuple[str, str]] | None = None,
) -> bytes:
    """Prepend Message-ID and Date if the client sent none (RFC 6409 §8.2, §8.3).

    ``fields``: the message's :func:`_header_fields`, if the caller has them already.

    The Message-ID names the sender's own onion domain, which the From: header already
    shows; the Date is in UTC marked ``-0000`` ("time zone unknown", RFC 5322 §3.3), so it
    does not tell recipients where the sender lives.
    """
    names = {name for name, _ in (_header_fields(message) if fields is None else fields)}
    added = b""
    if "message-id" not in names:
        added += f"Message-ID: <{token}@{own.domain}>\r\n".encode("ascii")
    if "date" not in names:
        added += f"Date: {email.utils.formatdate(now)}\r\n".encode("ascii")
    return added + message


class Backend(Protocol):
    """What the protocol code asks of the node: logins, and the durable submission.

    In one process (:func:`start_smtp`) it is :class:`LocalBackend`; in the SMTP front
    process (:mod:`gateway.smtpfront`) each call is a request over the pair to the node, which
    answers from its own :class:`LocalBackend`.  Only the node holds the database."""

    async def login(self, name: str, password: str, client: str) -> tuple[str, Address] | None:
        """The user and their address if ``name``/``password`` is a login, else None (the
        failure is counted by the throttle, and the call slowed down by it)."""

    async def refused(self, client: str) -> None:
        """A login refused before any check (an authorization id for somebody else)."""

    async def submit(self, user: str, recipients: list[str], message: bytes) -> str:
        """Submit a checked message; the reply line (250 only once it is durable)."""

    def in_data(self) -> contextlib.AbstractContextManager[None]:
        """Held while a client sends DATA and waits for its reply: the node's background work
        yields meanwhile (:class:`onionpost.base.aio.Foreground`)."""


class LocalBackend:
    """:class:`Backend` in the node itself: the account store, the login throttle and
    ``Submissions.submit_async``."""

    def __init__(
        self,
        *,
        submit: Submit,
        accounts: AccountStore,
        throttle: LoginThrottle,
        on_login: Callable[[str, str], Awaitable[None]] | None = None,
    ) -> None:
        self._submit = submit
        self._accounts = accounts
        self._throttle = throttle
        self._on_login = on_login

    async def login(self, name: str, password: str, client: str) -> tuple[str, Address] | None:
        credential = self._accounts.credential(name) if name else None
        account = credential.user if credential else None
        await self._throttle.before_check(account, client)
        # scrypt: tens of milliseconds of CPU, so off the event loop; the same for a
        # missing user (checked against a dummy hash), so timing does not reveal users.
        if await asyncio.to_thread(check_password, credential, password) and credential:
            self._throttle.succeeded(credential.user, client)
            if self._on_login is not None:
                await self._on_login(credential.user, password)
            return credential.user, Address.parse(self._accounts.address(credential.user))
        await self._throttle.failed("smtp", account, client)
        return None

    async def refused(self, client: str) -> None:
        await self._throttle.failed("smtp", None, client)

    def in_data(self) -> contextlib.AbstractContextManager[None]:
        return foreground.busy()

    async def submit(self, user: str, recipients: list[str], message: bytes) -> str:
        # From here to the reply a client waits on us: the node's background work yields.
        with foreground.busy():
            try:
                parsed = [Address.parse(r) for r in recipients]
                queued = self._submit(user, parsed, message)
                del message
                submission = await queued if inspect.isawaitable(queued) else queued
            except OnionpostError as exc:
                log.info("smtp: a message was refused (%s)", exc.code)
                return replies.smtp_reply(exc)
            except Exception:
                log.exception("smtp: submitting a message failed")
                return replies.SMTP_INTERNAL_ERROR
        # DEBUG: one line per message cost ~2 % of the loop under load (the handler's write).
        log.debug("smtp: submission %d queued for %d recipient(s)", submission, len(parsed))
        return replies.smtp_queued(submission)


class _Policy:
    """aiosmtpd's "handler": who may log in, send as whom, to whom, and what happens at DATA.

    aiosmtpd finds mechanisms by the ``auth_`` prefix and hooks by ``handle_``, so no other
    attribute here may start with either.
    """

    def __init__(
        self,
        *,
        backend: Backend,
        max_bytes: int,
        max_recipients: int,
        clock: Clock,
    ) -> None:
        self._backend = backend
        self._max_bytes = max_bytes
        self._max_recipients = max_recipients
        self._clock = clock

    # -- AUTH: our own mechanisms, because aiosmtpd's call a synchronous checker ----------

    async def auth_PLAIN(self, server: SMTP, args: list[str]) -> AuthResult:  # noqa: N802
        if len(args) == 1:
            answer = await server.challenge_auth("")
            if answer is MISSING:  # the client cancelled or sent bad base64; already answered
                return AuthResult(success=False, handled=True)
            blob: bytes | None = answer if isinstance(answer, bytes) else None
        else:
            blob = _b64(args[1])
        if blob is None:
            return AuthResult(success=False, handled=False, message=_BAD_BASE64)
        parts = blob.split(b"\0")
        if len(parts) != 3:
            return AuthResult(success=False, handled=False, message=replies.SMTP_BAD_PLAIN)
        authzid, login, password = parts
        if authzid and authzid != login:  # acting for another user is not offered
            await self._backend.refused(_client_address(server))
            return _AUTH_FAILED
        return await self._check(server, login, password)

    async def auth_LOGIN(self, server: SMTP, args: list[str]) -> AuthResult:  # noqa: N802
        if len(args) == 1:
            answer = await server.challenge_auth("Username:")
            if not isinstance(answer, bytes):
                return AuthResult(success=False, handled=True)
            login = answer
        else:
            decoded = _b64(args[1])
            if decoded is None:
                return AuthResult(success=False, handled=False, message=_BAD_BASE64)
            login = decoded
        password = await server.challenge_auth("Password:")
        if not isinstance(password, bytes):
            return AuthResult(success=False, handled=True)
        return await self._check(server, login, password)

    async def _check(self, server: SMTP, login: bytes, password: bytes) -> AuthResult:
        try:
            name, secret = login.decode("utf-8"), password.decode("utf-8")
        except UnicodeDecodeError:
            name, secret = "", ""
        found = await self._backend.login(name, secret, _client_address(server))
        if found is None:
            return _AUTH_FAILED
        user, own = found
        if isinstance(server.session, _Session):
            server.session.own_address = (user, own)
        return AuthResult(success=True, auth_data=user, message=replies.SMTP_AUTH_OK)

    # -- the envelope ---------------------------------------------------------------------

    async def handle_EHLO(  # noqa: N802
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        """aiosmtpd's list, plus SIZE (aiosmtpd's own SIZE check would word its 552 itself)
        and ENHANCEDSTATUSCODES, minus its HELP keyword."""
        session.host_name = hostname
        keywords = [line[4:] for line in responses[1:] if line[4:] != "HELP"]
        names = [server.hostname, f"SIZE {self._max_bytes}", *keywords, "ENHANCEDSTATUSCODES"]
        return [f"250-{n}" for n in names[:-1]] + [f"250 {names[-1]}"]

    async def handle_MAIL(  # noqa: N802
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        try:
            own = self._own_address(session)
            if not _is_own(address, own):
                raise SenderNotAllowed(
                    f"The sender (MAIL FROM) must be your own address, {own}; {address} is not."
                )
            for option in mail_options:
                key, _, value = option.partition("=")
                if key == "SIZE" and value.isdigit() and int(value) > self._max_bytes:
                    raise MessageTooLarge(
                        f"The message is {int(value)} bytes; this gateway accepts at most "
                        f"{self._max_bytes} bytes per message."
                    )
        except OnionpostError as exc:
            return replies.smtp_reply(exc)
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return replies.SMTP_SENDER_OK

    async def handle_RCPT(  # noqa: N802
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        try:
            recipient = str(Address.parse(address))
        except AddressError as exc:
            return replies.smtp_reply(exc)
        if recipient in envelope.rcpt_tos:
            return replies.SMTP_RECIPIENT_OK
        if len(envelope.rcpt_tos) >= self._max_recipients:
            return replies.smtp_too_many_recipients(self._max_recipients)
        envelope.rcpt_tos.append(recipient)
        envelope.rcpt_options.extend(rcpt_options)
        return replies.SMTP_RECIPIENT_OK

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:  # noqa: N802
        content = envelope.original_content or b""
        # The envelope lets go of the message: from here on the only copy is ``message``.
        envelope.content = envelope.original_content = None
        try:
            own = self._own_address(session)
            fields = _header_fields(content)  # read once, for both
            _check_author(fields, own)
            message = add_missing_headers(
                content, own, now=self._clock.now(), token=secrets.token_hex(16), fields=fields
            )
            del content
        except OnionpostError as exc:
            log.info("smtp: a message was refused (%s)", exc.code)
            return replies.smtp_reply(exc)
        return await self._backend.submit(str(session.auth_data), list(envelope.rcpt_tos), message)

    def in_data(self) -> contextlib.AbstractContextManager[None]:
        """See :meth:`Backend.in_data`."""
        return self._backend.in_data()

    async def handle_exception(self, error: Exception) -> str:
        """Whatever escaped a command: a reply for the client, a log line for the owner."""
        if isinstance(error, TLSSetupException):
            log.info("smtp: a STARTTLS handshake failed: %s", error.__cause__ or error)
            return replies.SMTP_INTERNAL_ERROR  # not sent: aiosmtpd closes the connection
        if isinstance(error, OnionpostError):
            return replies.smtp_reply(error)
        log.error("smtp: a command failed", exc_info=error)
        return replies.SMTP_INTERNAL_ERROR

    def _own_address(self, session: Session) -> Address:
        """The logged-in user's address, as the login found it (MAIL and DATA of every
        transaction need it; looking it up is a database query, in the node)."""
        cached = session.own_address if isinstance(session, _Session) else None
        if cached is None or cached[0] != str(session.auth_data):
            raise OnionpostError("The session's login is not known.")  # aiosmtpd requires AUTH
        return cached[1]


_BAD_BASE64 = replies.smtp_protocol_reply("501 5.5.2 Can't decode base64")
_AUTH_FAILED = AuthResult(success=False, handled=False, message=replies.SMTP_AUTH_FAILED)


class _Connection(SMTP):
    """One client session: aiosmtpd's state machine with our DATA reader and wording."""

    def __init__(
        self,
        policy: _Policy,
        registry: set[_Connection],
        *,
        max_bytes: int,
        idle_timeout: float,
        require_tls: bool,
        tls: ssl.SSLContext | None,
        hostname: str,
        loop: asyncio.AbstractEventLoop,
        lan_tls: ssl.SSLContext | None = None,
    ) -> None:
        with warnings.catch_warnings():
            # Plaintext AUTH on loopback is the configured policy, not an accident.
            warnings.filterwarnings(
                "ignore", message="Requiring AUTH while not requiring TLS", category=UserWarning
            )
            super().__init__(
                policy,
                data_size_limit=None,  # enforced by smtp_DATA and handle_MAIL instead
                enable_SMTPUTF8=False,
                decode_data=False,
                hostname=hostname,
                ident="ESMTP",
                tls_context=tls,
                require_starttls=False,
                timeout=idle_timeout,
                auth_required=True,
                auth_require_tls=require_tls,
                command_call_limit=dict(_CALL_LIMITS),
                loop=loop,
            )
        self._registry = registry
        self._handler = policy
        self._max_bytes = max_bytes
        self._lan_tls = lan_tls
        # Counted from creation: a burst of accepts creates many protocols before any
        # connection_made runs, and the session limit must hold during the burst too.
        registry.add(self)

    def _create_session(self) -> Session:
        return _Session(self.loop)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._original_transport is None and not self._over_loopback(transport):
            # LAN access: the LAN certificate, and STARTTLS before anything else.
            self.tls_context = self._lan_tls
            self.require_starttls = True
            self._auth_require_tls = True
        super().connection_made(transport)

    @staticmethod
    def _over_loopback(transport: asyncio.BaseTransport) -> bool:
        """The client reached a loopback address, from a loopback address."""
        ends = (transport.get_extra_info("sockname"), transport.get_extra_info("peername"))
        return all(isinstance(end, tuple) and end and _is_loopback(str(end[0])) for end in ends)

    def connection_lost(self, error: Exception | None) -> None:
        self._registry.discard(self)
        super().connection_lost(error)

    @property
    def handler_task(self) -> asyncio.Task[None] | None:
        return self._handler_coroutine

    async def push(self, status: AnyStr) -> None:
        if isinstance(status, str):
            await super().push(replies.smtp_protocol_reply(status))
        else:
            await super().push(status)

    def _timeout_cb(self) -> None:
        """Say why before hanging up on an idle client (aiosmtpd just closes)."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if isinstance(transport, asyncio.WriteTransport):
            line = replies.smtp_idle_timeout(self._timeout_duration) + "\r\n"
            with contextlib.suppress(Exception):
                transport.write(line.encode("ascii"))
        log.info("smtp: closed an idle session")
        transport.close()  # connection_lost cleans up, as after aiosmtpd's own timeout

    async def challenge_auth(
        self,
        challenge: str | bytes,
        encode_to_b64: bool = True,
        log_client_response: bool = False,
    ) -> Any:  # noqa: ANN401 - aiosmtpd's private _Missing | bytes
        """aiosmtpd's, but never logging the answer, and refusing an over-long one politely
        (its readline raises ValueError, which would read as an internal error)."""
        try:
            return await super().challenge_auth(challenge, encode_to_b64, False)
        except ValueError:
            await self.push(replies.SMTP_AUTH_TOO_LONG)
            return MISSING

    async def smtp_STARTTLS(self, arg: str) -> None:  # noqa: N802
        if self._tls_protocol is not None:  # aiosmtpd would stack a second TLS layer
            await self.push(replies.SMTP_TLS_ACTIVE)
            return
        await super().smtp_STARTTLS(arg)

    async def smtp_MAIL(self, arg: str | None) -> None:  # noqa: N802
        session = self.session
        if (
            arg is not None
            and session is not None
            and session.host_name
            and session.authenticated
            and _NULL_SENDER.match(arg.strip())
        ):
            refusal = SenderNotAllowed(
                "An empty sender (MAIL FROM:<>) is only for bounces; a message you send must "
                "come from your own address."
            )
            await self.push(replies.smtp_reply(refusal))
            return
        await super().smtp_MAIL(arg)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        """aiosmtpd's, with a fast path for the plain ``<local@domain>`` every mail client
        sends: aiosmtpd defines a ``typing.Protocol`` class and runs the RFC 5322 header
        parser on each MAIL and RCPT, which was ~7 % of the event loop under load.  Anything
        else (quoted local parts, comments, source routes, no brackets) goes to aiosmtpd."""
        match = _PLAIN_PATH.match(arg)
        rest = arg[match.end() :].lstrip() if match else ""
        if match is None or rest.startswith("("):  # a comment: aiosmtpd's parser skips it
            result: tuple[str | None, str | None] = super()._getaddr(arg)
            return result
        addr = match.group(1)
        if self.local_part_limit and len(addr.rpartition("@")[0]) > self.local_part_limit:
            return None, None
        return addr, rest

    async def smtp_DATA(self, arg: str) -> None:  # noqa: N802
        # From here to the reply a client waits on us: the node's background work yields.
        with self._handler.in_data():
            await self._data(arg)

    async def _data(self, arg: str) -> None:
        if await self.check_helo_needed() or await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        content = await self._receive()
        if content is _EOF:
            if self.transport is not None:
                self.transport.close()
            return
        if content is _TOO_LARGE:
            self.envelope = self._create_envelope()
            too_large = MessageTooLarge(
                f"The message is larger than this gateway's limit of {self._max_bytes} bytes, "
                "so it was not sent."
            )
            await self.push(replies.smtp_reply(too_large))
            return
        assert isinstance(content, bytes)
        self.envelope.content = content
        self.envelope.original_content = content
        status = await self._call_handler_hook("DATA")
        self.envelope = self._create_envelope()
        await self.push(status if isinstance(status, str) else replies.SMTP_INTERNAL_ERROR)

    async def _receive(self) -> bytes | object:
        """The message, un-dot-stuffed; ``_TOO_LARGE`` once past the limit; ``_EOF``.

        Memory: the message is spooled to a temporary file as it arrives (in memory up to
        :data:`_SPOOL_IN_MEMORY`) and read back in one piece at the end, so the result is the
        one copy held (a growing buffer would need twice the message, and copying it out a
        third time).  Past the limit, each piece is dropped as it is read.  A line longer than
        the reader's buffer arrives in pieces, which is fine: RFC 5321 §4.5.3.1 asks servers
        not to impose line limits where they can avoid it.
        """
        with tempfile.SpooledTemporaryFile(max_size=_SPOOL_IN_MEMORY) as spool:
            result = await self._spool_data(spool)
            if result is not None:
                return result
            spool.seek(0)
            return spool.read()

    async def _spool_data(self, body: IO[bytes]) -> object | None:
        """Write DATA to ``body``; None when complete, else ``_TOO_LARGE`` or ``_EOF``.

        Read in runs up to the next dot at the start of a line (``\\n.``), not line by line:
        a line-start dot is rare (a dot-stuffed line, and the final ``.``), and one
        ``readuntil`` per line was most of the SMTP front's DATA cost.  Only what the
        message needs is taken from the reader (up to the final dot line), as before."""
        kept = 0  # bytes of the message so far (counted also past the limit)
        unrefreshed = 0
        at_line_start = True  # DATA begins at the start of a line (the command's CRLF)
        dot_taken = False  # the dot that begins this line has been read
        last = b"\n"  # the last byte taken
        while True:
            try:
                piece, dot_taken = await self._data_piece(at_line_start, dot_taken, last)
            except asyncio.IncompleteReadError:
                return _EOF
            if piece is None:
                break  # the final dot line
            if not piece:
                continue  # a line's leading dot, taken off
            at_line_start = piece.endswith(b"\r\n") or (piece == b"\n" and last == b"\r")
            last = piece[-1:]
            if kept <= self._max_bytes:
                kept += len(piece)
                if kept <= self._max_bytes:
                    body.write(piece)
            unrefreshed += len(piece)
            if unrefreshed >= _REFRESH_EVERY:  # a long upload is not an idle client
                unrefreshed = 0
                self._reset_timeout()
        return _TOO_LARGE if kept > self._max_bytes else None

    async def _data_piece(
        self, at_line_start: bool, dot_taken: bool, last: bytes
    ) -> tuple[bytes | None, bool]:
        """The next piece of the message (None: the final dot line was read), and whether
        the next line's leading dot was taken with it.  ``at_line_start``: what was taken
        ends with CRLF; ``dot_taken``: and the dot after it too; ``last``: its last byte."""
        reader = self._reader
        if dot_taken:  # the rest of a line that begins with a dot
            try:
                piece = await reader.readuntil(b"\r\n")
            except asyncio.LimitOverrunError as exc:
                return await reader.readexactly(exc.consumed), False
            return (None if piece == b"\r\n" else piece), False
        if at_line_start:  # its CRLF consumed, so look at the line's first byte
            piece = await reader.readexactly(1)
            return (b"", True) if piece == b"." else (piece, False)
        try:
            piece = await reader.readuntil(b"\n.")
        except asyncio.LimitOverrunError as exc:
            return await reader.readexactly(exc.consumed), False
        if (piece[-3:-2] if len(piece) > 2 else last) == b"\r":
            return piece[:-1], True  # a dot at a line's start: stuffing, not the message's
        return piece, False


_TOO_LARGE = object()
_EOF = object()


class _Busy(asyncio.Protocol):
    """Answers a connection over the session limit and hangs up."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if isinstance(transport, asyncio.WriteTransport):
            transport.write((replies.SMTP_BUSY + "\r\n").encode("ascii"))
        transport.close()


class SMTPGateway:
    """The running submission server: where it listens, and how to stop it."""

    def __init__(self, servers: list[asyncio.Server], registry: set[_Connection]) -> None:
        self._servers = servers
        self._registry = registry
        sockets = [sock for server in servers for sock in server.sockets]
        self.host, self.port = sockets[0].getsockname()[:2]
        #: Every address it listens on (several with LAN access on), all on ``port``.
        self.hosts = [str(sock.getsockname()[0]) for sock in sockets]

    @property
    def sessions(self) -> int:
        """How many client sessions are open now."""
        return len(self._registry)

    async def close(self) -> None:
        """Stop listening, hang up on every session, and wait for their tasks to end."""
        for server in self._servers:
            server.close()
        tasks = [t for conn in list(self._registry) if (t := conn.handler_task) is not None]
        for conn in list(self._registry):
            if conn.transport is not None:
                conn.transport.close()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                for server in self._servers:
                    await server.wait_closed()


def bind_listeners(
    hosts: Sequence[str], port: int, *, backlog: int, listen: bool = True
) -> list[socket.socket]:
    """Listening sockets on every address of ``hosts`` at ``port`` (0: one free port, the same
    on all of them), as ``loop.create_server`` binds them.  The node binds them itself even
    when an SMTP front process serves them, so port 0, a port in use and the choice of
    addresses are decided (and reported) in the node.  ``listen=False`` leaves them bound
    but closed to clients until whoever serves them listens (``create_server`` does): the
    port opens when the SMTP front can answer, not before."""
    sockets: list[socket.socket] = []
    try:
        for host in hosts:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
            for family, kind, proto, _name, address in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((address[0], port, *address[2:]))
                if listen:
                    sock.listen(backlog)
                sock.setblocking(False)
                port = sock.getsockname()[1]
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


@dataclass(frozen=True)
class SMTPPolicy:
    """The settings of the protocol side, which the SMTP front process gets as JSON."""

    require_tls: bool
    max_bytes: int
    max_recipients: int = MAX_RECIPIENTS
    max_sessions: int = MAX_SESSIONS
    idle_timeout: float = IDLE_TIMEOUT
    hostname: str = "onionpost"


def smtp_service(
    cfg: GatewayConfig,
    *,
    tls: ssl.SSLContext | None,
    lan_tls: ssl.SSLContext | None,
    submit: Submit,
    accounts: AccountStore,
    throttle: LoginThrottle | None,
    auth_failure_delay: float,
    on_login: Callable[[str, str], Awaitable[None]] | None,
    **settings: Any,  # noqa: ANN401 - SMTPPolicy's own fields
) -> tuple[SMTPPolicy, LocalBackend]:
    """What serving SMTP in this process and through the SMTP front decide alike.

    The policy ``cfg`` asks for (after checking that the certificates it needs are there),
    and the backend that answers logins and submissions; without a shared ``throttle``, SMTP
    gets its own, starting at ``auth_failure_delay``.
    """
    backend = LocalBackend(
        submit=submit,
        accounts=accounts,
        throttle=throttle or LoginThrottle(base=auth_failure_delay),
        on_login=on_login,
    )
    # With LAN access on, loopback keeps its policy (as Dovecot does: it counts a client on
    # the server's own address as secured); every other client must STARTTLS first.
    require_tls = cfg.require_tls or not _is_loopback(cfg.listen_host)
    if (require_tls or cfg.lan) and tls is None:
        raise ConfigError(
            "The SMTP gateway must require TLS for logins (gateway.require_tls, "
            "gateway.lan, or a listen_host that is not loopback) but has no TLS certificate "
            "to offer."
        )
    if cfg.lan and lan_tls is None:
        raise ConfigError(
            "gateway.lan is on, but the SMTP gateway was given no LAN certificate to offer."
        )
    policy = SMTPPolicy(require_tls=require_tls, max_bytes=cfg.max_message_bytes, **settings)
    return policy, backend


async def serve_smtp(
    sockets: Sequence[socket.socket],
    policy: SMTPPolicy,
    backend: Backend,
    *,
    tls: ssl.SSLContext | None,
    lan_tls: ssl.SSLContext | None,
    clock: Clock,
) -> SMTPGateway:
    """Serve SMTP on listening ``sockets`` (bound by :func:`bind_listeners`; each is
    duplicated, the caller keeps its own) in this loop, asking ``backend``."""
    if _LOG_FILTER not in _AIOSMTPD_LOG.filters:
        _AIOSMTPD_LOG.addFilter(_LOG_FILTER)
    loop = asyncio.get_running_loop()
    handler = _Policy(
        backend=backend,
        max_bytes=policy.max_bytes,
        max_recipients=policy.max_recipients,
        clock=clock,
    )
    registry: set[_Connection] = set()

    def connection() -> asyncio.Protocol:
        if len(registry) >= policy.max_sessions:
            return _Busy()
        return _Connection(
            handler,
            registry,
            max_bytes=policy.max_bytes,
            idle_timeout=policy.idle_timeout,
            require_tls=policy.require_tls,
            tls=tls,
            hostname=policy.hostname,
            loop=loop,
            lan_tls=lan_tls,
        )

    servers: list[asyncio.Server] = []
    try:
        for sock in sockets:
            servers.append(
                await loop.create_server(
                    connection, sock=sock.dup(), backlog=max(128, policy.max_sessions)
                )
            )
    except BaseException:
        for server in servers:
            server.close()
        raise
    return SMTPGateway(servers, registry)


async def start_smtp(
    cfg: GatewayConfig,
    *,
    submit: Submit,
    accounts: AccountStore,
    tls: ssl.SSLContext | None,
    hostname: str = "onionpost",
    clock: Clock | None = None,
    idle_timeout: float = IDLE_TIMEOUT,
    max_sessions: int = MAX_SESSIONS,
    max_recipients: int = MAX_RECIPIENTS,
    auth_failure_delay: float = AUTH_FAILURE_DELAY,
    throttle: LoginThrottle | None = None,
    lan_tls: ssl.SSLContext | None = None,
    hosts: Sequence[str] | None = None,
    on_login: Callable[[str, str], Awaitable[None]] | None = None,
) -> SMTPGateway:
    """Listen on ``cfg.listen_host:cfg.smtp_port`` (port 0: any free port) in this loop.

    ``throttle`` is shared with the IMAP server in a running node; without one, SMTP gets
    its own, starting at ``auth_failure_delay``.  With ``cfg.lan`` it listens on every
    address (:func:`gateway.lan.listen_hosts`; ``hosts`` overrides, for tests) and offers
    ``lan_tls`` (:func:`gateway.tls.lan_server_context`) to clients not on loopback.
    ``on_login(user, password)`` runs after each successful login (the node uses it to give
    Dovecot a hash of a password it does not have yet).
    """
    listen = list(hosts) if hosts is not None else listen_hosts(cfg)
    if not cfg.lan and lan_tls is None:
        lan_tls = tls  # a listen_host that is not loopback: the one certificate there is
    policy, backend = smtp_service(
        cfg,
        tls=tls,
        lan_tls=lan_tls,
        submit=submit,
        accounts=accounts,
        throttle=throttle,
        auth_failure_delay=auth_failure_delay,
        on_login=on_login,
        max_recipients=max_recipients,
        max_sessions=max_sessions,
        idle_timeout=idle_timeout,
        hostname=hostname,
    )
    sockets = bind_listeners(listen, cfg.smtp_port, backlog=max(128, max_sessions))
    try:
        gateway = await serve_smtp(
            sockets, policy, backend, tls=tls, lan_tls=lan_tls, clock=clock or SystemClock()
        )
    finally:
        for sock in sockets:  # the servers listen on duplicates of their own
            sock.close()
    log.info("smtp: submission gateway on %s port %d", ", ".join(gateway.hosts), gateway.port)
    return gateway
