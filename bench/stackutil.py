"""A whole VFMOS stack (vfmd + vfm-modeld) in a temp dir, for benches that go through it."""

from __future__ import annotations

import os
from pathlib import Path

from bench.common import cleanup, spawn_daemon, stop, temp_state_dir, wait_until
from libvfm import Client, VfmError

STORY_TOPICS = ["a lighthouse", "a dragon", "the moon", "a robot chef", "an old library",
                "a mountain village", "a pirate ship", "a desert caravan"]


def story_prompts(n: int) -> list[str]:
    return [f"Write a long, detailed story about {STORY_TOPICS[i % len(STORY_TOPICS)]}."
            for i in range(n)]


def model_service_serving(socket: Path) -> bool:
    """Whether the kernel at `socket` reports vfm-modeld registered and SERVING."""
    try:
        with Client(socket, timeout=2) as client:
            return any(d.name == "vfm-modeld" and d.health == "SERVING"
                       for d in client.services())
    except VfmError:
        return False


class Stack:
    def __init__(self, *kernel_args: str, modeld_args: tuple[str, ...] = ()):
        self.state: Path = temp_state_dir()
        os.chmod(self.state, 0o755)
        self.socket = self.state / "vfmd.sock"
        self.kernel = spawn_daemon(["-m", "kernel.main", "--state-dir", str(self.state),
                                    "--log-level", "WARNING", *kernel_args],
                                   self.state / "vfmd.log")
        self.modeld = spawn_daemon(["-m", "services.model.main", "--state-dir", str(self.state),
                                    "--kernel-socket", str(self.socket), *modeld_args],
                                   self.state / "modeld.log")
        wait_until(self.ready, 600, "vfm-modeld to serve")

    def ready(self) -> bool:
        return model_service_serving(self.socket)

    def close(self) -> None:
        stop(self.modeld)
        stop(self.kernel)
        cleanup(self.state)


def load_direct(threads: int = 0):
    """The same model the stack serves, loaded in this process (for baselines)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from services.model.local import converted_dir
    from vfmos_runtime.paths import cache_root
    from services.model.registry import ModelRegistry

    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
    path = converted_dir(ModelRegistry.load().get(""), cache_root())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, tokenizer
