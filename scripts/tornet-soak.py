#!/usr/bin/env python3
"""Start and stop the private Tor network N times in a row; report how many became ready
and the slowest start.  The tor tests and `onionpost demo` depend on it becoming ready every
time.  Usage: .venv/bin/python scripts/tornet-soak.py [N]"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from onionpost.core.errors import TorError
from onionpost.testing.tornet import TorNetwork


def main() -> int:
    runs = int(sys.argv[1]) if len(sys.argv) > 1 else 20
    times: list[float] = []
    failures: list[str] = []
    for i in range(1, runs + 1):
        with tempfile.TemporaryDirectory(prefix="tornet-soak-") as tmp:
            net = TorNetwork(Path(tmp), interval=10)
            t0 = time.monotonic()
            try:
                net.start(timeout=180)
            except TorError as exc:
                failures.append(str(exc))
                print(f"start {i:2}: FAILED after {time.monotonic() - t0:.1f} s: {exc}", flush=True)
                continue
            finally:
                net.stop()
            times.append(net.timings["ready"])
            print(f"start {i:2}: ready in {times[-1]:.1f} s", flush=True)
    slowest = f"{max(times):.1f} s" if times else "-"
    print(f"{len(times)} of {runs} starts ready; slowest {slowest}; {len(failures)} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
