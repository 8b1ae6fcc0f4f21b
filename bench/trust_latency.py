"""Trust bench section: system 1's time per Ask and how many benign Asks go to system 2.

vfm-trustd's own service (every check it loads by default, the default policy: level
`standard`), in this process, on benign Asks: the support tickets (`instruction`, and its
`response` as the answer) and XSTest's safe prompts (question only). One Ask's system-1
time = ScreenInput on the question + CheckOutput on the whole answer, wall clock, one Ask
at a time (the gRPC hop, ~1 ms, is not counted here). Also, as the kernel really calls
CheckOutput while an answer streams: a check per window (`vfmos_runtime.windows`) with the
answer growing 4 characters at a time, their sum and the slowest per answer. And
ScreenInput with 8 materials abstracts as the working set, new and then again with the
next question (a process's knowledge comes back Ask after Ask). Baseline in
the same run: the tenant rules alone (`--checks rules`). `escalation_rate` = share of those
Asks whose screen sends them to system 2 (an uncertain score or a high-stakes topic).
Goals: p50 <= 10 ms, p99 <= 50 ms on 2 cores, escalation_rate <= 10%.

    python -m bench trust_latency [--data-dir ../shared/data/trust] [--quick]
"""

from __future__ import annotations

import gzip
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.common import percentile



def _jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as f:
        return [json.loads(line) for line in f if line.strip()]


def benign_asks(data_dir: Path, quick: bool) -> list[tuple[str, str]]:
    """(question, answer) pairs; answer "" where the set has none."""
    tickets = data_dir.parent / "personas" / "support" / "tickets_intent_dev.jsonl.gz"
    asks = []
    if tickets.exists():
        asks += [(r["instruction"], r.get("response", "")) for r in _jsonl(tickets)]
    xstest = data_dir / "xstest_dev.jsonl"
    if xstest.exists():
        asks += [(r["text"], "") for r in _jsonl(xstest) if r["label"] == "safe"]
    if not asks:
        raise SystemExit(f"error: no benign Asks under {data_dir} (xstest_dev.jsonl) or "
                         f"{tickets}")
    step = max(1, len(asks) // (120 if quick else 600))  # spread over both sources
    return asks[::step]


def _service(checks: str, store_dir: Path):
    from services.trust.config import TrustConfig
    from services.trust.main import build_checks
    from services.trust.policy_store import PolicyStore
    from services.trust.service import TrustService

    return TrustService(PolicyStore(store_dir), build_checks(TrustConfig(store_dir,
                                                                         checks=checks)))


def measure(service, asks: list[tuple[str, str]]) -> dict:
    from services.trust.service import Outcome, Scope

    scope = Scope("bench")
    service.screen_input(scope, "warm up", ())  # first-call costs (policy compile, caches)
    times, escalated, refused, windows, read = [], 0, 0, 0, 0
    for question, answer in asks:
        start = time.perf_counter()
        screen = service.screen_input(scope, question, ())
        checked = service.check_output(scope, answer, True, question) if answer else None
        times.append((time.perf_counter() - start) * 1000)
        for c in checked.verdict.checks if checked else ():
            if c.check == "moderation":  # how many of the answer's windows the encoder read
                windows += c.details.get("windows", 1)
                read += c.details.get("encoder_windows", c.details.get("windows", 1))
        escalated += screen.escalate_to_system2
        refused += screen.verdict.outcome in (Outcome.REFUSE, Outcome.ESCALATE)
    return {"p50": percentile(times, 50), "p99": percentile(times, 99),
            "escalation_rate": escalated / len(asks), "refusal_rate": refused / len(asks),
            "encoder_share": read / windows if windows else 0.0}


def streamed(service, asks: list[tuple[str, str]]) -> dict:
    """The answers as the kernel checks them while they stream: the text grows 4 characters
    at a time (about a token), a window is checked whenever one is complete
    (`vfmos_runtime.windows`, the kernel's rule), then the final one. Per answer: how many
    checks, their summed time, and the slowest one (the longest a window waits)."""
    from services.trust.service import Scope
    from vfmos_runtime.windows import window_end

    scope = Scope("bench-stream")
    totals, slowest, counts = [], [], []
    for question, answer in asks:
        if not answer:
            continue
        checked, total, worst, n = 0, 0.0, 0.0, 0
        for grown in [*range(4, len(answer), 4), len(answer)]:
            raw, final = answer[:grown], grown == len(answer)
            end = len(raw) if final else window_end(raw, checked, first=checked == 0)
            if end <= checked and not final:
                continue
            if end < len(raw) and raw[end].isspace():
                end += 1
            start = time.perf_counter()
            service.check_output(scope, raw[:end], final, question, (), checked)
            took = (time.perf_counter() - start) * 1000
            total, worst, n, checked = total + took, max(worst, took), n + 1, end
        totals.append(total)
        slowest.append(worst)
        counts.append(n)
    return {"total_p50": percentile(totals, 50), "total_p99": percentile(totals, 99),
            "slowest_p50": percentile(slowest, 50), "slowest_p99": percentile(slowest, 99),
            "checks_p50": percentile(counts, 50)}


def working_set(service, data_dir: Path, sets: int) -> dict | None:
    """ScreenInput with a knowledge working set: 8 materials abstracts as the items, then
    the same 8 with the next question (a process's knowledge comes back Ask after Ask);
    `sets` different sets. None without the abstracts."""
    from services.trust.service import Item, Scope

    path = data_dir.parent / "personas" / "materials" / "abstracts_dev.jsonl.gz"
    if not path.exists():
        return None
    abstracts = [r["abstract"] for r in _jsonl(path)][:8 * sets]
    scope, cold, again = Scope("bench-working-set"), [], []
    for n in range(0, len(abstracts) - 7, 8):
        items = [Item("knowledge", f"kb/{n + i}", a) for i, a in enumerate(abstracts[n:n + 8])]
        for question, times in (("Which compound has the widest band gap?", cold),
                                ("And which of them is the most stable?", again)):
            start = time.perf_counter()
            service.screen_input(scope, question, items)
            times.append((time.perf_counter() - start) * 1000)
    return {"cold_p50": percentile(cold, 50), "again_p50": percentile(again, 50)}


def evaluate(data_dir: Path, quick: bool) -> tuple[dict, list[tuple]]:
    asks = benign_asks(data_dir, quick)
    results = {}
    for label, checks in (("ours", "learned,pii,grounding,constraints,embeddings"),
                          ("rules", "rules")):
        store = Path(tempfile.mkdtemp(prefix="vfmtl", dir="/tmp"))
        service = _service(checks, store)
        try:
            results[label] = measure(service, asks)
            results[label]["streamed"] = streamed(service, asks)
            results[label]["working_set"] = working_set(service, data_dir, 3 if quick else 6)
        finally:
            service.close()
            shutil.rmtree(store, ignore_errors=True)
    ours, rules = results["ours"], results["rules"]
    figures = {"s1_p50_ms": round(ours["p50"], 2), "s1_p99_ms": round(ours["p99"], 2),
               "escalation_rate": round(ours["escalation_rate"], 4),
               "benign_refusal_rate": round(ours["refusal_rate"], 4),
               "latency_asks": len(asks),
               "answer_windows_encoded": round(ours["encoder_share"], 4),
               "s1_streamed_total_p50_ms": round(ours["streamed"]["total_p50"], 1),
               "s1_streamed_slowest_check_p50_ms": round(ours["streamed"]["slowest_p50"], 1),
               "s1_streamed_slowest_check_p99_ms": round(ours["streamed"]["slowest_p99"], 1)}
    so, sr = ours["streamed"], rules["streamed"]
    wo, wr = ours["working_set"], rules["working_set"]
    if wo is not None:
        figures["screen_working_set_cold_p50_ms"] = round(wo["cold_p50"], 1)
        figures["screen_working_set_again_p50_ms"] = round(wo["again_p50"], 1)
    rows = [("latency", "system-1 p50 ms per Ask", f"{ours['p50']:.2f}", f"{rules['p50']:.2f}",
             f"{ours['p50']:.2f}", "<= 10"),
            ("latency", "system-1 p99 ms per Ask", f"{ours['p99']:.2f}", f"{rules['p99']:.2f}",
             f"{ours['p99']:.2f}", "<= 50"),
            ("latency", f"streamed answer: all {so['checks_p50']:.0f} window checks, p50 ms",
             f"{so['total_p50']:.1f}", f"{sr['total_p50']:.1f}", f"{so['total_p50']:.1f}", ""),
            ("latency", "streamed answer: slowest window check p50 / p99 ms",
             f"{so['slowest_p50']:.1f} / {so['slowest_p99']:.1f}",
             f"{sr['slowest_p50']:.1f} / {sr['slowest_p99']:.1f}", "-", ""),
            *([("latency", "screen with 8 abstracts as knowledge: new / again, p50 ms",
                f"{wo['cold_p50']:.0f} / {wo['again_p50']:.0f}",
                f"{wr['cold_p50']:.0f} / {wr['again_p50']:.0f}", "-", "")] if wo else []),
            ("latency", "answers' windows the encoder read (the rest: n-gram gate)",
             f"{ours['encoder_share']:.3f}", "-", "-", ""),
            ("latency", "benign Asks sent to system 2", f"{ours['escalation_rate']:.3f}",
             f"{rules['escalation_rate']:.3f}", "-", "<= 0.10"),
            ("latency", "benign Asks refused or escalated", f"{ours['refusal_rate']:.3f}",
             f"{rules['refusal_rate']:.3f}", "-", "")]
    return figures, rows


def main(argv: list[str] | None = None) -> int:
    from bench.trust import run_section

    return run_section("trust_latency", "trust latency: benign Asks, one at a time", evaluate, argv, __doc__)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
