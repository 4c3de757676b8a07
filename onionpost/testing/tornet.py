"""A private Tor network on 127.0.0.1: three directory authorities and a few relays.

Tests, the offline demo and the benchmarks need real onion services without the internet.
The recipe (``shared/reference/tor-testnet.md``) is followed closely because every step in it
removed a measured delay: routers launch together, clients wait until *every* authority serves
a *complete* consensus in which every router is Running, Valid, Fast, Guard, HSDir and Stable,
and relays that lag behind are nudged with SIGHUP.  Done this way a client that joins
bootstraps in a few seconds instead of a random 5-35 s.

No listener binds anything but 127.0.0.1, no router knows a public authority or fallback
directory, and no relay is an exit, so nothing can leave the host.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from onionpost.base.config import TorConfig
from onionpost.core.errors import TorError, TorNotInstalled
from onionpost.testing.ports import port_is_free, start_range

log = logging.getLogger(__name__)

AUTHORITIES = 3
_DIRPORT_OFFSET = 20
_PORT_SPAN = 30  # ports base .. base+29 are reserved for one network
_REQUIRED_FLAGS = frozenset({"Running", "Valid", "Fast", "Guard", "HSDir", "Stable", "V2Dir"})
_KEEP_ON_RESET = frozenset({"keys", "fingerprint", "fingerprint-ed25519", "torrc"})
_GRACE_SECONDS = 5.0
_HUP_EVERY = 3.0

# Lines every tor in the network shares, clients included.  GeoIP is off because it costs
# 36 MB and half a second of CPU per tor and nothing here needs countries.
_SHARED_LINES = (
    "TestingTorNetwork 1",
    "ClientUseIPv6 0",
    "PathsNeededToBuildCircuits 0.67",
    'GeoIPFile ""',
    'GeoIPv6File ""',
    "ConnLimit 60",
)


@dataclass
class _Router:
    nick: str
    datadir: Path
    or_port: int
    dir_port: int | None  # authorities only
    fingerprint: str = ""
    v3ident: str = ""
    process: subprocess.Popen[bytes] | None = None
    stdout: IO[bytes] | None = field(default=None, repr=False)

    @property
    def is_authority(self) -> bool:
        return self.dir_port is not None

    @property
    def torrc(self) -> Path:
        return self.datadir / "torrc"


def free_base_port(span: int = _PORT_SPAN, *, rng: random.Random | None = None) -> int:
    """A base port whose whole block is free now; other programs on the host may hold ports.

    The block lies below the kernel's ephemeral range when it can, so that outgoing
    connections and ``auto`` listeners cannot take a port between this check and tor's bind.
    """
    rng = rng or random.Random()  # noqa: S311 - port choice, not a secret
    starts = start_range(span)
    for _ in range(200):
        base = rng.choice(starts)
        if all(port_is_free(base + i) for i in range(span)):
            return base
    raise TorError("Could not find a block of free loopback ports for the private Tor network.")


def _parse_consensus(text: str) -> dict[str, frozenset[str]]:
    """Router nickname -> flags, from a network-status consensus document."""
    routers: dict[str, frozenset[str]] = {}
    nick = ""
    for line in text.splitlines():
        if line.startswith("r "):
            nick = line.split()[1]
            routers[nick] = frozenset()
        elif line.startswith("s ") and nick:
            routers[nick] = frozenset(line.split()[1:])
    return routers


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _tail(path: Path, lines: int = 5) -> str:
    kept = [ln for ln in _read_text(path).splitlines() if "[warn]" in ln or "[err]" in ln]
    return " | ".join(kept[-lines:])


def _is_our_tor(pid: int, torrc: Path) -> bool:
    """Whether PID still runs our tor with this torrc, so we never signal a recycled PID."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return str(torrc).encode() in cmdline


class TorNetwork:
    """A private Tor network; ``start()`` returns once a client can bootstrap in seconds."""

    def __init__(
        self,
        workdir: Path,
        *,
        base_port: int | None = None,
        relays: int = 5,
        interval: int = 10,
        tor_binary: str = "tor",
        env: dict[str, str] | None = None,
    ) -> None:
        if relays < 1 or AUTHORITIES + relays > _DIRPORT_OFFSET:
            raise ValueError(f"relays must be between 1 and {_DIRPORT_OFFSET - AUTHORITIES}")
        if 86_400 % interval or interval < 10:
            raise ValueError("interval must be at least 10 and divide one day")
        self.workdir = Path(workdir)
        self.base_port = base_port if base_port is not None else free_base_port()
        self.interval = interval
        self.tor_binary = tor_binary
        self.env = env
        self.timings: dict[str, float] = {}
        self._routers: list[_Router] = []
        for i in range(AUTHORITIES + relays):
            auth = i < AUTHORITIES
            nick = f"auth{i}" if auth else f"relay{i - AUTHORITIES}"
            self._routers.append(
                _Router(
                    nick=nick,
                    datadir=self.workdir / nick,
                    or_port=self.base_port + i,
                    dir_port=self.base_port + _DIRPORT_OFFSET + i if auth else None,
                )
            )
        self._empty = self.workdir / "empty-torrc"

    # --- public API ---------------------------------------------------------------------

    @property
    def router_count(self) -> int:
        return len(self._routers)

    def start(self, timeout: float = 120.0) -> None:
        """Build keys, launch every router and wait until the network is ready for clients."""
        t0 = time.monotonic()
        deadline = t0 + timeout
        try:
            self._build()
            self.timings["build"] = time.monotonic() - t0
            for router in self._routers:
                self._reset_state(router)
                router.torrc.write_text("\n".join(self._torrc_lines(router)) + "\n")
                self._launch(router)
            self._wait_for_authorities(deadline)
            self.timings["consensus"] = time.monotonic() - t0
            self._wait_for_relays(deadline)
            self.timings["ready"] = time.monotonic() - t0
        except BaseException:
            self.stop()
            raise
        log.info(
            "private Tor network ready on 127.0.0.1:%d in %.1f s",
            self.base_port,
            self.timings["ready"],
        )

    def client_torrc_lines(self) -> list[str]:
        """Lines that make a client or onion-service tor join this network and nothing else."""
        if not all(r.v3ident for r in self._routers if r.is_authority):
            raise TorError("The private Tor network has not been started.")
        return [*_SHARED_LINES, *self._dir_authority_lines()]

    def tor_config(self, **overrides: Any) -> TorConfig:  # noqa: ANN401
        """A launch-mode TorConfig for a node on this network (``overrides`` replace fields)."""
        base = TorConfig(
            mode="launch",
            tor_binary=self.tor_binary,
            extra_torrc=tuple(self.client_torrc_lines()),
            bootstrap_timeout=90.0,
        )
        return dataclasses.replace(base, **overrides)

    def stop(self) -> None:
        """SIGTERM our own tors, then SIGKILL what is left after a grace period."""
        running = [r for r in self._routers if r.process is not None]
        for router in running:
            proc = router.process
            assert proc is not None
            if proc.poll() is None and _is_our_tor(proc.pid, router.torrc):
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + _GRACE_SECONDS
        for router in running:
            proc = router.process
            assert proc is not None
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("tor %s ignored SIGTERM; killing it", router.nick)
                if _is_our_tor(proc.pid, router.torrc):
                    proc.kill()
                proc.wait()
            router.process = None
            if router.stdout is not None:
                router.stdout.close()
                router.stdout = None

    def __enter__(self) -> TorNetwork:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # --- keys ---------------------------------------------------------------------------

    def _tor_cmd(self, *args: str) -> list[str]:
        return [
            self.tor_binary,
            "-f",
            str(self._empty),
            "--defaults-torrc",
            str(self._empty),
            *args,
        ]

    def _build(self) -> None:
        """Create missing keys; every tor-gencert and --list-fingerprint runs in parallel."""
        if shutil.which(self.tor_binary) is None:
            raise TorNotInstalled(
                f"The tor program '{self.tor_binary}' was not found. "
                "Install it with `sudo apt-get install tor`."
            )
        gencert = shutil.which("tor-gencert")
        if gencert is None:
            raise TorNotInstalled(
                "tor-gencert was not found; it comes with tor: `sudo apt-get install tor`."
            )
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._empty.touch()
        jobs: list[tuple[str, subprocess.Popen[bytes], bytes | None]] = []
        for router in self._routers:
            keys = router.datadir / "keys"
            keys.mkdir(parents=True, exist_ok=True)
            router.datadir.chmod(0o700)
            keys.chmod(0o700)
            if router.is_authority and not (keys / "authority_certificate").exists():
                cmd = [
                    gencert, "--create-identity-key", "--passphrase-fd", "0",
                    "-i", str(keys / "authority_identity_key"),
                    "-s", str(keys / "authority_signing_key"),
                    "-c", str(keys / "authority_certificate"),
                    "-m", "12", "-a", f"127.0.0.1:{router.dir_port}",
                ]  # fmt: skip
                jobs.append((f"tor-gencert for {router.nick}", self._spawn(cmd), b"\n"))
            if not (router.datadir / "fingerprint").exists():
                cmd = self._tor_cmd(
                    "--list-fingerprint", "--DataDirectory", str(router.datadir),
                    "--ORPort", "1", "--Nickname", router.nick,
                )  # fmt: skip
                jobs.append((f"key generation for {router.nick}", self._spawn(cmd), None))
        for what, proc, stdin in jobs:
            out, _ = proc.communicate(stdin, timeout=120)
            if proc.returncode != 0:
                raise TorError(f"{what} failed: {out.decode(errors='replace').strip()[-300:]}")
        for router in self._routers:
            router.fingerprint = _read_text(router.datadir / "fingerprint").split()[1]
            if router.is_authority:
                cert = _read_text(router.datadir / "keys" / "authority_certificate")
                match = re.search(r"^fingerprint ([0-9A-F]{40})$", cert, re.MULTILINE)
                if not match:
                    raise TorError(f"tor-gencert wrote no fingerprint for {router.nick}.")
                router.v3ident = match.group(1)

    def _spawn(self, cmd: list[str]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            cmd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=self._env(),
        )

    def _env(self) -> dict[str, str] | None:
        return None if self.env is None else {**os.environ, **self.env}

    def _reset_state(self, router: _Router) -> None:
        """Drop everything but keys, so a reused directory starts from a clean network."""
        for entry in router.datadir.iterdir():
            if entry.name in _KEEP_ON_RESET:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    # --- torrc --------------------------------------------------------------------------

    def _dir_authority_lines(self) -> list[str]:
        return [
            f"DirAuthority {r.nick} orport={r.or_port} no-v2 v3ident={r.v3ident} "
            f"127.0.0.1:{r.dir_port} {r.fingerprint}"
            for r in self._routers
            if r.is_authority
        ]

    def _torrc_lines(self, router: _Router) -> list[str]:
        d = router.datadir
        lines = [
            *_SHARED_LINES,
            f"DataDirectory {d}",
            f"PidFile {d / 'pid'}",
            f"Nickname {router.nick}",
            "RunAsDaemon 0",
            f"Log notice file {d / 'notice.log'}",
            "SafeLogging 0",
            "LogTimeGranularity 1",
            "ProtocolWarnings 1",
            "ShutdownWaitLength 0",
            "Sandbox 0",
            f"__OwningControllerProcess {os.getpid()}",
            *self._dir_authority_lines(),
            # relay
            "SocksPort 0",
            f"ORPort 127.0.0.1:{router.or_port}",
            "Address 127.0.0.1",
            "AssumeReachable 1",
            "ExitRelay 0",
            "ExitPolicy reject *:*",
            "ExitPolicy reject6 *:*",
            "PublishServerDescriptor 1",
            "ServerDNSDetectHijacking 0",
            "ServerDNSTestAddresses",
            f"ContactInfo {router.nick}@test.invalid",
            "MaxConsensusAgeForDiffs 30 seconds",
        ]
        if router.is_authority:
            i = self.interval
            delay = 2 if i < 20 else 4
            lines += [
                f"DirPort 127.0.0.1:{router.dir_port}",
                "AuthoritativeDirectory 1",
                "V3AuthoritativeDirectory 1",
                f"TestingV3AuthInitialVotingInterval {i}",
                f"TestingV3AuthInitialVoteDelay {delay}",
                f"TestingV3AuthInitialDistDelay {delay}",
                f"V3AuthVotingInterval {i}",
                f"V3AuthVoteDelay {delay}",
                f"V3AuthDistDelay {delay}",
                "V3AuthNIntervalsValid 2",
                "TestingDirAuthVoteGuard *",
                "TestingDirAuthVoteHSDir *",
                "AuthDirVoteStableGuaranteeMinUptime 0 seconds",
                "AuthDirVoteStableGuaranteeMTBF 0 seconds",
                "TestingMinFastFlagThreshold 0",
                "TestingMinExitFlagThreshold 0",
                # Fast otherwise goes to routers above the 12.5th percentile of bandwidth: on
                # an idle loopback network the slowest router's Fast flag came and went
                # between consensuses (and readiness waited for it).  1 KB/s guarantees it.
                "AuthDirFastGuarantee 1 KB",
                "AuthDirGuardBWGuarantee 1 KB",
            ]
        return lines

    # --- processes ----------------------------------------------------------------------

    def _launch(self, router: _Router) -> None:
        router.stdout = (router.datadir / "stdout.log").open("wb")
        router.process = subprocess.Popen(  # noqa: S603 - fixed argv, no shell
            [self.tor_binary, "-f", str(router.torrc), "--defaults-torrc", str(self._empty)],
            stdin=subprocess.DEVNULL,
            stdout=router.stdout,
            stderr=subprocess.STDOUT,
            env=self._env(),
        )

    def _check_alive(self) -> None:
        for router in self._routers:
            if router.process is not None and router.process.poll() is not None:
                why = _tail(router.datadir / "stdout.log") or _tail(router.datadir / "notice.log")
                raise TorError(
                    f"tor {router.nick} of the private network exited with code "
                    f"{router.process.returncode}: {why or 'see ' + str(router.datadir)}"
                )

    def _missing(self, consensus: Path) -> list[str]:
        """What the consensus at this path still lacks, in words (empty when complete)."""
        routers = _parse_consensus(_read_text(consensus))
        missing = []
        for router in self._routers:
            flags = routers.get(router.nick)
            if flags is None:
                missing.append(f"{router.nick} absent")
            elif lacking := _REQUIRED_FLAGS - flags:
                missing.append(f"{router.nick} lacks {','.join(sorted(lacking))}")
        return missing

    def _wait_for_authorities(self, deadline: float) -> None:
        auths = [r for r in self._routers if r.is_authority]
        while True:
            self._check_alive()
            missing = {r.nick: self._missing(r.datadir / "cached-consensus") for r in auths}
            missing = {nick: lacks for nick, lacks in missing.items() if lacks}
            if not missing:
                return
            if time.monotonic() > deadline:
                raise TorError(
                    "The private Tor network did not reach a complete consensus in time: "
                    + "; ".join(f"{k}: {', '.join(v)}" for k, v in missing.items())
                )
            time.sleep(0.25)

    def _microdesc_count(self, router: _Router) -> int:
        text = _read_text(router.datadir / "cached-microdescs") + _read_text(
            router.datadir / "cached-microdescs.new"
        )
        return text.count("\nonion-key") + text.startswith("onion-key")

    def _relay_ready(self, router: _Router) -> bool:
        d = router.datadir
        return not self._missing(d / "cached-microdesc-consensus") and self._microdesc_count(
            router
        ) >= len(self._routers)

    def _wait_for_relays(self, deadline: float) -> None:
        """Every router must serve the full directory; SIGHUP resets a lagging one's back-off."""
        last_hup = time.monotonic()
        while True:
            self._check_alive()
            lagging = [r for r in self._routers if not self._relay_ready(r)]
            if not lagging:
                return
            now = time.monotonic()
            if now > deadline:
                raise TorError(
                    "Some routers of the private Tor network did not fetch the directory in "
                    f"time: {', '.join(r.nick for r in lagging)}."
                )
            if now - last_hup >= _HUP_EVERY:
                self._hup(lagging)
                last_hup = now
            time.sleep(0.25)

    def _hup(self, routers: Iterable[_Router]) -> None:
        for router in routers:
            proc = router.process
            if proc is not None and proc.poll() is None and _is_our_tor(proc.pid, router.torrc):
                proc.send_signal(signal.SIGHUP)
