"""A whole VFMOS stack (vfmd + vfm-modeld) in a temp dir, for benches that go through it."""

from __future__ import annotations

import os
from pathlib import Path

from bench.common import cleanup, free_port, spawn_daemon, stop, temp_state_dir, wait_until
from libvfm import Client, VfmError

STORY_TOPICS = ["a lighthouse", "a dragon", "the moon", "a robot chef", "an old library",
                "a mountain village", "a pirate ship", "a desert caravan"]


def story_prompts(n: int) -> list[str]:
    return [f"Write a long, detailed story about {STORY_TOPICS[i % len(STORY_TOPICS)]}."
            for i in range(n)]


def services_serving(socket: Path, names: tuple[str, ...]) -> bool:
    """Whether the kernel at `socket` answers and reports each of `names` registered and
    SERVING (no names: the kernel answers)."""
    try:
        with Client(socket, timeout=2) as client:
            up = {d.name for d in client.services() if d.health == "SERVING"}
        return set(names) <= up
    except VfmError:
        return False


def model_service_serving(socket: Path) -> bool:
    return services_serving(socket, ("vfm-modeld",))


class Stack:
    """vfmd and vfm-modeld in a temp dir; with `trust`, vfm-trustd too and every Ask passes
    through it (vfmd --trust on)."""

    def __init__(self, *kernel_args: str, modeld_args: tuple[str, ...] = (),
                 trust: bool = False):
        self.state: Path = temp_state_dir()
        os.chmod(self.state, 0o755)
        self.socket = self.state / "vfmd.sock"
        self.trust = trust
        self.kernel = spawn_daemon(["-m", "kernel.main", "--state-dir", str(self.state),
                                    "--log-level", "WARNING", "--trust",
                                    "on" if trust else "off", *kernel_args],
                                   self.state / "vfmd.log")
        self.modeld = spawn_daemon(["-m", "services.model.main", "--state-dir", str(self.state),
                                    "--kernel-socket", str(self.socket), *modeld_args],
                                   self.state / "modeld.log")
        self.trustd = spawn_daemon(["-m", "services.trust.main", "--state-dir", str(self.state),
                                    "--kernel-socket", str(self.socket), "--log-level",
                                    "WARNING"], self.state / "trustd.log") if trust else None
        wait_until(self.ready, 600, "vfm-modeld" + (" and vfm-trustd" if trust else "") +
                   " to serve")

    def ready(self) -> bool:
        return services_serving(self.socket, ("vfm-modeld", "vfm-trustd") if self.trust
                                else ("vfm-modeld",))

    def close(self) -> None:
        if self.trustd is not None:
            stop(self.trustd)
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


class DaemonStack:
    """vfmd on its Unix socket and loopback TCP, then service daemons, in a temp dir; each
    daemon logs to NAME.log there. `services` maps a registered service name to its
    `python` arguments after `-m MODULE`; every service gets `--state-dir` and
    `--kernel-socket`."""

    def __init__(self, services: dict[str, list[str]], kernel_args: tuple[str, ...] = (),
                 ready_timeout_s: float = 300):
        self.state = temp_state_dir()
        os.chmod(self.state, 0o755)
        self.sock = self.state / "vfmd.sock"
        self.tcp = f"127.0.0.1:{free_port()}"
        self.services = tuple(services)
        self.procs = {"vfmd": spawn_daemon(
            ["-m", "kernel.main", "--state-dir", str(self.state), "--listen", self.tcp,
             *kernel_args], self.state / "vfmd.log")}
        try:
            wait_until(lambda: services_serving(self.sock, ()) or not self.alive(),
                       ready_timeout_s, "vfmd to serve")
            for name, (module, *args) in services.items():
                self.procs[name] = spawn_daemon(
                    ["-m", module, "--state-dir", str(self.state), "--kernel-socket",
                     str(self.sock), *args], self.state / f"{name}.log")
            wait_until(lambda: self.serving() or not self.alive(), ready_timeout_s,
                       f"{' and '.join(self.services)} to serve")
            if not self.alive():
                raise RuntimeError(f"a daemon exited while starting:\n{self.logs_tail()}")
        except BaseException:
            self.close()
            raise

    def serving(self) -> bool:
        return services_serving(self.sock, self.services)

    def dead(self) -> list[str]:
        return [name for name, proc in self.procs.items() if proc.poll() is not None]

    def alive(self) -> bool:
        return not self.dead()

    def logs(self) -> list[str]:
        return [(self.state / f"{name}.log").read_text(errors="replace") for name in self.procs]

    def logs_tail(self, lines: int = 20) -> str:
        return "\n".join(f"--- {name} ---\n" + "\n".join(text.splitlines()[-lines:])
                         for name, text in zip(self.procs, self.logs()))

    def close(self) -> None:
        for name in reversed(list(self.procs)):
            stop(self.procs[name])
        cleanup(self.state)
