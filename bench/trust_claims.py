"""`python -m bench trust_claims --csv PATH [--seed N] [--out FILE]`: the constraint claim set,
generated from a Materials Project property table: true statements about its compounds, and
statements that violate the materials domain rules declared here, each labelled."""

from __future__ import annotations

import argparse
import collections
import csv
import json
import random
import sys
from pathlib import Path

from bench.common import REPO

DEFAULT_CSV = REPO.parent / "shared" / "data" / "personas" / "materials" / "materials_dev.csv"

# The materials agent's domain rules, as a tenant declares them in its policy.
DOMAIN_RULES = [
    {"name": "band_gap_range", "quantity": "band_gap", "unit": "eV", "min": 0, "max": 15},
    {"name": "density_range", "quantity": "density", "unit": "g/cm3", "min": 0.01, "max": 25},
    {"name": "formation_energy_range", "quantity": "formation_energy", "unit": "eV/atom",
     "min": -6, "max": 4},
    # Below 1 is faster than light in vacuum; DFT gives narrow-gap compounds indices above 10.
    {"name": "refractive_index_range", "quantity": "refractive_index", "min": 1, "max": 30},
    {"name": "metal_zero_gap", "when": "is_metal", "require": "band_gap == 0"},
    {"name": "gapped_nonmetal", "when": "is_semiconductor or is_insulator",
     "require": "band_gap > 0"},
    {"name": "static_above_electronic",
     "require": "dielectric_total >= dielectric_electronic"},
    # n = sqrt(eps_inf) for a non-magnetic, non-absorbing crystal; the table holds it to < 1%.
    {"name": "index_matches_permittivity",
     "require": "abs(refractive_index**2 - dielectric_electronic) <= 0.05 * dielectric_electronic"},
]

CONSISTENT, VIOLATION = "consistent", "violation"


def _num(row: dict, key: str) -> float | None:
    return float(row[key]) if row.get(key) not in (None, "") else None


def load_rows(csv_path: Path) -> list[dict]:
    with open(csv_path, newline="") as handle:
        return list(csv.DictReader(handle))


# --- true statements ---------------------------------------------------------------------------

def _fmt(value: float) -> str:
    """Three significant digits, so a 0.004 eV gap is not written as 0.00 eV."""
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def _gap_phrase(rnd: random.Random, gap: float) -> str:
    style = rnd.randrange(6)
    if style == 0:
        return f"a band gap of {_fmt(gap)} eV"
    if style == 1:
        return f"a band gap of {_fmt(gap * 1000)} meV"
    if style == 2:
        return f"a {_fmt(gap)} eV band gap"
    if style == 3:
        low = max(0.0, round(gap - rnd.uniform(0.1, 1.0), 1))
        return f"a band gap between {low:.1f} and {gap + rnd.uniform(0.1, 1.0):.1f} eV"
    if style == 4:
        return f"a band gap below {gap + rnd.uniform(0.2, 2.0):.1f} eV"
    return f"a calculated (PBE) band gap of about {_fmt(gap)} eV"


def _density_phrase(rnd: random.Random, density: float) -> str:
    style = rnd.randrange(4)
    if style == 0:
        return f"a density of {density:.2f} g/cm3"
    if style == 1:
        return f"a density of {density * 1000:,.0f} kg/m3"
    if style == 2:
        return f"a density of {density:.2f} g cm-3"
    return f"a density below {density + rnd.uniform(0.5, 3):.1f} g/cm³"


def _true_statements(rnd: random.Random, row: dict) -> list[tuple[str, str]]:
    name, mid = row["formula"], row["material_id"]
    gap, density = _num(row, "band_gap_eV"), _num(row, "density_g_cm3")
    energy = _num(row, "formation_energy_eV_atom")
    n, eps_inf = _num(row, "refractive_index"), _num(row, "dielectric_electronic")
    eps = _num(row, "dielectric_total")
    out = []
    if gap is not None and density is not None:
        out.append(("gap+density", f"{name} ({mid}) has {_gap_phrase(rnd, gap)} and "
                                   f"{_density_phrase(rnd, density)}."))
    if gap is not None:
        if gap == 0:
            out.append(("metal", rnd.choice([f"{name} is a metal: its band gap is 0 eV.",
                                             f"{name}, a metal, has no band gap (0 eV).",
                                             f"{name} is metallic, with a band gap of 0 meV."])))
        else:
            kind = "insulator" if gap >= 3 else "semiconductor"
            article = "an" if kind == "insulator" else "a"
            out.append((kind, rnd.choice([
                f"{name} is {article} {kind} with {_gap_phrase(rnd, gap)}.",
                f"With {_gap_phrase(rnd, gap)}, {name} is {article} {kind}.",
                f"{name}, {article} {kind}, has {_gap_phrase(rnd, gap)}.",
                f"{name} is not a metal: it has {_gap_phrase(rnd, gap)}."])))
    if energy is not None:
        unit = rnd.choice(["eV/atom", "meV/atom"])
        value = energy if unit == "eV/atom" else energy * 1000
        out.append(("formation_energy", f"The formation energy of {name} is {value:.2f} {unit}."
                    if unit == "eV/atom" else
                    f"The formation energy of {name} is {value:.0f} {unit}."))
    if n is not None and eps_inf is not None and eps is not None:
        out.append(("dielectric", f"{name} has a refractive index of {n:.2f}, an electronic "
                                  f"dielectric constant of {eps_inf:.2f} and a static dielectric "
                                  f"constant of {eps:.2f}."))
    if gap is not None and density is not None:
        # Two compounds in one answer: one's classification must not meet the other's gap.
        out.append(("transition-metal-context",
                    f"Like many transition metal compounds, {name} is studied for catalysis; "
                    f"it has {_gap_phrase(rnd, gap)}."))
    return out


# --- violations --------------------------------------------------------------------------------

# Several phrasings per kind, so the set tests the extraction, not one sentence shape.
_GAP = ("{f} has a band gap of {v} eV.", "The computed band gap of {f} is {v} eV.",
        "With a band gap of {v} eV, {f} is a candidate absorber.", "{f}: band gap {v} eV.")
_METAL_GAP = ("{f} is a metal with a band gap of {v} eV.",
              "{f}, a metal, has a band gap of {v} eV.",
              "With a band gap of {v} eV, {f} is metallic.",
              "{f} is metallic; its band gap is {v} eV.")
_SEMI_NO_GAP = ("{f} is a semiconductor with a band gap of 0 eV.",
                "{f} is an insulator, yet its band gap is 0 meV.",
                "Although it has no band gap (0 eV), {f} is a semiconductor.")
_DENSITY = ("{f} has a density of {v} {u}.", "The density of {f} is {v} {u}.",
            "{f} is unusually dense, with a mass density of {v} {u}.")


def _violations(rnd: random.Random, row: dict) -> list[tuple[str, str, str]]:
    """(kind, text, the rule it violates)."""
    f = row["formula"]
    gap, density = _num(row, "band_gap_eV"), _num(row, "density_g_cm3")
    energy = _num(row, "formation_energy_eV_atom")
    n, eps_inf = _num(row, "refractive_index"), _num(row, "dielectric_electronic")
    out = []
    if gap is not None:
        wrong = -max(gap, rnd.uniform(0.05, 1.5))
        out.append(("negative_gap", rnd.choice(_GAP).format(f=f, v=f"{wrong:.2f}"),
                    "band_gap_range"))
        out.append(("gap_out_of_range",
                    rnd.choice(_GAP).format(f=f, v=f"{rnd.uniform(16, 80):.1f}"),
                    "band_gap_range"))
        out.append(("wrong_unit_gap", f"{f} has a band gap of {max(gap, 0.5):.2f} g/cm3.",
                    "band_gap_range"))
    out.append(("metal_with_gap",
                rnd.choice(_METAL_GAP).format(f=f, v=f"{rnd.uniform(0.5, 3.0):.1f}"),
                "metal_zero_gap"))
    out.append(("semiconductor_no_gap", rnd.choice(_SEMI_NO_GAP).format(f=f), "gapped_nonmetal"))
    if density is not None:
        impossible = rnd.choice([density * rnd.uniform(5, 20), -density,
                                 rnd.uniform(26, 90)])
        impossible = impossible if impossible > 25 or impossible < 0 else 30.0
        out.append(("impossible_density",
                    rnd.choice(_DENSITY).format(f=f, v=f"{impossible:.2f}", u="g/cm3"),
                    "density_range"))
        # The g/cm3 figure written in kg/m3 (a thousand times too light), or the kg/m3 figure
        # in g/cm3 where that would still pass (10.5 kg/m3 is 0.0105 g/cm3, in range).
        value, unit = (f"{density:.2f}", "kg/m3") if density < 10 else \
            (f"{density * 1000:.0f}", "g/cm3")
        out.append(("wrong_unit_density", rnd.choice(_DENSITY).format(f=f, v=value, u=unit),
                    "density_range"))
    if energy is not None:
        out.append(("formation_energy_out_of_range",
                    f"The formation energy of {f} is {rnd.uniform(-60, -8):.1f} eV/atom.",
                    "formation_energy_range"))
    if n is not None:
        out.append(("refractive_index_below_one",
                    f"{f} has a refractive index of {rnd.uniform(0.1, 0.95):.2f}.",
                    "refractive_index_range"))
    if n is not None and eps_inf is not None:
        out.append(("dielectric_relation",
                    f"{f} has an electronic dielectric constant of {eps_inf:.2f} and a static "
                    f"dielectric constant of {eps_inf * rnd.uniform(0.3, 0.9):.2f}.",
                    "static_above_electronic"))
        out.append(("index_permittivity",
                    f"{f} has a refractive index of {n * rnd.uniform(1.3, 2.0):.2f} and an "
                    f"electronic dielectric constant of {eps_inf:.2f}.",
                    "index_matches_permittivity"))
    return out


def generate(csv_path: Path | str, seed: int = 0) -> list[dict]:
    """Labelled statements about the table's compounds: each record has `id`, `text`, `label`
    (consistent | violation), `kind`, `material_id` and `violates` (the rule it breaks)."""
    rnd = random.Random(seed)
    records = []
    for row in load_rows(Path(csv_path)):
        mid = row["material_id"]
        for index, (kind, text) in enumerate(_true_statements(rnd, row)):
            records.append({"id": f"{mid}-true-{index}", "text": text, "label": CONSISTENT,
                            "kind": kind, "material_id": mid, "violates": []})
        # One violation per compound, of a kind drawn at random: every kind appears about as
        # often across the table, and the set stays as large as the true one's order.
        violations = _violations(rnd, row)
        for kind, text, rule in rnd.sample(violations, k=min(2, len(violations))):
            records.append({"id": f"{mid}-bad-{kind}", "text": text, "label": VIOLATION,
                            "kind": kind, "material_id": mid, "violates": [rule]})
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench trust_claims", description=__doc__)
    parser.add_argument("--csv", default=str(DEFAULT_CSV))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", help="write the records here as JSON lines")
    args = parser.parse_args(argv)
    if not Path(args.csv).is_file():
        print(f"--csv: no such file: {args.csv}", file=sys.stderr)
        return 2
    records = generate(args.csv, args.seed)
    if args.out:
        with open(args.out, "w") as out:
            for record in records:
                out.write(json.dumps(record) + "\n")
    kinds = collections.Counter((r["label"], r["kind"]) for r in records)
    for (label, kind), count in sorted(kinds.items()):
        print(f"{label:<11} {kind:<32} {count}")
    labels = collections.Counter(r["label"] for r in records)
    print(json.dumps({"records": len(records), **labels}, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
