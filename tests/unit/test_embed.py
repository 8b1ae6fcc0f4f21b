"""The shared embedder's number format: bf16 where the CPU has it, vectors as float32's."""

import numpy as np
import pytest

from vfmos_runtime.embed import TransformerEmbedder, compute_dtype

TEXTS = ["How do I reset my password?", "The band gap of silicon is 1.1 eV at room temperature.",
         "ok", "Shipping takes three days; returns are free within 30 days of delivery. " * 6]


def test_an_unknown_dtype_is_refused_by_name():
    with pytest.raises(ValueError, match="auto, float32 or bfloat16, not 'fp8'"):
        compute_dtype("fp8")


def test_a_dtype_asked_for_is_the_one_used():
    assert compute_dtype("float32") == "float32" and compute_dtype("bfloat16") == "bfloat16"
    assert compute_dtype("auto") in ("float32", "bfloat16")


def test_bfloat16_vectors_are_float32_unit_vectors_close_to_float32s():
    full, half = TransformerEmbedder(dtype="float32"), TransformerEmbedder(dtype="bfloat16")
    a, b = full.embed(TEXTS), half.embed(TEXTS)
    assert b.dtype == np.float32 and b.shape == a.shape == (len(TEXTS), 384)
    assert np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    assert (a * b).sum(1).min() > 0.999  # the heads trained on float32 read them alike
    assert (a[0] * b[1]).sum() < 0.9  # and they still tell texts apart


def test_the_lean_bert_pass_gives_the_transformers_hidden_states_alone_and_padded():
    import torch

    from vfmos_runtime.embed import BertForward

    embedder = TransformerEmbedder(dtype="float32")
    assert embedder._forward is not None  # the packaged MiniLM takes the lean pass
    tokenizer, model = embedder._tokenizer, embedder._model
    with torch.inference_mode():
        for texts in (TEXTS[:1], TEXTS):  # one text (no mask), then a padded batch
            batch = tokenizer(texts, padding=True, truncation=True, max_length=256,
                              return_tensors="pt")
            ours = embedder._forward(batch["input_ids"], batch["attention_mask"])
            theirs = model(**batch).last_hidden_state
            real = batch["attention_mask"].bool()
            assert ours.shape == theirs.shape
            assert (ours - theirs)[real].abs().max() < 1e-4
    cfg = model.config
    cfg.hidden_act = "relu"  # a variant it does not compute: the transformers pass stays
    try:
        assert not BertForward.fits(model)
    finally:
        cfg.hidden_act = "gelu"
    assert not BertForward.fits(object())
    alone = embedder.embed(TEXTS[:1])  # embed() takes the lean pass for a lone text
    embedder._forward = None
    assert np.allclose(alone, embedder.embed(TEXTS[:1]), atol=1e-5)
