"""Trust policies: the schema, parsed from YAML or JSON with line numbers in every error, the
defaults, and the effective policy of a scope (process over tenant over the defaults)."""

from __future__ import annotations

import copy
import difflib
import json
import math
import re
from dataclasses import dataclass
from typing import Any, Callable

import regex
import yaml

from vfmos_runtime.errors import InvalidArgument

LEVELS = ("off", "fast", "standard", "strict")
# Every check whose score a policy may threshold.
CHECKS = ("moderation", "harmful_request", "injection", "indirect_injection", "leak",
          "leak_overlap", "pii", "topics", "grounding", "constraints", "consistency", "judge")
SYSTEM2_CHECKS = ("grounding", "constraints", "consistency", "judge")
PII_ENTITIES = ("PERSON", "EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE",
                "IP_ADDRESS", "US_SSN", "LOCATION", "DATE_TIME", "NRP", "URL", "CRYPTO",
                "US_BANK_NUMBER", "US_DRIVER_LICENSE", "US_PASSPORT", "US_ITIN",
                "MEDICAL_LICENSE", "UK_NHS", "ORGANIZATION")
# ISO codes the amount parser of escalation rules knows (rules.CURRENCIES has their signs).
CURRENCY_CODES = ("USD", "EUR", "GBP", "JPY", "CHF", "CAD", "AUD", "NOK", "SEK", "DKK", "INR",
                  "CNY", "PLN")
MAX_DOCUMENT_BYTES = 256 * 1024
MAX_LIST = 256          # entries in one list of rules
MAX_PATTERN = 1000      # characters in one regex
MAX_TEXT = 4096         # characters in one reply or disclaimer

DEFAULTS: dict[str, Any] = {
    "level": "standard",
    "on_unavailable": "refuse",
    "thresholds": {name: 0.5 for name in CHECKS},
    "uncertain_band": {"default": [0.35, 0.5]},
    "pii": {"action": "redact",
            "entities": ["EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE",
                         "IP_ADDRESS", "US_SSN"],
            "external": "pseudonymize"},
    "denied_topics": [],
    "regexes": [],
    "required_disclaimers": [],
    "escalation_rules": [],
    "high_stakes_topics": [],
    "domain_rules": [],
    "revision": {"max_revisions": 1, "max_cost": 0.05, "model": "gemma3-270m"},
    "system2": {"judge_model": "gemma3-270m", "samples": 3,
                "checks": ["grounding", "constraints"]},
    "audit": {"store_text": False},
    "holding_reply": "A person will look at this request and get back to you.",
    "refusal_reply": "I can't help with that request.",
}


@dataclass(frozen=True)
class TopicRule:
    name: str
    description: str
    patterns: tuple[str, ...] = ()
    reply: str = ""


@dataclass(frozen=True)
class RegexRule:
    name: str
    pattern: str
    action: str          # refuse | redact | escalate
    on: str              # input | output | both
    replacement: str


@dataclass(frozen=True)
class DisclaimerRule:
    name: str
    when: str            # a regex, looked for in the question and the answer
    text: str
    action: str          # append | revise


@dataclass(frozen=True)
class EscalationRule:
    name: str
    topic: str = ""          # words that must all occur (any inflection)
    pattern: str = ""        # or a regex
    amount_above: float | None = None
    currency: str = ""       # "" = any currency
    on: str = "both"         # question | answer | both
    holding_reply: str = ""


@dataclass(frozen=True)
class Policy:
    """The effective policy, typed; `document` is the same as plain JSON-able data."""

    level: str
    on_unavailable: str
    thresholds: dict[str, float]
    bands: dict[str, tuple[float, float]]
    pii_action: str
    pii_entities: tuple[str, ...]
    pii_external: str
    denied_topics: tuple[TopicRule, ...]
    regexes: tuple[RegexRule, ...]
    disclaimers: tuple[DisclaimerRule, ...]
    escalations: tuple[EscalationRule, ...]
    high_stakes_topics: tuple[str, ...]
    domain_rules: tuple[dict, ...]
    max_revisions: int
    max_cost: float
    revision_model: str
    judge_model: str
    samples: int
    system2_checks: tuple[str, ...]
    store_text: bool
    holding_reply: str
    refusal_reply: str
    document: dict

    def threshold(self, check: str) -> float:
        return self.thresholds.get(check, 0.5)

    def band(self, check: str) -> tuple[float, float]:
        return self.bands.get(check) or self.bands["default"]

    def to_json(self) -> str:
        return json.dumps(self.document, sort_keys=True)

    @classmethod
    def from_document(cls, doc: dict) -> "Policy":
        pii, revision, system2 = doc["pii"], doc["revision"], doc["system2"]
        return cls(
            level=doc["level"], on_unavailable=doc["on_unavailable"],
            thresholds=dict(doc["thresholds"]),
            bands={k: (v[0], v[1]) for k, v in doc["uncertain_band"].items()},
            pii_action=pii["action"], pii_entities=tuple(pii["entities"]),
            pii_external=pii["external"],
            denied_topics=tuple(TopicRule(t["name"], t["description"],
                                          tuple(t.get("patterns", ())), t.get("reply", ""))
                                for t in doc["denied_topics"]),
            regexes=tuple(RegexRule(r["name"], r["pattern"], r.get("action", "refuse"),
                                    r.get("on", "both"),
                                    r.get("replacement", f"[{r['name'].upper()}]"))
                          for r in doc["regexes"]),
            disclaimers=tuple(DisclaimerRule(d["name"], d["when"], d["text"],
                                             d.get("action", "append"))
                              for d in doc["required_disclaimers"]),
            escalations=tuple(_escalation(e) for e in doc["escalation_rules"]),
            high_stakes_topics=tuple(doc["high_stakes_topics"]),
            domain_rules=tuple(doc["domain_rules"]),
            max_revisions=revision["max_revisions"], max_cost=revision["max_cost"],
            revision_model=revision["model"], judge_model=system2["judge_model"],
            samples=system2["samples"], system2_checks=tuple(system2["checks"]),
            store_text=doc["audit"]["store_text"], holding_reply=doc["holding_reply"],
            refusal_reply=doc["refusal_reply"], document=doc)


def _escalation(e: dict) -> EscalationRule:
    when = e["when"]
    if isinstance(when, str):
        when = {"pattern": when}
    return EscalationRule(e["name"], when.get("topic", ""), when.get("pattern", ""),
                          when.get("amount_above"), when.get("currency", ""),
                          e.get("on", "both"), e.get("holding_reply", ""))


# ---- parsing with line numbers ------------------------------------------------------------

Path_ = tuple  # a field's path: ("thresholds", "moderation"), ("regexes", 2, "pattern")


def dotted(path: Path_) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "the policy"


class _Errors:
    """Errors of one document, each with the line of the field it is about."""

    def __init__(self, filename: str, lines: dict[Path_, int]):
        self.filename, self.lines, self.found = filename, lines, []

    def line(self, path: Path_) -> int:
        while path and path not in self.lines:
            path = path[:-1]
        return self.lines.get(path, 1)

    def add(self, path: Path_, reason: str) -> None:
        self.found.append((self.line(path), f"{dotted(path)} {reason}"))

    def where(self, path: Path_) -> str:
        return f"{self.filename}:{self.line(path)}: {dotted(path)}"

    def raise_if_any(self) -> None:
        if not self.found:
            return
        ordered = sorted(self.found, key=lambda item: item[0])
        shown = [f"{self.filename}:{line}: {text}" for line, text in ordered[:5]]
        if len(ordered) > 5:
            shown.append(f"(and {len(ordered) - 5} more)")
        raise InvalidArgument("\n".join(shown))


class _Loader(yaml.SafeLoader):
    """YAML with the booleans of YAML 1.2 (true/false): in 1.1 `level: off` would read as
    false and the key `on:` as true."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool",
                              re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def load_document(document: str, filename: str = "policy.yaml") -> tuple[Any, dict[Path_, int]]:
    """The document's data and the line (1-based) of every key and list entry in it."""
    if len(document.encode("utf-8", "surrogatepass")) > MAX_DOCUMENT_BYTES:
        raise InvalidArgument(f"{filename}: the policy is over {MAX_DOCUMENT_BYTES // 1024} KiB")
    loader = _Loader(document)
    try:
        node = loader.get_single_node()
        if node is None:
            return {}, {}
        lines: dict[Path_, int] = {(): node.start_mark.line + 1}
        return _construct(loader, node, (), lines, filename), lines
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        problem = exc.problem or exc.context or "cannot be read"
        raise InvalidArgument(f"{filename}:{line}: not valid YAML or JSON: {problem}") from None
    except yaml.YAMLError as exc:
        raise InvalidArgument(f"{filename}: not valid YAML or JSON: {exc}") from None
    finally:
        loader.dispose()


def _construct(loader, node, path: Path_, lines: dict, filename: str) -> Any:
    if isinstance(node, yaml.MappingNode):
        out = {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            line = key_node.start_mark.line + 1
            if not isinstance(key, str):
                raise InvalidArgument(f"{filename}:{line}: {dotted(path)}: keys must be "
                                      f"names, got {key!r}")
            if key in out:
                raise InvalidArgument(f"{filename}:{line}: {dotted(path + (key,))} is set "
                                      "twice")
            lines[path + (key,)] = line
            out[key] = _construct(loader, value_node, path + (key,), lines, filename)
        return out
    if isinstance(node, yaml.SequenceNode):
        items = []
        for index, child in enumerate(node.value):
            lines[path + (index,)] = child.start_mark.line + 1
            items.append(_construct(loader, child, path + (index,), lines, filename))
        return items
    return loader.construct_object(node, deep=True)


# ---- validation ---------------------------------------------------------------------------

class _Schema:
    """Validates one (partial) document: each field alone, so a tenant or process document
    may set only what it changes. Returns the normalised document."""

    def __init__(self, errors: _Errors, domain_rules: Callable[[Any, str], Any] | None):
        self.e, self.domain_rules = errors, domain_rules

    def document(self, doc: Any) -> dict:
        if not isinstance(doc, dict):
            self.e.add((), f"must be a mapping of settings, got {_kind(doc)}")
            return {}
        out = {}
        for key, value in doc.items():
            field = getattr(self, "f_" + key, None) if key in DEFAULTS else None
            if field is None:
                self.unknown((key,), key, DEFAULTS)
                continue
            checked = field(value, (key,))
            if checked is not None:
                out[key] = checked
        return out

    def unknown(self, path: Path_, key: str, known, what: str = "setting") -> None:
        self.e.add(path, f"is not a known {what}{suggest(key, known)}")

    # scalars
    def choice(self, value, path, options):
        if value not in options:
            self.e.add(path, f"must be one of {', '.join(options)}, got {value!r}")
            return None
        return value

    def number(self, value, path, low, high, whole=False):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                (whole and not isinstance(value, int)):
            self.e.add(path, f"must be a {'whole ' if whole else ''}number, got {_kind(value)}")
            return None
        if not math.isfinite(value) or not low <= value <= high:
            self.e.add(path, f"must be {_fmt(low)}..{_fmt(high)}, got {value}")
            return None
        return value

    def text(self, value, path, required=True, limit=MAX_TEXT):
        if not isinstance(value, str) or (required and not value.strip()):
            self.e.add(path, f"must be {'a non-empty' if required else 'a'} string, "
                             f"got {_kind(value)}")
            return None
        if len(value) > limit:
            self.e.add(path, f"must be at most {limit} characters, got {len(value)}")
            return None
        return value

    def name(self, value, path):
        if not isinstance(value, str) or not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", value):
            self.e.add(path, f"must be a name (letters, digits, _ . -, at most 64), "
                             f"got {value!r}")
            return None
        return value

    def regex(self, value, path):
        if self.text(value, path, limit=MAX_PATTERN) is None:
            return None
        try:
            re.compile(value)
            regex.compile(value, regex.VERSION0)  # what the rules run it with
        except (re.error, regex.error) as exc:
            self.e.add(path, f"is not a valid regular expression: {exc}")
            return None
        return value

    def boolean(self, value, path):
        if not isinstance(value, bool):
            self.e.add(path, f"must be true or false, got {_kind(value)}")
            return None
        return value

    def listed(self, value, path, each):
        if not isinstance(value, list):
            self.e.add(path, f"must be a list, got {_kind(value)}")
            return None
        if len(value) > MAX_LIST:
            self.e.add(path, f"must have at most {MAX_LIST} entries, got {len(value)}")
            return None
        out = [each(item, path + (i,)) for i, item in enumerate(value)]
        return [item for item in out if item is not None]

    def mapping(self, value, path, fields: dict, required=()):
        """A mapping whose keys are `fields` (name -> validator(value, path))."""
        if not isinstance(value, dict):
            self.e.add(path, f"must be a mapping, got {_kind(value)}")
            return None
        out = {}
        for key, item in value.items():
            if key not in fields:
                self.unknown(path + (key,), key, fields)
                continue
            checked = fields[key](item, path + (key,))
            if checked is not None:
                out[key] = checked
        for key in required:
            if key not in value:
                self.e.add(path, f"needs '{key}'")
        return out

    def unique_names(self, items, path):
        seen = set()
        for i, item in enumerate(items or ()):
            name = item.get("name")
            if name in seen:
                self.e.add(path + (i, "name"), f"repeats the name {name!r}")
            seen.add(name)
        return items

    # top-level fields
    def f_level(self, v, p):
        return self.choice(v, p, LEVELS)

    def f_on_unavailable(self, v, p):
        return self.choice(v, p, ("refuse", "allow"))

    def f_thresholds(self, v, p):
        return self.mapping(v, p, {c: lambda x, q: self.number(x, q, 0, 1) for c in CHECKS})

    def f_uncertain_band(self, v, p):
        if isinstance(v, list):
            band = self.band(v, p)
            return None if band is None else {"default": band}
        return self.mapping(v, p, {c: self.band for c in ("default", *CHECKS)})

    def band(self, v, p):
        if not isinstance(v, list) or len(v) != 2:
            self.e.add(p, f"must be [low, high], got {v!r}")
            return None
        low, high = (self.number(x, p + (i,), 0, 1) for i, x in enumerate(v))
        if low is None or high is None:
            return None
        if low >= high:
            self.e.add(p, f"must have low < high, got [{low}, {high}]")
            return None
        return [low, high]

    def f_pii(self, v, p):
        return self.mapping(v, p, {
            "action": lambda x, q: self.choice(x, q, ("redact", "refuse", "allow")),
            "entities": lambda x, q: self.listed(x, q, self.entity),
            "external": lambda x, q: self.choice(x, q, ("pseudonymize", "allow"))})

    def entity(self, v, p):
        if v not in PII_ENTITIES:
            if isinstance(v, str):
                self.unknown(p, v, PII_ENTITIES, "entity")
            else:
                self.e.add(p, f"must be an entity name, got {_kind(v)}")
            return None
        return v

    def f_denied_topics(self, v, p):
        return self.unique_names(self.listed(v, p, lambda x, q: self.mapping(x, q, {
            "name": self.name, "description": self.text,
            "patterns": lambda y, r: self.listed(y, r, self.regex),
            "reply": self.text}, required=("name", "description"))), p)

    def f_regexes(self, v, p):
        return self.unique_names(self.listed(v, p, lambda x, q: self.mapping(x, q, {
            "name": self.name, "pattern": self.regex,
            "action": lambda y, r: self.choice(y, r, ("refuse", "redact", "escalate")),
            "on": lambda y, r: self.choice(y, r, ("input", "output", "both")),
            "replacement": lambda y, r: self.text(y, r, required=False)},
            required=("name", "pattern"))), p)

    def f_required_disclaimers(self, v, p):
        return self.unique_names(self.listed(v, p, lambda x, q: self.mapping(x, q, {
            "name": self.name, "when": self.regex, "text": self.text,
            "action": lambda y, r: self.choice(y, r, ("append", "revise"))},
            required=("name", "when", "text"))), p)

    def f_escalation_rules(self, v, p):
        return self.unique_names(self.listed(v, p, lambda x, q: self.mapping(x, q, {
            "name": self.name, "when": self.escalation_when,
            "on": lambda y, r: self.choice(y, r, ("question", "answer", "both")),
            "holding_reply": self.text}, required=("name", "when"))), p)

    def escalation_when(self, v, p):
        if isinstance(v, str):
            return self.regex(v, p)
        out = self.mapping(v, p, {
            "topic": self.text, "pattern": self.regex,
            "amount_above": lambda x, q: self.number(x, q, 0, 1e15),
            "currency": lambda x, q: self.choice(x, q, CURRENCY_CODES)})
        if out is not None and isinstance(v, dict) and not ({"topic", "pattern"} & set(v)):
            self.e.add(p, "needs a 'topic' or a 'pattern'")
        return out

    def f_high_stakes_topics(self, v, p):
        return self.listed(v, p, self.text)

    def f_domain_rules(self, v, p):
        rules = self.listed(v, p, lambda x, q: x if isinstance(x, dict) else
                            self.e.add(q, f"must be a mapping, got {_kind(x)}"))
        if rules is not None and self.domain_rules is not None:
            for i, rule in enumerate(rules):
                try:
                    self.domain_rules([rule], self.e.where(p + (i,)))
                except (InvalidArgument, ValueError) as exc:
                    self.e.add(p + (i,), str(getattr(exc, "message", exc)))
        return rules

    def f_revision(self, v, p):
        return self.mapping(v, p, {
            "max_revisions": lambda x, q: self.number(x, q, 0, 5, whole=True),
            "max_cost": lambda x, q: self.number(x, q, 0, 1e6),
            "model": lambda x, q: self.text(x, q, required=False, limit=128)})

    def f_system2(self, v, p):
        return self.mapping(v, p, {
            "judge_model": lambda x, q: self.text(x, q, limit=128),
            "samples": lambda x, q: self.number(x, q, 1, 16, whole=True),
            "checks": lambda x, q: self.listed(x, q, lambda y, r: self.choice(
                y, r, SYSTEM2_CHECKS))})

    def f_audit(self, v, p):
        return self.mapping(v, p, {"store_text": self.boolean})

    def f_holding_reply(self, v, p):
        return self.text(v, p)

    def f_refusal_reply(self, v, p):
        return self.text(v, p)


def suggest(word: str, known) -> str:
    """' (did you mean 'X'?)' for the closest known name, else the list of known ones."""
    known = list(known)
    close = difflib.get_close_matches(word, known, n=1, cutoff=0.6) or \
        [k for k in known if word and k.lower().startswith(word.lower())][:1]
    return f" (did you mean '{close[0]}'?)" if close else f" (known: {', '.join(known)})"


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (dict, list)):
        return "a mapping" if isinstance(value, dict) else "a list"
    return f"{type(value).__name__} {value!r}"[:80]


def _fmt(x: float) -> str:
    return f"{x:g}"


def parse_document(document: str, filename: str = "policy.yaml",
                   domain_rules: Callable[[Any, str], Any] | None = None) -> dict:
    """A (partial) policy document, validated and normalised; InvalidArgument names the file,
    the line, the field and the reason for every problem."""
    data, lines = load_document(document, filename or "policy.yaml")
    errors = _Errors(filename or "policy.yaml", lines)
    out = _Schema(errors, domain_rules).document(data)
    errors.raise_if_any()
    return out


def merge(base: dict, over: dict) -> dict:
    """`over` deep-merged into a copy of `base`: mappings merge key by key, anything else
    (lists of rules included) is replaced."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def effective(*documents: dict | None) -> Policy:
    """The defaults, then each parsed document in order (tenant, then process)."""
    doc = DEFAULTS
    for d in documents:
        if d:
            doc = merge(doc, d)
    return Policy.from_document(copy.deepcopy(doc) if doc is DEFAULTS else doc)
