"""The SMTP front: SMTP submission's protocol work in a second process, on the other core.

Why: the node's one event loop was the limit of SMTP submission (docs/performance.md):
aiosmtpd and our handler cost ~2.5 ms of CPU per message on the same loop as all of the
node's background work (sealing, delivery, sync, filing), on a machine with two cores.  The
front runs the protocol (:mod:`gateway.smtp`: greeting, EHLO, STARTTLS, AUTH's exchange,
MAIL, RCPT, reading DATA, the author check, the added Message-ID and Date) in a child
process, and asks the node only what needs the node:

* **a login**: the node checks it against its account store (scrypt in a worker thread), with
  the login throttle it shares with IMAP, and answers with the user and their address;
* **a transaction** (user, recipients, message): the node submits it through the group
  commit (``Submissions.submit_async``) and answers with the reply line, ``250`` only once
  the message is durable.  The front says to the client exactly what the node answered, so
  the rule "250 only after a durable commit" is the node's, as before.

Only the node holds the database; the front holds nothing that must survive it.

**Sockets.**  The node binds the listening sockets itself (:func:`gateway.smtp.bind_listeners`:
port 0, a port in use, 127.0.0.1-only binding and the LAN addresses are decided and reported
in the node) and keeps them open; the front inherits them, and its ``create_server`` is what
calls ``listen()``, so the port accepts connections only once a front can answer.  While a
front restarts, new clients wait in the listen backlog.

**The pair.**  Node and front talk over a Unix socketpair (the front's end is passed as an
inherited descriptor), in frames::

    frame  = length:u32 || kind:u8 || request:u32 || field*     (big-endian)
    field  = length:u32 || bytes

``length`` counts everything after itself; it is checked against a bound before anything is
read (a message's own limit plus :data:`ENVELOPE_ALLOWANCE`), and the fields must fill the
frame exactly.  A frame the node cannot read as a request gets an ``E`` answer naming the
problem; a length out of bounds closes the pair (there is no telling where the next frame
starts), which ends the front and makes the node start a new one.  Kinds, front to node:
``H`` hello (pid), ``L`` login (name, password, client address), ``F`` a login refused before
any check (client address), ``S`` submit (user, message, recipient, ...), ``B`` and ``D`` a
session entered and left DATA (not answered: the node's background work yields meanwhile);
node to front:
``l`` login answer (user and address, or no fields for a failure), ``f`` done, ``s`` the
reply line, ``E`` an error (text).  Requests are answered out of order, by ``request``.
docs/protocol.md has a test vector.

**Lifetime.**  The front exits when its end of the pair reaches EOF, which happens when the
node exits for any reason, SIGKILL included (the kernel closes the node's end; nothing else
holds it: Python's descriptors are not inherited unless passed); on Linux it also asks for
SIGTERM when its parent dies (``PR_SET_PDEATHSIG``).  The node restarts a front that exited,
after the pause :data:`onionpost.core.retry.SMTP_FRONT_RESTART` gives, and stops it at
shutdown by closing the pair (SIGKILL if it has not exited after :data:`STOP_WAIT`).  A
transaction in flight when the front dies is either committed (the client never heard 250,
and may send it again) or not: nothing acknowledged is lost.

``python -m gateway.smtpfront CONFIG`` is the front's entry point; the node starts it with
:func:`start_front`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import json
import logging
import os
import signal
import socket
import struct
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, Final

import gateway
from gateway import replies
from gateway.lan import LanNames, listen_hosts
from gateway.smtp import (
    AUTH_FAILURE_DELAY,
    IDLE_TIMEOUT,
    MAX_RECIPIENTS,
    MAX_SESSIONS,
    LocalBackend,
    SMTPGateway,
    SMTPPolicy,
    Submit,
    bind_listeners,
    serve_smtp,
    smtp_service,
)
from gateway.throttle import LoginThrottle
from gateway.tls import lan_server_context, server_context
from onionpost.base.aio import foreground
from onionpost.base.clock import SystemClock
from onionpost.base.config import GatewayConfig
from onionpost.core.address import Address
from onionpost.core.errors import AddressError, OnionpostError, SMTPFrontError
from onionpost.core.errors import SMTPFrontFrameError as FrameError
from onionpost.core.retry import SMTP_FRONT_RESTART, Backoff
from onionpost.store.accounts import AccountStore

__all__ = [
    "FrameError",
    "SMTPFront",
    "encode_frame",
    "parse_frame",
    "read_frame",
    "serve_pair",
    "start_front",
]

log = logging.getLogger(__name__)

HELLO: Final = ord("H")
LOGIN: Final = ord("L")
REFUSED: Final = ord("F")
SUBMIT: Final = ord("S")
IN_DATA: Final = ord("B")
DATA_DONE: Final = ord("D")
LOGGED_IN: Final = ord("l")
DONE: Final = ord("f")
REPLY: Final = ord("s")
ERROR: Final = ord("E")
_REQUESTS: Final = frozenset({HELLO, LOGIN, REFUSED, SUBMIT, IN_DATA, DATA_DONE})
_ANSWERS: Final = frozenset({LOGGED_IN, DONE, REPLY, ERROR})

_LENGTH = struct.Struct(">I")
_HEAD = struct.Struct(">BI")
#: Room for a transaction's envelope beside its message: up to 1000 recipients of at most
#: 254 characters, the user, the fields' lengths and the headers the front added.
ENVELOPE_ALLOWANCE: Final = 1 << 20
#: A frame that carries no message (logins, answers) is never larger than this.
SMALL_FRAME: Final = 64 * 1024
#: At most this many fields in a frame (a submission's recipients, plus user and message).
MAX_FIELDS: Final = MAX_RECIPIENTS + 8
#: How long a new front may take to say hello (Python's start and aiosmtpd's import take a
#: second or two on a loaded machine; this is only the bound for a front that hangs).
START_TIMEOUT: Final = 60.0
#: How long the node waits for a front to exit once its pair is closed, before SIGKILL.
STOP_WAIT: Final = 3.0
#: A front that ran this long before it exited starts the backoff over.
STABLE_AFTER: Final = 30.0


# -- the framing (pure) ---------------------------------------------------------------------


def encode_frame(kind: int, request: int, fields: Sequence[bytes]) -> bytes:
    """One frame: see the module docstring."""
    body = [_HEAD.pack(kind, request)]
    for field in fields:
        body.append(_LENGTH.pack(len(field)))
        body.append(field)
    payload = b"".join(body)
    return _LENGTH.pack(len(payload)) + payload


def parse_frame(payload: bytes, kinds: frozenset[int]) -> tuple[int, int, list[bytes]]:
    """(kind, request, fields) of a frame's ``payload`` (what follows its length), which must
    be one of ``kinds`` and be filled exactly by its fields."""
    if len(payload) < _HEAD.size:
        raise FrameError(f"A frame of {len(payload)} bytes is shorter than its header.")
    kind, request = _HEAD.unpack_from(payload)
    if kind not in kinds:
        raise FrameError(f"Unknown frame kind {kind}.", request)
    fields: list[bytes] = []
    at = _HEAD.size
    while at < len(payload):
        if len(fields) >= MAX_FIELDS:
            raise FrameError(f"More than {MAX_FIELDS} fields in one frame.", request)
        if len(payload) - at < _LENGTH.size:
            raise FrameError("A field's length is cut off.", request)
        (size,) = _LENGTH.unpack_from(payload, at)
        at += _LENGTH.size
        if size > len(payload) - at:
            raise FrameError("A field runs past the end of its frame.", request)
        fields.append(payload[at : at + size])
        at += size
    return kind, request, fields


async def read_frame(
    reader: asyncio.StreamReader, limit: int, kinds: frozenset[int]
) -> tuple[int, int, list[bytes]]:
    """The next frame; :class:`FrameError` (``request`` None) for a length out of bounds,
    ``asyncio.IncompleteReadError`` at EOF.  Memory is bounded by ``limit``: the length is
    checked before the frame is read."""
    (length,) = _LENGTH.unpack(await reader.readexactly(_LENGTH.size))
    if not _HEAD.size <= length <= limit:
        raise FrameError(f"A frame of {length} bytes is out of bounds (at most {limit}).")
    return parse_frame(await reader.readexactly(length), kinds)


class _FrameWriter:
    """Frames for one end of the pair, written once per turn of the event loop.

    Frames queued in the same turn (the answers of one group commit, the DATA marks of the
    sessions it woke) leave in one ``send`` instead of one each: on this path every system
    call on a loopback socket was a visible share of both processes' CPU.  Order is kept; a
    frame larger than :data:`SMALL_FRAME` (a message) is written at once after what is
    queued, so it is never copied again to be joined."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._queued: list[bytes] = []

    def write(self, frame: bytes) -> bool:
        """Queue ``frame``, or write it at once if it is large; True if it was written."""
        if self._writer.is_closing():
            return False
        if len(frame) > SMALL_FRAME:
            self.flush()
            self._writer.write(frame)
            return True
        if not self._queued:
            asyncio.get_running_loop().call_soon(self.flush)
        self._queued.append(frame)
        return False

    def flush(self) -> None:
        queued, self._queued = self._queued, []
        if queued and not self._writer.is_closing():
            self._writer.write(queued[0] if len(queued) == 1 else b"".join(queued))


def _text(field: bytes) -> str:
    try:
        return field.decode("utf-8")
    except UnicodeDecodeError:
        raise FrameError("A text field is not UTF-8.") from None


# -- the node's side ------------------------------------------------------------------------


class _PairServer:
    """The node's end of one pair: see :func:`serve_pair`."""

    def __init__(self, writer: asyncio.StreamWriter, backend: LocalBackend) -> None:
        self._writer = writer
        self._frames = _FrameWriter(writer)
        self._backend = backend
        self.tasks: set[asyncio.Task[None]] = set()
        # Sessions of the front in DATA: while any is, the node's background work yields (as
        # it does for DATA in one process), so a client's 250 does not wait behind a sealing
        # step.  Clamped at 0: a stray DATA_DONE cannot make it negative.
        self._in_data = 0
        self.busy = contextlib.ExitStack()

    def mark(self, delta: int) -> None:
        before, self._in_data = self._in_data, max(0, self._in_data + delta)
        if before == 0 and self._in_data:
            self.busy.enter_context(foreground.busy())
        elif before and not self._in_data:
            self.busy.close()

    def answer(self, kind: int, request: int, fields: Sequence[bytes]) -> None:
        self._frames.write(encode_frame(kind, request, fields))

    def start(self, kind: int, request: int, fields: list[bytes]) -> None:
        task = asyncio.create_task(self._handle(kind, request, fields), name="smtp-front-request")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _handle(self, kind: int, request: int, fields: list[bytes]) -> None:
        backend = self._backend
        try:
            if kind == LOGIN and len(fields) == 3:
                found = await backend.login(_text(fields[0]), _text(fields[1]), _text(fields[2]))
                out = [] if found is None else [found[0].encode(), str(found[1]).encode()]
                self.answer(LOGGED_IN, request, out)
            elif kind == REFUSED and len(fields) == 1:
                await backend.refused(_text(fields[0]))
                self.answer(DONE, request, [])
            elif kind == SUBMIT and len(fields) >= 3:
                user, message = _text(fields[0]), fields[1]
                recipients = [_text(f) for f in fields[2:]]
                del fields
                line = await backend.submit(user, recipients, message)
                self.answer(REPLY, request, [line.encode()])
            else:
                raise FrameError(f"A request of kind {kind} with the wrong fields.", request)
        except FrameError as exc:
            log.error("smtp front: a bad request: %s", exc)
            self.answer(ERROR, request, [str(exc).encode()])
        except Exception as exc:  # the front answers 451; the node goes on
            log.exception("smtp front: a request failed")
            self.answer(ERROR, request, [type(exc).__name__.encode()])


async def serve_pair(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    backend: LocalBackend,
    limit: int,
) -> None:
    """Answer the front's requests until the pair closes or can no longer be read.

    Each request runs in its own task, so a slow login (the throttle's pause, scrypt) does not
    hold up a submission.  A submission still running when the pair closes completes: it is
    committed, and only its answer is lost (the client never heard 250)."""
    server = _PairServer(writer, backend)
    try:
        while True:
            try:
                kind, request, fields = await read_frame(reader, limit, _REQUESTS)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            except FrameError as exc:
                log.error("smtp front: %s", exc)
                if exc.request is None:
                    return  # the stream cannot be trusted past this: the front is restarted
                server.answer(ERROR, exc.request, [str(exc).encode()])
                continue
            if kind in (IN_DATA, DATA_DONE):  # no answer: the front does not wait for one
                server.mark(1 if kind == IN_DATA else -1)
            elif kind != HELLO:
                server.start(kind, request, fields)
    finally:
        server.busy.close()
        writer.close()


class SMTPFront:
    """The node's handle on its SMTP front: the ports it serves, its process, and stopping.

    It looks like :class:`gateway.smtp.SMTPGateway` to the node (``host``, ``port``,
    ``hosts``, ``close``)."""

    def __init__(
        self,
        sockets: list[socket.socket],
        config: dict[str, Any],
        backend: LocalBackend,
        limit: int,
    ) -> None:
        self._sockets = sockets
        self._config = config
        self._backend = backend
        self._limit = limit
        self.host, self.port = sockets[0].getsockname()[:2]
        self.hosts = [str(sock.getsockname()[0]) for sock in sockets]
        self.restarts = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._pair: asyncio.Task[None] | None = None
        #: The pair's writer, closed by :meth:`_terminate` too: a pair task cancelled before
        #: it first ran (a close right after the start) never reaches its own ``finally``.
        self._pair_writer: asyncio.StreamWriter | None = None
        self._watch: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def pid(self) -> int | None:
        """The front's process id (None while none runs)."""
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    async def start(self) -> None:
        await self._spawn()
        self._watch = asyncio.create_task(self._supervise(), name="smtp-front-supervisor")

    async def _spawn(self) -> None:
        """Start a front and wait for its hello; :class:`SMTPFrontError` if it gives none."""
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            config = dict(
                self._config,
                pair=theirs.fileno(),
                listen=[s.fileno() for s in self._sockets],
                parent=os.getpid(),
                log_level=logging.getLogger().getEffectiveLevel(),
            )
            env = dict(os.environ)
            # The front runs this very code, wherever the node imported it from; -P keeps
            # the working directory off sys.path, so a "gateway" directory there is not it.
            root = str(Path(gateway.__file__).resolve().parent.parent)
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-P",
                "-m",
                "gateway.smtpfront",
                json.dumps(config),
                pass_fds=[theirs.fileno(), *config["listen"]],
                stdin=asyncio.subprocess.DEVNULL,
                env=env,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._proc = proc
        reader, writer = await asyncio.open_unix_connection(sock=ours)
        try:
            async with asyncio.timeout(START_TIMEOUT):
                kind, _request, _fields = await read_frame(reader, SMALL_FRAME, _REQUESTS)
            if kind != HELLO:
                raise FrameError(f"The SMTP front began with a frame of kind {kind}.")
        except BaseException as exc:
            writer.close()  # the front exits at EOF (also when the node is stopping now)
            if not isinstance(
                exc, (TimeoutError, asyncio.IncompleteReadError, ConnectionError, FrameError)
            ):
                raise
            await self._terminate()
            if isinstance(exc, TimeoutError):
                why = f"it was not ready after {START_TIMEOUT:.0f} s"
            elif isinstance(exc, FrameError):
                why = str(exc)
            else:
                why = "it exited before it was ready"
            raise SMTPFrontError(
                f"The SMTP front process did not start ({why}); its error, if any, is in the "
                "log above."
            ) from None
        self._pair_writer = writer
        self._pair = asyncio.create_task(
            serve_pair(reader, writer, self._backend, self._limit), name="smtp-front-pair"
        )
        log.info("smtp: the SMTP front process (pid %d) serves port %d", proc.pid, self.port)

    async def _supervise(self) -> None:
        backoff = Backoff(SMTP_FRONT_RESTART)
        loop = asyncio.get_running_loop()
        while True:
            proc, pair = self._proc, self._pair
            why = "did not start"
            if proc is not None and pair is not None:  # None: the last start failed
                started = loop.time()
                # The front's exit, or a pair the node gave up on (then the front is ended).
                exited = asyncio.ensure_future(proc.wait())
                try:
                    await asyncio.wait({pair, exited}, return_when="FIRST_COMPLETED")
                finally:
                    exited.cancel()
                if self._stop_requested():  # close() may have been called while we waited
                    return
                await self._terminate()
                if loop.time() - started >= STABLE_AFTER:
                    backoff.succeeded()
                why = f"exited with status {proc.returncode}"
            delay = backoff.failed()
            log.error("smtp: the SMTP front process %s; restarting it in %.1f s", why, delay)
            await asyncio.sleep(delay)
            try:
                await self._spawn()
            except (SMTPFrontError, OSError) as exc:
                log.error("smtp: %s", exc)
                continue
            self.restarts += 1

    def _stop_requested(self) -> bool:
        return self._stopping

    async def _terminate(self) -> None:
        """End the current front: close the pair (it exits at EOF), SIGKILL if it lingers."""
        proc, pair, writer = self._proc, self._pair, self._pair_writer
        self._pair = self._pair_writer = None
        if pair is not None:
            pair.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await pair
        if writer is not None:
            writer.close()
        if proc is None:
            return
        try:
            async with asyncio.timeout(STOP_WAIT):
                await proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def close(self) -> None:
        """Stop the front (its sessions end) and stop listening."""
        self._stopping = True
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await self._terminate()
        for sock in self._sockets:
            sock.close()


async def start_front(
    cfg: GatewayConfig,
    *,
    submit: Submit,
    accounts: AccountStore,
    tls_dir: Path,
    lan_names: LanNames | None = None,
    throttle: LoginThrottle | None = None,
    on_login: Callable[[str, str], Awaitable[None]] | None = None,
    hosts: Sequence[str] | None = None,
    max_sessions: int = MAX_SESSIONS,
    max_recipients: int = MAX_RECIPIENTS,
    idle_timeout: float = IDLE_TIMEOUT,
    auth_failure_delay: float = AUTH_FAILURE_DELAY,
) -> SMTPFront:
    """:func:`gateway.smtp.start_smtp`, with the protocol in an SMTP front process.

    The TLS certificates are the ones in ``tls_dir`` (:func:`gateway.tls.server_context`;
    with ``cfg.lan``, the LAN certificate for ``lan_names``), loaded by the front itself."""
    tls = server_context(tls_dir)
    lan_tls = None
    if cfg.lan:
        if lan_names is None:
            raise SMTPFrontError("gateway.lan is on, but the SMTP front was given no LAN names.")
        lan_tls = lan_server_context(tls_dir, lan_names.dns, lan_names.ips)
    policy, backend = smtp_service(
        cfg,
        tls=tls,
        lan_tls=lan_tls if cfg.lan else tls,
        submit=submit,
        accounts=accounts,
        throttle=throttle,
        auth_failure_delay=auth_failure_delay,
        on_login=on_login,
        max_sessions=max_sessions,
        max_recipients=max_recipients,
        idle_timeout=idle_timeout,
    )
    listen = list(hosts) if hosts is not None else listen_hosts(cfg)
    # Bound here, opened to clients by the front (its create_server listens): a client that
    # connects finds a server that answers, also while the node starts.
    sockets = bind_listeners(listen, cfg.smtp_port, backlog=max(128, max_sessions), listen=False)
    config: dict[str, Any] = {
        "policy": asdict(policy),
        "tls_dir": str(tls_dir.resolve()),
        "lan": None
        if lan_names is None or not cfg.lan
        else {"dns": list(lan_names.dns), "ips": [str(a) for a in lan_names.ips]},
    }
    front = SMTPFront(sockets, config, backend, cfg.max_message_bytes + ENVELOPE_ALLOWANCE)
    try:
        await front.start()
    except BaseException:
        await front.close()
        raise
    return front


# -- the front's side -----------------------------------------------------------------------


class _PairBackend:
    """:class:`gateway.smtp.Backend` in the front: each call is a request to the node."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._frames = _FrameWriter(writer)
        self._pending: dict[int, asyncio.Future[tuple[int, list[bytes]]]] = {}
        self._next = 0
        self._closed = False

    async def _send(self, kind: int, request: int, fields: Sequence[bytes]) -> None:
        """Hand one frame to the writer.  Only a frame written at once (a message) waits for
        the socket to take it: that is the back-pressure that bounds the front's memory.  A
        small frame leaves at the end of this turn, and there are at most a few per session
        in flight (each session waits for its answer), so waiting on it would bound nothing."""
        if self._frames.write(encode_frame(kind, request, fields)):
            await self._writer.drain()

    async def _ask(self, kind: int, fields: Sequence[bytes]) -> tuple[int, list[bytes]]:
        if self._closed:
            raise ConnectionError("The node has gone away.")
        self._next = (self._next + 1) & 0xFFFFFFFF
        request = self._next
        future: asyncio.Future[tuple[int, list[bytes]]] = asyncio.get_running_loop().create_future()
        self._pending[request] = future
        try:
            await self._send(kind, request, fields)
            return await future
        finally:
            self._pending.pop(request, None)

    async def hello(self) -> None:
        await self._send(HELLO, 0, [str(os.getpid()).encode()])

    async def run(self) -> None:
        """Read the node's answers until the pair closes (the node exited) or fails."""
        try:
            while True:
                kind, request, fields = await read_frame(self._reader, SMALL_FRAME, _ANSWERS)
                future = self._pending.get(request)
                if future is not None and not future.done():
                    future.set_result((kind, fields))
        except (asyncio.IncompleteReadError, ConnectionError):
            log.info("smtp front: the node closed the pair")
        except FrameError as exc:
            log.error("smtp front: an answer from the node cannot be read: %s", exc)
        finally:
            self._closed = True
            for future in self._pending.values():
                if not future.done():
                    future.set_exception(ConnectionError("The node has gone away."))

    async def login(self, name: str, password: str, client: str) -> tuple[str, Address] | None:
        kind, fields = await self._ask(LOGIN, [name.encode(), password.encode(), client.encode()])
        if kind != LOGGED_IN:
            raise SMTPFrontError("The node could not check the login.")
        if not fields:
            return None
        try:
            return fields[0].decode(), Address.parse(fields[1].decode())
        except (IndexError, UnicodeDecodeError, AddressError):
            raise SMTPFrontError("The node's answer to a login cannot be read.") from None

    async def refused(self, client: str) -> None:
        await self._ask(REFUSED, [client.encode()])

    @contextlib.contextmanager
    def in_data(self) -> Iterator[None]:
        """Tell the node a session is in DATA, and when it is no longer (two small frames,
        written without waiting: the node does not answer them)."""
        self._tell(IN_DATA)
        try:
            yield
        finally:
            self._tell(DATA_DONE)

    def _tell(self, kind: int) -> None:
        if not self._closed:
            self._frames.write(encode_frame(kind, 0, []))

    async def submit(self, user: str, recipients: list[str], message: bytes) -> str:
        fields = [user.encode(), message, *(r.encode() for r in recipients)]
        del message
        try:
            kind, answer = await self._ask(SUBMIT, fields)
        except ConnectionError:
            return replies.SMTP_INTERNAL_ERROR  # never 250 without the node's word
        finally:
            del fields
        if kind == REPLY and len(answer) == 1:
            return answer[0].decode("utf-8", "replace")
        log.error("smtp front: the node did not take a message: %r", answer[:1])
        return replies.SMTP_INTERNAL_ERROR


def _die_with_parent(parent: int) -> None:
    """SIGTERM when the node dies (Linux), on top of the EOF on the pair."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # the node died before the line above
        raise SystemExit(0)


async def _front(config: dict[str, Any]) -> None:
    pair = socket.socket(fileno=int(config["pair"]))
    reader, writer = await asyncio.open_unix_connection(sock=pair)
    backend = _PairBackend(reader, writer)
    tls_dir = Path(config["tls_dir"])
    tls = server_context(tls_dir)
    lan = config.get("lan")
    lan_tls = tls
    if lan is not None:
        ips = [ipaddress.ip_address(a) for a in lan["ips"]]
        lan_tls = lan_server_context(tls_dir, lan["dns"], ips)
    listeners = [socket.socket(fileno=int(fd)) for fd in config["listen"]]
    policy = SMTPPolicy(**config["policy"])
    try:
        smtp: SMTPGateway = await serve_smtp(
            listeners, policy, backend, tls=tls, lan_tls=lan_tls, clock=SystemClock()
        )
    finally:
        for sock in listeners:  # serve_smtp listens on duplicates
            sock.close()
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await backend.hello()
    reading = asyncio.create_task(backend.run())
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({reading, stopping}, return_when="FIRST_COMPLETED")
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(2):
            await smtp.close()
    writer.close()


def main(argv: Sequence[str]) -> int:
    """``python -m gateway.smtpfront CONFIG``: only the node starts this."""
    if len(argv) != 2:
        print("usage: python -m gateway.smtpfront CONFIG (the node starts it)", file=sys.stderr)
        return 2
    config = json.loads(argv[1])
    _die_with_parent(int(config["parent"]))
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C stops the node, which stops us
    logging.basicConfig(
        level=int(config.get("log_level", logging.INFO)),
        format="%(asctime)s %(levelname)s smtp-front %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("mail.log").setLevel(logging.WARNING)
    try:
        asyncio.run(_front(config))
    except OnionpostError as exc:  # e.g. the certificate cannot be loaded: a sentence, no trace
        log.error("smtp front: %s", exc)
        return 1
    except ConnectionError:  # the node went away while this front started: nothing to do
        return 0
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
