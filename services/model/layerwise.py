"""A forward pass run layer by layer, so an urgent arrival is prefilled between two layers
of a decode step or of other arrivals' prefill: its first token waits for one layer."""

from __future__ import annotations

from typing import Callable

import torch
from transformers.masking_utils import create_causal_mask

# Decoder-only families whose model.forward is: embed, causal mask, rotary, layers, norm.
LAYERWISE_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})


def supported(model) -> bool:
    inner = getattr(model, "model", None)
    return (getattr(model.config, "model_type", "") in LAYERWISE_TYPES
            and hasattr(model, "lm_head")
            and all(hasattr(inner, part) for part in ("embed_tokens", "layers", "norm",
                                                      "rotary_emb")))


def last_logits(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                  position_ids: torch.Tensor, cache, between: Callable[[], None]) -> torch.Tensor:
    """The last position's logits of `model(input_ids, ...)` (a decode step or a prefill),
    calling `between()` before each layer. The same computation as the model's own
    forward, in the same order."""
    inner = model.model
    hidden = inner.embed_tokens(input_ids)
    mask = create_causal_mask(config=model.config, inputs_embeds=hidden,
                              attention_mask=attention_mask, past_key_values=cache,
                              position_ids=position_ids)
    rotary = inner.rotary_emb(hidden, position_ids=position_ids)
    for layer in inner.layers[: model.config.num_hidden_layers]:
        between()
        hidden = layer(hidden, attention_mask=mask, position_embeddings=rotary,
                       position_ids=position_ids, past_key_values=cache, use_cache=True)
    hidden = inner.norm(hidden[:, -1:, :])
    return model.lm_head(hidden)[:, -1]
