"""Running the tor program: its version, its modules, launching it, reading its log."""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from onionpost.base.config import TorConfig
from onionpost.core.errors import (
    TorError,
    TorNotInstalled,
    TorTooOld,
)

Version = tuple[int, int, int, int]

MIN_VERSION: Version = (0, 4, 8, 0)

POW_VERSION: Version = (0, 4, 9, 2)  # ADD_ONION learnt PoWDefensesEnabled in 0.4.9.2-alpha

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
