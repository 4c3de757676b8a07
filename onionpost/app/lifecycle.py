"""`onionpost run` as a process: one node per data directory, and a node that stops when told.

**One node per data directory.**  :class:`RunLock` is an exclusive ``flock`` on
``<data>/run/node.lock``, taken before anything else is opened (databases, tor, ports).  Two
nodes on one data directory would publish the same onion address and work the same outbox,
and the second would release the first one's delivery leases at start-up, so both would
deliver the same rows.  The kernel drops the lock when the process ends, however it ends
(``kill -9`` included): there is never a stale lock to clean up.  The file holds the holder's
pid only so the refusal can name it.  Every other command (status, queue, devices, users,
...) works beside a running node without the lock: SQLite lets them share the databases.

**Stopping when told.**  :func:`serve` turns SIGTERM and Ctrl-C (SIGINT) into a stop request
from the moment it is called, so a node is stopped cleanly in any state, even while it
starts: :meth:`Node.run_until <onionpost.app.node.Node.run_until>` cancels a start in progress,
and :meth:`Node.stop <onionpost.app.node.Node.stop>` ends the work in progress.  Nothing
acknowledged depends on stopping in order (SMTP answers 250 and the inbox answers
``accepted`` only after their commits, and the crash test kills nodes with SIGKILL at random),
so the process never waits long for it:

* a request that comes while the node's modules are still being imported (seconds on a
  small, busy machine) exits at once with status 0: nothing has started yet;
* a second SIGTERM or SIGINT exits at once, with status 128 + the signal's number;
* if the orderly stop takes more than :data:`STOP_GRACE` seconds, something blocked that
  should not have: the process says so on stderr, dumps every thread's stack for the bug
  report, and exits with status 1.

Either way a tor this process launched is killed first; it would follow anyway (it watches
its owning process), but only after a while.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import faulthandler
import fcntl
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

from onionpost.base.config import Config
from onionpost.core.errors import DataDirError, NodeAlreadyRunning
from onionpost.store.keystore import ensure_private_dir

log = logging.getLogger(__name__)

#: Seconds the orderly stop may take before the process exits anyway (systemd's default
#: TimeoutStopSec is 90 s; people and the "stops within 10 s" promise want much less).
STOP_GRACE = 8.0


class RunLock:
    """The exclusive lock that makes a data directory one node's (see the module docstring)."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.path = data_dir / "run" / "node.lock"
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`NodeAlreadyRunning` naming the holder's pid."""
        try:
            ensure_private_dir(self.path.parent)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise DataDirError(f"Cannot open {self.path}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = _holder(fd)
            os.close(fd)
            raise NodeAlreadyRunning(str(self.data_dir), pid) from None
        except OSError as exc:
            os.close(fd)
            raise DataDirError(f"Cannot lock {self.path}: {exc.strerror or exc}") from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
            os.close(fd)  # closing drops the flock

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


def _holder(fd: int) -> int | None:
    """The pid in a lock file held by another process.  The holder writes it right after
    taking the lock, so an empty file is read again for a moment before giving up."""
    for _ in range(20):
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        if text.isdigit():
            return int(text)
        time.sleep(0.05)
    return None


class _Stopper:
    """SIGTERM and SIGINT as a stop request: the first one asks, a second one insists."""

    def __init__(self, grace: float, *, exit_before_attach: bool = False) -> None:
        self.requested = False
        self._grace = grace
        #: Whether a request that comes before :meth:`attach` exits the process at once:
        #: :func:`serve` attaches only once the node's modules are imported, and nothing
        #: has started before that.
        self._exit_before_attach = exit_before_attach
        self._loop: asyncio.AbstractEventLoop | None = None
        self._event: asyncio.Event | None = None
        self._watchdog: threading.Timer | None = None

    def install(self) -> None:
        # Plain signal handlers (not loop.add_signal_handler): they work before the event
        # loop exists and after it has closed, and asyncio.run leaves SIGINT to them.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def attach(self, loop: asyncio.AbstractEventLoop, event: asyncio.Event) -> None:
        """From now on a stop request sets ``event`` (at once if one came already)."""
        self._event = event
        self._loop = loop
        if self.requested:
            event.set()

    def disarm(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.requested:
            _say(f"onionpost: second {name}: stopping at once.")
            _exit_now(128 + signum)
        if self._loop is None and self._exit_before_attach:
            # Still importing the node's modules (seconds on a small, busy machine): nothing
            # has started and nothing was acknowledged, so there is nothing to wind down.
            _say(f"onionpost: {name} before the node started: stopped.")
            _exit_now(0)
        self.requested = True
        self._watchdog = threading.Timer(self._grace, self._overran)
        self._watchdog.daemon = True
        self._watchdog.start()
        loop, event = self._loop, self._event
        if loop is not None and event is not None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nothing to tell
                loop.call_soon_threadsafe(event.set)

    def _overran(self) -> None:
        _say(
            f"onionpost: the node did not stop within {self._grace:.0f} s; exiting now. "
            "Nothing acknowledged is lost. Please report this with the stacks below."
        )
        with contextlib.suppress(Exception):
            faulthandler.dump_traceback(all_threads=True)
        loop = self._loop
        if loop is not None:  # and what the event loop was waiting for (best effort)
            with contextlib.suppress(Exception):
                for task in asyncio.all_tasks(loop):
                    task.print_stack(file=sys.stderr)
        _exit_now(1)


def _say(line: str) -> None:
    with contextlib.suppress(OSError):
        os.write(2, (line + "\n").encode())


def _exit_now(status: int) -> None:
    """End the process without waiting for anything (threads, the event loop, atexit)."""
    tor = sys.modules.get("onionpost.net.tor.process")  # imported by the node; no tor before that
    if tor is not None:
        with contextlib.suppress(Exception):
            tor.kill_launched()
    with contextlib.suppress(Exception):
        sys.stderr.flush()
    os._exit(status)


#: Seconds a thread holding the GIL runs before one that waits for it gets its turn.
SWITCH_INTERVAL = 0.0005


def serve(
    config: Config,
    *,
    extensions: Callable[[], tuple[Any, ...]] = tuple,
    grace: float = STOP_GRACE,
) -> None:
    """Run a node on ``config``'s data directory until SIGTERM or SIGINT.

    ``extensions`` returns the node's extensions (the gateway); it is called under the lock,
    because importing them takes a while and a second node should be refused at once.

    Raises :class:`NodeAlreadyRunning` when another node holds the data directory, and
    whatever stopped the node from starting; returns once it has stopped.
    """
    bound_heap()
    # Worker threads (the SMTP group commit, scrypt, Dovecot) mostly wait on fsync and
    # sockets; each time one returns it needs the GIL back, and with the default 5 ms switch
    # interval a busy event loop makes it wait that long, after every fsync of a commit.
    sys.setswitchinterval(SWITCH_INTERVAL)
    stopper = _Stopper(grace, exit_before_attach=True)
    stopper.install()
    try:
        with RunLock(config.data_dir):
            if not stopper.requested:
                asyncio.run(_run(config, extensions, stopper))
    finally:
        stopper.disarm()


#: glibc's mallopt parameters (malloc.h).
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8


def bound_heap() -> bool:
    """Keep a large message's buffers out of the heap, so freeing them returns the memory.

    glibc serves large allocations with mmap and unmaps them when freed, but after the first
    such free it raises its threshold to that size (up to 32 MiB), so the next large buffers
    come from the heap and stay resident after they are freed: measured, a node kept
    ~240 MB after one 50 MiB message.  Setting the threshold explicitly turns that
    adjustment off.  Worker threads (a delivery's unwrapping) would each get their own
    arena; two are plenty for a node.  Returns False where this is not glibc.
    """
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    ok = bool(mallopt(_M_MMAP_THRESHOLD, 256 * 1024))
    return bool(mallopt(_M_ARENA_MAX, 2)) and ok


async def _run(
    config: Config, extensions: Callable[[], tuple[Any, ...]], stopper: _Stopper
) -> None:
    # Imported only now, under the lock: the node's imports (stem, aiohttp, ...) take a while
    # on a small machine, and a second node should be refused without waiting for them.
    from onionpost.app.node import Node

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    node = Node(config, extensions=extensions())
    loop.add_signal_handler(signal.SIGUSR1, node.wake)
    stopper.attach(loop, stop)
    await node.run_until(stop)
    log.info("onionpost node stopped")
