"""Run the benchmark sections: ``python -m bench [--quick] [--only SECTION ...] [--list]``."""

from __future__ import annotations

import argparse
import importlib
import sys
import time

from bench import SECTIONS
from bench.harness import Context, environment


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small sizes, few repeats (smoke run)")
    ap.add_argument(
        "--only",
        action="append",
        metavar="SECTION",
        help=f"run only this section (repeatable): {', '.join(SECTIONS)}",
    )
    ap.add_argument("--list", action="store_true", help="list the sections and exit")
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(SECTIONS))
        return 0
    names = args.only or list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        ap.error(f"unknown section(s): {', '.join(unknown)}; known: {', '.join(SECTIONS)}")
    ctx = Context(quick=args.quick)
    print(environment(quick=args.quick))
    for name in names:
        started = time.perf_counter()
        module = importlib.import_module(SECTIONS[name])
        ctx.begin(name, (module.__doc__ or "").strip().splitlines()[0] if module.__doc__ else "")
        module.run(ctx)
        print(f"  ({name}: {time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
