"""The node API over HTTP/1.1: what the onion service maps to (aiohttp; its one other importer
is the loopback-only autoconfig server, ``gateway/autoconfig.py``).

Routes (all under ``/v1``)::

    GET  /health                    liveness (tor's self-probe uses it)
    GET  /bundle/{local}            the mailbox's signed key bundle
    POST /deliver                   an L1 envelope from another inbox
    POST /deliveries                several L1 envelopes from another inbox, one answer each
    POST /device/challenge          device login, step 1
    POST /device/login              device login, step 2 (signed challenge) -> session
    GET  /device/pending            long-poll: new sealed mail for this device
    GET  /device/pending-mail       the same, with the envelopes of its first messages
                                    (both may carry ?ack=1,2,... : the ack before the list)
    GET  /device/message/{id}       one spooled L2
    GET  /device/messages           several spooled L2s in one answer (?ids=1,2,...)
    POST /device/ack                drop this device's copies
    POST /device/submit             queue an L1 for delivery by this inbox
    POST /device/submissions        queue several, one answer each
    POST /device/keys               publish rotated keys, device lists, prekeys, bindings
    POST /device/tokens             register (or withdraw) a contact token
    GET  /device/policy             whether strangers may write (with a stamp)
    POST /device/policy             ... set it
    GET  /device/outbox             this mailbox's queue
    POST /device/outbox/{id}/{op}   retry / cancel one queued message
    GET  /device/devices            when each of the mailbox's devices last talked to the inbox
    POST /device/invite             a member mints an invite paid from their allowance
    GET  /device/chain              the member and everyone below them in the invite chain
    POST /device/chain/remove       remove someone below them (invitees removed or re-parented)
    POST /invite/info               an invited machine learns its name and the inbox's key
    POST /invite/redeem             ... and opens its mailbox with keys it made itself
    POST /device/pairing            an existing device offers a pairing slot
    GET  /device/pairing/{slot}     ... and waits there for the new device's sealed request
    POST /device/pairing/{slot}/finish  ... answers it sealed (or aborts)
    GET  /pair/{slot}               the new device reads the offer, later the sealed answer
    POST /pair/{slot}/join          ... and leaves its sealed request

docs/protocol.md §17 specifies each route (tests/unit/test_protocol_doc.py keeps both lists
whole).

The server bounds what a hostile client can make it do: request size (Content-Length
required and capped before any body is read), header size (aiohttp's limits), the time to
send headers and a body (a slow client is disconnected), concurrent connections (over the cap
a connection gets an immediate 503 and is closed) and concurrent deliveries.  It tells a
prober as little as it can: no ``Server`` header, and every answer is a short JSON body in its
own words, never an echo of the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import IO, Any, ClassVar, Generic, TypeVar

from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from onionpost.base.clock import Clock
from onionpost.base.config import InboxConfig
from onionpost.core.chain import Invitees, Member
from onionpost.core.crypto.envelope import Readable
from onionpost.core.crypto.keys import RotationRecord
from onionpost.core.errors import (
    BadRequest,
    DeviceRefused,
    MalformedData,
    MessageTooLarge,
    OnionpostError,
    RequestAborted,
    TemporaryDeliveryError,
    UnknownMailbox,
)
from onionpost.core.queuestate import outbox_states_from_wire, outbox_to_wire
from onionpost.core.wire import (
    DELIVERY_FRAME_HEAD,
    MAX_DELIVERIES_BYTES,
    MAX_FETCH_IDS,
    MAX_HAND_OVERS_BYTES,
    MESSAGE_FRAME_HEAD,
    HandOverFields,
    KeyUpdate,
    first_that_fit,
    hex_field,
    message_frame_head,
    parse_delivery_frames,
    parse_hand_overs,
    parse_request_json,
    pending_list_head,
    refusal,
)
from onionpost.inbox.enrolment import Enrolment
from onionpost.inbox.postoffice import DeliveryResult, HandOver, Inbox, Session, Unwrapped
from onionpost.store.inbox import SpoolEntry
from onionpost.store.outbox import OutboxRow

log = logging.getLogger(__name__)


A = TypeVar("A")
R = TypeVar("R")


class _MalformedRequests(logging.Filter):
    """aiohttp answers a malformed request (oversized header, bad syntax) with a 400 and then
    logs a full traceback at ERROR; a hostile peer could fill the log with them.  The 400 is
    all that is needed."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, HttpProcessingError)


logging.getLogger("aiohttp.server").addFilter(_MalformedRequests())

JSON_LIMIT = 64 * 1024
OUTBOX_IDS_MAX = 200
KEYS_LIMIT = 1 << 20
#: Seconds the devices' acknowledgements wait for a batch of deliveries to carry their
#: deletion before they are committed on their own (the inbox has gone quiet).
ACK_WAIT = 1.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class QuietResponse(web.Response):
    """A response without a ``Server`` header.

    aiohttp names itself and the Python version in every answer; behind an onion address that
    only helps a prober match the node against known bugs.  aiohttp adds the header while
    preparing the headers (and calls the app's ``on_response_prepare`` only for routed
    requests, not for its own error pages), so it is removed right after that step.
    """

    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()
        self.headers.popall(hdrs.SERVER, None)


class _StreamResponse(web.StreamResponse):
    """A streamed response without a ``Server`` header (see :class:`QuietResponse`)."""

    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()
        self.headers.popall(hdrs.SERVER, None)


def _json(status: int, body: dict[str, Any]) -> web.Response:
    return QuietResponse(
        status=status, body=json.dumps(body).encode(), content_type="application/json"
    )


async def _framed(
    request: web.Request, found: list[tuple[int, int, Iterator[bytes]]], prefix: bytes = b""
) -> web.StreamResponse:
    """``prefix``, then each spooled envelope of ``found`` as a ``/v1/device/messages``
    frame (its spool id and length, then its bytes), streamed from the spool."""
    response = _StreamResponse(
        headers={
            "Content-Type": "application/octet-stream",
            "Content-Length": str(
                len(prefix) + sum(MESSAGE_FRAME_HEAD + size for _, size, _ in found)
            ),
        }
    )
    await response.prepare(request)
    if prefix:
        await response.write(prefix)
    for spool_id, size, chunks in found:
        await response.write(message_frame_head(spool_id, size))
        for chunk in chunks:
            await response.write(chunk)
    await response.write_eof()
    return response


def _reader(body: IO[bytes]) -> Callable[[int, int], bytes]:
    """``read(at, n)``: ``n`` bytes of a spooled request body from offset ``at`` (what the
    pure parsers of framed bodies take)."""

    def read(at: int, n: int) -> bytes:
        body.seek(at)
        return body.read(n)

    return read


class _Window:
    """One envelope of a spooled request body, read from its own place: the hand-overs of
    one request share the file, and each is copied into its row in turn (the group commit
    stores a batch's items one after another)."""

    def __init__(self, body: IO[bytes], at: int) -> None:
        self._body = body
        self._at = at

    def read(self, n: int = -1) -> bytes:
        self._body.seek(self._at)
        piece = self._body.read(n)
        self._at += len(piece)
        return piece


def _error(exc: OnionpostError) -> web.Response:
    status, body = refusal(exc)
    return _json(status, body)


def _accepted(result: DeliveryResult) -> dict[str, Any]:
    return {
        "status": "accepted",
        "receipt": result.receipt,
        "duplicate": result.duplicate,
        "missing_devices": result.missing_devices,
    }


def _spool_ids(raw: str, name: str) -> list[int]:
    """A query's comma-separated spool ids (aiohttp bounds the request line, so the list)."""
    try:
        return [int(i) for i in raw.split(",")] if raw else []
    except ValueError as exc:
        raise MalformedData(f"'{name}' must be message numbers separated by commas.") from exc


def _ack_ids(raw: str | None) -> list[int] | None:
    """The ``ack`` of a pending list's query: None when it has none."""
    if raw is None:
        return None
    ids = _spool_ids(raw, "ack")
    if len(ids) > MAX_FETCH_IDS:
        raise MalformedData(f"Acknowledge at most {MAX_FETCH_IDS} messages with a list.")
    return ids


def _one_result(result: DeliveryResult | int | BaseException) -> dict[str, Any]:
    """One envelope's entry in a ``POST /v1/deliveries`` or ``/v1/device/submissions``
    answer: what ``deliver`` or ``submit`` would have answered for it alone (``accepted``,
    ``queued``), a refusal with the HTTP status it would have had."""
    if isinstance(result, DeliveryResult):
        return _accepted(result)
    if isinstance(result, int):
        return {"status": "queued", "id": result}
    if not isinstance(result, OnionpostError):
        if not isinstance(result, Exception):  # a cancellation: the whole request goes
            raise result
        log.error("unexpected error storing one of several envelopes", exc_info=result)
        result = TemporaryDeliveryError("The inbox hit an internal error.", code="4.3.0")
    status, body = refusal(result)
    return {**body, "http": status}


class FixedErrorPages(RequestHandler):
    """aiohttp's per-connection protocol, answering requests that never reach a route.

    For a request that is not valid HTTP (bad syntax, oversized line or header) aiohttp's own
    answer is a text page quoting the offending bytes: a 64 KiB garbage request got a 188 KB
    reply echoing it.  Here the answer is a short fixed page (:meth:`page`), and the failure
    is logged at DEBUG only (a hostile peer could otherwise fill the log); a failure of the
    server itself (5xx) is still logged as an error.  The node API and the autoconfig server
    (``gateway/autoconfig.py``) each subclass it with their own page.
    """

    __slots__ = ()

    #: Who failed, in the log's words.
    what: ClassVar[str]
    error_log: ClassVar[logging.Logger]

    @classmethod
    def page(cls, status: int) -> web.Response:
        """The fixed answer for ``status`` (5xx: our failure; else: a malformed request)."""
        raise NotImplementedError

    @classmethod
    def adopt(cls, handler: RequestHandler) -> RequestHandler:
        """``handler`` (from ``web.Server()``) answering errors with this class's pages."""
        # web.Server builds plain RequestHandlers and has no hook for another class; the
        # subclass adds no state (empty __slots__), so switching the class is safe.
        handler.__class__ = cls
        return handler

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if request.writer.output_size > 0:
            raise ConnectionError("The answer was already started; the connection is broken.")
        if status >= 500:
            self.error_log.error("%s failed to handle a request", self.what, exc_info=exc)
        else:
            self.error_log.debug(
                "%s: malformed request refused with %d: %r", self.what, status, exc
            )
        response = self.page(status)
        response.force_close()
        return response


class _ApiRequestHandler(FixedErrorPages):
    """The node API's pages: the short JSON refusal every other answer has."""

    __slots__ = ()
    what = "the node API"
    error_log = log

    @classmethod
    def page(cls, status: int) -> web.Response:
        error: OnionpostError
        if status >= 500:
            error = TemporaryDeliveryError("The inbox hit an internal error.", code="4.3.0")
        else:
            error = BadRequest("The request is not valid HTTP.")
        return _json(status, refusal(error)[1])


class _ConnectionGuard:
    """Caps connections and gives each request's headers a deadline.

    aiohttp has no timeout for a client that sends headers slowly, so every connection is
    armed with one when it opens and after each response, and disarmed when a request's
    headers are complete (the middleware runs).
    """

    def __init__(self, server: web.Server, header_timeout: float, max_connections: int) -> None:
        self._server = server
        self._timeout = header_timeout
        self._max = max_connections
        self._timers: dict[asyncio.BaseTransport, asyncio.TimerHandle | None] = {}

    @property
    def open_connections(self) -> int:
        return len(self._timers)

    def factory(self) -> asyncio.Protocol:
        return _GuardedProtocol(_ApiRequestHandler.adopt(self._server()), self)

    def opened(self, transport: asyncio.BaseTransport) -> bool:
        """Register a new connection; False (after answering 503) when over the cap."""
        if len(self._timers) >= self._max:
            if isinstance(transport, asyncio.WriteTransport):
                transport.write(_overloaded_reply())
            transport.close()
            return False
        self._timers[transport] = None
        return True

    def closed(self, transport: asyncio.BaseTransport) -> None:
        self._cancel(transport)
        self._timers.pop(transport, None)

    def arm(self, transport: asyncio.BaseTransport) -> None:
        if transport not in self._timers:
            return
        self._cancel(transport)
        loop = asyncio.get_running_loop()
        self._timers[transport] = loop.call_later(self._timeout, transport.close)

    def disarm(self, transport: asyncio.BaseTransport | None) -> None:
        if transport is not None:
            self._cancel(transport)

    def _cancel(self, transport: asyncio.BaseTransport) -> None:
        timer = self._timers.get(transport)
        if timer is not None:
            timer.cancel()
            self._timers[transport] = None


class _GuardedProtocol(asyncio.Protocol):
    """Delegates to aiohttp's protocol; tells the guard when connections open and close."""

    def __init__(self, inner: RequestHandler, guard: _ConnectionGuard) -> None:
        self._inner = inner
        self._guard = guard
        self._accepted = False
        self._transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport
        self._accepted = self._guard.opened(transport)
        if self._accepted:
            self._inner.connection_made(transport)
            self._guard.arm(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._guard.closed(self._transport)
        if self._accepted:
            self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._accepted:
            self._inner.data_received(data)

    def eof_received(self) -> None:
        if self._accepted:
            self._inner.eof_received()

    def pause_writing(self) -> None:
        if self._accepted:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._accepted:
            self._inner.resume_writing()


def _overloaded_reply() -> bytes:
    body = json.dumps(
        {
            "status": "temporary",
            "code": "4.3.2",
            "reason": "busy",
            "message": "The inbox is busy; try again in a minute or two.",
        }
    ).encode()
    head = (
        "HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
        f"Connection: close\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


class _BatchedCommit(Generic[A, R]):
    """Group commit for requests that each store one thing: the ones ready to be stored in
    the same turn of the event loop share one COMMIT (``run_many``: peers' deliveries,
    :meth:`Inbox.accept_many`; devices' hand-overs, :meth:`Inbox.submit_many`).

    Storing runs on the loop and its COMMIT (an fsync) blocks it, so requests that became
    ready meanwhile (a delivery's outer layer opened in a worker thread, a hand-over's body
    read) are all ready on the next turn and go together; an idle inbox stores a lone one a
    turn after it is ready.  Each request waits for the commit that holds its item before
    it is answered (``accepted``, ``queued``).
    """

    def __init__(self, run_many: Callable[[list[A]], Sequence[R | Exception]]) -> None:
        self._run_many = run_many
        self._batch: list[tuple[A, asyncio.Future[R]]] = []

    async def run(self, item: A) -> R:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[R] = loop.create_future()
        if not self._batch:
            loop.call_soon(self._flush)
        self._batch.append((item, fut))
        # Cancelled (the client went away): the future is cancelled with it and the flush
        # skips the item, whose file the caller closes on the way out.
        return await fut

    def _flush(self) -> None:
        batch = [b for b in self._batch if not b[1].cancelled()]
        self._batch = []
        if not batch:
            return
        try:
            results = self._run_many([item for item, _ in batch])
        except Exception as exc:  # the COMMIT failed: every request hears it
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        for (_, fut), result in zip(batch, results, strict=True):
            if fut.done():
                continue
            if isinstance(result, Exception):
                fut.set_exception(result)
            else:
                fut.set_result(result)


class InboxServer:
    def __init__(
        self,
        inbox: Inbox,
        *,
        config: InboxConfig,
        clock: Clock,
        on_inbound: Callable[[], None] | None = None,
        on_submitted: Callable[[], None] | None = None,
        enrolment: Enrolment | None = None,
    ) -> None:
        self.inbox = inbox
        self.enrolment = enrolment
        self.config = config
        self.clock = clock
        self._on_inbound = on_inbound
        self._on_submitted = on_submitted
        self._deliveries = asyncio.Semaphore(8)
        self._accepts: _BatchedCommit[tuple[Unwrapped, int], DeliveryResult] = _BatchedCommit(
            inbox.accept_many
        )
        self._hand_overs: _BatchedCommit[HandOver, int] = _BatchedCommit(inbox.submit_many)
        self._ack_flush: asyncio.TimerHandle | None = None
        self._events: dict[tuple[bytes, bytes], asyncio.Event] = {}
        self._server: asyncio.Server | None = None
        self._runner: web.AppRunner
        self._guard: _ConnectionGuard | None = None
        self.port = 0
        inbox.on_spooled.append(self._wake)

    # -- lifecycle ------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=KEYS_LIMIT)
        r = app.router
        r.add_get("/v1/health", self.health)
        r.add_get("/v1/bundle/{local}", self.bundle)
        r.add_post("/v1/deliver", self.deliver)
        r.add_post("/v1/deliveries", self.deliveries)
        r.add_post("/v1/device/challenge", self.challenge)
        r.add_post("/v1/device/login", self.login)
        r.add_get("/v1/device/pending", self.pending)
        r.add_get("/v1/device/pending-mail", self.pending_mail)
        r.add_get("/v1/device/message/{id}", self.message)
        r.add_get("/v1/device/messages", self.messages)
        r.add_post("/v1/device/ack", self.ack)
        r.add_post("/v1/device/submit", self.submit)
        r.add_post("/v1/device/submissions", self.submissions)
        r.add_post("/v1/device/keys", self.keys)
        r.add_post("/v1/device/tokens", self.tokens)
        r.add_get("/v1/device/policy", self.get_policy)
        r.add_post("/v1/device/policy", self.set_policy)
        r.add_get("/v1/device/outbox", self.outbox)
        r.add_post("/v1/device/outbox/{id}/{op}", self.outbox_op)
        r.add_get("/v1/device/devices", self.devices)
        r.add_post("/v1/device/invite", self.device_invite)
        r.add_get("/v1/device/chain", self.chain)
        r.add_post("/v1/device/chain/remove", self.chain_remove)
        r.add_post("/v1/invite/info", self.invite_info)
        r.add_post("/v1/invite/redeem", self.invite_redeem)
        r.add_post("/v1/device/pairing", self.pairing_offer)
        r.add_get("/v1/device/pairing/{slot}", self.pairing_owner)
        r.add_post("/v1/device/pairing/{slot}/finish", self.pairing_finish)
        r.add_get("/v1/pair/{slot}", self.pair_read)
        r.add_post("/v1/pair/{slot}/join", self.pair_join)
        return app

    async def start(self, host: str, port: int) -> int:
        self._runner = web.AppRunner(
            self.app(),
            handle_signals=False,
            access_log=None,
            keepalive_timeout=max(self.config.header_timeout, 5.0),
            max_line_size=8190,
            max_field_size=8190,
            max_headers=64,
        )
        await self._runner.setup()
        server = self._runner.server
        assert server is not None
        self._guard = _ConnectionGuard(
            server, self.config.header_timeout, self.config.max_connections
        )
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._guard.factory, host, port, backlog=512)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("node API listening on %s:%d", host, self.port)
        return self.port

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for event in self._events.values():
            event.set()  # end long-polls now instead of waiting out the shutdown grace
        if self._runner.server is not None:
            await self._runner.server.shutdown(2.0)
        await self._runner.cleanup()
        self._server = None
        self._flush_acks()  # else offered again after the restart, and acknowledged again

    @property
    def open_connections(self) -> int:
        return self._guard.open_connections if self._guard else 0

    # -- plumbing -------------------------------------------------------------------------

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if self._guard is not None:
            self._guard.disarm(request.transport)
        if self._on_inbound is not None:
            self._on_inbound()
        try:
            return await handler(request)
        except web.HTTPException as exc:
            return _json(
                exc.status,
                {
                    "status": "permanent",
                    "code": "5.5.0",
                    "reason": "bad-request",
                    "message": exc.reason,
                },
            )
        except (RequestAborted, ConnectionResetError) as exc:
            # A reset: the client went away while a streamed answer was written (a
            # device that stopped during its long-poll), as ordinary as an aborted upload.
            aborted = (
                exc
                if isinstance(exc, RequestAborted)
                else RequestAborted("The client went away during the answer.")
            )
            log.info("%s %s: %s", request.method, request.path, aborted)
            return _error(aborted)  # nobody reads it; aiohttp drops it quietly
        except OnionpostError as exc:
            return _error(exc)
        except TimeoutError:
            return _error(TemporaryDeliveryError("The request took too long to arrive."))
        except Exception:
            log.exception("unexpected error in %s %s", request.method, request.path)
            return _error(TemporaryDeliveryError("The inbox hit an internal error.", code="4.3.0"))
        finally:
            if self._guard is not None and request.transport is not None:
                self._guard.arm(request.transport)

    def _now(self) -> int:
        return self.clock.now()

    async def _body_to_file(self, request: web.Request, limit: int) -> tuple[IO[bytes], int]:
        """Stream the request body into a temporary file, within size and time limits."""
        length = request.content_length
        if length is None:
            raise MalformedData("The request must say how long its body is (Content-Length).")
        if length > limit:
            raise MessageTooLarge(f"The request is {length} bytes; the limit is {limit}.")
        tmp = tempfile.SpooledTemporaryFile(max_size=256 * 1024)  # noqa: SIM115
        left = length
        try:
            async with asyncio.timeout(self.config.request_timeout):
                while left:
                    piece = await request.content.read(min(65536, left))
                    if not piece:
                        raise ConnectionResetError("end of stream")
                    tmp.write(piece)
                    left -= len(piece)
        except ConnectionError as exc:
            # A sender whose circuit broke mid-upload: ordinary on tor, and nobody is left to
            # answer.  Translated here, where aiohttp's exception crosses in.
            tmp.close()
            raise RequestAborted(
                f"The client went away after {length - left} of {length} bytes."
            ) from exc
        except BaseException:
            tmp.close()
            raise
        tmp.seek(0)
        return tmp, length

    async def _small_json(self, request: web.Request) -> dict[str, Any]:
        body, length = await self._body_to_file(request, JSON_LIMIT)
        with body:
            return parse_request_json(body.read(length))

    def _session(self, request: web.Request) -> Session:
        auth = request.headers.get("Authorization", "")
        scheme, _, value = auth.partition(" ")
        try:
            token = bytes.fromhex(value.strip()) if scheme.lower() == "bearer" else b""
        except ValueError:
            token = b""
        if len(token) != 32:
            raise DeviceRefused("This request needs a device session; log in first.")
        return self.inbox.session(token, self._now())

    def _wake(self, mailbox_id: bytes, device_ids: frozenset[bytes]) -> None:
        for device_id in device_ids:
            event = self._events.get((mailbox_id, device_id))
            if event is not None:
                event.set()

    # -- public routes --------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.Response:
        return _json(200, {"status": "ok"})

    async def bundle(self, request: web.Request) -> web.Response:
        data = self.inbox.bundle(request.match_info["local"], self._now())
        return QuietResponse(body=data, content_type="application/octet-stream")

    async def deliver(self, request: web.Request) -> web.Response:
        limit = self.config.max_envelope_bytes + (1 << 20)
        body, length = await self._body_to_file(request, limit)
        with body:
            async with self._delivery_slot():
                now = self._now()
                unwrapped = await asyncio.to_thread(self.inbox.unwrap, body, length, now=now)
                with unwrapped:
                    result = await self._accepts.run((unwrapped, now))
        return _json(200, _accepted(result))

    async def deliveries(self, request: web.Request) -> web.Response:
        """Several envelopes for this inbox in one request, each judged as ``deliver``
        judges one: its own answer in the list, in order.  All the accepted ones share one
        COMMIT, which comes before the answer.  Over tor a delivery costs a round trip; a
        sender with a queue for this inbox pays one per batch."""
        body, length = await self._body_to_file(request, MAX_DELIVERIES_BYTES)
        with body:
            read = _reader(body)
            frames = parse_delivery_frames(lambda at: read(at, DELIVERY_FRAME_HEAD), length)
            async with self._delivery_slot():
                now = self._now()
                with contextlib.ExitStack() as files:
                    opened = await asyncio.to_thread(self._unwrap_all, body, frames, now, files)
                    ready = [u for u in opened if isinstance(u, Unwrapped)]
                    stored = iter(
                        await asyncio.gather(
                            *(self._accepts.run((u, now)) for u in ready), return_exceptions=True
                        )
                    )
                    results = [next(stored) if isinstance(u, Unwrapped) else u for u in opened]
        return _json(200, {"status": "done", "results": [_one_result(r) for r in results]})

    def _unwrap_all(
        self, body: IO[bytes], frames: list[tuple[int, int]], now: int, files: contextlib.ExitStack
    ) -> list[Unwrapped | OnionpostError]:
        """Each framed envelope's outer layer opened from the spooled body (in a worker
        thread, as ``deliver`` does; never the whole batch in memory), or the error that
        refuses it; what opened is closed by ``files``."""
        out: list[Unwrapped | OnionpostError] = []
        for at, size in frames:
            body.seek(at)
            try:
                out.append(files.enter_context(self.inbox.unwrap(body, size, now=now)))
            except OnionpostError as exc:
                out.append(exc)
        return out

    @contextlib.asynccontextmanager
    async def _delivery_slot(self) -> AsyncIterator[None]:
        """One of the concurrent deliveries' slots (a request of several takes one)."""
        try:
            async with asyncio.timeout(30):
                await self._deliveries.acquire()
        except TimeoutError as exc:
            raise TemporaryDeliveryError(
                "The inbox is busy; delivery will be retried.", code="4.3.2"
            ) from exc
        try:
            yield
        finally:
            self._deliveries.release()

    # -- device routes --------------------------------------------------------------------

    async def challenge(self, request: web.Request) -> web.Response:
        data = await self._small_json(request)
        challenge, expires = self.inbox.challenge(
            hex_field(data, "mailbox", 16), hex_field(data, "device", 16), self._now()
        )
        return _json(200, {"challenge": challenge.hex(), "expires_at": expires})

    async def login(self, request: web.Request) -> web.Response:
        data = await self._small_json(request)
        raw = data.get("rotations", [])
        if not isinstance(raw, list) or len(raw) > 256 or not all(isinstance(r, str) for r in raw):
            raise MalformedData("'rotations' must be a list of hex records.")
        try:
            rotations = [RotationRecord.parse(bytes.fromhex(r)) for r in raw]
        except ValueError as exc:
            raise MalformedData("'rotations' must be a list of hex records.") from exc
        token, expires = self.inbox.login(
            hex_field(data, "mailbox", 16),
            hex_field(data, "device", 16),
            challenge=hex_field(data, "challenge", 32),
            signature=hex_field(data, "signature", 64),
            now=self._now(),
            rotations=rotations,
        )
        self._seen(Session(hex_field(data, "mailbox", 16), hex_field(data, "device", 16)))
        return _json(200, {"session": token.hex(), "expires_at": expires})

    async def pending(self, request: web.Request) -> web.Response:
        answer, _ = await self._pending_list(request, self._session(request))
        return _json(200, answer)

    async def _pending_list(
        self, request: web.Request, s: Session
    ) -> tuple[dict[str, Any], list[SpoolEntry]]:
        """The answer of ``pending`` (long-polled up to ``wait`` seconds) and its entries."""
        try:
            after = int(request.query.get("after", "0"))
            wait = min(float(request.query.get("wait", "0")), self.config.longpoll_seconds)
        except ValueError as exc:
            raise MalformedData("'after' and 'wait' must be numbers.") from exc
        acks = _ack_ids(request.query.get("ack"))
        # What the device filed after its last list rides this one (protocol §17.3): acknowledged
        # first, so the list leaves it out, and a round trip less per sync than a POST /ack.
        acknowledged = self._acknowledge(s, acks) if acks is not None else None
        self._seen(s)
        key = (s.mailbox_id, s.device_id)
        event = self._events.setdefault(key, asyncio.Event())
        event.clear()
        entries = self.inbox.pending(s, after)
        if not entries and wait > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await event.wait()
            entries = self.inbox.pending(s, after)
        mb = self.inbox.store.mailbox(s.mailbox_id)
        answer = {
            "messages": [
                {"id": e.spool_id, "size": e.size, "received_at": e.received_at} for e in entries
            ],
            # A device compares this with its own copy and fetches a newer list (another
            # device of the person added or revoked one).
            "device_list_version": mb.device_list_version if mb else 0,
        }
        if acknowledged is not None:  # the device learns that this inbox took its `ack`
            answer["acknowledged"] = acknowledged
        return answer, entries

    async def pending_mail(self, request: web.Request) -> web.StreamResponse:
        """``pending`` with the envelopes of the first messages of its list (protocol
        §17.3): new mail reaches a device in one exchange instead of two, which over tor is
        a round trip less before it is in the mailbox."""
        s = self._session(request)
        try:
            count = int(request.query.get("count", "0"))
            limit = int(request.query.get("bytes", "0"))
        except ValueError as exc:
            raise MalformedData("'count' and 'bytes' must be numbers.") from exc
        if not 0 <= count <= MAX_FETCH_IDS or limit < 0:
            raise MalformedData(f"Ask for 0 to {MAX_FETCH_IDS} messages at a time.")
        answer, entries = await self._pending_list(request, s)
        listed = json.dumps(answer).encode()
        chosen = first_that_fit([(e.spool_id, e.size) for e in entries], count, limit)
        return await _framed(
            request, self.inbox.read_many(s, chosen), pending_list_head(len(listed)) + listed
        )

    async def message(self, request: web.Request) -> web.StreamResponse:
        s = self._session(request)
        try:
            spool_id = int(request.match_info["id"])
        except ValueError as exc:
            raise MalformedData("The message id must be a number.") from exc
        size, chunks = self.inbox.read(s, spool_id)
        response = _StreamResponse(
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)}
        )
        await response.prepare(request)
        for chunk in chunks:
            await response.write(chunk)
        await response.write_eof()
        return response

    async def messages(self, request: web.Request) -> web.StreamResponse:
        """Several spooled envelopes in one answer (protocol §17.3): a device fetching a
        batch pays one request, not one per message."""
        s = self._session(request)
        ids = _spool_ids(request.query.get("ids", ""), "ids")
        if not 1 <= len(ids) <= MAX_FETCH_IDS:
            raise MalformedData(f"Ask for 1 to {MAX_FETCH_IDS} messages at a time.")
        return await _framed(request, self.inbox.read_many(s, ids))

    async def ack(self, request: web.Request) -> web.Response:
        s = self._session(request)
        data = await self._small_json(request)
        ids = data.get("ids")
        if not isinstance(ids, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in ids
        ):
            raise MalformedData("'ids' must be a list of message numbers.")
        return _json(200, {"acknowledged": self._acknowledge(s, ids)})

    def _acknowledge(self, s: Session, ids: list[int]) -> int:
        acknowledged = self.inbox.acknowledge(s, ids)
        if acknowledged and self._ack_flush is None:
            # Their deletion rides the next batch of deliveries; if none comes, this commits it.
            self._ack_flush = asyncio.get_running_loop().call_later(ACK_WAIT, self._flush_acks)
        return acknowledged

    def _flush_acks(self) -> None:
        if self._ack_flush is not None:
            self._ack_flush.cancel()
            self._ack_flush = None
        try:
            self.inbox.flush_acks()
        except OnionpostError as exc:  # they stay hidden and waiting; tried again at stop
            log.warning("could not delete acknowledged messages: %s", exc)

    async def submit(self, request: web.Request) -> web.Response:
        s = self._session(request)
        q = request.query
        try:
            msg_id = bytes.fromhex(q.get("msg_id", ""))
            expires_at = int(q.get("expires_at", ""))
        except ValueError as exc:
            raise MalformedData("'msg_id' must be hex and 'expires_at' a number.") from exc
        fields = HandOverFields(
            destination=q.get("destination", ""),
            msg_id=msg_id,
            expires_at=expires_at,
            ref=q.get("ref", ""),
            key=q.get("key", ""),
        )
        body, length = await self._body_to_file(request, self.config.max_envelope_bytes + (1 << 20))
        with body:
            row_id = await self._hand_over(s, fields, (body, length), self._now())
        if self._on_submitted is not None:
            self._on_submitted()
        return _json(200, {"status": "queued", "id": row_id})

    async def submissions(self, request: web.Request) -> web.Response:
        """Several hand-overs in one request, each judged as ``submit`` judges one: its own
        answer in the list, in order.  The queued ones share one COMMIT, before the answer.
        A device away from its inbox (a laptop, over tor) pays a round trip per request."""
        s = self._session(request)
        body, length = await self._body_to_file(request, MAX_HAND_OVERS_BYTES)
        with body:
            items = parse_hand_overs(_reader(body), length)
            now = self._now()
            results = await asyncio.gather(
                *(self._hand_over(s, f, (_Window(body, at), size), now) for f, at, size in items),
                return_exceptions=True,
            )
        if self._on_submitted is not None and any(isinstance(r, int) for r in results):
            self._on_submitted()
        return _json(200, {"status": "done", "results": [_one_result(r) for r in results]})

    def _hand_over(
        self, s: Session, f: HandOverFields, sealed: tuple[Readable, int], now: int
    ) -> Awaitable[int]:
        """One hand-over (either route's) to the group commit: its row, once committed."""
        return self._hand_overs.run(
            HandOver(
                s,
                destination=f.destination,
                sealed=sealed,
                msg_id=f.msg_id,
                expires_at=f.expires_at,
                message_ref=f.ref,
                submission_key=f.key or f.msg_id.hex(),
                now=now,
            )
        )

    async def keys(self, request: web.Request) -> web.Response:
        s = self._session(request)
        body, length = await self._body_to_file(request, KEYS_LIMIT)
        with body:
            update = KeyUpdate.parse(body.read(length))
        if update.device_list is not None and self.enrolment is not None:
            self.enrolment.check_device_room(s.mailbox_id, total=len(update.device_list.devices))
        signed = self.inbox.publish(s.mailbox_id, update, self._now())
        answer: dict[str, Any] = {"status": "ok"}
        if signed is not None:
            answer["binding"] = signed.encode().hex()
        return _json(200, answer)

    async def tokens(self, request: web.Request) -> web.Response:
        s = self._session(request)
        data = await self._small_json(request)
        token = hex_field(data, "token", 32)
        label = data.get("label", "")
        if not isinstance(label, str) or len(label) > 200:
            raise MalformedData("'label' must be a short string.")
        # The label (the device names the contact) is checked for form and not kept: the
        # inbox needs only the token's keyed hash.
        if data.get("revoke") is True:
            withdrawn = self.inbox.withdraw_token(s.mailbox_id, token, self._now())
            return _json(200, {"status": "ok", "withdrawn": withdrawn})
        self.inbox.store.add_token(s.mailbox_id, self.inbox.token_hash(token), self._now())
        return _json(200, {"status": "ok"})

    def _policy_answer(self, mailbox_id: bytes) -> web.Response:
        mb = self.inbox.store.mailbox(mailbox_id)
        if mb is None:
            raise UnknownMailbox()
        policy = self.inbox.policy(mb.accepts_strangers, mb.pow_bits)
        return _json(
            200, {"accepts_strangers": policy.accepts_strangers, "pow_bits": policy.pow_bits}
        )

    async def get_policy(self, request: web.Request) -> web.Response:
        """The mailbox's anti-spam policy: whether strangers may write (with a stamp)."""
        return self._policy_answer(self._session(request).mailbox_id)

    async def set_policy(self, request: web.Request) -> web.Response:
        """Open the mailbox to strangers or make it contacts-only (``accepts_strangers``)."""
        s = self._session(request)
        data = await self._small_json(request)
        accepts = data.get("accepts_strangers")
        if not isinstance(accepts, bool):
            raise MalformedData("'accepts_strangers' must be true or false.")
        self.inbox.set_accepts_strangers(s.mailbox_id, accepts)
        return self._policy_answer(s.mailbox_id)

    async def outbox(self, request: web.Request) -> web.Response:
        """Queue status: the rows named by ``ids`` (how a device learns the fate of what it
        handed over), or the mailbox's rows in ``states``, newest first, at most 500."""
        s = self._session(request)
        if "ids" in request.query:
            try:
                ids = [int(i) for i in request.query["ids"].split(",") if i]
            except ValueError as exc:
                raise MalformedData("'ids' must be numbers separated by commas.") from exc
            if len(ids) > OUTBOX_IDS_MAX:
                raise MalformedData(f"Ask for at most {OUTBOX_IDS_MAX} queue ids at a time.")
            rows = self.inbox.outbox.rows_by_ids(s.mailbox_id, ids)
        else:
            try:
                states = outbox_states_from_wire(request.query.get("states", "queued").split(","))
            except ValueError as exc:
                raise MalformedData("Unknown outbox state.") from exc
            rows = self.inbox.outbox.rows(mailbox_id=s.mailbox_id, states=states)[-500:]
        return _json(200, {"items": [_outbox_item(r) for r in rows]})

    async def outbox_op(self, request: web.Request) -> web.Response:
        s = self._session(request)
        op = request.match_info["op"]
        try:
            row_id = int(request.match_info["id"])
        except ValueError as exc:
            raise MalformedData("The queue id must be a number.") from exc
        row = self.inbox.outbox.get(row_id)
        if row is None or row.mailbox_id != s.mailbox_id:
            raise MalformedData(f"There is no queued message {row_id}.")
        if op == "cancel":
            done = self.inbox.outbox.cancel(row_id, now=self._now(), mailbox_id=s.mailbox_id)
        elif op == "retry":
            done = self.inbox.outbox.retry_now(self._now(), row_id) > 0
            if done and self._on_submitted is not None:
                self._on_submitted()
        else:
            raise MalformedData("The operation must be 'retry' or 'cancel'.")
        return _json(200, {"status": "ok" if done else "unchanged"})

    # -- devices, invites and pairings -----------------------------------------------------

    def _seen(self, s: Session) -> None:
        if self.enrolment is not None:
            self.enrolment.store.touch_device(s.mailbox_id, s.device_id, self._now())

    def _enrolment(self) -> Enrolment:
        if self.enrolment is None:
            raise web.HTTPNotFound()
        return self.enrolment

    async def devices(self, request: web.Request) -> web.Response:
        s = self._session(request)
        seen = self._enrolment().store.devices_seen(s.mailbox_id)
        return _json(200, {"seen": {d.hex(): t for d, t in seen.items()}})

    async def device_invite(self, request: web.Request) -> web.Response:
        """A member (not the admin) asks for an invite code, paid from their allowance."""
        s = self._session(request)
        data = await self._small_json(request)
        local = data.get("local")
        if not isinstance(local, str) or not 0 < len(local) <= 64:
            raise MalformedData("'local' must be the invited person's name.")
        can_invite = _int_field(data, "can_invite", default=0)
        code, expires = self._enrolment().create_invite(
            local,
            now=self._now(),
            lifetime=_int_field(data, "lifetime"),
            quota_bytes=_int_field(data, "quota_bytes"),
            max_devices=_int_field(data, "max_devices"),
            inviter=s.mailbox_id,
            can_invite=0 if can_invite is None else can_invite,
        )
        return _json(200, {"code": code.text(), "expires_at": expires})

    async def chain(self, request: web.Request) -> web.Response:
        """The member and the people below them in the invite chain (nobody else's)."""
        s = self._session(request)
        enrolment = self._enrolment()
        chain = enrolment.chain(self._now())
        me = chain.members.get(s.mailbox_id)
        if me is None:
            raise UnknownMailbox()
        rows = [(0, me), *chain.below(s.mailbox_id)]
        return _json(
            200,
            {
                "members": [
                    _chain_row(d, m, chain.members, enrolment.config.quota_bytes) for d, m in rows
                ]
            },
        )

    async def chain_remove(self, request: web.Request) -> web.Response:
        """Remove someone the member is up the invite chain of."""
        s = self._session(request)
        data = await self._small_json(request)
        local = data.get("local")
        mode = data.get("invitees")
        if not isinstance(local, str) or not 0 < len(local) <= 64:
            raise MalformedData("'local' must be the name of the person to remove.")
        if mode is not None and mode not in ("remove", "reparent"):
            raise MalformedData("'invitees' must be 'remove', 'reparent' or absent.")
        plan = self._enrolment().remove(
            s.mailbox_id, local, Invitees(mode) if mode else None, self._now()
        )
        return _json(
            200,
            {
                "removed": [m.name for m in plan.removed],
                "reparented": [m.name for m in plan.reparented],
            },
        )

    async def invite_info(self, request: web.Request) -> web.Response:
        data = await self._small_json(request)
        info = self._enrolment().invite_info(hex_field(data, "claim", 32), self._now())
        return _json(
            200,
            {
                "local": info.local,
                "expires_at": info.expires_at,
                "sek_id": info.server_key.sek_id,
                "sek_pk": info.server_key.public.hex(),
                "quota_bytes": info.quota_bytes,
                "max_devices": info.max_devices,
            },
        )

    async def invite_redeem(self, request: web.Request) -> web.Response:
        data = await self._small_json(request)
        raw = data.get("keys")
        if not isinstance(raw, str) or len(raw) > 2 * JSON_LIMIT:
            raise MalformedData("'keys' must be a hex key update.")
        try:
            update = KeyUpdate.parse(bytes.fromhex(raw))
        except ValueError as exc:
            raise MalformedData("'keys' must be a hex key update.") from exc
        signed = self._enrolment().redeem(
            hex_field(data, "claim", 32), update, hex_field(data, "token", 32), self._now()
        )
        return _json(200, {"binding": signed.encode().hex()})

    async def pairing_offer(self, request: web.Request) -> web.Response:
        s = self._session(request)
        data = await self._small_json(request)
        expires = self._enrolment().offer(
            s, hex_field(data, "slot", 16), hex_field(data, "offer", 32), self._now()
        )
        return _json(200, {"expires_at": expires})

    def _slot(self, request: web.Request) -> bytes:
        try:
            slot = bytes.fromhex(request.match_info["slot"])
        except ValueError as exc:
            raise MalformedData("A pairing slot is 32 hex digits.") from exc
        if len(slot) != 16:
            raise MalformedData("A pairing slot is 32 hex digits.")
        return slot

    async def pairing_owner(self, request: web.Request) -> web.Response:
        s = self._session(request)
        row = self._enrolment().pairing_for_owner(s, self._slot(request), self._now())
        answer: dict[str, Any] = {"state": row.state, "expires_at": row.expires_at}
        if row.join_pk is not None and row.join_box is not None:
            answer["join_pk"], answer["box"] = row.join_pk.hex(), row.join_box.hex()
        return _json(200, answer)

    async def pairing_finish(self, request: web.Request) -> web.Response:
        s = self._session(request)
        data = await self._small_json(request)
        box = data.get("grant")
        if box is not None and not isinstance(box, str):
            raise MalformedData("'grant' must be hex.")
        try:
            grant = bytes.fromhex(box) if box is not None else None
        except ValueError as exc:
            raise MalformedData("'grant' must be hex.") from exc
        self._enrolment().finish(s, self._slot(request), grant, self._now())
        return _json(200, {"status": "ok"})

    async def pair_read(self, request: web.Request) -> web.Response:
        row = self._enrolment().pairing_for_joiner(self._slot(request), self._now())
        answer: dict[str, Any] = {"state": row.state, "offer": row.offer.hex()}
        if row.grant_box is not None:
            answer["grant"] = row.grant_box.hex()
        return _json(200, answer)

    async def pair_join(self, request: web.Request) -> web.Response:
        data = await self._small_json(request)
        box = data.get("box")
        if not isinstance(box, str) or len(box) > 32_768:
            raise MalformedData("'box' must be hex.")
        try:
            sealed = bytes.fromhex(box)
        except ValueError as exc:
            raise MalformedData("'box' must be hex.") from exc
        self._enrolment().join(
            self._slot(request), hex_field(data, "join_pk", 32), sealed, self._now()
        )
        return _json(200, {"status": "joined"})


def _int_field(data: dict[str, Any], name: str, *, default: int | None = None) -> int | None:
    value = data.get(name, default)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 53:
        raise MalformedData(f"'{name}' must be a whole number.")
    return value


def _chain_row(depth: int, m: Member, members: dict[bytes, Member], quota: int) -> dict[str, Any]:
    up = members.get(m.invited_by) if m.invited_by is not None else None
    return {
        "local": m.name,
        "depth": depth,
        "invited_by": up.name if up is not None else None,
        "remaining": m.remaining,
        "quota_bytes": m.quota_bytes or quota,
        "max_devices": m.max_devices,
    }


def _outbox_item(r: OutboxRow) -> dict[str, Any]:
    """A queue row as its device sees it; the device knows the recipient and the message,
    so the inbox answers with what it holds: the destination inbox while queued."""
    return {
        "id": r.id,
        "destination": f"{r.onion}.onion" if r.onion else "",
        "created_at": r.created_at,
        "expires_at": r.expires_at,
        "next_attempt_at": r.next_attempt_at,
        "attempts": r.attempts,
        "last_error": r.last_error,
        "last_error_code": r.last_error_code,
        "state": outbox_to_wire(r.state),
        "finished_at": r.finished_at,
    }
