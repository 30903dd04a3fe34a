"""python -m benchmarks [--quick] [--only NAME[,NAME]] [--out DIR]"""

from __future__ import annotations

import argparse
import sys

from .common import one_blas_thread

one_blas_thread()  # before numpy is imported, here and in the workers


def main(argv: list[str] | None = None) -> int:
    from . import NAMES, run_suite

    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="qjamfab's benchmark suite (results in "
        "benchmarks/results/, or benchmarks/results/quick/).",
    )
    parser.add_argument(
        "--quick", action="store_true", help="small sizes, about a minute"
    )
    parser.add_argument(
        "--scale", choices=["full", "quick", "tiny"], help=argparse.SUPPRESS
    )
    parser.add_argument(
        "--only", default="", help=f"comma-separated subset of: {', '.join(NAMES)}"
    )
    parser.add_argument(
        "--out", default=None, help="output directory for results.json and plots"
    )
    args = parser.parse_args(argv)
    scale = args.scale or ("quick" if args.quick else "full")
    only = [n.strip() for n in args.only.split(",") if n.strip()] or None
    try:
        results = run_suite(scale, only, args.out)
    except ValueError as exc:
        parser.error(str(exc))
    failed = [n for n, r in results["benchmarks"].items() if r.get("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
