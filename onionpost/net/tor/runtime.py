"""The Tor boundary: run or attach to tor, publish the inbox onion service, dial peers.

Only this package (net.tor) imports stem and PySocks.  Both are synchronous and raise their
own exceptions, so every call into them runs in a worker thread and every exception they raise
is translated here into an :class:`~onionpost.core.errors.OnionpostError` that says in words what
went wrong and what to check.  Nothing from stem or PySocks escapes this package.

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
import logging
import os
import re
import signal
import socket
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import stem
import stem.connection
import stem.control
import stem.response

from onionpost.base.clock import Clock
from onionpost.base.config import TorConfig
from onionpost.base.logfiles import LOG_ROTATE_BYTES, set_aside_if_large
from onionpost.core.address import (
    onion_from_public_key,
    tor_service_key_blob,
)
from onionpost.core.crypto.primitives import ed25519_public
from onionpost.core.errors import (
    ConfigError,
    OnionpostError,
    OnionServiceError,
    PeerRefused,
    TorBootstrapError,
    TorControlError,
    TorError,
    TorNotInstalled,
    TorNotRunning,
)
from onionpost.core.retry import TOR_REPAIR
from onionpost.net.tor.control import _auth_error, _Problem, _Reply
from onionpost.net.tor.health import TorStatus
from onionpost.net.tor.process import (
    _LAUNCHED,
    _T,
    Version,
    _bootstrap_phase,
    _in_thread,
    _log_tail,
    _run_tor,
    _safe,
    check_version,
    format_version,
    parse_modules,
    parse_tor_version,
    pow_support,
)
from onionpost.net.tor.service import _Service
from onionpost.net.tor.socks import _dial

log = logging.getLogger(__name__)

# stem logs every command it sends at its TRACE level, ADD_ONION key blobs and AUTHENTICATE
# passwords included, and its logger passes TRACE records on to the application's handlers.
# Only its warnings may leave stem (its INFO lines are noise on every disconnect).
logging.getLogger("stem").setLevel(logging.WARNING)

_CONTROL_TIMEOUT = 30.0  # one control-port command

_CONTROL_FILE_TIMEOUT = 30.0  # a launched tor writes its control port within this

_PUBLISH_TIMEOUT = 120.0

_UPLOADS_WANTED = 3  # of up to 8 HSDirs: enough that clients find the descriptor at once

_UPLOAD_SETTLE = 10.0  # ... or at least one upload and this many seconds of waiting

_GRACE_SECONDS = 5.0

_CLOSE_TIMEOUT = 5.0  # closing the control connection; stem can hang in it (see _in_thread)

_PROBE_FAILURES_BEFORE_RESTART = 3

_PROBE_TIMEOUT = 60.0


class TorRuntime:
    """A tor that onionpost controls, with at most one onion service: the inbox."""

    LOG_LIMIT = LOG_ROTATE_BYTES

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

    async def rotate_log(self) -> bool:
        """Set a launched tor's ``notice.log`` aside once it passes the limit
        (onionpost.base.logfiles) and have tor reopen it; whether it did.  Never raises.

        tor reopens its logs on RELOAD (SIGHUP), which also rereads the torrc: the node wrote
        that once at the start and it is unchanged, and tor keeps its listeners (``auto``
        ports included), its circuits and the inbox's ephemeral onion service across it.  A
        tor run by the system (``mode = "attach"``) keeps its own logs."""
        if self._cfg.mode != "launch" or self._stopped or not self._process_alive():
            return False
        log_file = self._tor_dir / "notice.log"
        try:
            if not await asyncio.to_thread(set_aside_if_large, log_file, self.LOG_LIMIT):
                return False
            await self._call(lambda c: c.signal(stem.Signal.RELOAD), "reopening its log")
        except (OSError, TorError) as exc:
            log.warning("tor: could not start a new log at %s: %s", log_file, exc)
            return False
        log.info("tor's log was set aside as %s.1", log_file.name)
        return True

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
