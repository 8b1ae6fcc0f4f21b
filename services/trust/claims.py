"""Checkable statements in an answer: quantities with units (values, ranges, inequalities) and
classifications ("is a metal"), each tied to the compound it is about and to its characters."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from fractions import Fraction

# --- units -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """A unit: its dimension and how a value in it becomes the dimension's canonical unit
    (canonical = value * factor + offset; the offset is for temperatures)."""

    symbol: str
    dimension: str
    factor: Fraction = Fraction(1)
    offset: Fraction = Fraction(0)

    def to_canonical(self, value: float | Fraction) -> Fraction:
        """Exact, so "1500 meV" is 1.5 eV to the solver, not 1.5000000000000002."""
        return as_fraction(value) * self.factor + self.offset


def as_fraction(value: float | Fraction | int) -> Fraction:
    return value if isinstance(value, Fraction) else Fraction(repr(value))


CANONICAL = {"energy": "eV", "density": "g/cm3", "volume": "Å3", "temperature": "K",
             "charge_density": "C/m2", "dimensionless": ""}

_F = Fraction
_UNITS = [
    Unit("eV", "energy"), Unit("meV", "energy", _F("1e-3")), Unit("keV", "energy", _F(1000)),
    # Formation energies are quoted per atom; the per-atom unit is the energy's own here.
    Unit("eV/atom", "energy"), Unit("meV/atom", "energy", _F("1e-3")),
    Unit("kJ/mol", "energy", 1 / _F("96.485332")), Unit("kcal/mol", "energy", 1 / _F("23.060548")),
    Unit("g/cm3", "density"), Unit("kg/m3", "density", _F("1e-3")),
    Unit("g/L", "density", _F("1e-3")), Unit("kg/L", "density"), Unit("g/mL", "density"),
    Unit("Å3", "volume"), Unit("nm3", "volume", _F(1000)), Unit("pm3", "volume", _F("1e-6")),
    Unit("K", "temperature"), Unit("°C", "temperature", _F(1), _F("273.15")),
    Unit("°F", "temperature", _F(5, 9), _F("273.15") - _F(32 * 5, 9)),
    Unit("C/m2", "charge_density"),
]
UNITS = {u.symbol: u for u in _UNITS}
# Spellings of the same units, normalised (lower case, no spaces) before the look-up.
_ALIASES = {
    "ev/at": "eV/atom", "ev/at.": "eV/atom", "evperatom": "eV/atom", "mev/at": "meV/atom",
    "g/cm^3": "g/cm3", "g/cm³": "g/cm3", "gcm-3": "g/cm3", "gcm^-3": "g/cm3", "g/cc": "g/cm3",
    "gcm−3": "g/cm3", "g·cm-3": "g/cm3", "g·cm−3": "g/cm3", "g/ml": "g/mL",
    "kg/m^3": "kg/m3", "kg/m³": "kg/m3", "kgm-3": "kg/m3", "kgm−3": "kg/m3", "kg·m-3": "kg/m3",
    "kg/l": "kg/L", "g/l": "g/L",
    "a3": "Å3", "a^3": "Å3", "å^3": "Å3", "å³": "Å3", "Å^3": "Å3", "Å³": "Å3", "nm^3": "nm3",
    "nm³": "nm3", "ang3": "Å3", "angstrom3": "Å3",
    "kelvin": "K", "k": "K", "degc": "°C", "ºc": "°C", "c": "°C", "celsius": "°C",
    "degreesc": "°C", "degreescelsius": "°C", "degf": "°F", "fahrenheit": "°F", "f": "°F",
    "c/m^2": "C/m2", "c/m²": "C/m2", "cm-2": "C/m2", "cm^-2": "C/m2",
}
_BY_KEY = {u.symbol.lower().replace(" ", ""): u for u in _UNITS}
_BY_KEY.update({k: UNITS[v] for k, v in _ALIASES.items()})


def unit_named(text: str) -> Unit | None:
    """The unit a spelling means ("meV", "g cm-3", "°C"), or None when it is no unit we know."""
    key = text.strip().replace(" ", "").replace("\u2009", "")
    if key in UNITS:
        return UNITS[key]
    return _BY_KEY.get(key.lower())


# --- quantities --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Quantity:
    """A property an answer can state, its dimension, and the phrases that name it."""

    name: str
    dimension: str
    phrases: tuple[str, ...]


QUANTITIES = {q.name: q for q in [
    Quantity("band_gap", "energy", ("band gap", "bandgap", "band-gap", "energy gap",
                                    "optical gap", "gap", "E_g", "Eg")),
    Quantity("formation_energy", "energy", ("formation energy", "formation enthalpy",
                                            "energy of formation", "enthalpy of formation",
                                            "E_f", "ΔH_f", "ΔHf")),
    Quantity("energy_above_hull", "energy", ("energy above hull", "energy above the hull",
                                             "e_above_hull", "hull distance")),
    Quantity("density", "density", ("mass density", "density")),
    Quantity("volume", "volume", ("cell volume", "unit-cell volume", "unit cell volume",
                                  "volume")),
    Quantity("refractive_index", "dimensionless", ("refractive index", "index of refraction")),
    Quantity("dielectric_electronic", "dimensionless", (
        "electronic dielectric constant", "high-frequency dielectric constant",
        "optical dielectric constant", "ε∞", "ε_∞", "epsilon_inf")),
    Quantity("dielectric_total", "dimensionless", (
        "static dielectric constant", "total dielectric constant", "dielectric constant",
        "relative permittivity", "permittivity", "ε0", "ε_0")),
    Quantity("piezo_modulus", "charge_density", ("piezoelectric modulus",
                                                 "piezoelectric coefficient",
                                                 "piezoelectric constant", "e_ij")),
    Quantity("melting_point", "temperature", ("melting point", "melting temperature")),
    Quantity("transition_temperature", "temperature", (
        "critical temperature", "transition temperature", "Curie temperature", "Néel temperature",
        "T_c", "Tc")),
]}


class Predicate(str, enum.Enum):
    """Classifications an answer can state about a compound."""

    METAL = "is_metal"
    SEMICONDUCTOR = "is_semiconductor"
    INSULATOR = "is_insulator"


class Relation(str, enum.Enum):
    """How a stated number bounds the quantity."""

    EQ = "=="
    LT = "<"
    LE = "<="
    GT = ">"
    GE = ">="
    BETWEEN = "between"


# --- claims ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QuantityClaim:
    """"<subject>'s <quantity> <relation> <value> [<high>] <unit>" and where it is written.
    `unit` is None when the unit was absent or unknown; `unit_text` is what was written."""

    subject: str
    quantity: str
    relation: Relation
    value: float
    high: float | None
    unit: Unit | None
    unit_text: str
    start: int
    end: int

    def canonical(self) -> tuple[Fraction, Fraction | None]:
        """The bounds in the dimension's canonical unit (dimensionless values as written)."""
        convert = self.unit.to_canonical if self.unit is not None else as_fraction
        return convert(self.value), None if self.high is None else convert(self.high)


@dataclass(frozen=True)
class ClassClaim:
    """"<subject> is (not) a metal / semiconductor / insulator" and where it is written."""

    subject: str
    predicate: Predicate
    holds: bool
    start: int
    end: int


Claim = QuantityClaim | ClassClaim

# --- extraction --------------------------------------------------------------------------------

ELEMENTS = frozenset("""H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni
Cu Zn Ga Ge As Se Br Kr Rb Sr Y Zr Nb Mo Tc Ru Rh Pd Ag Cd In Sn Sb Te I Xe Cs Ba La Ce Pr Nd Pm
Sm Eu Gd Tb Dy Ho Er Tm Yb Lu Hf Ta W Re Os Ir Pt Au Hg Tl Pb Bi Po At Rn Fr Ra Ac Th Pa U Np Pu
Am Cm Bk Cf Es Fm Md No Lr""".split())
# One-element "formulas" that are also English words or abbreviations at a sentence's start.
_WORDLIKE = frozenset({"In", "As", "Be", "He", "No", "At", "I", "Es", "Am", "Cm", "Tc", "Pa",
                       "Ne", "Mo", "Sc"})
_FORMULA = re.compile(r"(?<![\w-])(?:[A-Z][a-z]?\d*(?:\.\d+)?|\((?:[A-Z][a-z]?\d*)+\)\d*)+"
                      r"(?![\w-])")
_MP_ID = re.compile(r"\bmp-\d+\b")
# A sentence ends at . ! ? ; before a space (so "1.5 eV" stays whole) or at a line break.
_SENTENCE = re.compile(r"\S.*?(?:[.!?;](?=\s|$)|(?=\n)|$)", re.S)

_NUM = (r"[-−+]?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
        r"(?:\s?[×x]\s?10\^?[-−]?\d+|[eE][-−+]?\d+)?")
# Prose after a number is no unit: "between 2 and 4 eV", "2 eV for GaAs".
_PROSE = (r"(?!(?:and|or|to|for|in|at|on|of|with|than|the|an?|while|which|that|but|is|are|was|"
          r"were|per|from|when|whereas|as|by|so|it|its|this|these)\b)")
_UNIT_TOKEN = (_PROSE + r"(?:°\s?[CF]|º\s?C|deg\s?[CF]\b|degrees?\s+(?:C|F|Celsius|Fahrenheit)\b|"
               r"[A-Za-zÅµ][A-Za-zÅµ]*(?:\^?\d|[²³])?"
               r"(?:\s?[·/]\s?[A-Za-zÅ]+(?:\^?[-−]?\d|[²³])?|[\s·](?:cm|m)\^?[-−]\d)?)")
_RANGE_SEP = r"\s*(?:–|—|-|−|to|and|\.\.)\s*"
_LOWER_WORDS = (r"(?:>=|≥|>|above|over|greater than|more than|higher than|larger than|exceeding|"
                r"at least|no less than|not less than|in excess of|beyond)")
_UPPER_WORDS = (r"(?:<=|≤|<|below|under|less than|lower than|smaller than|at most|up to|"
                r"no more than|not more than|not exceeding|within)")
_VALUE = re.compile(
    r"(?P<cmp>" + _LOWER_WORDS + r"|" + _UPPER_WORDS + r"|between|from|of|is|are|was|=|≈|~|"
    r"about|around|approximately|roughly|near|nearly|close to|of about|of around|equal to|"
    r"equals|reaching|measured at|calculated at|computed as|at)?\s*"
    r"(?P<a>(?<![\w.,)])" + _NUM + r")(?:\s*(?P<ua>" + _UNIT_TOKEN + r"))?"
    r"(?:(?P<sep>" + _RANGE_SEP + r")(?P<b>" + _NUM + r")(?:\s*(?P<ub>" + _UNIT_TOKEN + r"))?)?",
    re.IGNORECASE)
# "a 1.5 eV band gap": the value written before its phrase.
_VALUE_BEFORE = re.compile(r"(?P<a>(?<![\w.,)])" + _NUM + r")\s*(?P<ua>" + _UNIT_TOKEN + r")\s*"
                           r"(?:[A-Za-z-]+\s+)?$")
_CLASS = re.compile(
    r"(?:\b(?P<verb>is|are|was|were|be|being|becomes|behaves as|acts as|remains|classified as)"
    r"|(?P<comma>,)(?=\s+an?\s))\s+"  # "Cu, a metal, ..."
    r"(?P<neg>not\s+|n't\s+|never\s+)?(?:an?\s+)?(?:(?:good|poor|wide-gap|narrow-gap|"
    r"wide[- ]band[- ]?gap|narrow[- ]band[- ]?gap|direct[- ]gap|indirect[- ]gap|direct|indirect|"
    r"typical|true|strong|weak|band|Mott|topological|magnetic|nonmagnetic|ferromagnetic|"
    r"antiferromagnetic|transparent|trivial)\s+)*"
    r"(?P<non>non-?)?(?P<kind>metallic|metal|semiconducting|semiconductor|insulating|insulator)"
    r"(?P<after>(?:[-\w]+)?)", re.IGNORECASE)
# "metal" as a noun before another noun names a kind of compound, not a classification.
_CLASS_NOUNS_AFTER = frozenset("""oxide oxides halide halides atom atoms ion ions cation cations
center centers centre site sites organic complex complexes cluster clusters dichalcogenide
dichalcogenides alloy alloys nitride nitrides carbide carbides hydride hydrides sulfide sulfides
framework frameworks electrode electrodes contact contacts substrate layer layers film films
phase-change""".split())
_KIND = {"metal": Predicate.METAL, "metallic": Predicate.METAL,
         "semiconductor": Predicate.SEMICONDUCTOR, "semiconducting": Predicate.SEMICONDUCTOR,
         "insulator": Predicate.INSULATOR, "insulating": Predicate.INSULATOR}
_NO_SUBJECT = "_"


def _phrase_pattern() -> re.Pattern:
    phrases = sorted(((p, q.name) for q in QUANTITIES.values() for p in q.phrases),
                     key=lambda pq: -len(pq[0]))
    alternatives = "|".join(r"(?P<q%d>%ss?)" % (i, re.escape(p))
                            for i, (p, _) in enumerate(phrases))
    _phrase_pattern.names = [name for _, name in phrases]  # type: ignore[attr-defined]
    return re.compile(r"(?<![\w-])(?:" + alternatives + r")(?![\w])", re.IGNORECASE)


_PHRASE = _phrase_pattern()
_PHRASE_NAMES: list[str] = _phrase_pattern.names  # type: ignore[attr-defined]
# Short symbols ("Eg", "Tc") only count in their own case: "tc" or "EG" in prose are not them.
_CASE_SENSITIVE = {"E_g", "Eg", "E_f", "T_c", "Tc", "e_ij"}


def is_formula(token: str) -> bool:
    """A chemical formula made of real element symbols ("GaAs", "SiO2", "Si", "N2"), not a
    word, an abbreviation or a unit ("In", "K")."""
    symbols = re.findall(r"[A-Z][a-z]?", token)
    if not symbols or any(s not in ELEMENTS for s in symbols):
        return False
    if len(symbols) == 1 and not re.search(r"\d", token):
        return len(token) == 2 and token not in _WORDLIKE
    return True


def _number(text: str) -> float:
    text = text.replace("−", "-").replace(" ", "").replace(",", "")
    match = re.fullmatch(r"([-+]?\d+(?:\.\d+)?)(?:[×x]10\^?([-+]?\d+))?", text)
    if match:
        value = float(match.group(1))
        return value * 10 ** int(match.group(2)) if match.group(2) else value
    return float(text)


def _subjects(sentence: str, base: int) -> list[tuple[int, str]]:
    """(offset, compound) for each formula or Materials Project id in a sentence."""
    found = [(base + m.start(), m.group()) for m in _FORMULA.finditer(sentence)
             if is_formula(m.group())]
    found += [(base + m.start(), m.group()) for m in _MP_ID.finditer(sentence)]
    return sorted(found)


def _subject_at(position: int, subjects: list[tuple[int, str]], previous: str,
                value_at: int | None = None) -> str:
    """The compound a statement is about: one named between its phrase and its value ("the
    gap of GaAs is 1.4 eV"), else the nearest one before it, else the last one named."""
    if value_at is not None:
        inside = [name for offset, name in subjects if position <= offset < value_at]
        if inside:
            return inside[-1]
    before = [name for offset, name in subjects if offset < position]
    if before:
        return before[-1]
    # "With a gap of 2 eV, Cu is metallic": nothing named yet, so the sentence's compound.
    return previous if previous != _NO_SUBJECT or not subjects else subjects[0][1]


def _relation(cmp: str | None, ranged: bool) -> Relation:
    word = " ".join((cmp or "").lower().split())
    if ranged:
        return Relation.BETWEEN
    if re.fullmatch(_LOWER_WORDS, word):
        return Relation.GE if word in (">=", "≥", "at least", "no less than",
                                       "not less than") else Relation.GT
    if re.fullmatch(_UPPER_WORDS, word):
        return Relation.LE if word in ("<=", "≤", "at most", "up to", "no more than",
                                       "not more than", "not exceeding", "within") else Relation.LT
    return Relation.EQ


def _unit_of(written: str | None) -> tuple[Unit | None, str]:
    written = (written or "").strip()
    return (unit_named(written), written) if written else (None, "")


def _phrase_name(phrase: re.Match) -> str | None:
    """The quantity a matched phrase names; short symbols ("Eg", "Tc") count only in their own
    spelling, so "tc" or "EG" in prose are not them."""
    index = int(phrase.lastgroup[1:])
    written = phrase.group()
    if written.lower() in _CASE_SENSITIVE_LOWER and written not in _CASE_SENSITIVE:
        return None
    return _PHRASE_NAMES[index]


_CASE_SENSITIVE_LOWER = {p.lower() for p in _CASE_SENSITIVE}


def _value_after(window: str) -> re.Match | None:
    """The first number after a phrase, if few words lie between ("a band gap of 1.2 eV")."""
    for candidate in _VALUE.finditer(window):
        gap = _FORMULA.sub("X", window[:candidate.start()])  # "the gap of Ca(OH)2 is"
        # An aside between phrase and number ("gap, unlike Si's, is") breaks the link; a bare
        # opening parenthesis ("no band gap (0 eV)") does not.
        if len(gap.split()) <= 4 and not re.search(r"[,;]|\((?=.*\w)|\b(?:and|while|whereas)\b",
                                                   gap):
            return candidate
        return None
    return None


def _quantity_claims(sentence: str, base: int, subjects, previous: str) -> list[QuantityClaim]:
    claims = []
    phrases = [p for p in _PHRASE.finditer(sentence) if _phrase_name(p)]
    for index, phrase in enumerate(phrases):
        name = _phrase_name(phrase)
        stop = phrases[index + 1].start() if index + 1 < len(phrases) else len(sentence)
        window = sentence[phrase.end():min(stop, phrase.end() + 80)]
        match = _value_after(window)
        if match is not None:
            start, end = phrase.start(), phrase.end() + match.end()
            value_at = base + phrase.end() + match.start("a")
        else:
            before = sentence[max(0, phrase.start() - 40):phrase.start()]
            match = _VALUE_BEFORE.search(before)
            if match is None:
                continue
            start = phrase.start() - len(before) + match.start()
            end, value_at = phrase.end(), None
        unit, unit_text = _unit_of(match.group("ua"))
        high = None
        if "b" in match.re.groupindex and match.group("b") is not None:
            # "2-4 eV" and "2 eV to 4 eV" share one unit.
            if not unit_text:
                unit, unit_text = _unit_of(match.group("ub"))
            high = _number(match.group("b"))
        value = _number(match.group("a"))
        cmp = match.group("cmp") if "cmp" in match.re.groupindex else None
        relation = _relation(cmp, high is not None)
        if high is not None and high < value:
            value, high = high, value
        text = sentence[start:end]
        start += len(text) - len(text.lstrip())
        end -= len(text) - len(text.rstrip(" ,"))
        claims.append(QuantityClaim(
            subject=_subject_at(base + phrase.start(), subjects, previous, value_at),
            quantity=name, relation=relation, value=value, high=high, unit=unit,
            unit_text=unit_text, start=base + start, end=base + end))
    return claims


def _class_claims(sentence: str, base: int, subjects, previous: str) -> list[ClassClaim]:
    claims = []
    for match in _CLASS.finditer(sentence):
        after = (match.group("after") or "").lower()
        rest = sentence[match.end():].split()
        next_word = rest[0].strip(",.;:()").lower() if rest else ""
        if after.startswith("-") or after or next_word in _CLASS_NOUNS_AFTER:
            continue
        negated = bool(match.group("neg")) != bool(match.group("non"))
        claims.append(ClassClaim(
            subject=_subject_at(base + match.start(), subjects, previous),
            predicate=_KIND[match.group("kind").lower()], holds=not negated,
            start=base + match.start("verb" if match.group("verb") else "comma") +
            (2 if match.group("comma") else 0), end=base + match.end("kind")))
    return claims


def extract(answer: str) -> list[Claim]:
    """Every checkable statement in an answer, in order; each names the compound it is about
    (the nearest formula before it, else the last one named, else "_")."""
    claims: list[Claim] = []
    previous = _NO_SUBJECT
    for sentence_match in _SENTENCE.finditer(answer):
        sentence, base = sentence_match.group(), sentence_match.start()
        subjects = _subjects(sentence, base)
        found = _quantity_claims(sentence, base, subjects, previous) + \
            _class_claims(sentence, base, subjects, previous)
        claims += sorted(found, key=lambda c: c.start)
        if subjects:
            previous = subjects[-1][1]
    return claims
