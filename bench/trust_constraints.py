"""The trust bench's constraint section: z3 verification of generated materials claims against
the declared domain rules, beside a keyword baseline and system 1 (which has no such check).

The materials table is the `csv_path` argument, else $VFM_MATERIALS_CSV, else
data_dir/../personas/materials/materials_dev.csv, else ../shared/data/personas/materials/ beside
the repository."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from bench.common import percentile
from bench.trust_claims import CONSISTENT, DEFAULT_CSV, DOMAIN_RULES, VIOLATION, generate
from services.trust.constraints import ConstraintChecker, parse_rules

GOALS = {"constraint_precision": ">= 0.95", "constraint_recall": ">= 0.95",
         "constraint_false_alarm": "<= 0.02"}
QUICK_RECORDS = 600


def materials_csv(data_dir: Path, csv_path: Path | str | None = None) -> Path:
    if csv_path:
        return Path(csv_path)
    if os.environ.get("VFM_MATERIALS_CSV"):
        return Path(os.environ["VFM_MATERIALS_CSV"])
    beside = Path(data_dir).parent / "personas" / "materials" / "materials_dev.csv"
    return beside if beside.is_file() else DEFAULT_CSV


def keyword_flags(text: str) -> bool:
    """The baseline: regexes without units, compounds or a solver: a negative number, "metal"
    beside a non-zero number, a density figure above 25."""
    if re.search(r"(?<![\w.])[-−]\d", text):
        return True
    if re.search(r"\bmetal\b", text) and re.search(r"(?<![\w.])(?!0(?:\.0+)?\s)\d+(?:\.\d+)?\s*eV",
                                                   text):
        return True
    density = re.search(r"density of (\d+(?:\.\d+)?)", text)
    return bool(density and float(density.group(1)) > 25)


def _scores(records: list[dict], flagged: list[bool], named: list[bool]) -> dict:
    """Record-level figures; a violation counts as found only if its own rule is named."""
    bad = [r["label"] == VIOLATION for r in records]
    true_pos = sum(f and b and n for f, b, n in zip(flagged, bad, named))
    flagged_count = sum(flagged)
    false_alarms = sum(f and not b for f, b in zip(flagged, bad))
    consistent = sum(not b for b in bad)
    return {"precision": true_pos / flagged_count if flagged_count else 0.0,
            "recall": true_pos / max(1, sum(bad)),
            "false_alarm": false_alarms / max(1, consistent)}


def evaluate(data_dir: Path, quick: bool, csv_path: Path | str | None = None,
             seed: int = 0) -> tuple[dict, list[tuple]]:
    path = materials_csv(data_dir, csv_path)
    if not path.is_file():
        raise FileNotFoundError(f"materials table not found: {path} (set VFM_MATERIALS_CSV)")
    records = generate(path, seed)
    if quick:
        records = records[:QUICK_RECORDS]
    checker = ConstraintChecker(parse_rules(DOMAIN_RULES))
    flagged, named, times, misses = [], [], [], {}
    for record in records:
        began = time.perf_counter()
        finding = checker.check(record["text"])
        times.append((time.perf_counter() - began) * 1000)
        flagged.append(finding.score >= 1.0)
        named.append(set(record["violates"]) <= set(finding.details["violated"]))
        if (finding.score >= 1.0) != (record["label"] == VIOLATION):
            misses.setdefault(record["kind"], record["text"])
    ours = _scores(records, flagged, named)
    keyword = _scores(records, [keyword_flags(r["text"]) for r in records], [True] * len(records))
    figures = {f"constraint_{k}": round(v, 4) for k, v in ours.items()}
    figures["constraint_p50_ms"] = round(percentile(times, 50), 2)
    figures["constraint_records"] = len(records)
    rows = [("constraints", key.removeprefix("constraint_"), figures[key],
             round(keyword[key.removeprefix("constraint_")], 4),
             0.0 if key != "constraint_precision" else "n/a", GOALS[key]) for key in GOALS]
    rows.append(("constraints", "p50 ms per answer", figures["constraint_p50_ms"], "", "", ""))
    n_true = sum(r["label"] == CONSISTENT for r in records)
    rows.append(("constraints", "records (consistent/violation)",
                 f"{n_true}/{len(records) - n_true}", "", "", ""))
    for kind, text in sorted(misses.items())[:8]:
        rows.append(("constraints", f"missed/false: {kind}", text[:70], "", "", ""))
    return figures, rows


def main(argv: list[str] | None = None) -> int:
    from bench.trust import run_section

    return run_section("trust_constraints", "trust: constraints (generated materials claims)", evaluate, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main())
