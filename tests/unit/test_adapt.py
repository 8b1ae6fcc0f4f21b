"""LoRA distillation: ROUGE-L, the split, intent parsing, and a real adapter trained on SmolLM2."""

from __future__ import annotations

import pytest

from services.model.adapt import (AdaptConfig, Exchange, encode_example, IGNORE, intent_target,
                                  lcs_length, load_model, parse_intent, rouge_l, split,
                                  train_adapter)

LABELS = ("cancel_order", "track_order", "get_refund")


# ---- ROUGE-L ----------------------------------------------------------------------------------

def test_lcs_is_the_longest_common_subsequence():
    assert lcs_length("a b c d".split(), "a c d".split()) == 3
    assert lcs_length("a b c".split(), "c b a".split()) == 1
    assert lcs_length([], "a".split()) == 0
    assert lcs_length("x a y b".split(), "a b".split()) == 2


def test_rouge_l_values():
    assert rouge_l("the cat sat", "the cat sat") == pytest.approx(1.0)
    assert rouge_l("dog", "the cat sat") == 0.0
    assert rouge_l("", "the cat") == 0.0
    # LCS "the cat" = 2: precision 2/3, recall 2/4 → F1 = 2·(2/3)(1/2)/(2/3 + 1/2) = 4/7
    assert rouge_l("the cat ran", "the big cat sat") == pytest.approx(4 / 7)


def test_rouge_l_ignores_case_and_punctuation():
    assert rouge_l("Hello, World!", "hello world") == pytest.approx(1.0)


# ---- split ------------------------------------------------------------------------------------

def _labelled(n: int) -> list[Exchange]:
    return [Exchange(f"request {i}", f"reply {i}", LABELS[i % 3]) for i in range(n)]


def test_split_is_disjoint_complete_and_deterministic():
    data = _labelled(90)
    train, held = split(data, 0.2, seed=7)
    assert not {e.prompt for e in train} & {e.prompt for e in held}
    assert len(train) + len(held) == 90
    assert split(data, 0.2, seed=7) == (train, held)
    assert split(data, 0.2, seed=8) != (train, held)


def test_split_is_stratified_by_label():
    train, held = split(_labelled(90), 0.2, seed=1)
    assert sorted(e.label for e in held) == sorted(LABELS * 6)


# ---- intent parsing ---------------------------------------------------------------------------

@pytest.mark.parametrize("output, label", [
    ("intent: cancel_order\nSure, I can help.", "cancel_order"),
    ("Intent: Track Order\nLet me check.", "track_order"),
    ("**intent:** get-refund.\n...", "get_refund"),
    ("get_refund\nhere is how", "get_refund"),
    ("intent: refund_please\nHello", None),
    ("I can help you cancel your order.", None),
    ("", None),
])
def test_parse_intent(output, label):
    assert parse_intent(output, LABELS)[0] == label


def test_parse_intent_returns_the_reply_after_the_intent_line():
    assert parse_intent("intent: cancel_order\nSure.\nBye.", LABELS) == ("cancel_order",
                                                                          "Sure.\nBye.")
    assert parse_intent("No intent line here.", LABELS) == (None, "No intent line here.")


# ---- a real adapter ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2_dir():
    from services.model.local import converted_dir
    from services.model.registry import ModelRegistry
    from vfmos_runtime.paths import cache_root

    entry = ModelRegistry.load().get("smollm2-135m")
    try:
        return converted_dir(entry, cache_root())
    except Exception as exc:  # the model package is part of the install; say so plainly
        pytest.fail(f"smollm2-135m is not available: {exc}")


TINY = [Exchange(p, intent_target(i, r), i) for p, i, r in (
    ("cancel my order please", "cancel_order", "I can cancel it for you."),
    ("where is my package", "track_order", "Let me look up your package."),
    ("I want my money back", "get_refund", "I will start your refund."),
    ("stop order 123", "cancel_order", "I can cancel it for you."),
    ("track parcel 77", "track_order", "Let me look up your package."),
    ("refund for the broken lamp", "get_refund", "I will start your refund."),
    ("please cancel what I bought", "cancel_order", "I can cancel it for you."),
    ("has my order shipped", "track_order", "Let me look up your package."),
)]


def test_only_reply_tokens_are_targets(smollm2_dir):
    _, tokenizer = load_model(smollm2_dir)
    ids, labels = encode_example(tokenizer, "Be brief.", TINY[0], max_tokens=96)
    targets = [t for t in labels if t != IGNORE]
    assert len(ids) == len(labels) and labels[0] == IGNORE
    assert tokenizer.decode(targets).startswith(TINY[0].reply)
    assert tokenizer.eos_token_id in targets  # the end of the turn is learned too
    _, cut = encode_example(tokenizer, "Be brief.", TINY[0], max_tokens=3)
    assert len([t for t in cut if t != IGNORE]) == 3


def test_train_adapter_end_to_end(smollm2_dir, tmp_path):
    import torch

    # One thread: two OpenMP threads on two cores that other work also wants wait on each
    # other for most of each step (measured 55 s a step instead of 2 on a busy machine).
    config = AdaptConfig(rank=8, alpha=16, epochs=4, lr=3e-3, batch_size=4, max_tokens=24,
                         threads=1, system_prompt="Answer with the intent line, then the reply.")
    seen = []
    result = train_adapter(smollm2_dir, TINY, tmp_path / "adapter", config,
                           lambda fraction, message: seen.append(fraction))
    out = tmp_path / "adapter"
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    assert not list(tmp_path.glob("adapter.tmp*"))  # staged, then renamed into place
    assert result.steps == 8 and result.adapter_bytes > 0
    assert seen[-1] == pytest.approx(1.0) and seen == sorted(seen)
    assert result.epoch_losses[-1] < result.epoch_losses[0]

    base, tokenizer = load_model(smollm2_dir)
    adapted, _ = load_model(smollm2_dir, out)
    ids = torch.tensor([tokenizer.encode("where is my package")])
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, adapted(ids).logits, atol=1e-4)
