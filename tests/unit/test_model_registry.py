"""The model registry: built-in entries, user config files, validation, lookups."""

import json

import pytest

from libvfm.errors import InvalidArgument, NotFound
from services.model.registry import ModelEntry, ModelRegistry


def test_builtin_models_and_default():
    reg = ModelRegistry.load()
    assert reg.default == "smollm2-135m"
    assert reg.get("").name == "smollm2-135m" and reg.get("gemma3-270m").backend == "local-torch"


def test_config_file_adds_models_and_picks_default(tmp_path):
    cfg = tmp_path / "models.json"
    cfg.write_text(json.dumps({"default": "big", "models": [
        {"name": "big", "backend": "openai", "base_url": "http://127.0.0.1:8000/v1",
         "remote_model": "llama", "api_key_env": "BIG_KEY", "cost_per_1k_tokens": 0.5},
        {"name": "mine", "source": str(tmp_path), "context_window": 2048}]}))
    reg = ModelRegistry.load(cfg)
    assert reg.default == "big" and reg.get("big").cost_per_1k_tokens == 0.5
    assert reg.get("mine").context_window == 2048


@pytest.mark.parametrize("entry", [
    ModelEntry("x", backend="tpu-magic", source="/x"),
    ModelEntry("x", backend="openai"),
    ModelEntry("x", backend="local-torch"),
    ModelEntry("x", source="/x", context_window=0),
    ModelEntry("x", source="/x", cost_per_1k_tokens=-1),
])
def test_bad_entries_are_refused(entry):
    with pytest.raises(InvalidArgument):
        entry.validate()


def test_unknown_default_and_unknown_lookup():
    with pytest.raises(InvalidArgument, match="default model"):
        ModelRegistry.load(default="nope")
    with pytest.raises(NotFound, match="known: gemma3-270m, smollm2-135m"):
        ModelRegistry.load().get("nope")
