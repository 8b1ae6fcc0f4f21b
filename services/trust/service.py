"""TrustService: runs a scope's policy over the injected checks (system 1 on the question, the
working set and the answer; system 2 on escalation) and decides. Plain objects, no wire."""

from __future__ import annotations

import enum
import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable

import numpy as np

from services.trust import keywords
from services.trust.learned import WindowCache, windows
from services.trust.checks import Check, Finding, Span, Text
from services.trust.policy import MAX_DOCUMENT_BYTES, Policy, effective, parse_document
from services.trust.policy_store import PolicyStore
from services.trust.rules import (APPEND, ESCALATE, PATTERN_TIMEOUT_S, REDACT, REFUSE, REVISE,
                                  SYSTEM2, PatternTimeout, TenantRules, apply_spans)
from vfmos_runtime.errors import InvalidArgument, Unavailable
from vfmos_runtime.protocol import MAX_TENANT
from vfmos_runtime.windows import window_end

log = logging.getLogger("vfm-trustd.service")

MAX_QUESTION_BYTES = 256 * 1024
MAX_OUTPUT_CHARS = 1 << 20
MAX_ITEMS = 512
MAX_ITEM_CHARS = 64 * 1024
MAX_PROTECTED = 64
MAX_SOURCES = 512
CACHE_SCOPES = 4096


class Outcome(enum.IntEnum):
    """What a check or a verdict decides (numbered as trust.v1.Outcome)."""

    ALLOW = 1
    REDACT = 2
    REVISE = 3
    REFUSE = 4
    ESCALATE = 5


# A verdict is its most severe check's outcome.
SEVERITY = {Outcome.ALLOW: 0, Outcome.REDACT: 1, Outcome.REVISE: 2, Outcome.ESCALATE: 3,
            Outcome.REFUSE: 4}
RULE_OUTCOMES = {REFUSE: Outcome.REFUSE, REDACT: Outcome.REDACT, ESCALATE: Outcome.ESCALATE,
                 REVISE: Outcome.REVISE, APPEND: Outcome.ALLOW, SYSTEM2: Outcome.ALLOW}
# Learned checks by where they look; a score at or above its threshold refuses.
QUESTION_CHECKS = ("moderation", "harmful_request", "injection")
ITEM_CHECKS = ("indirect_injection", "injection")   # the first one present screens items
OUTPUT_CHECKS = ("moderation",)
FIRST_WINDOW_CHARS = 40  # a first window this short is judged by its words alone
ITEM_VECTORS = 4096      # working-set items whose embeddings are kept (about 6 MB)


@dataclass(frozen=True)
class Scope:
    tenant: str
    pid: int = 0


@dataclass(frozen=True)
class Item:
    kind: str          # knowledge | memory | other | turn (the process's own conversation)
    id: str
    text: str


@dataclass
class CheckResult:
    check: str
    score: float
    threshold: float
    outcome: Outcome
    reason: str = ""
    spans: tuple[Span, ...] = ()
    system: int = 1
    elapsed_ms: float = 0.0
    target: str = ""
    key: str = ""              # the thresholds/uncertain_band entry it was compared with
    details: dict = field(default_factory=dict)


@dataclass
class Verdict:
    outcome: Outcome
    checks: list[CheckResult]
    reasons: list[str]
    system: int
    elapsed_ms: float
    policy_version: int
    level: str
    redacted_text: str = ""
    holding_reply: str = ""
    feedback: str = ""
    escalation_rule: str = ""


@dataclass
class ItemVerdict:
    index: int
    id: str
    dropped: bool
    checks: list[CheckResult]
    reason: str = ""


@dataclass
class InputScreen:
    verdict: Verdict
    items: list[ItemVerdict]
    escalate_to_system2: bool


@dataclass
class OutputCheck:
    verdict: Verdict
    text: str          # what may be released, from offset 0
    cut: bool


@dataclass
class Verification:
    verdict: Verdict
    revise_model: str = ""


@dataclass
class PolicyView:
    effective_json: str
    version: int
    origin: str        # process | tenant | default
    document: str


@dataclass
class PutResult:
    version: int
    effective_json: str
    sha256: str


@dataclass
class CheckSet:
    """The checks a TrustService runs, injected: `main` builds the real ones, tests the ones
    they can run. A check that is absent is not run (and not reported)."""

    text: dict[str, Check] = field(default_factory=dict)   # moderation, injection, ...
    leaks: dict[str, Any] = field(default_factory=dict)    # name -> .check_output(Text, [str])
    pii: Callable[[tuple[str, ...], float], Check] | None = None    # (entities, threshold)
    pseudonymize: Callable[[list[str], list[str]], tuple[list[str], list]] | None = None
    grounding: Any = None                                  # .check(answer, sources, question)
    constraints: Callable[[list[dict]], Any] | None = None  # rules -> .check(answer)
    domain_rules: Callable[[Any, str], Any] | None = None  # validates a policy's domain_rules
    embed: Callable[[list[str]], np.ndarray] | None = None


@dataclass
class Compiled:
    """A scope's effective policy with its rules compiled and checks built, cached."""

    policy: Policy
    version: int
    origin: str
    document: str
    rules: TenantRules
    pii: Check | None
    constraints: Any = None


class TrustService:
    def __init__(self, store: PolicyStore, checks: CheckSet):
        self.store, self.checks = store, checks
        self._lock = threading.Lock()
        self._scopes: dict[tuple[str, int], Compiled] = {}
        self._pii: dict[tuple, Check] = {}
        # A process's working set comes back Ask after Ask (pinned entries, recent turns,
        # the same knowledge chunks): their embeddings are kept, per tenant.
        self._item_vectors = WindowCache(checks.embed, ITEM_VECTORS) if checks.embed else None

    # ---- policies -----------------------------------------------------------------------
    def put_policy(self, scope: Scope, document: str, filename: str = "",
                   author: str = "") -> PutResult:
        scope = check_scope(scope)
        if not isinstance(document, str) or not document.strip():
            raise InvalidArgument("document: the policy is empty")
        parsed = parse_document(document, filename or "policy.yaml", self.checks.domain_rules)
        with self._lock:
            stored = self.store.put(scope.tenant, scope.pid, document, parsed, author,
                                    filename)
            for key in [k for k in self._scopes if k[0] == scope.tenant
                        and (scope.pid == 0 or k[1] == scope.pid)]:
                del self._scopes[key]
        return PutResult(stored.version, self.compiled(scope).policy.to_json(), stored.sha256)

    def get_policy(self, scope: Scope) -> PolicyView:
        cp = self.compiled(check_scope(scope))
        return PolicyView(cp.policy.to_json(), cp.version, cp.origin, cp.document)

    def policy_history(self, scope: Scope):
        scope = check_scope(scope)
        return self.store.history(scope.tenant, scope.pid)

    def compiled(self, scope: Scope) -> Compiled:
        key = (scope.tenant, scope.pid)
        cp = self._scopes.get(key)
        if cp is not None:
            return cp
        with self._lock:
            cp = self._scopes.get(key) or self._load(scope)
            if len(self._scopes) >= CACHE_SCOPES:
                self._scopes.clear()
            self._scopes[key] = cp
        return cp

    def _load(self, scope: Scope) -> Compiled:
        own = self.store.latest(scope.tenant, scope.pid) if scope.pid else None
        if scope.pid and own is None:
            tenant = self._scopes.get((scope.tenant, 0)) or self._load(Scope(scope.tenant))
            self._scopes.setdefault((scope.tenant, 0), tenant)
            return tenant  # a process without a policy of its own shares its tenant's
        tenant = self.store.latest(scope.tenant, 0)
        docs = [tenant.parsed if tenant else None, own.parsed if own else None]
        top = own or tenant
        origin = "process" if own else "tenant" if tenant else "default"
        return self._compile(effective(*docs), top.version if top else 0, origin,
                             top.document if top else "")

    def _compile(self, policy: Policy, version: int, origin: str, document: str) -> Compiled:
        pii = None
        if self.checks.pii is not None and policy.pii_action != "allow" and policy.pii_entities:
            key = (policy.pii_entities, policy.threshold("pii"))
            pii = self._pii.get(key)
            if pii is None:
                pii = self._pii[key] = self.checks.pii(*key)
        constraints = None
        if self.checks.constraints is not None and policy.domain_rules:
            constraints = self.checks.constraints(list(policy.domain_rules))
        return Compiled(policy, version, origin, document,
                        TenantRules(policy, self.checks.embed), pii, constraints)

    # ---- system 1: the way in -----------------------------------------------------------
    def screen_input(self, scope: Scope, question: str, items: Iterable[Item] = (),
                     system_prompt: str = "") -> InputScreen:
        items = list(items)
        check_question(question)
        check_items(items)
        return self._screen(self.compiled(check_scope(scope)), question, items, scope.tenant)

    def _screen(self, cp: Compiled, question: str, items: list[Item],
                namespace: str = "") -> InputScreen:
        started = time.perf_counter()
        p = cp.policy
        if p.level == "off":
            return InputScreen(self._verdict(cp, [], started),
                               [ItemVerdict(i, it.id, False, []) for i, it in
                                enumerate(items)], False)
        q = Text(question, self.checks.embed)
        results = [self._learned(cp, name, check, q, "question")
                   for name in QUESTION_CHECKS if (check := self.checks.text.get(name))]
        if cp.pii is not None and p.pii_action == "refuse":  # else the asker's own: no act
            results.append(self._pii_result(cp, q, "question"))
        results += self._rules(cp, "question", lambda: cp.rules.screen_question(q))
        verdicts = self._screen_items(cp, items, namespace)
        verdict = self._verdict(cp, results, started)
        if verdict.outcome == Outcome.REDACT:  # what the model may see of the question
            verdict.redacted_text = self._redacted(question, [
                span for r in results if r.outcome == Outcome.REDACT for span in r.spans])
        s2 = verdict.outcome in (Outcome.ALLOW, Outcome.REDACT) and \
            self._wants_system2(p, results)
        if s2:
            verdict.reasons.append("sent to system 2: " + self._why_system2(p, results))
        return InputScreen(verdict, verdicts, s2)

    def _screen_items(self, cp: Compiled, items: list[Item],
                      namespace: str = "") -> list[ItemVerdict]:
        if not items:
            return []
        name = next((n for n in ITEM_CHECKS if n in self.checks.text), "")
        texts = [Text(it.text, self.checks.embed, namespace) for it in items]
        # One batch for what is not kept yet. A document of several windows is judged by its
        # windows (which indirect_injection embeds and keeps itself): its whole is not embedded.
        # A turn is read whole by the direct check, however long.
        whole = [t for it, t in zip(items, texts) if it.kind == "turn"
                 or name != "indirect_injection" or len(windows(t.value)) == 1]
        if name and whole and self._item_vectors is not None:
            for text, vector in zip(whole, self._item_vectors([t.value for t in whole],
                                                              namespace)):
                text.preset(vector)
        out = []
        for i, (item, text) in enumerate(zip(items, texts)):
            target = f"item:{i}"
            if item.kind == "turn":  # the asker's own words: judged as the question is
                direct = self.checks.text.get("injection")
                results = [self._learned(cp, "injection", direct, text, target)] if direct else []
            else:
                results = [self._learned(cp, name, self.checks.text[name], text, target,
                                         key="indirect_injection")] if name else []
            results += self._rules(cp, target, lambda t=item.text: cp.rules.screen_item(t))
            bad = [r for r in results if r.outcome in (Outcome.REFUSE, Outcome.ESCALATE)]
            out.append(ItemVerdict(i, item.id, bool(bad), results,
                                   "; ".join(r.reason for r in bad)))
        return out

    # ---- system 1: the way out ----------------------------------------------------------
    def check_output(self, scope: Scope, text: str, final: bool, question: str = "",
                     protected: Iterable[str] = (), released: int = 0) -> OutputCheck:
        protected = list(protected)
        check_output_args(text, question, protected, released)
        return self._check_output(self.compiled(check_scope(scope)), text, final, question,
                                  protected, released, scope.tenant)

    def _check_output(self, cp: Compiled, text: str, final: bool, question: str,
                      protected: list[str], released: int, namespace: str = "") -> OutputCheck:
        """`namespace` (the tenant) keeps the answer windows' embeddings apart per tenant."""
        started = time.perf_counter()
        p = cp.policy
        if p.level == "off":
            return OutputCheck(self._verdict(cp, [], started), text, False)
        out = Text(text, self.checks.embed, namespace)
        # The first words of an answer (nothing released yet, a short window, no keyword
        # of the baseline in it) are too few for the encoder's checks to judge: the checks
        # that read words (PII, overlap with protected texts, the tenant's rules) decide
        # them, and the encoder reads them with the next window, which rechecks from the
        # start. That takes the encoder's time off the first token.
        words_only = (released == 0 and not final and len(text) <= FIRST_WINDOW_CHARS
                      and not any(keywords.counts(text)))
        results = [] if words_only else [
            self._scored(cp, name, Outcome.REFUSE, "output", run=lambda c=check, n=name: (
                c.check_answer(out, threshold=cp.policy.threshold(n))
                if hasattr(c, "check_answer") else c.check(out)))
            for name in OUTPUT_CHECKS if (check := self.checks.text.get(name))]
        if protected:
            results += [self._leak(cp, name, check, out, protected)
                        for name, check in self.checks.leaks.items()
                        if not (words_only and getattr(check, "reads_embedding", True))]
        if cp.pii is not None:  # the first words: the tagger only if they may name someone
            results.append(self._pii_result(cp, out, "output", fast=words_only or None))
        results += self._rules(cp, "output",
                               lambda: cp.rules.check_output(text, final, question))
        verdict = self._verdict(cp, results, started)
        releasable, cut = self._releasable(p, text, final, released, results, verdict)
        if verdict.outcome == Outcome.REDACT:
            verdict.redacted_text = releasable
        return OutputCheck(verdict, releasable, cut)

    def _releasable(self, p: Policy, text: str, final: bool, released: int,
                    results: list[CheckResult], verdict: Verdict) -> tuple[str, bool]:
        """How much of the answer may reach the client, redacted: all of it when final,
        else up to the last sentence end (nothing new at strict, which waits for system 2);
        never into a span still being written; never past a leak or a refusal."""
        spans = [s for r in results for s in r.spans if r.outcome == Outcome.REDACT]
        if verdict.outcome in (Outcome.REFUSE, Outcome.ESCALATE):
            stops = [s.start for r in results if r.outcome == Outcome.REFUSE
                     and r.check.startswith("leak") for s in r.spans]
            others = [r for r in results if r.outcome in (Outcome.REFUSE, Outcome.ESCALATE)
                      and not r.check.startswith("leak")]
            stop = released if others or not stops else max(released, min(stops))
            return self._redacted(text[:stop], spans), True
        if final:
            stop = len(text)
        elif p.level == "strict":
            stop = released
        else:  # the kernel's own window rule, so each window it sends goes out at once
            stop = window_end(text, 0, first=released == 0)
        for span in spans:
            if span.start < stop < span.end:
                stop = span.start
        releasable = self._redacted(text[:max(stop, released)], spans)
        if final:
            for r in results:
                if r.details.get("action") == APPEND:
                    releasable += "\n\n" + r.details["text"]
        return releasable, False

    @staticmethod
    def _redacted(text: str, spans: list[Span]) -> str:
        inside = [s if s.replacement else replace(s, replacement=f"[{s.label}]")
                  for s in spans if s.end <= len(text)]
        return apply_spans(text, inside)

    # ---- system 2 -----------------------------------------------------------------------
    def verify(self, scope: Scope, question: str, answer: str, sources: Iterable[str] = (),
               model: str = "") -> Verification:
        sources = list(sources)
        check_question(question, required=False)
        check_output_args(answer, question, [], 0, field_name="answer")
        if len(sources) > MAX_SOURCES:
            raise InvalidArgument(f"sources: at most {MAX_SOURCES}, got {len(sources)}")
        cp = self.compiled(check_scope(scope))
        started = time.perf_counter()
        p = cp.policy
        if p.level == "off":
            return Verification(self._verdict(cp, [], started))
        results = []
        grounding = self.checks.grounding
        if "grounding" in p.system2_checks and grounding is not None and sources:
            results.append(self._scored(cp, "grounding", Outcome.REVISE, "output", system=2,
                                        run=lambda: grounding.check(answer, sources, question)))
        if "constraints" in p.system2_checks and cp.constraints is not None:
            results.append(self._scored(cp, "constraints", Outcome.REVISE, "output", system=2,
                                        run=lambda: cp.constraints.check(answer)))
        verdict = self._verdict(cp, results, started)
        verdict.system = 2
        revise_model = ""
        if verdict.outcome == Outcome.REVISE:
            verdict.feedback = "; ".join(r.reason for r in results
                                         if r.outcome == Outcome.REVISE)
            if p.max_revisions == 0:
                verdict.outcome, verdict.holding_reply = Outcome.REFUSE, p.refusal_reply
                verdict.reasons.append("no revisions allowed (revision.max_revisions: 0)")
            elif p.revision_model and p.revision_model != model:
                revise_model = p.revision_model
        return Verification(verdict, revise_model)

    # ---- privacy toward external models -------------------------------------------------
    def pseudonymize(self, scope: Scope, texts: list[str]) -> tuple[list[str], list]:
        if len(texts) > MAX_ITEMS + 16:
            raise InvalidArgument(f"texts: at most {MAX_ITEMS + 16}, got {len(texts)}")
        for i, t in enumerate(texts):
            if len(t) > MAX_QUESTION_BYTES:
                raise InvalidArgument(f"texts[{i}]: over {MAX_QUESTION_BYTES} characters")
        p = self.compiled(check_scope(scope)).policy
        if p.level == "off" or p.pii_external == "allow" or not p.pii_entities:
            return list(texts), []
        if self.checks.pseudonymize is None:
            raise Unavailable("vfm-trustd runs without its PII check; cannot pseudonymize")
        return self.checks.pseudonymize(list(texts), list(p.pii_entities))

    # ---- a policy on trial --------------------------------------------------------------
    def test_policy(self, scope: Scope, document: str, filename: str, text: str,
                    output_text: str = "") -> tuple[Verdict, Verdict | None]:
        scope = check_scope(scope)
        check_question(text)
        if document.strip():
            parsed = parse_document(document, filename or "policy.yaml",
                                    self.checks.domain_rules)
            tenant = self.store.latest(scope.tenant, 0) if scope.pid else None
            cp = self._compile(effective(tenant.parsed if tenant else None, parsed), 0,
                               "test", document)
        else:
            cp = self.compiled(scope)
        screened = self._screen(cp, text, []).verdict
        output = None
        if output_text:
            check_output_args(output_text, text, [], 0, field_name="output_text")
            output = self._check_output(cp, output_text, True, text, [], 0).verdict
        return screened, output

    # ---- deciding -----------------------------------------------------------------------
    def _learned(self, cp: Compiled, name: str, check: Check, text: Text, target: str,
                 key: str = "") -> CheckResult:
        return self._scored(cp, key or name, Outcome.REFUSE, target,
                            run=lambda: check.check(text))

    def _leak(self, cp: Compiled, name: str, check, out: Text, protected: list[str]):
        return self._scored(cp, name, Outcome.REFUSE, "output",
                            run=lambda: check.check_output(out, protected))

    def _pii_result(self, cp: Compiled, text: Text, target: str,
                    fast: bool | None = None) -> CheckResult:
        """PII in the answer is redacted or refused as the policy says; in the question it
        is the asker's own, so it is checked only when the policy refuses it."""
        action = Outcome.REFUSE if cp.policy.pii_action == "refuse" else Outcome.REDACT
        result = self._scored(cp, "pii", action, target, run=lambda: cp.pii.check(text, fast))
        if result.outcome == Outcome.REDACT and not result.spans:
            result.outcome = Outcome.ALLOW
        return result

    def _scored(self, cp: Compiled, key: str, action: Outcome, target: str, run,
                system: int = 1) -> CheckResult:
        threshold = cp.policy.threshold(key)
        started = time.perf_counter()
        try:
            finding: Finding = run()
        except Exception as exc:  # a broken check decides as the policy's on_unavailable
            log.warning("check %s failed: %s", key, exc, exc_info=True)
            refuse = cp.policy.on_unavailable == "refuse"
            return CheckResult(key, 0.0, threshold,
                               Outcome.REFUSE if refuse else Outcome.ALLOW,
                               f"{key} failed ({type(exc).__name__}); "
                               f"{'refused' if refuse else 'allowed unverified'} "
                               "(on_unavailable)", system=system,
                               elapsed_ms=(time.perf_counter() - started) * 1e3,
                               target=target, key=key)
        fired = finding.score >= threshold
        return CheckResult(finding.check or key, float(finding.score), threshold,
                           action if fired else Outcome.ALLOW,
                           finding.reason or (f"{key} {finding.score:.2f} >= {threshold:g}"
                                              if fired else ""),
                           finding.spans, max(system, finding.system),
                           finding.elapsed_ms or (time.perf_counter() - started) * 1e3,
                           target, key, finding.details)

    def _rules(self, cp: Compiled, target: str, run) -> list[CheckResult]:
        """The tenant's rules on one text. A pattern that runs out of its time there decides
        as the policy's on_unavailable says, like a check that fails."""
        try:
            return [self._rule(cp, f, target) for f in run()]
        except PatternTimeout as slow:
            refuse = cp.policy.on_unavailable == "refuse"
            log.warning("rule %s ran over %.0f ms on a text", slow.rule,
                        PATTERN_TIMEOUT_S * 1000)
            return [CheckResult(
                "rules", 0.0, 1.0, Outcome.REFUSE if refuse else Outcome.ALLOW,
                f"rule {slow.rule}: its pattern ran over {PATTERN_TIMEOUT_S * 1000:.0f} ms "
                f"on this text; {'refused' if refuse else 'allowed unverified'} "
                "(on_unavailable)", target=target)]

    def _rule(self, cp: Compiled, finding: Finding, target: str) -> CheckResult:
        action = finding.details.get("action", "")
        outcome = RULE_OUTCOMES.get(action, Outcome.ALLOW)
        is_topic = finding.details.get("rule", "").startswith("denied_topics.")
        threshold = cp.policy.threshold("topics") if is_topic else 1.0
        if finding.score < threshold:
            outcome = Outcome.ALLOW
        return CheckResult("rules", finding.score, threshold, outcome, finding.reason,
                           finding.spans, 1, finding.elapsed_ms, target,
                           "topics" if is_topic else "", finding.details)

    def _wants_system2(self, p: Policy, results: list[CheckResult]) -> bool:
        if p.level == "strict":
            return True
        return p.level == "standard" and bool(self._why_system2(p, results))

    @staticmethod
    def _why_system2(p: Policy, results: list[CheckResult]) -> str:
        if p.level == "strict":
            return "level strict"
        why = [f"{r.key} {r.score:.2f} in the uncertain band"
               for r in results if r.key and r.outcome == Outcome.ALLOW
               and p.band(r.key)[0] <= r.score < p.band(r.key)[1]]
        why += [r.reason for r in results if r.details.get("action") == SYSTEM2]
        return "; ".join(why)

    def _verdict(self, cp: Compiled, results: list[CheckResult], started: float) -> Verdict:
        p = cp.policy
        outcome = max((r.outcome for r in results), key=SEVERITY.__getitem__,
                      default=Outcome.ALLOW)
        verdict = Verdict(outcome, results,
                          [r.reason for r in results if r.reason and (
                              r.outcome != Outcome.ALLOW or r.details.get("action") == APPEND)],
                          max((r.system for r in results), default=1),
                          (time.perf_counter() - started) * 1e3, cp.version, p.level)
        if outcome == Outcome.ESCALATE:
            rule = next(r for r in results if r.outcome == Outcome.ESCALATE)
            verdict.escalation_rule = rule.details.get("escalation", "")
            verdict.holding_reply = rule.details.get("holding_reply") or p.holding_reply
        elif outcome == Outcome.REFUSE:
            verdict.holding_reply = self._refusal_reply(p, results)
        elif outcome == Outcome.REVISE:
            verdict.feedback = "; ".join(
                f"add the disclaimer: {r.details['text']}" if r.details.get("text")
                else r.reason for r in results if r.outcome == Outcome.REVISE)
        return verdict

    @staticmethod
    def _refusal_reply(p: Policy, results: list[CheckResult]) -> str:
        for r in results:
            rule = r.details.get("rule", "")
            if r.outcome == Outcome.REFUSE and rule.startswith("denied_topics."):
                topic = next(t for t in p.denied_topics
                             if f"denied_topics.{t.name}" == rule)
                if topic.reply:
                    return topic.reply
        return p.refusal_reply

    def close(self) -> None:
        self.store.close()


# ---- bad input ---------------------------------------------------------------------------

def check_scope(scope: Scope) -> Scope:
    # The kernel always sets the tenant; an empty or odd one means a caller bypassed it.
    tenant = scope.tenant
    if not tenant or len(tenant) > MAX_TENANT or any(ord(c) < 32 for c in tenant):
        raise InvalidArgument("scope.tenant: a tenant is required (the kernel sets it)")
    if scope.pid < 0:
        raise InvalidArgument(f"scope.pid: must be >= 0 (0 = the tenant), got {scope.pid}")
    return scope


def check_question(question: str, required: bool = True, field_name: str = "question") -> None:
    if required and not question.strip():
        raise InvalidArgument(f"{field_name}: must not be empty")
    if len(question.encode("utf-8", "surrogatepass")) > MAX_QUESTION_BYTES:
        raise InvalidArgument(f"{field_name}: over {MAX_QUESTION_BYTES // 1024} KiB")


def check_items(items: list[Item]) -> None:
    if len(items) > MAX_ITEMS:
        raise InvalidArgument(f"items: at most {MAX_ITEMS}, got {len(items)}")
    for i, item in enumerate(items):
        if len(item.text) > MAX_ITEM_CHARS:
            raise InvalidArgument(f"items[{i}].text: over {MAX_ITEM_CHARS} characters")


def check_output_args(text: str, question: str, protected: list[str], released: int,
                      field_name: str = "text") -> None:
    if len(text) > MAX_OUTPUT_CHARS:
        raise InvalidArgument(f"{field_name}: over {MAX_OUTPUT_CHARS} characters")
    check_question(question, required=False)
    if len(protected) > MAX_PROTECTED:
        raise InvalidArgument(f"protected_texts: at most {MAX_PROTECTED}, got {len(protected)}")
    for i, t in enumerate(protected):
        if len(t) > MAX_QUESTION_BYTES:
            raise InvalidArgument(f"protected_texts[{i}]: over {MAX_QUESTION_BYTES} characters")
    if not 0 <= released <= len(text):
        raise InvalidArgument(f"released: must be 0..{len(text)} (the text's length), "
                              f"got {released}")


__all__ = ["CheckSet", "InputScreen", "Item", "ItemVerdict", "Outcome", "OutputCheck",
           "PolicyView", "PutResult", "Scope", "TrustService", "Verdict", "Verification",
           "MAX_DOCUMENT_BYTES"]
