"""Dialing peers through tor's SOCKS port (the only importer of PySocks), with retries."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import socket
from typing import Any, Protocol

import socks

from onionpost.base.clock import Clock
from onionpost.core.address import (
    public_key_from_onion,
)
from onionpost.core.errors import (
    AddressError,
    BadOnionAddress,
    OnionClientAuthRejected,
    OnionClientAuthRequired,
    OnionpostError,
    PeerConnectionFailed,
    PeerDescriptorInvalid,
    PeerIntroductionFailed,
    PeerIntroductionTimedOut,
    PeerOffline,
    PeerRefused,
    PeerRendezvousFailed,
    PeerTimedOut,
    PeerUnreachable,
    TorError,
    TorNotRunning,
)
from onionpost.core.retry import TOR_DIAL
from onionpost.net.tor.process import _in_thread

_SOCKS_ATTEMPT_TIMEOUT = 15.0  # short attempts: a hung one can otherwise eat the whole budget

_RETRY_PAUSE = TOR_DIAL.pause(1)

_MAX_DESCRIPTOR_RETRIES = 2  # 0xF0 right after publication: the HSDir asked had no copy yet

_MAX_INTRO_RETRIES = 2

_SOCKS_PASSWORD = "onionpost"  # noqa: S105 - not a secret: isolation is keyed by the username


def isolation_username(onion: str, isolation: str) -> str:
    """A SOCKS username that gives each (destination, role) its own tor circuits.

    tor isolates streams by SOCKS credentials (IsolateSOCKSAuth).  The destination is hashed in
    too, so two callers that pass the same role string still never share a circuit across
    inboxes.  Hex never starts with ``<torS0X>``, which tor >= 0.4.9 reserves.
    """
    data = f"{onion}\0{isolation}".encode()
    return hashlib.blake2b(data, digest_size=16, person=b"onionpost-socks").hexdigest()


_SOCKS_GENERIC = {
    0x02: "tor's rules do not allow this connection.",
    0x03: "tor could not reach the recipient's inbox (network unreachable).",
    0x04: "tor could not reach the recipient's inbox (host unreachable).",
    0x07: "tor did not accept onionpost's SOCKS request (command not supported).",
    0x08: "tor did not accept onionpost's SOCKS request (address type not supported).",
}


def socks_reply_error(code: int) -> PeerUnreachable:
    """The error for a SOCKS5 reply code from tor (0xF0-0xF7 need ``ExtendedErrors``)."""
    specific: dict[int, type[PeerUnreachable]] = {
        0x01: PeerConnectionFailed,
        0x05: PeerRefused,
        0x06: PeerTimedOut,
        0xF0: PeerOffline,
        0xF1: PeerDescriptorInvalid,
        0xF2: PeerIntroductionFailed,
        0xF3: PeerRendezvousFailed,
        0xF4: OnionClientAuthRequired,
        0xF5: OnionClientAuthRejected,
        0xF6: BadOnionAddress,
        0xF7: PeerIntroductionTimedOut,
    }
    if code in specific:
        return specific[code]()
    if code in _SOCKS_GENERIC:
        return PeerUnreachable(_SOCKS_GENERIC[code])
    return PeerUnreachable(f"tor could not reach the recipient's inbox (SOCKS reply {code:#04x}).")


def translate_socks_error(exc: BaseException, socks_address: str) -> OnionpostError:  # noqa: PLR0911
    """Turn what PySocks raised into words.

    PySocks wraps tor's reply in ``GeneralProxyError("Socket error: 0xf0: Unknown error")`` and
    knows none of the onion codes, so the code is read back from the message.
    """
    if isinstance(exc, socks.ProxyConnectionError):
        return TorNotRunning(
            f"Tor is not running: nothing answers on its SOCKS port {socks_address}."
        )
    if isinstance(exc, socks.SOCKS5AuthError):
        return TorError(
            f"The tor at {socks_address} refused the SOCKS login that onionpost uses to keep "
            "circuits apart; check that its SocksPort allows username authentication."
        )
    match = re.search(r"\b0x([0-9a-fA-F]{2}):", str(exc))
    if match:
        return socks_reply_error(int(match.group(1), 16))
    inner = exc.socket_err if isinstance(exc, socks.ProxyError) else exc
    if isinstance(inner, TimeoutError):
        return PeerTimedOut()
    if isinstance(exc, socks.GeneralProxyError) and "closed unexpectedly" in str(exc):
        return TorError(
            f"The tor at {socks_address} closed the SOCKS connection unexpectedly; it may have "
            "stopped."
        )
    if isinstance(inner, ConnectionError):
        return TorError(f"The connection to tor's SOCKS port {socks_address} broke.")
    return PeerUnreachable(
        f"tor could not open a connection to the recipient's inbox ({type(inner).__name__})."
    )


def _check_label(onion: str) -> str:
    label = onion.strip().lower().removesuffix(".onion")
    try:
        public_key_from_onion(label)
    except AddressError as exc:
        raise BadOnionAddress(str(exc)) from exc
    return label


def _socks_socket(proxy: tuple[str, int], username: str, timeout: float) -> Any:  # noqa: ANN401
    """A PySocks socket set up for one connect through tor (PySocks is untyped)."""
    sock = socks.socksocket(socket.AF_INET, socket.SOCK_STREAM)
    # rdns: tor resolves the name, so the onion address never reaches a local resolver.
    sock.set_proxy(
        socks.SOCKS5, proxy[0], proxy[1], rdns=True, username=username, password=_SOCKS_PASSWORD
    )
    sock.settimeout(timeout)
    return sock


def _socks_connect(
    sock: Any,  # noqa: ANN401 - socks.socksocket
    proxy: tuple[str, int],
    label: str,
    port: int,
) -> socket.socket:
    """One blocking SOCKS5 connect through tor (worker thread); returns a plain socket."""
    try:
        sock.connect((f"{label}.onion", port))
    except (socks.ProxyError, OSError) as exc:
        sock.close()
        raise translate_socks_error(exc, f"{proxy[0]}:{proxy[1]}") from exc
    sock.settimeout(None)
    # A plain socket for asyncio: PySocks overrides methods that asyncio relies on.
    return socket.socket(fileno=sock.detach())


async def _socks_open(
    proxy: tuple[str, int], label: str, port: int, username: str, timeout: float
) -> socket.socket:
    """:func:`_socks_connect` in a worker thread, cancellable.

    Cancelling the await does not stop the thread, which would sit in the SOCKS handshake for
    up to ``timeout`` (tor answers only once it has reached the onion service or given up),
    and the process waits for its worker threads before it exits.  So a cancelled connect
    shuts the socket down: the thread's blocked read returns at once and the thread ends.
    """
    sock = _socks_socket(proxy, username, timeout)
    try:
        return await _in_thread(_socks_connect, sock, proxy, label, port)
    except asyncio.CancelledError:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        raise


# A peer whose tor restarted can leave our tor holding its old descriptor and a rendezvous
# circuit that waits for an answer that never comes; every new stream then joins that circuit
# and stalls for minutes (tor's SocksTimeout).  These failures are retried after NEWNYM, which
# drops cached descriptors and makes new streams build fresh circuits.
_STALLS = (
    PeerTimedOut,
    PeerConnectionFailed,
    PeerIntroductionFailed,
    PeerIntroductionTimedOut,
    PeerRendezvousFailed,
)


def _retryable(exc: PeerUnreachable, tries: dict[str, int]) -> bool:
    if isinstance(exc, PeerTimedOut):
        return True
    if isinstance(exc, PeerOffline):
        kind, limit = "descriptor", _MAX_DESCRIPTOR_RETRIES
    elif isinstance(exc, _STALLS):
        kind, limit = "intro", _MAX_INTRO_RETRIES
    else:
        return False
    tries[kind] = tries.get(kind, 0) + 1
    return tries[kind] <= limit


class _SocksSource(Protocol):
    """What dialing needs from a tor: where its SOCKS port is, a clock, and a way to drop
    stale circuits."""

    @property
    def clock(self) -> Clock: ...

    def socks_endpoint(self) -> tuple[str, int]: ...

    async def renew_circuits(self) -> None: ...

    def note_outbound(self) -> None: ...


class SocksEndpoint:
    """A tor that another process controls (the running node's, used by the CLI): its SOCKS
    port only.  Circuits cannot be renewed from here; a stalled dial simply retries."""

    def __init__(self, host: str, port: int, clock: Clock) -> None:
        self._endpoint = (host, port)
        self._clock = clock

    @property
    def clock(self) -> Clock:
        return self._clock

    def socks_endpoint(self) -> tuple[str, int]:
        return self._endpoint

    async def renew_circuits(self) -> None:
        return None

    def note_outbound(self) -> None:
        return None


async def _dial(
    runtime: _SocksSource, onion: str, port: int, *, isolation: str, timeout: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    label = _check_label(onion)
    username = isolation_username(label, isolation)
    clock = runtime.clock
    deadline = clock.monotonic() + timeout
    tries: dict[str, int] = {}
    while True:
        proxy = runtime.socks_endpoint()
        attempt = max(0.1, min(deadline - clock.monotonic(), _SOCKS_ATTEMPT_TIMEOUT))
        try:
            sock = await _socks_open(proxy, label, port, username, attempt)
            break
        except PeerUnreachable as exc:
            if deadline - clock.monotonic() <= _RETRY_PAUSE or not _retryable(exc, tries):
                raise
            if isinstance(exc, _STALLS):
                await runtime.renew_circuits()
            if not isinstance(exc, PeerTimedOut):
                await clock.sleep(_RETRY_PAUSE)
    try:
        return await asyncio.open_connection(sock=sock)
    except OSError as exc:
        sock.close()
        raise PeerUnreachable(f"The connection to the recipient's inbox broke: {exc}") from exc


class TorDialer:
    """Opens streams to onion services through tor's SOCKS port (``api.transport.Dialer``)."""

    def __init__(self, runtime: _SocksSource) -> None:
        self._runtime = runtime

    async def open(
        self, onion: str, port: int, *, isolation: str, timeout: float
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """Connect to ``onion``:``port``; every failure is a PeerUnreachable or TorError.

        ``isolation`` names the role (e.g. "deliver"); together with the destination it picks
        the SOCKS username, so different roles and inboxes never share a circuit.
        """
        streams = await _dial(self._runtime, onion, port, isolation=isolation, timeout=timeout)
        self._runtime.note_outbound()
        return streams
