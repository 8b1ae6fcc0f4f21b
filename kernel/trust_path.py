"""The Ask path's side of the Trust Agent: screen the working set, release the answer window by
window once checked, verify, pseudonymize toward external models, and the Ask's audit record.

vfm-trustd judges; the kernel orchestrates. Everything here speaks the `TrustClient` port
(plain dataclasses), so it is unit-tested with an in-memory trust service.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import re
import time
from typing import Awaitable, Callable, Sequence

from kernel.memory import Item
from kernel.ports import (OUTCOMES, AuditSink, CheckResult, EscalationOpener, OutputDecision,
                          Placeholder, ScreenItem, TrustClient, TrustPolicy, TrustScope,
                          Verdict, Verification)
from vfmos_runtime.errors import DeadlineExceeded, Unavailable
from vfmos_runtime.protocol import TRUST_SERVICE
from vfmos_runtime.types import Usage
from vfmos_runtime.windows import opener_only, window_end

log = logging.getLogger("vfmd.trust")

REFUSAL_REPLY = "I can't help with that."
HOLDING_REPLY = "Your request needs a person's review; you will get an answer soon."


def strongest(*outcomes: str) -> str:
    """The outcome that weighs most (refuse > escalate > revise > redact > allow)."""
    return max(outcomes, key=lambda o: OUTCOMES.index(o) if o in OUTCOMES else 0)


def restore(text: str, placeholders: Sequence[Placeholder]) -> str:
    """Put the originals back where an external model echoed a placeholder, with or without
    its angle brackets (`<EMAIL_ADDRESS_1>`, `EMAIL_ADDRESS_1`)."""
    for p in sorted(placeholders, key=lambda p: -len(p.placeholder)):
        bare = p.placeholder.strip("<>")
        if bare:
            text = re.sub(rf"<?(?<![A-Za-z0-9_]){re.escape(bare)}(?![A-Za-z0-9_])>?",
                          lambda _: p.original, text)
    return text


def mask(text: str, placeholders: Sequence[Placeholder]) -> str:
    """The reverse of `restore`: originals replaced by their placeholders."""
    for p in sorted(placeholders, key=lambda p: -len(p.original)):
        if p.original:
            text = text.replace(p.original, p.placeholder)
    return text


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


CONVERSATION = ("user", "assistant")  # speakers of the process's own turns


def screen_item(item: Item, n: int) -> ScreenItem:
    """How vfm-trustd is to read a working-set item: a knowledge chunk, or a memory entry of
    another speaker (a tool's output, a remembered document), as a third party's text
    (indirect injection); the process's own turns and what its owner pinned as the asker's
    words (direct injection), without the "speaker: " the prompt gives them."""
    ident = item.source_ids[0] if item.source_ids else f"{item.kind}:{n}"
    if item.kind == "knowledge":
        return ScreenItem("knowledge", ident, item.text)
    if item.kind == "pinned" or item.speaker in CONVERSATION:
        text = item.text.removeprefix(f"{item.speaker}: ") if item.speaker else item.text
        return ScreenItem("turn", ident, text)
    return ScreenItem("memory", ident, item.text)


class TrustGate:
    """What every Ask shares: the trust service (None with `--trust off`), the last
    effective policy seen per (tenant, pid), where escalations wait and where records go."""

    def __init__(self, client: TrustClient | None, escalations: EscalationOpener | None = None,
                 audit: AuditSink | None = None):
        self.client = client
        self.escalations = escalations
        self.audit = audit
        self._policies: dict[tuple[str, int], TrustPolicy] = {}

    @property
    def enabled(self) -> bool:
        return self.client is not None

    def session(self, tenant: str, pid: int, question: str, system_prompt: str) -> "TrustSession":
        return TrustSession(self, TrustScope(tenant, pid), question, system_prompt)

    def remember_policy(self, scope: TrustScope, policy: TrustPolicy) -> None:
        self._policies[(scope.tenant, scope.pid)] = policy

    def last_policy(self, scope: TrustScope) -> TrustPolicy | None:
        return self._policies.get((scope.tenant, scope.pid))

    def record(self, tenant: str, pid: int, usage: Usage, question: str, answer: str,
               session: "TrustSession | None", error: str = "") -> None:
        """Append the Ask's audit record; a failure is logged, never the Ask's."""
        if self.audit is None:
            return
        verdict = session.verdict if session is not None else None
        policy = session.policy if session is not None else None
        reasons = list(verdict.reasons) if verdict else []
        if error:
            reasons.append(error)
        record = {
            "kind": "ask", "tenant": tenant, "pid": pid, "time": time.time(),
            "model": usage.model, "policy_version": verdict.policy_version if verdict else 0,
            "checks": [{"check": c.check, "score": c.score, "threshold": c.threshold,
                        "outcome": c.outcome, "reason": c.reason, "system": c.system,
                        "target": c.target} for c in (verdict.checks if verdict else [])],
            "verdict": ("refuse" if error else verdict.outcome) if verdict else "off",
            "unverified": bool(verdict and verdict.unverified),
            "reasons": reasons, "tokens_in": usage.tokens_in, "tokens_out": usage.tokens_out,
            "cost": usage.cost, "prompt_sha256": _sha256(question),
            "answer_sha256": _sha256(answer), "ask_id": usage.ask_id}
        if usage.route_reason:
            record["route_reason"] = usage.route_reason
        if policy is not None and policy.store_text:
            record["prompt_text"], record["answer_text"] = question, answer
        try:
            self.audit.append(record)
        except Exception:  # the audit log's own failure must not lose the answer
            log.exception("the audit record of an Ask of process %d was not written", pid)


@dataclasses.dataclass(frozen=True)
class Revision:
    """System 2 wants the answer again: with this feedback, on this model ("" = the same)."""

    feedback: str
    model: str = ""


@dataclasses.dataclass
class Ending:
    """An Ask that ends without (more of) the model's answer: its finish reason and reply."""

    finish: str            # "refused" or "escalated"
    reply: str
    escalation_id: str = ""


class TrustSession:
    """One Ask's dealings with vfm-trustd, and the verdict they add up to."""

    def __init__(self, gate: TrustGate, scope: TrustScope, question: str, system_prompt: str):
        self._gate = gate
        self._client = gate.client
        self.scope = scope
        self.question = question
        self.system_prompt = system_prompt
        self.protected: list[str] = [system_prompt] if system_prompt else []
        self.model_question: str | None = None  # the question redacted by the policy
        self.policy: TrustPolicy | None = None
        self.verdict = Verdict(system=0)
        self.placeholders: list[Placeholder] = []
        self.verifies = False       # system 2 sees the whole answer before it is released
        self.passthrough = False    # level off, or allowed unverified: no more checks
        self._output_checks: list[CheckResult] = []
        self._policy_task = asyncio.ensure_future(self._fetch_policy())

    def may_start_early(self, items: list[Item]) -> bool:
        """Whether a model of ours may begin answering before the screen is done: vfm-trustd
        has answered for this process before (so an Ask refused for its absence costs
        nothing), and the working set holds only the asker's own words (a third party's
        text, which may carry injected instructions, never reaches the model unscreened)."""
        return self._gate.last_policy(self.scope) is not None and all(
            screen_item(item, n).kind == "turn" for n, item in enumerate(items))

    def close(self) -> None:
        """The Ask is over: a policy lookup still running (the Ask failed early) is dropped."""
        self._policy_task.cancel()

    # --- vfm-trustd unreachable ----------------------------------------------------------
    async def _fetch_policy(self) -> TrustPolicy | None:
        try:
            policy = await self._client.policy(self.scope)
        except (Unavailable, DeadlineExceeded):
            return self._gate.last_policy(self.scope)
        self._gate.remember_policy(self.scope, policy)
        return policy

    def _unavailable(self, err: Unavailable | DeadlineExceeded) -> None:
        """The policy's on_unavailable: allow (the Ask goes on unchecked and says so) or
        refuse (Unavailable naming vfm-trustd); without a policy seen, refuse."""
        policy = self.policy or self._gate.last_policy(self.scope)
        if policy is not None and policy.on_unavailable == "allow":
            if not self.verdict.unverified:
                log.warning("answering unverified (on_unavailable: allow): %s", err.message)
            self.verdict.unverified = True
            self.verdict.reasons.append(f"unverified: {TRUST_SERVICE} not reachable")
            self.passthrough = True
            self.verifies = False
            return
        message = err.message if TRUST_SERVICE in err.message else \
            f"service {TRUST_SERVICE} is unavailable: {err.message}"
        raise Unavailable(f"{message}; the trust policy refuses asks until it is back")

    async def _call(self, call: Callable[[], Awaitable]):
        """A call to vfm-trustd, or None when it is away and the policy allows that."""
        try:
            return await call()
        except (Unavailable, DeadlineExceeded) as err:
            self._unavailable(err)
            return None

    def _add(self, verdict: Verdict, target: str, output: bool = False) -> None:
        v = self.verdict
        checks = [c if c.target else dataclasses.replace(c, target=target)
                  for c in verdict.checks]
        if output:  # each window rechecks the text so far: keep the latest window's checks
            self._output_checks = checks
        else:
            v.checks.extend(checks)
        v.outcome = strongest(v.outcome, verdict.outcome)
        v.reasons.extend(r for r in verdict.reasons if r not in v.reasons)
        v.system = max(v.system, verdict.system)
        v.elapsed_ms += verdict.elapsed_ms
        v.policy_version = verdict.policy_version or v.policy_version
        v.level = verdict.level or v.level
        v.escalation_rule = verdict.escalation_rule or v.escalation_rule

    def final_verdict(self) -> Verdict:
        v = self.verdict
        return dataclasses.replace(v, checks=[*v.checks, *self._output_checks])

    # --- the way in ----------------------------------------------------------------------
    async def screen(self, items: list[Item]) -> tuple[list[Item], Ending | None]:
        """System 1 on the question and every item of the working set: the items that may
        enter the prompt, and the Ask's ending when it must not go on."""
        self.protected += [i.text for i in items if i.kind == "pinned"]
        screened = [screen_item(i, n) for n, i in enumerate(items)]
        screening_task = asyncio.ensure_future(self._call(lambda: self._client.screen_input(
            self.scope, self.question, screened, self.system_prompt)))
        self.policy = await self._policy_task
        if self.policy is not None and self.policy.level == "off":
            screening_task.cancel()
            await asyncio.gather(screening_task, return_exceptions=True)
            self.passthrough = True
            self.verdict = Verdict(level="off", policy_version=self.policy.version, system=0)
            return items, None
        screening = await screening_task
        if screening is None:
            return items, None
        self._add(screening.verdict, "question")
        if screening.verdict.outcome == "redact" and screening.verdict.redacted_text:
            self.model_question = screening.verdict.redacted_text
        kept, decisions = [], {iv.index: iv for iv in screening.items}
        for n, item in enumerate(items):
            decided = decisions.get(n)
            if decided is not None:
                self.verdict.checks.extend(
                    c if c.target else dataclasses.replace(c, target=f"item:{n}")
                    for c in decided.checks)
            if decided is not None and decided.dropped:
                self.verdict.dropped_items.append(screened[n].id)
                self.verdict.reasons.append(f"dropped {screened[n].id} from the working set: "
                                            f"{decided.reason or 'failed the input screen'}")
            else:
                kept.append(item)
        self.verifies = screening.escalate_to_system2 or self.verdict.level == "strict"
        return kept, await self._ending(screening.verdict)

    async def _ending(self, verdict: Verdict) -> Ending | None:
        if verdict.outcome == "refuse":
            return Ending("refused", verdict.holding_reply or self.reply("refusal"))
        if verdict.outcome == "escalate":
            return await self.escalate(verdict)
        return None

    def reply(self, kind: str) -> str:
        """The policy's "refusal" or "holding" reply, or the kernel's own."""
        policy = self.policy
        if kind == "refusal":
            return (policy.refusal_reply if policy else "") or REFUSAL_REPLY
        return (policy.holding_reply if policy else "") or HOLDING_REPLY

    async def escalate(self, verdict: Verdict) -> Ending:
        reply = verdict.holding_reply or self.reply("holding")
        book = self._gate.escalations
        if book is None:  # nowhere for a human to see it: the safe ending is a refusal
            self.verdict.reasons.append("an escalation rule fired but vfmd keeps no escalations")
            self.verdict.outcome = strongest(self.verdict.outcome, "refuse")
            return Ending("refused", self.reply("refusal"))
        escalation_id = await book.open(
            self.scope.tenant, self.scope.pid, self.question, self.final_verdict(), reply)
        return Ending("escalated", reply, str(escalation_id))

    async def pseudonymize(self, system_prompt: str, prompt: str,
                           items: list[Item]) -> tuple[str, str, list[Item]] | None:
        """The texts an external model gets, PII replaced by placeholders (as the policy
        says); None when nothing changes."""
        if self.passthrough:
            return None
        texts = [system_prompt, prompt, *(i.text for i in items)]
        done = await self._call(lambda: self._client.pseudonymize(self.scope, texts))
        if done is None or not done.placeholders:
            return None
        self.placeholders = list(done.placeholders)
        return done.texts[0], done.texts[1], [dataclasses.replace(i, text=t)
                                              for i, t in zip(items, done.texts[2:])]

    def restore(self, text: str) -> str:
        return restore(text, self.placeholders) if self.placeholders else text

    def mask(self, text: str) -> str:
        return mask(text, self.placeholders) if self.placeholders else text

    # --- the way out ---------------------------------------------------------------------
    async def check_output(self, text: str, final: bool, released: int) -> OutputDecision:
        if self.passthrough:
            return OutputDecision(Verdict(), text)
        decision = await self._call(lambda: self._client.check_output(
            self.scope, text, final, self.question, self.protected, released))
        if decision is None:
            return OutputDecision(Verdict(), text)
        self._add(decision.verdict, "output", output=True)
        return decision

    async def verify(self, answer: str, sources: list[Item], model: str,
                     target: str = "answer") -> Verification | None:
        if self.passthrough:
            return None
        done = await self._call(lambda: self._client.verify(
            self.scope, self.question, answer,
            [ScreenItem(i.kind, i.source_ids[0] if i.source_ids else "", i.text)
             for i in sources], model))
        if done is not None:
            self._add(done.verdict, target)
        return done

    # --- a cascade's first answer, judged and dropped --------------------------------------
    def draft_mark(self) -> tuple[str, int, int]:
        """Where the verdict stands before a draft answer is judged."""
        return self.verdict.outcome, len(self.verdict.reasons), len(self.verdict.checks)

    def drop_draft(self, mark: tuple[str, int, int], note: str) -> None:
        """The draft was replaced unseen: its checks stay in the record (target "draft"),
        but the verdict is the next answer's to make."""
        outcome, reasons, checks = mark
        v = self.verdict
        v.checks[checks:] = [dataclasses.replace(c, target="draft") for c in v.checks[checks:]]
        v.checks.extend(dataclasses.replace(c, target="draft") for c in self._output_checks)
        self._output_checks = []
        v.outcome = outcome
        del v.reasons[reasons:]
        v.reasons.append(note)

    async def system2(self, answer: str, sources: list[Item],
                      model: str) -> "Revision | Ending | None":
        """Verify a held answer: None releases it; a Revision asks for it again (within the
        policy's max_revisions, after which it is refused); an Ending replaces it."""
        verified = await self.verify(answer, sources, model)
        if verified is None or verified.verdict.outcome in ("allow", "redact"):
            return None
        verdict = verified.verdict
        if verdict.outcome == "revise":
            limit = self.policy.max_revisions if self.policy else 1
            if self.verdict.revisions < limit:
                self.verdict.revisions += 1
                feedback = verdict.feedback or "A reviewer found the previous answer wrong."
                return Revision(self.mask(feedback), verified.revise_model)
            self.verdict.reasons.append(
                f"still not verified after {self.verdict.revisions} revision(s)")
            self.verdict.outcome = "refuse"
        if verdict.outcome == "escalate":
            return await self.escalate(verdict)
        return Ending("refused", verdict.holding_reply or self.reply("refusal"))


class OutputGuard:
    """Releases the model's answer to the client only once vfm-trustd has checked it.

    The generation appends to `raw` and calls `grown()`; this task takes everything complete
    since the last window (a sentence, or a run cut after a plain word), checks the answer
    so far while the model goes on, and releases what the check allows. One check is in
    flight at a time: text that comes meanwhile makes the next window. An answer's opening
    word alone (`opener_only`) goes out at once, unchecked. With `hold`, nothing is released:
    the whole checked answer waits in `held` for system 2."""

    def __init__(self, session: TrustSession, raw: list[str], release: Callable[[str], None],
                 stop: Callable[[], None], hold: bool):
        self._session = session
        self._raw = raw
        self._release = release
        self._stop = stop
        self.hold = hold
        self._wake = asyncio.Event()
        self._finished = False
        self.sent = ""        # what the client has been given (checked, maybe redacted)
        self.held = ""        # with `hold`: the checked answer, not released yet
        self.cut: OutputDecision | None = None

    def grown(self) -> None:
        self._wake.set()

    def finish(self) -> None:
        self._finished = True
        self._wake.set()

    async def run(self) -> None:
        try:
            await self._run()
        except BaseException:
            self._stop()  # an answer that cannot be checked must not go on
            raise

    async def _run(self) -> None:
        checked_raw, checked = 0, 0  # raw characters checked; checked text's length
        while True:
            self._wake.clear()
            finished = self._finished
            raw = "".join(self._raw)
            if finished:
                end = len(raw)
            elif self.hold:
                end = checked_raw
            else:  # the first-window rule holds until a check has let something out
                end = window_end(raw, checked_raw, first=checked == 0)
            if end <= checked_raw and not finished:
                await self._wake.wait()
                continue
            # The whitespace after the boundary goes too: it shows vfm-trustd the last word
            # is complete, so the window is released now, not with the next one.
            if end < len(raw) and raw[end].isspace():
                end += 1
            if not finished and not self.hold and not self.sent and opener_only(raw[:end]):
                # One opening word ("The ", "Sure, ") carries no name, secret or harm: it goes
                # out without the round trip, and the next check reads from the start.
                self._give(self._session.restore(raw[:end]))
                checked_raw = end
                continue
            text = self._session.restore(raw[:end])
            decision = await self._session.check_output(text, finished, checked)
            if decision.cut or decision.verdict.outcome in ("refuse", "escalate"):
                self.cut = decision
                self._stop()
                if not self.hold:
                    self._give(decision.text)
                return
            if self.hold:
                self.held = decision.text
            else:
                self._give(decision.text)
            if finished:
                return
            checked_raw, checked = end, len(text)

    def _give(self, text: str) -> None:
        # `text` is the checked answer from offset 0; what went out before stays out (a
        # redaction reaching back into it cannot be taken back), so only its tail is new.
        new = text[len(self.sent):]
        if new:
            self.sent += new
            self._release(new)
