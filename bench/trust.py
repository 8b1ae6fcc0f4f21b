"""`python -m bench trust [--data-dir DIR] [--quick]`: every section of the trust benchmark
(learned checks, PII, grounding, constraints, latency) in one table, each figure beside the keyword
baseline and system 1 alone measured in the same run, then all figures as one JSON line."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

from bench.common import REPO, report

DEFAULT_DATA = REPO.parent / "shared" / "data" / "trust"
# Fixed order; each module has evaluate(data_dir: Path, quick: bool) -> (figures, rows).
SECTIONS = ("bench.trust_classify", "bench.trust_pii", "bench.trust_grounding",
            "bench.trust_constraints", "bench.trust_latency")
HEADER = ("task", "figure", "ours", "keyword baseline", "system 1 only", "goal")


def _args(prog: str, description: str | None, quick_help: str,
          argv: list[str] | None) -> argparse.Namespace | None:
    """--data-dir and --quick; None (after one line on stderr) when the folder is missing."""
    parser = argparse.ArgumentParser(prog=prog, description=description,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    args = parser.parse_args(argv)
    if not args.data_dir.is_dir():
        print(f"{prog}: --data-dir {args.data_dir} is not a folder", file=sys.stderr)
        return None
    return args


def run_section(name: str, title: str, evaluate, argv: list[str] | None,
                description: str | None = None) -> int:
    """`python -m bench.NAME [--data-dir DIR] [--quick]`: one section alone, same table and
    JSON line as the whole bench."""
    prog = f"python -m bench.{name}"
    args = _args(prog, description, "a smaller share of the data", argv)
    if args is None:
        return 2
    try:
        figures, rows = evaluate(args.data_dir, args.quick)
    except FileNotFoundError as missing:
        print(f"{prog}: {missing}", file=sys.stderr)
        return 2
    report(title + (" (quick)" if args.quick else ""), rows, HEADER, figures)
    return 0


def main(argv: list[str]) -> int:
    args = _args("python -m bench trust", __doc__, "fewer folds and benign texts", argv)
    if args is None:
        return 2
    figures: dict = {}
    rows: list[tuple] = []
    for name in SECTIONS:
        module = importlib.import_module(name)
        start = time.monotonic()
        try:
            section_figures, section_rows = module.evaluate(args.data_dir, args.quick)
        except FileNotFoundError as err:  # a data folder without this section's files
            print(f"section {name.rsplit('.', 1)[-1]} skipped: {err.filename} not found")
            continue
        figures.update(section_figures)
        rows.extend(section_rows)
        print(f"section {name.rsplit('.', 1)[-1]}: {time.monotonic() - start:.0f} s",
              file=sys.stderr)
    report(f"trust checks on {args.data_dir}" + (" (quick)" if args.quick else ""),
           rows, HEADER, figures)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
