"""System 2, constraint verification: the checkable statements of an answer (numbers with units,
ranges, inequalities, "is a metal") and a tenant's domain rules, encoded in z3; a rule the
statements cannot satisfy is a proven violation, named with the statement's characters.

Domain rules (a list in the policy, each a mapping):
  - {name: band_gap_nonnegative, quantity: band_gap, unit: eV, min: 0}        a range
  - {name: metal_zero_gap, when: "is_metal", require: "band_gap == 0"}       an implication
  - {name: static_above_electronic, require: "dielectric_total >= dielectric_electronic"}
Expressions use the quantities of `claims.QUANTITIES` in their canonical units (eV, g/cm3, Å3,
K, C/m2), the predicates is_metal / is_semiconductor / is_insulator, numbers, + - * / **,
abs(), comparisons, and / or / not."""

from __future__ import annotations

import ast
import enum
import time
from collections import defaultdict
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable

import z3

from services.trust.checks import Finding, Span
from services.trust.claims import (CANONICAL, QUANTITIES, ClassClaim, Predicate, QuantityClaim,
                                   Relation, as_fraction, extract, unit_named)

CHECK = "constraints"
UNCHECKED_SCORE = 0.5  # a statement we could not check: neither proven wrong nor consistent
SOLVER_TIMEOUT_MS = 2000
_FIELDS = ("name", "quantity", "unit", "min", "max", "when", "require", "description")
_PREDICATES = tuple(p.value for p in Predicate)


class RuleKind(enum.Enum):
    RANGE = "range"          # quantity within [min, max]
    IMPLICATION = "when"     # when -> require
    RELATION = "require"     # require, always


Env = dict[str, z3.ExprRef]


@dataclass(frozen=True)
class Rule:
    """One validated domain rule; `formula(env)` is its z3 form over one compound's variables."""

    name: str
    kind: RuleKind
    names: frozenset[str]  # the quantities and predicates it constrains
    formula: Callable[[Env], z3.BoolRef] = field(compare=False, repr=False)
    text: str = ""
    quantity: str | None = None
    unit: str = ""


def parse_rules(obj, where: str = "domain_rules") -> list[Rule]:
    """Validate a policy's domain rules; ValueError names the path of the first bad field
    ("domain_rules[2].unit: unknown unit 'eVs'")."""
    if obj is None:
        return []
    if not isinstance(obj, list):
        raise ValueError(f"{where}: must be a list of rules, got {type(obj).__name__}")
    rules, seen = [], set()
    for index, item in enumerate(obj):
        path = f"{where}[{index}]"
        rule = _parse_rule(item, path)
        if rule.name in seen:
            raise ValueError(f"{path}.name: duplicate rule name {rule.name!r}")
        seen.add(rule.name)
        rules.append(rule)
    return rules


def _parse_rule(item, path: str) -> Rule:
    if not isinstance(item, dict):
        raise ValueError(f"{path}: must be a mapping, got {type(item).__name__}")
    unknown = [key for key in item if key not in _FIELDS]
    if unknown:
        raise ValueError(f"{path}: unknown field {unknown[0]!r} (fields: {', '.join(_FIELDS)})")
    name = item.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{path}.name: required, a non-empty string")
    if "quantity" in item:
        if "when" in item or "require" in item:
            raise ValueError(f"{path}: a rule has either quantity/min/max or when/require")
        return _range_rule(item, path, name.strip())
    for key in ("unit", "min", "max"):
        if key in item:
            raise ValueError(f"{path}.{key}: only a quantity rule has {key}")
    if "require" not in item:
        raise ValueError(f"{path}: needs quantity with min/max, or require")
    require, names = _expression(item["require"], f"{path}.require")
    if "when" in item:
        when, when_names = _expression(item["when"], f"{path}.when")
        text = f"when {item['when']}: {item['require']}"
        return Rule(name.strip(), RuleKind.IMPLICATION, frozenset(names | when_names),
                    lambda env: z3.Implies(when(env), require(env)), text)
    return Rule(name.strip(), RuleKind.RELATION, frozenset(names), require, str(item["require"]))


def _range_rule(item: dict, path: str, name: str) -> Rule:
    quantity = item["quantity"]
    if quantity not in QUANTITIES:
        raise ValueError(f"{path}.quantity: unknown quantity {quantity!r} "
                         f"(known: {', '.join(QUANTITIES)})")
    dimension = QUANTITIES[quantity].dimension
    written = item.get("unit", CANONICAL[dimension])
    written = "" if written is None else written
    if not isinstance(written, str):
        raise ValueError(f"{path}.unit: must be a string, got {type(written).__name__}")
    if dimension == "dimensionless":
        if written:
            raise ValueError(f"{path}.unit: {quantity} has no unit, got {written!r}")
        convert = as_fraction
    else:
        unit = unit_named(written)
        if unit is None:
            raise ValueError(f"{path}.unit: unknown unit {written!r}")
        if unit.dimension != dimension:
            raise ValueError(f"{path}.unit: {written!r} is a {unit.dimension} unit, "
                             f"{quantity} is {_a(dimension)}")
        convert = unit.to_canonical
    bounds = {}
    for key in ("min", "max"):
        if key in item:
            value = item[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"{path}.{key}: must be a number, got {value!r}")
            bounds[key] = convert(value)
    if not bounds:
        raise ValueError(f"{path}: a quantity rule needs min or max")
    low, high = bounds.get("min"), bounds.get("max")
    if low is not None and high is not None and low > high:
        raise ValueError(f"{path}.min: must be <= max, got {item['min']} > {item['max']}")

    def formula(env: Env) -> z3.BoolRef:
        var = env[quantity]
        parts = ([var >= _real(low)] if low is not None else []) + \
            ([var <= _real(high)] if high is not None else [])
        return z3.And(*parts)
    if low is not None and high is not None:
        shown = f"{quantity} must lie in {item['min']} .. {item['max']} {written}"
    else:
        shown = f"{quantity} must be {'>=' if low is not None else '<='} " \
                f"{item['min'] if low is not None else item['max']} {written}"
    return Rule(name, RuleKind.RANGE, frozenset({quantity}), formula, shown.strip(), quantity,
                written)


# --- rule expressions --------------------------------------------------------------------------

_COMPARE = {ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b,
            ast.Lt: lambda a, b: a < b, ast.LtE: lambda a, b: a <= b,
            ast.Gt: lambda a, b: a > b, ast.GtE: lambda a, b: a >= b}
_ARITH = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
          ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}


def _expression(source, path: str) -> tuple[Callable[[Env], z3.BoolRef], set[str]]:
    """A rule's condition, checked at parse time, as a builder of its z3 form."""
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"{path}: must be an expression string")
    try:
        tree = ast.parse(source.strip(), mode="eval").body
    except SyntaxError:
        raise ValueError(f"{path}: cannot parse {source!r}") from None
    names: set[str] = set()
    kind, build = _node(tree, path, names)
    if kind != "bool":
        raise ValueError(f"{path}: must be a condition (a comparison or a predicate), "
                         f"got {source!r}")
    return build, names


def _node(node: ast.AST, path: str, names: set[str]):
    """(type, builder) of one expression node; type is "bool" or "real"."""
    if isinstance(node, ast.Name):
        if node.id in QUANTITIES:
            names.add(node.id)
            return "real", lambda env, n=node.id: env[n]
        if node.id in _PREDICATES:
            names.add(node.id)
            return "bool", lambda env, n=node.id: env[n]
        raise ValueError(f"{path}: unknown name {node.id!r} (quantities: "
                         f"{', '.join(QUANTITIES)}; predicates: {', '.join(_PREDICATES)})")
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) \
            and not isinstance(node.value, bool):
        value = _real(as_fraction(node.value))
        return "real", lambda env: value
    if isinstance(node, ast.UnaryOp):
        kind, inner = _node(node.operand, path, names)
        if isinstance(node.op, ast.Not) and kind == "bool":
            return "bool", lambda env: z3.Not(inner(env))
        if isinstance(node.op, ast.USub) and kind == "real":
            return "real", lambda env: -inner(env)
        if isinstance(node.op, ast.UAdd) and kind == "real":
            return "real", inner
    elif isinstance(node, ast.BoolOp):
        parts = [_typed(v, "bool", path, names) for v in node.values]
        join = z3.And if isinstance(node.op, ast.And) else z3.Or
        return "bool", lambda env: join(*[p(env) for p in parts])
    elif isinstance(node, ast.Compare):
        terms = [_typed(t, "real", path, names) for t in (node.left, *node.comparators)]
        ops = [_COMPARE.get(type(op)) for op in node.ops]
        if None not in ops:
            return "bool", lambda env: z3.And(*[op(terms[i](env), terms[i + 1](env))
                                                for i, op in enumerate(ops)])
    elif isinstance(node, ast.BinOp):
        if isinstance(node.op, ast.Pow) and isinstance(node.right, ast.Constant) \
                and isinstance(node.right.value, int) and 1 <= node.right.value <= 4:
            base, exponent = _typed(node.left, "real", path, names), node.right.value
            return "real", lambda env: _power(base(env), exponent)
        if type(node.op) in _ARITH:
            left = _typed(node.left, "real", path, names)
            right = _typed(node.right, "real", path, names)
            op = _ARITH[type(node.op)]
            return "real", lambda env: op(left(env), right(env))
    elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
            and node.func.id == "abs" and len(node.args) == 1 and not node.keywords:
        inner = _typed(node.args[0], "real", path, names)
        return "real", lambda env: _abs(inner(env))
    raise ValueError(f"{path}: unsupported expression {ast.unparse(node)!r}")


def _typed(node, kind: str, path: str, names: set[str]):
    got, build = _node(node, path, names)
    if got != kind:
        raise ValueError(f"{path}: {ast.unparse(node)!r} must be a "
                         f"{'number' if kind == 'real' else 'condition'}")
    return build


def _power(base, exponent: int):
    result = base
    for _ in range(exponent - 1):
        result = result * base
    return result


def _abs(value):
    return z3.If(value >= 0, value, -value)


def _real(value: Fraction) -> z3.ArithRef:
    return z3.RealVal(f"{value.numerator}/{value.denominator}")


# --- the check ---------------------------------------------------------------------------------


@dataclass
class _Violation:
    rule: str
    subject: str
    claims: list[QuantityClaim | ClassClaim]
    why: str


class ConstraintChecker:
    """Checks an answer's statements against a tenant's domain rules (system 2)."""

    name = CHECK

    def __init__(self, rules: list[Rule]):
        self.rules = list(rules)
        self._unit_rule = {r.quantity: r.name for r in self.rules if r.kind is RuleKind.RANGE}

    def check(self, answer: str) -> Finding:
        began = time.perf_counter()
        claims = extract(answer)
        violations, unchecked, checkable = [], [], defaultdict(list)
        for claim in claims:
            problem = _unit_problem(claim) if isinstance(claim, QuantityClaim) else None
            if problem is None:
                checkable[claim.subject].append(claim)
            elif problem.startswith("wrong"):
                violations.append(_Violation(
                    self._unit_rule.get(claim.quantity, "units"), claim.subject, [claim],
                    problem))
            else:
                unchecked.append((claim, problem))
        for subject, group in checkable.items():
            found, undecided = self._check_subject(subject, group)
            violations += found
            unchecked += undecided
        return self._finding(answer, claims, violations, unchecked,
                             (time.perf_counter() - began) * 1000)

    def _check_subject(self, subject: str, claims: list) -> tuple[list, list]:
        """Every rule the subject's statements cannot satisfy. Statements that contradict
        each other (two values quoted for one compound) are checked one value at a time."""
        names = {c.quantity if isinstance(c, QuantityClaim) else c.predicate.value for c in claims}
        rules = [r for r in self.rules if r.names & names]
        if not rules:
            return [], []
        env = _variables(names | set().union(*(r.names for r in rules)))
        facts = [(claim, _claim_formula(claim, env)) for claim in claims]
        solver = z3.Solver()
        solver.set("timeout", SOLVER_TIMEOUT_MS)
        solver.add(*[f for _, f in facts])
        if solver.check() == z3.sat:
            return self._against_rules(subject, facts, rules, env)
        classes = [(c, f) for c, f in facts if isinstance(c, ClassClaim)]
        solver = z3.Solver()
        solver.add(*[f for _, f in classes])
        if solver.check() != z3.sat:
            classes = []
        found, undecided, named = [], [], set()
        for claim, formula in facts:
            if isinstance(claim, QuantityClaim):
                more, unknown = self._against_rules(subject, [(claim, formula), *classes],
                                                    rules, env)
                found += [v for v in more if (v.rule, claim.start) not in named]
                named |= {(v.rule, claim.start) for v in more}
                undecided += unknown
        return found, undecided

    def _against_rules(self, subject: str, facts, rules: list[Rule], env: Env):
        found, undecided = [], []
        tracks = [z3.Bool(f"claim_{i}") for i in range(len(facts))]
        for rule in rules:
            solver = z3.Solver()
            solver.set("timeout", SOLVER_TIMEOUT_MS)
            solver.add(rule.formula(env))
            for track, (_, formula) in zip(tracks, facts):
                solver.add(z3.Implies(track, formula))
            result = solver.check(*tracks)
            if result == z3.unsat:
                core = {str(t) for t in solver.unsat_core()}
                blamed = [c for t, (c, _) in zip(tracks, facts) if str(t) in core]
                found.append(_Violation(rule.name, subject, blamed, rule.text))
            elif result == z3.unknown:
                undecided += [(c, f"solver gave up on rule {rule.name}") for c, _ in facts]
        return found, undecided

    def _finding(self, answer: str, claims, violations, unchecked, elapsed_ms: float) -> Finding:
        spans, reasons = [], []
        for violation in violations:
            quoted = ", ".join(repr(answer[c.start:c.end]) for c in violation.claims)
            about = "" if violation.subject == "_" else f" ({violation.subject})"
            reasons.append(f"{violation.rule} violated by {quoted}{about}: {violation.why}")
            spans += [Span(c.start, c.end, violation.rule) for c in violation.claims]
        for claim, problem in unchecked:
            reasons.append(f"cannot check {answer[claim.start:claim.end]!r}: {problem}")
        if violations:
            score = 1.0
        elif unchecked:
            score = UNCHECKED_SCORE
        else:
            score = 0.0
            reasons.append(f"{len(claims)} checkable statement(s), all consistent with "
                           f"{len(self.rules)} rule(s)" if claims else "no checkable statements")
        details = {"claims": len(claims), "violated": sorted({v.rule for v in violations}),
                   "unchecked": len(unchecked)}
        return Finding(CHECK, score, "; ".join(reasons), tuple(dict.fromkeys(spans)), system=2,
                       elapsed_ms=elapsed_ms, details=details)


def _unit_problem(claim: QuantityClaim) -> str | None:
    """Why a statement's unit keeps it from being checked (None: it can be checked); a
    unit of the wrong dimension ("a band gap of 2 g/cm3") is itself a proven error."""
    dimension = QUANTITIES[claim.quantity].dimension
    if dimension == "dimensionless":
        return f"wrong unit: {claim.quantity} has no unit, got {claim.unit_text!r}" \
            if claim.unit_text and claim.unit is not None else None
    if claim.unit is None:
        return f"unknown unit {claim.unit_text!r}" if claim.unit_text else "no unit given"
    if claim.unit.dimension != dimension:
        return (f"wrong unit: {claim.unit_text!r} is a {claim.unit.dimension} unit, "
                f"{claim.quantity} is {_a(dimension)}")
    return None


def _a(dimension: str) -> str:
    return ("an " if dimension[0] in "aeiou" else "a ") + dimension.replace("_", " ")


def _variables(names: set[str]) -> Env:
    return {n: z3.Bool(n) if n in _PREDICATES else z3.Real(n) for n in sorted(names)}


def _claim_formula(claim, env: Env) -> z3.BoolRef:
    if isinstance(claim, ClassClaim):
        var = env[claim.predicate.value]
        return var if claim.holds else z3.Not(var)
    var = env[claim.quantity]
    low, high = claim.canonical()
    if claim.relation is Relation.BETWEEN:
        return z3.And(var >= _real(low), var <= _real(high))
    return {Relation.EQ: var == _real(low), Relation.LT: var < _real(low),
            Relation.LE: var <= _real(low), Relation.GT: var > _real(low),
            Relation.GE: var >= _real(low)}[claim.relation]
