"""`python -m analysis DIR [DIR ...] [--out OUT]`: results tables and roadmap figures from run folders."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 for a bad DIR, with a one-line message)."""
    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__)
    parser.add_argument("dirs", nargs="+", type=Path, help="sweep or run folders (searched recursively)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: the first DIR)")
    args = parser.parse_args(argv)

    from analysis import analyze, find_run_dirs  # after parsing: --help should not pay for pandas/matplotlib

    for d in args.dirs:
        if not d.is_dir():
            print(f"error: {d} does not exist or is not a directory", file=sys.stderr)
            return 2
        if not find_run_dirs([d]):
            print(f"error: no run folders (config.yaml) under {d}", file=sys.stderr)
            return 2
    written = analyze(args.dirs, args.out)
    print("wrote " + ", ".join(str(p) for p in written.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
