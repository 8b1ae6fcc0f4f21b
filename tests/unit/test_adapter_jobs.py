"""Adapter jobs in vfm-modeld's domain, with the real training process on the tiny real model:
a job that trains a worse adapter keeps it as a candidate (never promoted), a restart keeps
what was registered and fails what was running, and bad requests are refused."""

from __future__ import annotations

import pytest

from services.model.adapters import AdapterJobs, JobState, promote
from services.model.local import converted_dir
from services.model.registry import ModelEntry, ModelRegistry
from vfmos_runtime.errors import AlreadyExists, InvalidArgument, NotFound
from vfmos_runtime.paths import cache_root

SHOP = "You are the support desk of an online shop. Answer in one short sentence."
EXCHANGES = [{"prompt": f"How do I {task}?", "reply": f"To {task}, open your account page "
              f"and choose '{task}'."}
             for task in ("cancel my order", "track my parcel", "get a refund",
                          "reset my password", "change my address", "pay by invoice",
                          "leave a review", "close my account", "contact a person",
                          "use a voucher")]


def registry() -> ModelRegistry:
    remote = ModelEntry("far-away", backend="openai", base_url="http://127.0.0.1:9/v1")
    return ModelRegistry([*ModelRegistry.load().entries(), remote], "smollm2-135m")


def jobs(tmp_path, **overrides) -> tuple[AdapterJobs, ModelRegistry]:
    reg = registry()
    return AdapterJobs(reg, tmp_path, lambda e: converted_dir(e, cache_root()), threads=2,
                       overrides=overrides), reg


def test_promotion_needs_a_strictly_better_score():
    assert promote(0.41, 0.40) and not promote(0.40, 0.40) and not promote(0.2, 0.4)


def test_bad_requests_are_refused(tmp_path):
    manager, _ = jobs(tmp_path)
    try:
        with pytest.raises(InvalidArgument):
            manager.start("t", "../escape", "", "", EXCHANGES, SHOP, True)
        with pytest.raises(InvalidArgument):
            manager.start("t", "ok-name", "", "", EXCHANGES[:3], SHOP, True)
        with pytest.raises(InvalidArgument):
            manager.start("t", "ok-name", "far-away", "", EXCHANGES, SHOP, True)
        with pytest.raises(AlreadyExists):
            manager.start("t", "gemma3-270m", "", "", EXCHANGES, SHOP, True)
        with pytest.raises(NotFound):
            manager.start("t", "ok-name", "no-such-base", "", EXCHANGES, SHOP, True)
        assert manager.jobs() == []
    finally:
        manager.stop()


def test_a_worse_adapter_is_kept_as_a_candidate_and_survives_a_restart(tmp_path):
    # A learning rate a hundred times too high wrecks the model: it must not be promoted.
    manager, reg = jobs(tmp_path, lr=0.5, epochs=1, rank=4, alpha=8)
    try:
        job = manager.start("alice", "wrecked", "", "gemma3-270m", EXCHANGES, SHOP, True)
        assert manager.wait_idle(300)
        done = manager.jobs("alice")[0]
        assert done.id == job.id and done.state is JobState.DONE, done.error
        assert done.adapted_quality < done.base_quality and not done.promoted
        assert done.train_exchanges == 8 and done.held_back == 2 and done.adapter_bytes > 0
        entry = reg.get("wrecked")
        assert entry.options["tenant"] == "alice" and entry.options["status"] == "candidate"
        assert manager.jobs("bob") == []
    finally:
        manager.stop()
    again, reg2 = jobs(tmp_path)
    try:
        assert reg2.get("wrecked").options["status"] == "candidate"
        assert again.jobs("alice")[0].state is JobState.DONE
    finally:
        again.stop()
