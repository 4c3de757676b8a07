"""The node API client (the only importer of h11): HTTP/1.1 over a stream from a dialer.

Without a :class:`~onionpost.net.pool.ConnectionPool` every exchange has its own connection
(``Connection: close``).  With one, the connection is kept alive after a complete exchange
and reused for the next request to the same destination and role; a request that meets a
reused connection the peer has closed meanwhile (nothing of an answer arrived) is sent once
more on a fresh connection.  Only requests that are safe to repeat go through a pool: key
fetches, health checks and deliveries (an inbox drops a repeated envelope by its digest), and
a device's hot path to its own inbox: the pending list (a read), fetches (reads),
acknowledgements (deleting what is already deleted does nothing) and hand-overs (the inbox
answers a repeated submission key with the row it already queued).  Everything else a
device asks (login, keys, tokens, invites, pairing) passes ``reuse=False`` and has a
connection of its own.

It speaks to another inbox (bundles, deliveries) or to the device's own inbox (login, fetch,
acknowledge, submit, publish keys) over whatever :class:`~onionpost.net.transport.Dialer` it
is given.  Every failure leaves as an :class:`~onionpost.core.errors.OnionpostError`: a refusal
keeps the peer's own code and words; a network problem is a temporary
:class:`~onionpost.core.errors.PeerUnreachable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any, Protocol, TypeVar
from urllib.parse import quote, urlencode

import h11

from onionpost.core.crypto.envelope import Readable, Writable
from onionpost.core.crypto.keys import ServerBinding
from onionpost.core.errors import (
    DeviceRefused,
    OnionpostError,
    PeerConnectionLost,
    PeerProtocolError,
    PeerUnreachable,
    UnknownMailbox,
)
from onionpost.core.wire import (
    MAX_FETCH_IDS,
    MESSAGE_FRAME_HEAD,
    PENDING_LIST_HEAD,
    HandOverFields,
    KeyUpdate,
    delivery_frame_head,
    error_from_body,
    error_from_fields,
    hand_overs_head,
    parse_json,
    parse_message_frame_head,
    parse_pending_list_head,
)
from onionpost.net.pool import ConnectionPool
from onionpost.net.transport import Dialer

T = TypeVar("T")

USER_AGENT = "onionpost/1"
READ_CHUNK = 65536
REUSED_ANSWER_TIMEOUT = 60.0


#: The largest answer a request takes unless its caller says otherwise.
ANSWER_LIMIT = 4 << 20


def refusal(r: Response) -> OnionpostError:
    """The error a peer's non-200 answer stands for: its own code and words, except that
    a refused session (401/403) is always :class:`DeviceRefused`, whatever its body says,
    so that callers can tell "log in again" from a refusal of the request itself."""
    err = error_from_body(r.status, r.body)
    return DeviceRefused(str(err)) if r.status in (401, 403) else err


class Rewindable(Readable, Protocol):
    def seek(self, offset: int, whence: int = 0, /) -> int: ...


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes


@dataclass(frozen=True)
class DeliveryReceipt:
    receipt: str
    duplicate: bool
    missing_devices: int


@dataclass(frozen=True)
class PendingMessage:
    id: int
    size: int
    received_at: int


class InboxClient:
    """Talks to one inbox, identified by its onion label."""

    def __init__(
        self,
        dialer: Dialer,
        onion: str,
        *,
        port: int = 80,
        isolation: str,
        timeout: float = 120.0,
        connect_timeout: float = 60.0,
        pool: ConnectionPool | None = None,
    ) -> None:
        self.dialer = dialer
        self.onion = onion
        self.port = port
        self.isolation = isolation
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.pool = pool
        #: On a reused kept-alive connection, how long after the request went out the first
        #: byte of the answer may take before the connection is taken for dead (its circuit
        #: gone silently) and the request sent again on a fresh one.  Above an inbox's
        #: longest legitimate wait before answering a delivery (30 s for a free slot).
        self.reused_answer_timeout = REUSED_ANSWER_TIMEOUT

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes = b"",
        source: tuple[Readable, int] | None = None,
        headers: tuple[tuple[str, str], ...] = (),
        limit: int = ANSWER_LIMIT,
        sink: Writable | None = None,
        timeout: float | None = None,
        reuse: bool = True,
        answer_wait: float = 0.0,
    ) -> Response:
        """One request; the response body goes to ``sink`` if given, else is returned.

        With a pool, the request goes on a kept-alive connection unless ``reuse`` is False
        (a request that must not be sent twice).  ``answer_wait`` is how long the peer may
        legitimately hold the answer back (a long poll), added to the silence allowed on a
        reused connection before it is taken for dead."""
        if self.pool is not None and reuse:
            return await self._pooled(
                self.pool,
                method=method,
                path=path,
                body=body,
                source=source,
                headers=headers,
                limit=limit,
                sink=sink,
                timeout=timeout,
                answer_wait=answer_wait,
            )
        try:
            async with asyncio.timeout(timeout or self.timeout):
                reader, writer = await self.dialer.open(
                    self.onion, self.port, isolation=self.isolation, timeout=self.connect_timeout
                )
                try:
                    response, _ = await self._exchange(
                        reader=reader,
                        writer=writer,
                        method=method,
                        path=path,
                        body=body,
                        source=source,
                        headers=headers,
                        limit=limit,
                        sink=sink,
                        keep_alive=False,
                    )
                    return response
                finally:
                    writer.close()
                    # never swallow a cancellation here: the caller's stop() must win
                    with contextlib.suppress(OSError, TimeoutError):
                        await writer.wait_closed()
        except TimeoutError as exc:
            raise PeerUnreachable("The recipient's inbox did not answer in time.") from exc
        except (OSError, asyncio.IncompleteReadError) as exc:
            raise PeerUnreachable("The connection to the inbox was lost.") from exc

    async def _pooled(
        self,
        pool: ConnectionPool,
        *,
        method: str,
        path: str,
        body: bytes,
        source: tuple[Readable, int] | None,
        headers: tuple[tuple[str, str], ...],
        limit: int,
        sink: Writable | None,
        timeout: float | None,
        answer_wait: float = 0.0,
    ) -> Response:
        """One request on a kept-alive connection from ``pool``.

        A reused connection that fails before any byte of the answer arrived is closed and
        the request sent once more on a fresh connection (when its body can be read again):
        the peer closed the idle connection just as it was picked.  The request may have
        reached the peer anyway, which is why only repeatable requests use a pool.  Any other
        failure closes the connection and is reported as without a pool.
        """
        start = source[0].tell() if source is not None and hasattr(source[0], "tell") else None
        rewind = getattr(source[0], "seek", None) if source is not None else None
        try:
            async with asyncio.timeout(timeout or self.timeout):
                while True:
                    conn = await pool.acquire(
                        self.onion,
                        self.port,
                        isolation=self.isolation,
                        timeout=self.connect_timeout,
                    )
                    try:
                        response, reusable = await self._exchange(
                            reader=conn.reader,
                            writer=conn.writer,
                            method=method,
                            path=path,
                            body=body,
                            source=source,
                            headers=headers,
                            limit=limit,
                            sink=sink,
                            keep_alive=True,
                            first_byte=(
                                self.reused_answer_timeout + answer_wait if conn.reused else None
                            ),
                        )
                    except PeerConnectionLost:
                        pool.discard(conn)
                        if not conn.reused or (source is not None and rewind is None):
                            raise
                        if rewind is not None:
                            rewind(start or 0)
                        continue
                    except BaseException:
                        pool.discard(conn)
                        raise
                    pool.release(conn, reusable=reusable)
                    return response
        except TimeoutError as exc:
            raise PeerUnreachable("The recipient's inbox did not answer in time.") from exc
        except (OSError, asyncio.IncompleteReadError) as exc:
            raise PeerUnreachable("The connection to the inbox was lost.") from exc

    async def _exchange(
        self,
        *,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        method: str,
        path: str,
        body: bytes,
        source: tuple[Readable, int] | None,
        headers: tuple[tuple[str, str], ...],
        limit: int,
        sink: Writable | None,
        keep_alive: bool,
        first_byte: float | None = None,
    ) -> tuple[Response, bool]:
        """One exchange; returns the answer and whether the connection may carry another."""
        conn = h11.Connection(our_role=h11.CLIENT, max_incomplete_event_size=16 * 1024)
        length = source[1] if source is not None else len(body)
        head = [
            ("Host", f"{self.onion}.onion"),
            ("User-Agent", USER_AGENT),
            ("Content-Length", str(length)),
            *(() if keep_alive else (("Connection", "close"),)),
            *headers,
        ]
        try:
            try:
                # The head, the body's first piece and (when it fits) the end go out in one
                # write: over tor, a request that reaches the SOCKS port in two writes can
                # wait ~40 ms for the second (measured in docs/performance.md, "one write").
                out = [conn.send(h11.Request(method=method, target=path, headers=head))]
                if source is not None:
                    stream, left = source
                    while left:
                        piece = stream.read(min(READ_CHUNK, left))
                        if not piece:
                            raise PeerProtocolError("The message to send ended early.")
                        left -= len(piece)
                        out.append(conn.send(h11.Data(data=piece)))
                        if left:
                            writer.write(b"".join(out))
                            out.clear()
                            await writer.drain()
                elif body:
                    out.append(conn.send(h11.Data(data=body)))
                out.append(conn.send(h11.EndOfMessage()))
                writer.write(b"".join(out))
                await writer.drain()
            except OSError as exc:
                raise PeerConnectionLost("The connection to the inbox was lost.") from exc
            response = await self._read_response(conn, reader, limit, sink, first_byte)
        except h11.ProtocolError as exc:
            raise PeerProtocolError(
                "The inbox answered with something that is not valid HTTP."
            ) from exc
        # Reusable only if both sides finished the exchange without asking to close, and
        # the peer sent nothing beyond its answer.
        reusable = (
            keep_alive
            and conn.our_state is h11.DONE
            and conn.their_state is h11.DONE
            and not conn.trailing_data[0]
        )
        return response, reusable

    @staticmethod
    async def _read_response(
        conn: h11.Connection,
        reader: asyncio.StreamReader,
        limit: int,
        sink: Writable | None,
        first_byte: float | None = None,
    ) -> Response:
        status = 0
        chunks: list[bytes] = []
        received = 0
        answered = False
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await _receive(reader, answered=answered, wait=first_byte))
                answered = True
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.InformationalResponse):
                continue
            elif isinstance(event, h11.Data):
                received += len(event.data)
                if received > limit:
                    raise PeerProtocolError(f"The inbox's answer is larger than {limit} bytes.")
                if sink is not None and status == 200:
                    sink.write(bytes(event.data))
                else:
                    chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return Response(status, b"".join(chunks))
            elif isinstance(event, h11.ConnectionClosed):
                raise PeerUnreachable("The inbox closed the connection mid-answer.")

    async def call_json(
        self,
        method: str,
        path: str,
        data: dict[str, Any] | None = None,
        *,
        token: bytes | None = None,
        timeout: float | None = None,
        reuse: bool = True,
        answer_wait: float = 0.0,
    ) -> dict[str, Any]:
        headers: tuple[tuple[str, str], ...] = (("Content-Type", "application/json"),)
        if token is not None:
            headers = (*headers, ("Authorization", f"Bearer {token.hex()}"))
        body = json.dumps(data).encode() if data is not None else b""
        r = await self.request(
            method,
            path,
            body=body,
            headers=headers,
            timeout=timeout,
            reuse=reuse,
            answer_wait=answer_wait,
        )
        return self.check_json(r)

    @staticmethod
    def check_json(r: Response) -> dict[str, Any]:
        if r.status != 200:
            raise refusal(r)
        return parse_json(r.body, "answer")

    # -- between inboxes ------------------------------------------------------------------

    async def health(self) -> bool:
        return self.check_json(await self.request("GET", "/v1/health")).get("status") == "ok"

    async def bundle(self, local: str) -> bytes:
        r = await self.request("GET", f"/v1/bundle/{quote(local, safe='')}", limit=1 << 20)
        if r.status != 200:
            raise refusal(r)
        return r.body

    async def deliver(self, envelope: bytes | tuple[Readable, int]) -> DeliveryReceipt:
        source = envelope if isinstance(envelope, tuple) else None
        body = envelope if isinstance(envelope, bytes) else b""
        r = await self.request(
            "POST",
            "/v1/deliver",
            body=body,
            source=source,
            headers=(("Content-Type", "application/octet-stream"),),
        )
        receipt = _receipt(self.check_json(r))
        if receipt is None:
            raise PeerProtocolError("The inbox's answer to a delivery is not understood.")
        return receipt

    async def deliver_many(
        self, framed: tuple[Readable, int], count: int
    ) -> list[DeliveryReceipt | OnionpostError] | None:
        """Deliver ``count`` envelopes in one request (``POST /v1/deliveries``; ``framed``
        is its body, each envelope after :func:`~onionpost.core.wire.delivery_frame_head`).
        Returns each envelope's outcome, in order: its receipt, or the error that refused
        it.  None if the inbox does not serve the route (an older inbox: deliver one at a
        time).  A refusal of the whole request is raised, as :meth:`deliver` raises one."""
        r = await self.request(
            "POST",
            "/v1/deliveries",
            source=framed,
            headers=(("Content-Type", "application/octet-stream"),),
            limit=ANSWER_LIMIT,
        )
        return _each_result(r, count, "deliveries", "accepted", _receipt)

    # -- invites and pairings (no session: the code is the credential) ----------------

    async def invite_info(self, claim: bytes) -> dict[str, Any]:
        return await self.call_json("POST", "/v1/invite/info", {"claim": claim.hex()})

    async def redeem_invite(self, claim: bytes, update: KeyUpdate, token: bytes) -> ServerBinding:
        """Open the invited mailbox; returns the binding countersigned by this inbox."""
        data = await self.call_json(
            "POST",
            "/v1/invite/redeem",
            {"claim": claim.hex(), "keys": update.encode().hex(), "token": token.hex()},
        )
        return _countersigned(data.get("binding"), update.binding)

    async def pair_read(self, slot: bytes) -> dict[str, Any]:
        return await self.call_json("GET", f"/v1/pair/{slot.hex()}")

    async def pair_join(self, slot: bytes, join_pk: bytes, box: bytes) -> None:
        await self.call_json(
            "POST", f"/v1/pair/{slot.hex()}/join", {"join_pk": join_pk.hex(), "box": box.hex()}
        )


def _each_result(
    r: Response,
    count: int,
    what: str,
    ok: str,
    parse: Callable[[dict[str, Any]], T | None],
) -> list[T | OnionpostError] | None:
    """Each envelope's outcome from the answer to a request that carried ``count`` of them
    (``POST /v1/deliveries``, ``POST /v1/device/submissions``), in order: ``parse`` of an
    entry whose status is ``ok`` (None: malformed), else the error that refused that one.
    None if the inbox does not serve the route (404 for the route, not for a mailbox: an
    older inbox).  A refusal of the whole request is raised."""
    if r.status == 404 and not isinstance(refusal(r), UnknownMailbox):
        return None
    results = InboxClient.check_json(r).get("results")
    bad = f"The inbox's answer to several {what} is not understood."
    if not isinstance(results, list) or len(results) != count:
        raise PeerProtocolError(bad)
    out: list[T | OnionpostError] = []
    for item in results:
        if not isinstance(item, dict):
            raise PeerProtocolError(bad)
        if item.get("status") == ok:
            parsed = parse(item)
            if parsed is None:
                raise PeerProtocolError(bad)
            out.append(parsed)
        else:
            http = item.get("http")
            out.append(error_from_fields(http if isinstance(http, int) else 400, item))
    return out


def _queued_row(data: dict[str, Any]) -> int | None:
    """The row id of a ``queued`` answer to a hand-over, or None if it has none."""
    row = data.get("id")
    return row if isinstance(row, int) and not isinstance(row, bool) else None


def _receipt(data: dict[str, Any]) -> DeliveryReceipt | None:
    """An ``accepted`` answer to a delivery, or None if it is not one."""
    receipt = data.get("receipt")
    if data.get("status") != "accepted" or not isinstance(receipt, str):
        return None
    missing = data.get("missing_devices", 0)
    return DeliveryReceipt(
        receipt, bool(data.get("duplicate")), missing if isinstance(missing, int) else 0
    )


async def _receive(
    reader: asyncio.StreamReader, *, answered: bool, wait: float | None = None
) -> bytes:
    """The next bytes of an answer; a connection lost before its first byte is a
    :class:`PeerConnectionLost` (the request may go again on a fresh connection), and so is no first
    byte within ``wait`` seconds (given for reused connections: see
    ``InboxClient.reused_answer_timeout``)."""
    try:
        if wait is not None and not answered:
            try:
                async with asyncio.timeout(wait):
                    data = await reader.read(READ_CHUNK)
            except TimeoutError as exc:
                raise PeerConnectionLost("The kept connection to the inbox went silent.") from exc
        else:
            data = await reader.read(READ_CHUNK)
    except OSError as exc:
        if answered:
            raise
        raise PeerConnectionLost("The connection to the inbox was lost.") from exc
    if not data:
        if not answered:
            raise PeerConnectionLost("The inbox closed the connection before answering.")
        raise PeerUnreachable("The inbox closed the connection mid-answer.")
    return data


def _countersigned(raw: object, sent: ServerBinding | None) -> ServerBinding:
    """The inbox's countersigned copy of ``sent``, checked: same body, valid signatures."""
    try:
        signed = ServerBinding.parse(bytes.fromhex(raw)) if isinstance(raw, str) else None
    except (ValueError, OnionpostError) as exc:
        raise PeerProtocolError("The inbox sent a malformed binding.") from exc
    if signed is None or sent is None or signed.body() != sent.body():
        raise PeerProtocolError("The inbox did not countersign the binding it was sent.")
    signed.verify()
    return signed


def _read_frames(
    body: IO[bytes],
    end: int,
    sink: Callable[[int], Writable],
    accept: Callable[[int, int, list[int]], bool],
    bad: str,
) -> list[int]:
    """The envelopes framed as ``/v1/device/messages`` frames them, from where ``body``
    stands to ``end``, each copied to ``sink(its id)``; the ids, in order.  A frame that does
    not parse, runs past ``end`` or that ``accept(id, size, ids so far)`` refuses refuses the
    whole answer (:class:`PeerProtocolError` with ``bad``)."""
    got: list[int] = []
    while body.tell() < end:
        try:
            spool_id, size = parse_message_frame_head(body.read(MESSAGE_FRAME_HEAD))
        except OnionpostError as exc:
            raise PeerProtocolError(bad) from exc
        if not accept(spool_id, size, got) or body.tell() + size > end:
            raise PeerProtocolError(bad)
        out = sink(spool_id)
        left = size
        while left:
            piece = body.read(min(left, 1 << 20))
            out.write(piece)
            left -= len(piece)
        got.append(spool_id)
    return got


class DeviceSession:
    """A device's logged-in session with its own inbox."""

    def __init__(
        self,
        client: InboxClient,
        *,
        mailbox_id: bytes,
        device_id: bytes,
        sign: Callable[[bytes], bytes],
        login_message: Callable[[bytes], bytes],
        rotations: Callable[[], list[bytes]] | None = None,
    ) -> None:
        self.client = client
        self._rotations = rotations
        self.mailbox_id = mailbox_id
        self.device_id = device_id
        self._sign = sign
        self._login_message = login_message
        self._token: bytes | None = None
        # One login at a time: requests sent together with no session (the sealing job's
        # concurrent hand-overs, a sync) share the session the first one opens.
        self._logging_in = asyncio.Lock()
        #: The device list version the inbox holds, as of the last ``pending`` answer.
        self.inbox_device_list_version = 0
        #: False once the inbox answered ``pending-mail`` with 404 (an older inbox).
        self.pending_mail_served = True

    async def login(self) -> None:
        ids = {"mailbox": self.mailbox_id.hex(), "device": self.device_id.hex()}
        ch = await self.client.call_json("POST", "/v1/device/challenge", ids, reuse=False)
        try:
            challenge = bytes.fromhex(str(ch.get("challenge")))
        except ValueError as exc:
            raise PeerProtocolError("The inbox sent a malformed login challenge.") from exc
        signature = self._sign(self._login_message(challenge))
        chain = [r.hex() for r in self._rotations()] if self._rotations else []
        answer = await self.client.call_json(
            "POST",
            "/v1/device/login",
            {**ids, "challenge": challenge.hex(), "signature": signature.hex(), "rotations": chain},
            reuse=False,
        )
        try:
            self._token = bytes.fromhex(str(answer.get("session")))
        except ValueError as exc:
            raise PeerProtocolError("The inbox sent a malformed session.") from exc

    async def _call(
        self,
        method: str,
        path: str,
        data: dict[str, Any] | None = None,
        timeout: float | None = None,
        *,
        reuse: bool = False,
        answer_wait: float = 0.0,
    ) -> dict[str, Any]:
        """``reuse``: the request is safe to send twice, so it may go on a kept-alive
        connection (see the module's docstring); off unless asked for."""
        for attempt in (1, 2):
            if self._token is None:
                await self.login()
            try:
                return await self.client.call_json(
                    method,
                    path,
                    data,
                    token=self._token,
                    timeout=timeout,
                    reuse=reuse,
                    answer_wait=answer_wait,
                )
            except DeviceRefused:
                self._token = None
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    def _auth(self) -> tuple[tuple[str, str], ...]:
        assert self._token is not None
        return (("Authorization", f"Bearer {self._token.hex()}"),)

    async def _authorized(
        self,
        method: str,
        path: str,
        *,
        again: bool,
        rewind: Rewindable | None = None,
        body: bytes = b"",
        source: tuple[Readable, int] | None = None,
        headers: tuple[tuple[str, str], ...] = (),
        sink: Writable | None = None,
        limit: int = ANSWER_LIMIT,
        reuse: bool = False,
        timeout: float | None = None,
        answer_wait: float = 0.0,
    ) -> Response:
        """A raw request in this device's session: log in first if there is no session,
        and forget a session the inbox refuses (401/403; it expired or the inbox restarted).
        With ``again``, a refused request is sent once more in a new session (``rewind``
        is sought to its start first); without, the refusal is the caller's answer.
        ``reuse``: safe to send twice, so it may go on a kept-alive connection."""
        for attempt in (1, 2):
            if self._token is None:
                async with self._logging_in:
                    if self._token is None:
                        await self.login()
            if rewind is not None:
                rewind.seek(0)
            r = await self.client.request(
                method,
                path,
                body=body,
                source=source,
                headers=(*self._auth(), *headers),
                sink=sink,
                limit=limit,
                reuse=reuse,
                timeout=timeout,
                answer_wait=answer_wait,
            )
            if r.status not in (401, 403):
                return r
            self._token = None
            if not again or attempt == 2:
                return r
        raise AssertionError("unreachable")  # pragma: no cover

    async def pending(self, *, after: int = 0, wait: float = 0) -> list[PendingMessage]:
        query = urlencode({"after": after, "wait": wait})
        data = await self._call(
            "GET", f"/v1/device/pending?{query}", timeout=wait + 60, reuse=True, answer_wait=wait
        )
        return self._pending_list(data)

    def _pending_list(self, data: dict[str, Any]) -> list[PendingMessage]:
        items = data.get("messages")
        if not isinstance(items, list):
            raise PeerProtocolError("The inbox's list of pending mail is not understood.")
        version = data.get("device_list_version")
        if isinstance(version, int) and not isinstance(version, bool):
            self.inbox_device_list_version = version
        out = []
        for item in items:
            try:
                out.append(
                    PendingMessage(int(item["id"]), int(item["size"]), int(item["received_at"]))
                )
            except (KeyError, TypeError, ValueError) as exc:
                raise PeerProtocolError(
                    "The inbox's list of pending mail is not understood."
                ) from exc
        return out

    async def pending_mail(
        self,
        *,
        wait: float,
        count: int,
        limit: int,
        sink: Callable[[int], Writable],
        ack: Sequence[int] = (),
    ) -> tuple[list[PendingMessage], list[int]] | None:
        """What :meth:`pending` lists, with the envelopes of its first messages in the same
        answer (``GET /v1/device/pending-mail``): at most ``count`` of them and ``limit``
        bytes, each to ``sink(its id)``.  Returns the list and the ids received, in list
        order; None if the inbox does not serve the route (an older inbox: ask
        :meth:`pending`, as this session will from now on).  The envelopes must be ones the
        list names, in its order, at the sizes it gives, within what was asked, or the
        answer is refused whole.

        ``ack``: spool ids to acknowledge first, in the same request (what the device filed
        since its last list: a round trip less than :meth:`acknowledge` before asking).
        Unless None is returned they are acknowledged when this returns: by a request of
        their own if the inbox ignored them (it did not say how many it took), and then
        left out of the list."""
        if not self.pending_mail_served:
            return None
        if len(ack) > MAX_FETCH_IDS:  # more than a list may carry: acknowledged on their own
            await self.acknowledge(list(ack))
            ack = ()
        fields: dict[str, Any] = {"after": 0, "wait": wait, "count": count, "bytes": limit}
        if ack:
            fields["ack"] = ",".join(str(i) for i in ack)
        query = urlencode(fields)
        ceiling = PENDING_LIST_HEAD + ANSWER_LIMIT + count * MESSAGE_FRAME_HEAD + limit
        bad = "The inbox's pending mail is not understood."
        with tempfile.SpooledTemporaryFile(max_size=1 << 20) as body:
            r = await self._authorized(
                "GET",
                f"/v1/device/pending-mail?{query}",
                again=True,  # the body goes to ``body`` only with a 200
                sink=body,
                limit=ceiling,
                reuse=True,
                timeout=wait + 60,
                answer_wait=wait,
            )
            if r.status == 404:
                self.pending_mail_served = False
                return None
            if r.status != 200:
                raise refusal(r)
            end = body.tell()
            body.seek(0)
            try:
                length = parse_pending_list_head(body.read(PENDING_LIST_HEAD))
            except OnionpostError as exc:
                raise PeerProtocolError(bad) from exc
            if length > ANSWER_LIMIT or PENDING_LIST_HEAD + length > end:
                raise PeerProtocolError(bad)
            data = parse_json(body.read(length), "answer")
            listed = self._pending_list(data)
            position = {m.id: (i, m.size) for i, m in enumerate(listed)}

            def in_list_order(spool_id: int, size: int, got: list[int]) -> bool:
                at, listed_size = position.get(spool_id, (-1, -1))
                last = position[got[-1]][0] if got else -1
                carried = size + sum(position[i][1] for i in got)
                return at > last and size == listed_size and len(got) < count and carried <= limit

            got = _read_frames(body, end, sink, in_list_order, bad)
        if ack and "acknowledged" not in data:  # an inbox from before `ack`
            await self.acknowledge(list(ack))
            gone = set(ack)
            return [m for m in listed if m.id not in gone], [i for i in got if i not in gone]
        return listed, got

    async def fetch(self, message_id: int, sink: Writable, *, limit: int) -> None:
        r = await self._authorized(
            "GET",
            f"/v1/device/message/{message_id}",
            again=False,
            sink=sink,
            limit=limit,
            reuse=True,
        )
        if r.status != 200:
            raise refusal(r)

    async def fetch_many(
        self, wanted: list[PendingMessage], sink: Callable[[int], Writable]
    ) -> list[int]:
        """Fetch several spooled envelopes in one request (``GET /v1/device/messages``);
        each goes to ``sink(its id)``.  Returns the ids received, in order: one the inbox
        no longer holds is left out of its answer.  The answer may hold only what was asked,
        at the sizes the pending list gave, or it is refused whole."""
        sizes = {m.id: m.size for m in wanted}
        limit = sum(MESSAGE_FRAME_HEAD + m.size for m in wanted)
        with tempfile.SpooledTemporaryFile(max_size=1 << 20) as body:
            r = await self._authorized(
                "GET",
                "/v1/device/messages?ids=" + ",".join(str(m.id) for m in wanted),
                again=False,
                sink=body,
                limit=limit,
                reuse=True,
            )
            if r.status != 200:
                raise refusal(r)
            end = body.tell()
            body.seek(0)
            return _read_frames(
                body,
                end,
                sink,
                lambda spool_id, size, got: sizes.get(spool_id) == size and spool_id not in got,
                "The inbox's batch of messages is not understood.",
            )

    async def acknowledge(self, ids: list[int]) -> int:
        data = await self._call("POST", "/v1/device/ack", {"ids": ids}, reuse=True)
        n = data.get("acknowledged", 0)
        return n if isinstance(n, int) else 0

    async def submit(
        self,
        *,
        destination: str,
        envelope: bytes | tuple[Rewindable, int],
        msg_id: bytes,
        expires_at: int,
        ref: str,
        key: str,
    ) -> int:
        query = urlencode(
            {
                "destination": destination,
                "msg_id": msg_id.hex(),
                "expires_at": expires_at,
                "ref": ref,
                "key": key,
            }
        )
        r = await self._authorized(
            "POST",
            f"/v1/device/submit?{query}",
            again=True,
            # a retry after a lost session re-sends from the start
            rewind=envelope[0] if isinstance(envelope, tuple) else None,
            body=envelope if isinstance(envelope, bytes) else b"",
            source=envelope if isinstance(envelope, tuple) else None,
            headers=(("Content-Type", "application/octet-stream"),),
            reuse=True,  # the inbox answers a repeated key with the row it queued
        )
        row = self.client.check_json(r).get("id")
        if not isinstance(row, int):
            raise PeerProtocolError("The inbox's answer to a submission is not understood.")
        return row

    async def submit_many(
        self, items: list[tuple[HandOverFields, bytes]]
    ) -> list[int | OnionpostError] | None:
        """Hand several envelopes over in one request (``POST /v1/device/submissions``):
        each one's queued row, or the error that refused it, in order.  None if the inbox
        does not serve the route (an older one: hand them over one at a time).  A refusal
        of the whole request is raised, as :meth:`submit` raises one."""
        body = b"".join(
            [
                hand_overs_head([f for f, _ in items]),
                *(part for _, e in items for part in (delivery_frame_head(len(e)), e)),
            ]
        )
        r = await self._authorized(
            "POST",
            "/v1/device/submissions",
            again=True,
            body=body,
            headers=(("Content-Type", "application/octet-stream"),),
            reuse=True,  # the inbox answers a repeated key with the row it queued
        )
        return _each_result(r, len(items), "hand-overs", "queued", _queued_row)

    async def publish(self, update: KeyUpdate) -> ServerBinding | None:
        """Publish keys; returns the inbox's countersigned binding if one was published."""
        r = await self._authorized(
            "POST",
            "/v1/device/keys",
            again=True,
            body=update.encode(),
            headers=(("Content-Type", "application/octet-stream"),),
        )
        data = self.client.check_json(r)
        if update.binding is None:
            return None
        return _countersigned(data.get("binding"), update.binding)

    async def register_token(self, token: bytes, label: str, *, revoke: bool = False) -> None:
        await self._call(
            "POST", "/v1/device/tokens", {"token": token.hex(), "label": label, "revoke": revoke}
        )

    async def withdraw_token(self, token: bytes) -> bool:
        """Withdraw a contact token at the inbox; True if it was valid until now."""
        data = await self._call(
            "POST", "/v1/device/tokens", {"token": token.hex(), "label": "", "revoke": True}
        )
        return data.get("withdrawn") is True

    async def policy(self) -> bool:
        """Whether the mailbox accepts mail from strangers (with a proof of work)."""
        return _accepts_strangers(await self._call("GET", "/v1/device/policy"))

    async def set_policy(self, *, accepts_strangers: bool) -> bool:
        """Open the mailbox to strangers or make it contacts-only; returns the new setting."""
        data = await self._call(
            "POST", "/v1/device/policy", {"accepts_strangers": accepts_strangers}
        )
        return _accepts_strangers(data)

    async def outbox(
        self, states: tuple[str, ...] = ("queued",), *, ids: list[int] | None = None
    ) -> list[dict[str, Any]]:
        """Queue rows: those named by ``ids`` (at most 200), or the latest in ``states``."""
        query = (
            f"ids={','.join(str(i) for i in ids)}"
            if ids is not None
            else (f"states={','.join(states)}")
        )
        data = await self._call("GET", f"/v1/device/outbox?{query}")
        items = data.get("items")
        if not isinstance(items, list):
            raise PeerProtocolError("The inbox's queue listing is not understood.")
        return [i for i in items if isinstance(i, dict)]

    async def outbox_op(self, row_id: int, op: str) -> bool:
        data = await self._call("POST", f"/v1/device/outbox/{row_id}/{op}", {})
        return data.get("status") == "ok"

    async def devices_seen(self) -> dict[bytes, int]:
        """When each device of this mailbox last talked to the inbox."""
        data = await self._call("GET", "/v1/device/devices")
        seen = data.get("seen")
        if not isinstance(seen, dict):
            raise PeerProtocolError("The inbox's device activity is not understood.")
        out: dict[bytes, int] = {}
        for key, value in seen.items():
            try:
                out[bytes.fromhex(key)] = int(value)
            except (TypeError, ValueError) as exc:
                raise PeerProtocolError("The inbox's device activity is not understood.") from exc
        return out

    async def invite(
        self,
        local: str,
        *,
        can_invite: int,
        quota_bytes: int | None,
        max_devices: int | None,
        lifetime: int | None,
    ) -> tuple[str, int]:
        """An invite code minted by the inbox, paid from this member's allowance; returns
        the code's text and when it expires."""
        data = await self._call(
            "POST",
            "/v1/device/invite",
            {
                "local": local,
                "can_invite": can_invite,
                "quota_bytes": quota_bytes,
                "max_devices": max_devices,
                "lifetime": lifetime,
            },
        )
        code, expires = data.get("code"), data.get("expires_at")
        if not isinstance(code, str) or not isinstance(expires, int):
            raise PeerProtocolError("The inbox's answer to an invite is not understood.")
        return code, expires

    async def chain(self) -> list[dict[str, Any]]:
        """This member and everyone below them in the invite chain, depth first."""
        data = await self._call("GET", "/v1/device/chain")
        rows = data.get("members")
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise PeerProtocolError("The inbox's invite chain is not understood.")
        return rows

    async def remove_member(self, local: str, invitees: str | None) -> tuple[list[str], list[str]]:
        """Remove someone below this member; returns who was removed and who re-parented."""
        data = await self._call(
            "POST", "/v1/device/chain/remove", {"local": local, "invitees": invitees}
        )
        removed, moved = data.get("removed"), data.get("reparented")
        if not isinstance(removed, list) or not isinstance(moved, list):
            raise PeerProtocolError("The inbox's answer to a removal is not understood.")
        return [str(n) for n in removed], [str(n) for n in moved]

    async def offer_pairing(self, slot: bytes, offer: bytes) -> int:
        data = await self._call(
            "POST", "/v1/device/pairing", {"slot": slot.hex(), "offer": offer.hex()}
        )
        expires = data.get("expires_at")
        if not isinstance(expires, int):
            raise PeerProtocolError("The inbox's answer to a pairing offer is not understood.")
        return expires

    async def pairing_state(self, slot: bytes) -> dict[str, Any]:
        return await self._call("GET", f"/v1/device/pairing/{slot.hex()}")

    async def finish_pairing(self, slot: bytes, grant: bytes | None) -> None:
        body: dict[str, Any] = {} if grant is None else {"grant": grant.hex()}
        await self._call("POST", f"/v1/device/pairing/{slot.hex()}/finish", body)


def _accepts_strangers(data: dict[str, Any]) -> bool:
    value = data.get("accepts_strangers")
    if not isinstance(value, bool):
        raise PeerProtocolError("The inbox's mailbox policy is not understood.")
    return value
