"""The small framework the benchmark sections share: timing, statistics, and printing each
figure next to its reference.

A section calls :meth:`Context.measure` for the thing it studies *and* for a reference that
bounds it from below (the raw primitive doing the same bytes), then :meth:`Context.compare`,
which prints both and their ratio on one line.  Non-speed figures (memory, sizes) go through
:meth:`Context.figure`.  Nothing here asserts anything: benchmarks report, tests judge.
"""

from __future__ import annotations

import gc
import importlib.metadata
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Stats:
    """Seconds per call over the samples of one measurement."""

    name: str
    samples: tuple[float, ...]
    size: int | None = None  # bytes processed per call, for MB/s

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples)

    @property
    def p50(self) -> float:
        return statistics.median(self.samples)

    @property
    def p95(self) -> float:
        s = sorted(self.samples)
        return s[min(len(s) - 1, round(0.95 * (len(s) - 1)))]

    @property
    def rate(self) -> float | None:
        """MB/s (10**6 bytes) at the median, when a size is known."""
        if self.size is None or self.p50 <= 0:
            return None
        return self.size / self.p50 / 1e6


def fmt_time(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} µs"


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _cell(s: Stats) -> str:
    rate = s.rate
    text = fmt_time(s.p50)
    return f"{text:>10}" + (f" {rate:8.1f} MB/s" if rate is not None else " " * 14)


class Context:
    """What a section gets: the run's options and the printing helpers."""

    def __init__(self, *, quick: bool) -> None:
        self.quick = quick
        self.section = ""

    def begin(self, name: str, title: str) -> None:
        self.section = name
        print(f"\n== {name}: {title}" if title else f"\n== {name}")

    def heading(self, text: str) -> None:
        print(f"\n  {text}")

    def note(self, text: str) -> None:
        print(f"    {text}")

    def measure(
        self,
        name: str,
        fn: Callable[[], object],
        *,
        repeat: int,
        number: int = 1,
        size: int | None = None,
        warmup: int = 1,
    ) -> Stats:
        """Time ``fn``: ``repeat`` samples of ``number`` calls each (seconds per call)."""
        for _ in range(warmup):
            fn()
        samples = []
        gc_was = gc.isenabled()
        gc.disable()
        try:
            for _ in range(repeat):
                t0 = time.perf_counter()
                for _ in range(number):
                    fn()
                samples.append((time.perf_counter() - t0) / number)
        finally:
            if gc_was:
                gc.enable()
        return Stats(name, tuple(samples), size)

    def compare(self, subject: Stats, reference: Stats, *, extra: str = "") -> float:
        """Print ``subject`` next to ``reference`` (both medians) and their ratio; return it."""
        ratio = subject.p50 / reference.p50 if reference.p50 > 0 else float("inf")
        print(
            f"    {subject.name:<34}{_cell(subject)}   vs {reference.name:<30}"
            f"{_cell(reference)}   x{ratio:7.2f}{('   ' + extra) if extra else ''}"
        )
        return ratio

    def distribution(self, subject: Stats, reference: Stats, *, extra: str = "") -> float:
        """Like :meth:`compare`, with mean/p50/p95 of the subject (for skewed timings)."""
        ratio = subject.mean / reference.p50 if reference.p50 > 0 else float("inf")
        print(
            f"    {subject.name:<34} mean {fmt_time(subject.mean)}, p50 {fmt_time(subject.p50)},"
            f" p95 {fmt_time(subject.p95)} (n={len(subject.samples)})"
        )
        print(
            f"    {'':<34} vs {reference.name} {fmt_time(reference.p50)}   x{ratio:.2f}"
            f"{('   ' + extra) if extra else ''}"
        )
        return ratio

    def figure(self, name: str, value: str, *, extra: str = "") -> None:
        """A figure that is not a speed (memory, size): printed as is."""
        print(f"    {name:<34}{value:>24}{('   ' + extra) if extra else ''}")


def environment(*, quick: bool) -> str:
    cpu = ""
    try:
        m = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = m.group(1).strip() if m else ""
    except OSError:
        pass
    try:
        nacl = importlib.metadata.version("PyNaCl")
    except importlib.metadata.PackageNotFoundError:
        nacl = "?"
    return (
        f"onionpost bench{' (quick)' if quick else ''}: Python {sys.version.split()[0]}, "
        f"PyNaCl {nacl}, {platform.machine()}" + (f", {cpu}" if cpu else "") + f", {_cpus()} CPUs"
    )


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# --- memory ------------------------------------------------------------------------------------


def rss_bytes() -> int | None:
    """Current resident set size (Linux), or None where /proc is not there."""
    return _status_kib("VmRSS")


def reset_peak_rss() -> bool:
    """Reset the kernel's high-water mark of this process (Linux >= 4.0); False if not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int | None:
    return _status_kib("VmHWM")


def _status_kib(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(m.group(1)) * 1024 if m else None
