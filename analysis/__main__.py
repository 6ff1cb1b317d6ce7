"""`python -m analysis DIR [DIR ...] [--out OUT]`: results tables, roadmap figures (in each roadmap's order), learning
curves and, for leave-one-out runs, leave_one_out.png/.md/.csv, for a two-level design of steps factorial.json/.md/.png
(analysis.factorial) from run folders; `--status`: a table of every job
(epochs done, top-1, img/s, status, ETA), writing nothing."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 for a bad DIR, with a one-line message)."""
    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__)
    parser.add_argument(
        "dirs", nargs="+", type=Path, help="sweep or run folders (searched recursively), or results.csv files to merge"
    )
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the first DIR)")
    parser.add_argument("--metric", default="top1", choices=["top1", "best_top1", "top1_ema", "best_top1_ema"],
                        help="what the figures and tables rank: the last epoch's top-1 (default), the best "
                        "epoch's, or the EMA's")  # fmt: skip
    parser.add_argument(
        "--status", action="store_true", help="print every job's progress and the sweep's ETA; writes nothing"
    )
    args = parser.parse_args(argv)

    from analysis import analyze, find_run_dirs, results_csv  # after parsing: --help need not pay for pandas

    for d in args.dirs:
        if results_csv(d) is not None and not args.status:
            continue
        if not d.is_dir():
            print(f"error: {d} does not exist or is not a directory (or a results.csv)", file=sys.stderr)
            return 2
        if not find_run_dirs([d]):
            print(f"error: no run folders (config.yaml) and no results.csv under {d}", file=sys.stderr)
            return 2
    if args.status:
        from analysis.status import print_status

        print_status(args.dirs)
        return 0
    try:
        written = analyze(args.dirs, args.out, metric=args.metric)
    except ValueError as e:  # e.g. a CSV that is not a results table
        print(f"error: {e}", file=sys.stderr)
        return 2
    print("wrote " + ", ".join(str(p) for p in written.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
