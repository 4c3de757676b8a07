"""The Tor boundary: run or attach to tor, publish the inbox onion service, dial peers.

This is the only module that imports stem and PySocks.  Both are synchronous and raise their
own exceptions, so every call into them runs in a worker thread and every exception they raise
is translated here into an :class:`~onionpost.errors.OnionpostError` that says in words what
went wrong and what to check.  Nothing from stem or PySocks escapes this module.

Two ways to reach tor:

* **launch** (default): onionpost starts its own tor with a generated torrc in
  ``<data>/tor/``; ports are picked by tor (``auto``) on 127.0.0.1, the control port uses a
  cookie, and ``__OwningControllerProcess`` makes tor exit when onionpost does.
* **attach**: onionpost uses a system tor through its ControlPort or ControlSocket (cookie, or
  a password when ``tor.control_password`` is set).  ``torrc.example`` shows that torrc.

The onion service is ephemeral (``ADD_ONION`` without ``Detach``): tor forgets it when the
control connection closes, so a crashed onionpost never leaves an address up with nothing
behind it.  The key comes from the node's seed, so the address never changes; health checks
re-add the service after tor or the control connection was lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
import signal
import socket
import subprocess
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, NamedTuple, Protocol, TypeVar

import socks
import stem
import stem.connection
import stem.control
import stem.response

from onionpost.address import onion_from_public_key, public_key_from_onion, tor_service_key_blob
from onionpost.clock import Clock
from onionpost.config import TorConfig
from onionpost.crypto.primitives import ed25519_public
from onionpost.errors import (
    AddressError,
    BadOnionAddress,
    ConfigError,
    OnionClientAuthRejected,
    OnionClientAuthRequired,
    OnionpostError,
    OnionServiceError,
    PeerConnectionFailed,
    PeerDescriptorInvalid,
    PeerIntroductionFailed,
    PeerIntroductionTimedOut,
    PeerOffline,
    PeerRefused,
    PeerRendezvousFailed,
    PeerTimedOut,
    PeerUnreachable,
    TorAuthError,
    TorBootstrapError,
    TorControlError,
    TorError,
    TorNotInstalled,
    TorNotRunning,
    TorTooOld,
)
from onionpost.retry import TOR_REPAIR

log = logging.getLogger(__name__)

# stem logs every command it sends at its TRACE level, ADD_ONION key blobs and AUTHENTICATE
# passwords included, and its logger passes TRACE records on to the application's handlers.
# Only its warnings may leave stem (its INFO lines are noise on every disconnect).
logging.getLogger("stem").setLevel(logging.WARNING)

Version = tuple[int, int, int, int]
MIN_VERSION: Version = (0, 4, 8, 0)
POW_VERSION: Version = (0, 4, 9, 2)  # ADD_ONION learnt PoWDefensesEnabled in 0.4.9.2-alpha

_CONTROL_TIMEOUT = 30.0  # one control-port command
_CONTROL_FILE_TIMEOUT = 30.0  # a launched tor writes its control port within this
_PUBLISH_TIMEOUT = 120.0
_UPLOADS_WANTED = 3  # of up to 8 HSDirs: enough that clients find the descriptor at once
_UPLOAD_SETTLE = 10.0  # ... or at least one upload and this many seconds of waiting
_SOCKS_ATTEMPT_TIMEOUT = 15.0  # short attempts: a hung one can otherwise eat the whole budget
_RETRY_PAUSE = 1.0
_MAX_DESCRIPTOR_RETRIES = 2  # 0xF0 right after publication: the HSDir asked had no copy yet
_MAX_INTRO_RETRIES = 2
_GRACE_SECONDS = 5.0
_CLOSE_TIMEOUT = 5.0  # closing the control connection; stem can hang in it (see _in_thread)
_PROBE_FAILURES_BEFORE_RESTART = 3
_PROBE_TIMEOUT = 60.0
_SOCKS_PASSWORD = "onionpost"  # noqa: S105 - not a secret: isolation is keyed by the username

_T = TypeVar("_T")

#: Every tor this process launched and has not stopped yet (see :func:`kill_launched`).
_LAUNCHED: set[subprocess.Popen[bytes]] = set()


async def _in_thread(fn: Callable[..., _T], *args: Any) -> _T:  # noqa: ANN401
    """``fn(*args)`` in a daemon thread of its own, awaited.

    Used instead of :func:`asyncio.to_thread` for calls that may never return: stem
    deadlocks when tor exits in the middle of a command (its reader thread, closing the
    connection, joins the event thread, which waits for a lock the caller holds while it
    waits for the reply), and a SOCKS handshake waits as long as tor does.  asyncio.run and
    the interpreter wait for the default executor's threads before the process may exit;
    they do not wait for daemon threads, so a stuck call cannot keep a stopping node alive.
    A result that arrives after the caller gave up (a socket, a controller) is closed.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()

    def settle(result: _T | None, error: BaseException | None) -> None:
        if future.done():
            if error is None and hasattr(result, "close"):
                threading.Thread(target=_close_quietly, args=(result,), daemon=True).start()
        elif error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def run() -> None:
        try:
            result = fn(*args)
        except BaseException as exc:  # handed to the awaiting task
            outcome: tuple[_T | None, BaseException | None] = (None, exc)
        else:
            outcome = (result, None)
        try:
            loop.call_soon_threadsafe(settle, *outcome)
        except RuntimeError:  # the event loop has closed: nobody waits any more
            if outcome[1] is None:
                _close_quietly(outcome[0])

    threading.Thread(target=run, name="onionpost-tor-call", daemon=True).start()
    return await future


def _close_quietly(thing: object) -> None:
    close = getattr(thing, "close", None)
    if callable(close):
        with contextlib.suppress(Exception):
            close()


def kill_launched() -> None:
    """SIGKILL every tor this process launched, for an exit that cannot wait for them.

    Safe to call from a signal handler or another thread.  A launched tor would notice its
    owning process is gone by itself (``__OwningControllerProcess``), but only after a while.
    """
    for proc in list(_LAUNCHED):
        with contextlib.suppress(OSError):
            proc.kill()


# --- pure helpers (unit-tested without tor) --------------------------------------------------


def parse_tor_version(text: str) -> Version:
    """The numeric version in ``tor --version`` output or ``GETINFO version``."""
    match = re.search(r"(\d+)\.(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not match:
        raise TorError(f"Cannot understand tor's version string {text.strip()[:80]!r}.")
    major, minor, micro, patch = match.groups()
    return (int(major), int(minor), int(micro), int(patch or 0))


def format_version(version: Version) -> str:
    return ".".join(str(part) for part in version)


def check_version(version: Version) -> None:
    if version < MIN_VERSION:
        raise TorTooOld(
            f"The installed tor is version {format_version(version)}; onionpost needs "
            f"{format_version(MIN_VERSION)} or newer. Install a newer tor (Debian: "
            "https://support.torproject.org/apt/)."
        )


def parse_modules(text: str) -> dict[str, bool]:
    """``tor --list-modules`` output ("pow: yes") as a mapping."""
    modules = {}
    for line in text.splitlines():
        name, sep, value = line.partition(":")
        if sep:
            modules[name.strip()] = value.strip() == "yes"
    return modules


def pow_support(version: Version, modules: Mapping[str, bool] | None) -> tuple[bool, str | None]:
    """Whether to ask for PoW defenses, and the note to show in status when not (or unsure)."""
    if version < POW_VERSION:
        return False, (
            f"Onion-service proof-of-work is off: tor {format_version(version)} cannot turn "
            f"it on for onionpost's service (needs {format_version(POW_VERSION)} or newer)."
        )
    if modules is None:
        return True, (
            "onionpost could not run `tor --list-modules` to check that this tor was built "
            "with the pow module; tor accepted the PoW options."
        )
    if not modules.get("pow", False):
        return False, (
            "Onion-service proof-of-work is off: this tor was built without the pow module "
            "(`tor --list-modules` does not show 'pow: yes')."
        )
    return True, None


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


def _bootstrap_phase(text: str) -> tuple[int, str]:
    """Percent and summary from ``GETINFO status/bootstrap-phase``."""
    progress = re.search(r"PROGRESS=(\d+)", text)
    summary = re.search(r'SUMMARY="([^"]*)"', text)
    warning = re.search(r'WARNING="([^"]*)"', text)
    words = summary.group(1) if summary else "unknown"
    if warning and not text.startswith("NOTICE"):
        words += f" (problem: {warning.group(1)})"
    return (int(progress.group(1)) if progress else 0), words


_BLOB_LIKE = re.compile(r"[A-Za-z0-9+/=]{40,}")


def _safe(exc: BaseException) -> str:
    """An exception's text with anything that looks like a key blob removed."""
    return _BLOB_LIKE.sub("[redacted]", str(exc)).strip() or type(exc).__name__


_HARMLESS = (  # warnings tor always logs on a test network or as root
    "TestingTorNetwork is set",
    "running Tor as root",
    "DirAuthority or AlternateDirAuthority",
)


def _log_tail(*paths: Path, lines: int = 2) -> str:
    """The last warnings and errors tor logged, without the ones that are always there."""
    kept: list[str] = []
    for path in paths:
        with contextlib.suppress(OSError):
            text = path.read_text(encoding="utf-8", errors="replace")
            kept += [
                ln.split("] ", 1)[-1].strip()
                for ln in text.splitlines()
                if ("[warn]" in ln or "[err]" in ln) and not any(h in ln for h in _HARMLESS)
            ]
    return " | ".join(kept[-lines:])


def _run_tor(binary: str, *args: str) -> str:
    """Output of ``tor <args>``; a missing program becomes TorNotInstalled."""
    try:
        done = subprocess.run(  # noqa: S603 - fixed argv, no shell
            [binary, *args], capture_output=True, text=True, timeout=60, check=False
        )
    except FileNotFoundError as exc:
        raise TorNotInstalled(
            f"The tor program was not found (looked for '{binary}'). Install it with "
            "`sudo apt-get install tor`, or set tor.tor_binary to its path."
        ) from exc
    except PermissionError as exc:
        raise TorNotInstalled(
            f"'{binary}' cannot be run (permission denied). Install tor with "
            "`sudo apt-get install tor`, or set tor.tor_binary to a tor you may run."
        ) from exc
    except (OSError, subprocess.SubprocessError) as exc:
        raise TorError(f"Running '{binary} {' '.join(args)}' failed: {_safe(exc)}") from exc
    if done.returncode != 0:
        raise TorError(
            f"'{binary} {' '.join(args)}' failed with exit code {done.returncode}: "
            f"{(done.stdout + done.stderr).strip()[-200:]}"
        )
    return done.stdout


async def preflight(cfg: TorConfig) -> None:
    """Fail now for what waiting will not fix: no tor program, or one that is too old.

    Everything else (no network yet, a slow bootstrap) is worth waiting for, in the
    background; this check takes a fraction of a second.
    """
    if cfg.mode != "launch":
        return
    check_version(parse_tor_version(await asyncio.to_thread(_run_tor, cfg.tor_binary, "--version")))


# --- status -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class TorStatus:
    """What the CLI and the status page show about tor; times are Unix seconds."""

    mode: str
    healthy: bool  # False while a problem found by check_health is not repaired
    version: str | None
    bootstrap_percent: int
    bootstrap_summary: str
    socks: str | None  # "127.0.0.1:port" that the dialer uses
    onion: str | None  # 56 characters, without ".onion"
    published: bool
    pow_enabled: bool
    pow_note: str | None
    last_published: int | None
    last_inbound: int | None
    last_outbound: int | None
    last_probe: int | None
    last_probe_ok: bool | None
    last_error: str | None
    last_recovery: str | None
    restarts: int
    notes: tuple[str, ...]


@dataclass(frozen=True)
class _Service:
    seed: bytes
    target_host: str
    target_port: int

    def __repr__(self) -> str:  # keep the seed out of tracebacks and logs
        return f"_Service(target={self.target_host}:{self.target_port})"


class _Reply(NamedTuple):
    ok: bool
    code: str
    message: str
    service_id: str | None


class _Problem(NamedTuple):
    words: str
    action: str  # "restart" | "reconnect" | "republish"


# --- the runtime ------------------------------------------------------------------------------


class TorRuntime:
    """A tor that onionpost controls, with at most one onion service: the inbox."""

    def __init__(self, cfg: TorConfig, data_dir: Path, clock: Clock) -> None:
        self._on_progress: Callable[[int, str], None] | None = None
        """Use :meth:`start`; this only sets up state."""
        self._cfg = cfg
        self._clock = clock
        self._tor_dir = Path(data_dir) / "tor"
        self._version: Version | None = None
        self._modules: dict[str, bool] | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._stdout: IO[bytes] | None = None
        self._control_port: int | None = None
        self._controller: Any = None  # stem.control.Controller (untyped library)
        self._socks: tuple[str, int] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._lock = asyncio.Lock()
        self._stopped = False
        # onion service
        self._service: _Service | None = None
        self._onion: str | None = None
        self._pending: str | None = None  # onion whose HS_DESC events we count
        self._uploads = 0
        self._upload_failure: str | None = None
        self._desc_changed = asyncio.Event()
        self._published = False
        self._pow_enabled = False
        self._pow_note: str | None = None
        # status
        self._bootstrap: tuple[int, str] = (0, "not started")
        self._last_published: int | None = None
        self._last_inbound: int | None = None
        self._last_outbound: int | None = None
        self._last_probe: int | None = None
        self._last_probe_ok: bool | None = None
        self._last_probe_at = float("-inf")
        self._probe_failures = 0
        self._last_error: str | None = None
        self._last_recovery: str | None = None
        self._restarts = 0
        self._healthy = True
        self._failures = 0
        self._next_recovery = float("-inf")
        self._notes: dict[str, str] = {}

    # --- lifecycle ------------------------------------------------------------------------

    @classmethod
    async def start(
        cls,
        cfg: TorConfig,
        data_dir: Path,
        *,
        clock: Clock,
        on_progress: Callable[[int, str], None] | None = None,
    ) -> TorRuntime:
        """Launch or attach to tor and return once it has bootstrapped to 100 %.

        ``on_progress(percent, summary)`` is called whenever the bootstrap advances, so a
        caller can show a person what tor is doing while they wait.
        """
        if cfg.mode == "off":
            raise ConfigError("tor.mode is 'off': onionpost was configured to run without tor.")
        runtime = cls(cfg, data_dir, clock)
        runtime._on_progress = on_progress
        runtime._loop = asyncio.get_running_loop()
        try:
            if cfg.mode == "launch":
                await runtime._prepare_launch()
                await runtime._spawn_and_connect()
            else:
                await runtime._attach()
            await runtime._wait_bootstrapped()
            await runtime._find_socks()
        except BaseException:
            await runtime._teardown()
            raise
        return runtime

    async def stop(self) -> None:
        """Remove the service, close the control connection, stop a launched tor."""
        if self._stopped:
            return
        self._stopped = True
        async with self._lock:
            if self._onion is not None:
                with contextlib.suppress(TorError):
                    await self._del_onion(self._onion)
            self._forget_service()
            await self._teardown()

    @property
    def clock(self) -> Clock:
        return self._clock

    @property
    def onion(self) -> str | None:
        return self._onion

    @property
    def pid(self) -> int | None:
        """The process id of a tor that onionpost launched (None when attached)."""
        return self._process.pid if self._process is not None else None

    def socks_endpoint(self) -> tuple[str, int]:
        """Where the dialer connects; it moves when a launched tor is restarted."""
        if self._socks is None or self._stopped:
            raise TorNotRunning()
        return self._socks

    def note_inbound(self) -> None:
        """Called by the API server for each request that arrived through the onion service."""
        self._last_inbound = self._clock.now()

    def note_outbound(self) -> None:
        self._last_outbound = self._clock.now()

    def status(self) -> TorStatus:
        notes = tuple(self._notes.values())
        return TorStatus(
            mode=self._cfg.mode,
            healthy=self._healthy,
            version=format_version(self._version) if self._version else None,
            bootstrap_percent=self._bootstrap[0],
            bootstrap_summary=self._bootstrap[1],
            socks=f"{self._socks[0]}:{self._socks[1]}" if self._socks else None,
            onion=self._onion,
            published=self._published,
            pow_enabled=self._pow_enabled,
            pow_note=self._pow_note,
            last_published=self._last_published,
            last_inbound=self._last_inbound,
            last_outbound=self._last_outbound,
            last_probe=self._last_probe,
            last_probe_ok=self._last_probe_ok,
            last_error=self._last_error,
            last_recovery=self._last_recovery,
            restarts=self._restarts,
            notes=notes,
        )

    # --- launch ---------------------------------------------------------------------------

    async def _prepare_launch(self) -> None:
        binary = self._cfg.tor_binary
        self._version = parse_tor_version(await asyncio.to_thread(_run_tor, binary, "--version"))
        check_version(self._version)
        self._modules = parse_modules(await asyncio.to_thread(_run_tor, binary, "--list-modules"))
        await asyncio.to_thread(self._write_torrc)

    def _write_torrc(self) -> None:
        d = self._tor_dir
        try:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            d.chmod(0o700)  # tor refuses a data directory that others can read
            lines = [
                "# Written by onionpost at every start; edit tor.extra_torrc instead.",
                f"DataDirectory {d}",
                "RunAsDaemon 0",
                # auto: tor picks free ports itself, so two nodes on one host never collide.
                "SocksPort 127.0.0.1:auto ExtendedErrors",
                "ControlPort 127.0.0.1:auto",
                f"ControlPortWriteToFile {d / 'control-port'}",
                "CookieAuthentication 1",
                f"CookieAuthFile {d / 'control_auth_cookie'}",
                f"__OwningControllerProcess {os.getpid()}",
                f"Log notice file {d / 'notice.log'}",
                *self._cfg.extra_torrc,
            ]
            torrc = d / "torrc"
            torrc.write_text("\n".join(lines) + "\n", encoding="utf-8")
            torrc.chmod(0o600)
            (d / "torrc.defaults").write_text("", encoding="utf-8")
        except OSError as exc:
            raise TorError(f"Cannot prepare tor's directory {d}: {exc.strerror or exc}") from exc

    def _spawn(self) -> None:
        d = self._tor_dir
        (d / "control-port").unlink(missing_ok=True)
        if self._stdout is not None:
            self._stdout.close()
        self._stdout = (d / "stdout.log").open("wb")
        cmd = [self._cfg.tor_binary, "-f", str(d / "torrc"), "--defaults-torrc"]
        cmd.append(str(d / "torrc.defaults"))
        try:
            self._process = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
                cmd, stdin=subprocess.DEVNULL, stdout=self._stdout, stderr=subprocess.STDOUT
            )
            _LAUNCHED.add(self._process)
        except FileNotFoundError as exc:
            raise TorNotInstalled() from exc
        except OSError as exc:
            raise TorError(f"Cannot start tor: {exc.strerror or exc}") from exc

    def _exit_words(self) -> str:
        assert self._process is not None
        d = self._tor_dir
        code = self._process.returncode
        if code < 0:
            return f"tor was killed by {signal.Signals(-code).name}"
        tail = _log_tail(d / "stdout.log", d / "notice.log")
        return f"tor exited with code {code}" + (f": {tail}" if tail else f" (logs in {d})")

    async def _spawn_and_connect(self) -> None:
        await asyncio.to_thread(self._spawn)
        deadline = self._clock.monotonic() + _CONTROL_FILE_TIMEOUT
        port_file = self._tor_dir / "control-port"
        while True:
            assert self._process is not None
            if self._process.poll() is not None:
                raise TorError(f"Tor stopped right after it was started: {self._exit_words()}.")
            text = port_file.read_text() if port_file.exists() else ""
            match = re.search(r"PORT=127\.0\.0\.1:(\d+)", text)
            if match:
                self._control_port = int(match.group(1))
                break
            if self._clock.monotonic() > deadline:
                raise TorError(
                    f"Tor started but did not open its control port within "
                    f"{_CONTROL_FILE_TIMEOUT:.0f} s (logs in {self._tor_dir})."
                )
            await self._clock.sleep(0.1)
        await self._connect()

    def _process_alive(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def _terminate(self) -> None:
        proc = self._process
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                log.warning("tor ignored SIGTERM for %.0f s; killing it", _GRACE_SECONDS)
                proc.kill()
                proc.wait()
        _LAUNCHED.discard(proc)
        self._process = None
        if self._stdout is not None:
            self._stdout.close()
            self._stdout = None

    async def _teardown(self) -> None:
        controller, self._controller = self._controller, None
        if controller is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(_in_thread(controller.close), _CLOSE_TIMEOUT)
        await asyncio.to_thread(self._terminate)
        self._socks = None

    # --- control connection ---------------------------------------------------------------

    def _where(self) -> str:
        if self._cfg.mode == "launch":
            return f"the control port 127.0.0.1:{self._control_port} of the tor onionpost started"
        if self._cfg.control_port:
            return f"tor's control port 127.0.0.1:{self._cfg.control_port}"
        return f"tor's control socket {self._cfg.control_socket}"

    def _knock(self) -> None:
        """Connect once without stem, which leaks its socket when the connect fails."""
        cfg = self._cfg
        port = self._control_port if cfg.mode == "launch" else cfg.control_port
        if port:
            with socket.create_connection(("127.0.0.1", port), timeout=_CONTROL_TIMEOUT):
                return
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(_CONTROL_TIMEOUT)
            sock.connect(cfg.control_socket)

    def _open_controller(self) -> Any:  # noqa: ANN401 - stem is untyped
        """Connect and authenticate (worker thread)."""
        cfg = self._cfg
        try:
            self._knock()
            if cfg.mode == "launch":
                controller = stem.control.Controller.from_port("127.0.0.1", self._control_port)
            elif cfg.control_port:
                controller = stem.control.Controller.from_port("127.0.0.1", cfg.control_port)
            else:
                controller = stem.control.Controller.from_socket_file(cfg.control_socket)
        except (stem.SocketError, OSError, ValueError) as exc:
            if cfg.mode == "launch":
                raise TorControlError(f"Cannot connect to {self._where()}.") from exc
            if cfg.control_port:
                hint = (
                    f"check that tor is running and that its torrc has "
                    f"'ControlPort {cfg.control_port}' (see torrc.example)"
                )
            else:
                hint = (
                    f"check that tor is running, that its torrc has 'ControlSocket "
                    f"{cfg.control_socket}', and that this user may open it "
                    "(see torrc.example)"
                )
            raise TorControlError(f"Cannot connect to {self._where()}: {hint}.") from exc
        try:
            if cfg.mode == "attach" and cfg.control_password:
                # Only the password the operator configured: a cookie that happens to be
                # readable must not hide a wrong password.
                stem.connection.authenticate_password(controller, cfg.control_password)
            else:
                controller.authenticate()
            controller.add_event_listener(self._on_hs_desc, stem.control.EventType.HS_DESC)
        except stem.connection.AuthenticationFailure as exc:
            controller.close()
            raise _auth_error(exc, self._where()) from exc
        except (stem.ControllerError, OSError) as exc:
            controller.close()
            raise TorControlError(f"Talking to {self._where()} failed: {_safe(exc)}") from exc
        return controller

    async def _connect(self) -> None:
        old, self._controller = self._controller, None
        if old is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(_in_thread(old.close), _CLOSE_TIMEOUT)
        self._controller = await asyncio.wait_for(
            _in_thread(self._open_controller), _CONTROL_TIMEOUT
        )

    async def _call(self, fn: Callable[[Any], _T], doing: str) -> _T:
        """Run ``fn(controller)`` in a thread; stem's exceptions become TorControlError."""
        controller = self._controller
        if controller is None or not controller.is_alive():
            raise TorControlError(f"onionpost has lost its connection to {self._where()}.")
        try:
            return await asyncio.wait_for(_in_thread(fn, controller), _CONTROL_TIMEOUT)
        except OnionpostError:
            raise
        except TimeoutError as exc:
            raise TorControlError(
                f"tor did not answer within {_CONTROL_TIMEOUT:.0f} s while {doing}."
            ) from exc
        except stem.SocketClosed as exc:
            raise TorControlError(
                f"The connection to {self._where()} closed while {doing}."
            ) from exc
        except (stem.ControllerError, OSError, ValueError) as exc:
            raise TorControlError(f"tor failed while {doing}: {_safe(exc)}") from exc

    async def _get_info(self, key: str) -> str:
        return await self._call(lambda c: str(c.get_info(key)), f"asking for {key}")

    # --- attach ---------------------------------------------------------------------------

    async def _attach(self) -> None:
        await self._connect()
        self._version = parse_tor_version(await self._get_info("version"))
        check_version(self._version)
        try:
            modules_text = await asyncio.to_thread(_run_tor, self._cfg.tor_binary, "--list-modules")
            binary_version = await asyncio.to_thread(_run_tor, self._cfg.tor_binary, "--version")
        except TorError:
            self._modules = None
        else:
            # Only trust the local binary's module list when it is the tor we attached to.
            same = parse_tor_version(binary_version) == self._version
            self._modules = parse_modules(modules_text) if same else None

    # --- bootstrap and listeners ----------------------------------------------------------

    async def _refresh_bootstrap(self) -> None:
        self._bootstrap = _bootstrap_phase(await self._get_info("status/bootstrap-phase"))

    async def _wait_bootstrapped(self) -> None:
        timeout = self._cfg.bootstrap_timeout
        deadline = self._clock.monotonic() + timeout
        while True:
            if self._cfg.mode == "launch" and not self._process_alive():
                raise TorError(f"Tor stopped while connecting: {self._exit_words()}.")
            before = self._bootstrap
            await self._refresh_bootstrap()
            if self._on_progress is not None and self._bootstrap != before:
                self._on_progress(*self._bootstrap)
            if self._bootstrap[0] >= 100:
                return
            if self._clock.monotonic() > deadline:
                percent, summary = self._bootstrap
                raise TorBootstrapError(
                    f"Tor did not finish connecting to the Tor network within {timeout:.0f} s: "
                    f"it reached {percent}% ({summary}). Check the network connection and the "
                    f"system clock; tor's log is in {self._tor_dir}."
                    if self._cfg.mode == "launch"
                    else f"The attached tor did not finish connecting within {timeout:.0f} s: "
                    f"it reached {percent}% ({summary})."
                )
            await self._clock.sleep(0.25)

    async def _find_socks(self) -> None:
        cfg = self._cfg
        if cfg.mode == "attach" and cfg.socks_port:
            self._socks = (cfg.socks_host, cfg.socks_port)
        else:
            listeners = await self._call(
                lambda c: list(c.get_listeners(stem.control.Listener.SOCKS)),
                "asking for its SOCKS port",
            )
            if not listeners:
                raise TorError(
                    "The tor onionpost attached to has no SocksPort; add "
                    "'SocksPort 127.0.0.1:9050 ExtendedErrors' to its torrc (see torrc.example)."
                )
            host, port = listeners[0]
            self._socks = (str(host), int(port))
        if cfg.mode == "attach":
            ports = await self._call(
                lambda c: list(c.get_conf("SocksPort", multiple=True)), "reading SocksPort"
            )
            if not any("ExtendedErrors" in p for p in ports):
                self._notes["socks"] = (
                    "The attached tor's SocksPort lacks ExtendedErrors, so delivery failures "
                    "are reported less precisely (see torrc.example)."
                )

    # --- onion service --------------------------------------------------------------------

    async def publish_service(self, seed: bytes, target_host: str, target_port: int) -> str:
        """Publish the inbox onion service for ``seed`` and return its 56-character label.

        Returns only once tor has uploaded the descriptor to a few HSDirs, so a peer that
        dials the address right away finds it.
        """
        if self._stopped:
            raise TorNotRunning()
        async with self._lock:
            if self._onion is not None:
                await self._del_onion(self._onion)
                self._forget_service()
            self._service = _Service(seed, target_host, target_port)
            return await self._add_service()

    async def remove_service(self) -> None:
        """Take the inbox off the Tor network (health checks stop re-adding it)."""
        async with self._lock:
            onion = self._onion
            self._forget_service()
            if onion is not None and self._controller is not None:
                await self._del_onion(onion)

    def _forget_service(self) -> None:
        self._service = None
        self._onion = None
        self._pending = None
        self._published = False
        self._pow_enabled = False

    async def _del_onion(self, onion: str) -> None:
        def run(c: Any) -> None:  # noqa: ANN401
            reply = c.msg(f"DEL_ONION {onion}")
            if not reply.is_ok() and "Unknown Onion Service" not in str(reply):
                raise TorControlError(f"tor would not remove the onion service: {reply}")

        if self._controller is not None and self._controller.is_alive():
            await self._call(run, "removing the onion service")

    async def _add_onion(self, service: _Service, with_pow: bool) -> _Reply:
        cfg = self._cfg
        parts = [f"ADD_ONION ED25519-V3:{tor_service_key_blob(service.seed)}", "Flags=DiscardPK"]
        if with_pow:
            parts += [
                "PoWDefensesEnabled=1",
                f"PoWQueueRate={cfg.pow_queue_rate}",
                f"PoWQueueBurst={cfg.pow_queue_burst}",
            ]
        parts.append(f"Port={cfg.onion_port},{service.target_host}:{service.target_port}")
        command = " ".join(parts)

        def run(c: Any) -> _Reply:  # noqa: ANN401
            reply = c.msg(command)
            code, _, message = reply.content()[0]
            if not reply.is_ok():
                return _Reply(False, code, message, None)
            stem.response.convert("ADD_ONION", reply)
            return _Reply(True, code, message, reply.service_id)

        return await self._call(run, "creating the onion service")

    async def _add_service(self) -> str:
        """ADD_ONION for the remembered service, then wait for the descriptor uploads."""
        service = self._service
        assert service is not None
        expected = onion_from_public_key(ed25519_public(service.seed))
        if self._cfg.pow_defense and self._version is not None:
            with_pow, note = pow_support(self._version, self._modules)
        else:
            with_pow, note = False, "Onion-service proof-of-work is turned off (tor.pow_defense)."
        self._pending, self._uploads, self._upload_failure = expected, 0, None
        self._published = False
        self._desc_changed.clear()
        reply = await self._add_onion(service, with_pow)
        if not reply.ok and with_pow and reply.code in {"512", "513"}:
            note = (
                f"Onion-service proof-of-work is off: tor refused the PoW options "
                f"({reply.message})."
            )
            with_pow = False
            reply = await self._add_onion(service, with_pow)
        if not reply.ok:
            if reply.code == "550" and "collision" in reply.message.lower():
                raise OnionServiceError(
                    f"The inbox address {expected}.onion is already in use on this tor, "
                    "probably by another onionpost process with the same data directory."
                )
            raise OnionServiceError(f"tor refused to create the onion service: {reply.message}")
        if reply.service_id != expected:
            raise OnionServiceError(
                f"tor created {reply.service_id}.onion instead of {expected}.onion."
            )
        self._onion = expected
        self._pow_enabled = with_pow
        self._pow_note = note
        await self._wait_published(expected)
        return expected

    def _on_hs_desc(self, event: Any) -> None:  # noqa: ANN401 - stem's event thread
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        action, address = str(event.action), str(event.address)
        reason = str(event.reason) if event.reason else None
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
            loop.call_soon_threadsafe(self._note_desc, action, address, reason)

    def _note_desc(self, action: str, address: str, reason: str | None) -> None:
        if address != self._pending:
            return
        if action == "UPLOADED":
            self._uploads += 1
            self._published = True
            self._last_published = self._clock.now()
        elif action == "FAILED":
            self._upload_failure = reason or "unknown reason"
        self._desc_changed.set()

    async def _wait_published(self, onion: str) -> None:
        start = self._clock.monotonic()
        deadline = start + _PUBLISH_TIMEOUT
        first_upload: float | None = None
        while self._uploads < _UPLOADS_WANTED:
            now = self._clock.monotonic()
            if self._uploads and first_upload is None:
                first_upload = now
            if first_upload is not None and now - first_upload >= _UPLOAD_SETTLE:
                return
            if now >= deadline:
                failure = f" (last failure: {self._upload_failure})" if self._upload_failure else ""
                raise OnionServiceError(
                    f"tor created {onion}.onion but could not publish it to the Tor network "
                    f"within {_PUBLISH_TIMEOUT:.0f} s{failure}; it keeps trying."
                )
            self._desc_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._desc_changed.wait(), min(1.0, deadline - now))

    async def published_pow_params(self) -> str | None:
        """The ``pow-params`` line of our own published descriptor (None when absent).

        Proves that PoW really reached the descriptor, not only that ADD_ONION accepted it.
        """
        onion = self._onion
        if onion is None:
            return None

        def run(c: Any) -> str | None:  # noqa: ANN401
            from stem.descriptor.hidden_service import HiddenServiceDescriptorV3

            text = c.get_info(f"hs/service/desc/id/{onion}")
            inner = HiddenServiceDescriptorV3.from_str(text).decrypt(onion)
            for line in str(inner).splitlines():
                if line.startswith("pow-params "):
                    return line.removeprefix("pow-params ")
            return None

        return await self._call(run, "reading the published descriptor")

    async def renew_circuits(self) -> None:
        """NEWNYM: forget cached onion descriptors and use fresh circuits for new streams.

        Best effort; tor rate-limits it to one per 10 s by delaying, and open streams keep
        working.
        """
        with contextlib.suppress(TorError):
            await self._call(lambda c: c.signal(stem.Signal.NEWNYM), "renewing circuits")

    # --- health ---------------------------------------------------------------------------

    async def check_health(self) -> None:
        """Find and repair a dead tor, a lost control connection or a vanished service.

        Meant to run every ~30 s.  Failures are recorded in :meth:`status`, never raised;
        repeated failed repairs back off exponentially (5 s doubling to 5 min).
        """
        if self._stopped:
            return
        async with self._lock:
            problem = await self._diagnose()
            if problem is None:
                problem = await self._probe_if_due()
            if problem is None:
                self._healthy = True
                self._failures = 0
                self._next_recovery = float("-inf")
                return
            now = self._clock.monotonic()
            self._healthy = False
            self._last_error = problem.words
            if now < self._next_recovery:
                wait = self._next_recovery - now
                self._last_error = f"{problem.words} (next repair attempt in {wait:.0f} s)"
                return
            log.warning("tor health: %s; trying to %s", problem.words, problem.action)
            try:
                done = await self._recover(problem)
            except OnionpostError as exc:
                self._failures += 1
                delay = TOR_REPAIR.pause(self._failures)
                self._next_recovery = now + delay
                self._last_error = (
                    f"{problem.words}; repair failed: {exc} (next attempt in {delay:.0f} s)"
                )
                log.warning("tor health: repair failed: %s", exc)
                return
            self._healthy = True
            self._failures = 0
            self._next_recovery = float("-inf")
            self._last_recovery = f"{problem.words}; {done}"
            log.info("tor health: %s", self._last_recovery)

    async def _diagnose(self) -> _Problem | None:
        if self._cfg.mode == "launch" and not self._process_alive():
            if self._process is not None:
                words = f"Tor stopped unexpectedly ({self._exit_words()})"
            else:
                words = "Tor is not running"
            return _Problem(words, "restart")
        if self._controller is None or not self._controller.is_alive():
            return _Problem("The control connection to tor was lost", "reconnect")
        try:
            await self._refresh_bootstrap()
            onions = await self._get_info("onions/current") if self._service else ""
        except TorError:
            return _Problem("tor stopped answering on its control connection", "reconnect")
        if self._service is not None and (self._onion is None or self._onion not in onions):
            return _Problem("The inbox onion service is no longer registered in tor", "republish")
        if self._service is not None and not self._published:
            return _Problem("The inbox onion service was never published", "republish")
        return None

    async def _recover(self, problem: _Problem) -> str:
        """Carry out the repair; returns what was done, in words."""
        action = problem.action
        if action == "reconnect" and self._cfg.mode == "launch":
            # stem sends TAKEOWNERSHIP on connecting to a tor we launched, so that tor exits
            # with its control connection (and never outlives onionpost): restart it.
            action = "restart"
        if action == "reconnect":
            await self._connect()
        if action == "restart":
            if self._cfg.mode != "launch":
                raise TorError("The attached tor must be restarted by its owner.")
            await self._teardown()
            await self._spawn_and_connect()
            self._restarts += 1
        if action in {"reconnect", "restart"}:
            await self._wait_bootstrapped()
            await self._find_socks()
        elif self._onion is not None:
            await self._del_onion(self._onion)  # registered but never published: start over
        if self._service is not None:
            await self._add_service()
        words = {
            "restart": "restarted tor",
            "reconnect": "reconnected to tor",
            "republish": "published the service again",
        }[action]
        if self._service is not None and action != "republish":
            words += " and published the service again"
        return words

    async def _probe_if_due(self) -> _Problem | None:
        interval = self._cfg.self_probe_interval
        if not interval or self._onion is None:
            return None
        if self._clock.monotonic() - self._last_probe_at < interval:
            return None
        if await self._probe(_PROBE_TIMEOUT):
            return None
        if self._probe_failures < _PROBE_FAILURES_BEFORE_RESTART:
            return None
        self._probe_failures = 0
        action = "restart" if self._cfg.mode == "launch" else "republish"
        return _Problem(
            f"The inbox was unreachable through its own onion address "
            f"{_PROBE_FAILURES_BEFORE_RESTART} times in a row",
            action,
        )

    async def probe_self(self, *, timeout: float = 60.0) -> bool:
        """Fetch ``/v1/health`` from our own onion address through our own tor.

        An onion service can stall while tor still looks healthy; only a round trip through
        the Tor network shows it.  Any HTTP answer counts as reachable.
        """
        async with self._lock:
            return await self._probe(timeout)

    async def _probe(self, timeout: float) -> bool:
        onion = self._onion
        if onion is None:
            raise OnionServiceError("No onion service is published, so there is nothing to probe.")
        self._last_probe_at = self._clock.monotonic()
        stalled = False
        try:
            reader, writer = await _dial(
                self, onion, self._cfg.onion_port, isolation="self-probe", timeout=timeout
            )
            try:
                request = (
                    f"GET /v1/health HTTP/1.1\r\nHost: {onion}.onion\r\nConnection: close\r\n\r\n"
                )
                writer.write(request.encode("ascii"))
                await writer.drain()
                line = await asyncio.wait_for(reader.readline(), timeout)
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
            ok = line.startswith(b"HTTP/1.")
            why = "" if ok else "the inbox API did not answer over HTTP"
        except PeerRefused as exc:  # tor delivered the stream; nothing listens behind it
            ok, why = False, str(exc)
        except (OnionpostError, OSError, TimeoutError) as exc:
            ok, why, stalled = False, str(exc) or "no answer in time", True
        self._last_probe = self._clock.now()
        self._last_probe_ok = ok
        # Only failures inside tor count towards a restart; a broken API is not tor's fault.
        self._probe_failures = self._probe_failures + 1 if stalled else 0
        if ok:
            self._notes.pop("probe", None)
        else:
            self._notes["probe"] = f"The last self-reachability probe failed: {why}"
        return ok


def _auth_error(exc: Exception, where: str) -> TorAuthError:  # noqa: PLR0911
    conn = stem.connection
    if isinstance(exc, conn.IncorrectPassword):
        return TorAuthError(f"{where} rejected the control password (tor.control_password).")
    if isinstance(exc, conn.PasswordAuthRejected):
        return TorAuthError(
            f"{where} does not accept a password; remove tor.control_password to use its cookie."
        )
    if isinstance(exc, conn.MissingPassword):
        return TorAuthError(
            f"{where} requires a password: set tor.control_password in onionpost.toml."
        )
    if isinstance(exc, conn.UnreadableCookieFile):
        return TorAuthError(
            f"onionpost cannot read the authentication cookie {exc.cookie_path} of {where}: "
            "add this user to the group that owns it (Debian: `sudo adduser onionpost "
            "debian-tor`) and set CookieAuthFileGroupReadable 1 (see torrc.example)."
        )
    if isinstance(exc, conn.CookieAuthFailed):
        return TorAuthError(f"{where} rejected the authentication cookie.")
    if isinstance(exc, conn.MissingAuthInfo | conn.UnrecognizedAuthMethods):
        return TorAuthError(
            f"{where} offers no login onionpost can use: set CookieAuthentication 1 in its "
            "torrc (see torrc.example)."
        )
    return TorAuthError(f"{where} refused onionpost's login: {_safe(exc)}")


# --- dialing ----------------------------------------------------------------------------------


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
