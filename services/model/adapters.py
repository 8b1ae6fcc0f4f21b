"""Tenants' LoRA adapters: the jobs that train them (one at a time, each in its own process so
training never takes the serving engines' threads or memory), their records, and the registry
entries that serve them (base weights with the adapter merged in, one engine per adapter).

Storage is one small LMDB environment (`adapters.lmdb` in the state dir); the adapters' files
live under `adapters/<tenant>/<name>/`."""

from __future__ import annotations

import enum
import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from services.model.registry import ModelEntry, ModelRegistry
from vfmos_runtime.errors import AlreadyExists, InvalidArgument, QuotaExceeded
from vfmos_runtime.storage import open_env, pack, unpack

log = logging.getLogger("vfm-modeld.adapters")

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MIN_EXCHANGES = 8          # fewer cannot be split into a training and a held-back part
MAX_EXCHANGES = 20_000
MAX_QUEUED = 4
HELD_BACK = 0.2


class JobState(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"


# Legal moves of a job (a restart fails whatever was queued or running: its process is gone).
TRANSITIONS = {JobState.QUEUED: {JobState.RUNNING, JobState.FAILED},
               JobState.RUNNING: {JobState.DONE, JobState.FAILED},
               JobState.DONE: set(), JobState.FAILED: set()}


@dataclass
class AdaptJob:
    id: str
    tenant: str
    name: str
    base: str
    teacher: str
    state: JobState = JobState.QUEUED
    progress: float = 0.0
    message: str = "queued"
    train_exchanges: int = 0
    held_back: int = 0
    base_quality: float = 0.0
    adapted_quality: float = 0.0
    promoted: bool = False
    started_at: float = 0.0
    finished_at: float = 0.0
    error: str = ""
    train_seconds: float = 0.0
    adapter_bytes: int = 0

    def move(self, state: JobState) -> None:
        if state not in TRANSITIONS[self.state]:
            raise ValueError(f"job {self.id}: {self.state.value} -> {state.value} is not a move")
        self.state = state

    def to_dict(self) -> dict:
        return {**asdict(self), "state": self.state.value}

    @classmethod
    def from_dict(cls, data: dict) -> "AdaptJob":
        return cls(**{**data, "state": JobState(data["state"])})


@dataclass(frozen=True)
class AdapterRecord:
    """A trained adapter, as registered: whose, on which base, and how it scored."""

    name: str
    tenant: str
    base: str
    path: str
    promoted: bool
    quality: float
    base_quality: float
    system_prompt: str = ""

    def entry(self, base: ModelEntry, base_dir: Path) -> ModelEntry:
        """The registry entry that serves it: the base's converted weights, merged with it."""
        return ModelEntry(
            self.name, backend="local-torch", context_window=base.context_window,
            cost_per_1k_tokens=base.cost_per_1k_tokens, source=str(base_dir),
            options={"adapter_dir": self.path, "tenant": self.tenant, "base": self.base,
                     "status": "promoted" if self.promoted else "candidate",
                     "quality": self.quality, "base_quality": self.base_quality})


def promote(adapted_quality: float, base_quality: float) -> bool:
    """An adapter replaces its base for the tenant only when it scores strictly better on
    the tenant's held-back exchanges."""
    return adapted_quality > base_quality


@dataclass
class JobSpec:
    """What the training process is given (written as JSON beside the adapter)."""

    base_dir: str
    out_dir: str
    exchanges: list[dict]
    system_prompt: str
    quick: bool
    held_back: float = HELD_BACK
    overrides: dict = field(default_factory=dict)   # AdaptConfig fields (tests, experiments)


class AdapterStore:
    def __init__(self, path: Path):
        self._env = open_env(path, map_size=1 << 28, max_dbs=2)
        self._jobs = self._env.open_db(b"jobs")
        self._adapters = self._env.open_db(b"adapters")
        self._lock = threading.Lock()

    def put_job(self, job: AdaptJob) -> None:
        with self._lock, self._env.begin(write=True) as txn:
            txn.put(job.id.encode(), pack(job.to_dict()), db=self._jobs)

    def jobs(self) -> list[AdaptJob]:
        with self._env.begin() as txn:
            return [AdaptJob.from_dict(unpack(v)) for _, v in txn.cursor(db=self._jobs)]

    def put_adapter(self, record: AdapterRecord) -> None:
        with self._lock, self._env.begin(write=True) as txn:
            txn.put(record.name.encode(), pack(asdict(record)), db=self._adapters)

    def adapters(self) -> list[AdapterRecord]:
        with self._env.begin() as txn:
            return [AdapterRecord(**unpack(v)) for _, v in txn.cursor(db=self._adapters)]

    def close(self) -> None:
        self._env.close()


class AdapterJobs:
    """Queues adapter jobs and runs them one at a time in a child process
    (`python -m services.model.adapt_job SPEC`), reading its progress lines; a finished job
    registers its adapter. `base_dir(name)` gives a local base model's weights directory."""

    def __init__(self, registry: ModelRegistry, state_dir: Path,
                 base_dir: Callable[[ModelEntry], Path], threads: int = 0,
                 overrides: dict | None = None):
        self._registry = registry
        self._root = state_dir / "adapters"
        self._store = AdapterStore(state_dir / "adapters.lmdb")
        self._base_dir = base_dir
        self._threads = threads
        self._overrides = overrides or {}
        self._lock = threading.Lock()
        self._queue: list[tuple[AdaptJob, JobSpec]] = []
        self._jobs: dict[str, AdaptJob] = {}
        self._worker: threading.Thread | None = None
        self._child: subprocess.Popen | None = None
        self._stopping = False
        self._recover()

    def _recover(self) -> None:
        for job in self._store.jobs():
            if job.state in (JobState.QUEUED, JobState.RUNNING):
                job.move(JobState.FAILED)
                job.error = "vfm-modeld restarted while the job was queued or running"
                job.finished_at = time.time()
                self._store.put_job(job)
            self._jobs[job.id] = job
        for record in self._store.adapters():
            self._register(record)

    def _register(self, record: AdapterRecord) -> None:
        try:
            base = self._registry.get(record.base)
            self._registry.add(record.entry(base, self._base_dir(base)))
        except Exception as exc:  # one broken adapter must not keep the service down
            log.warning("adapter %s is not served: %s", record.name, exc)

    # -- the calls ---------------------------------------------------------------------
    def start(self, tenant: str, name: str, base: str, teacher: str, exchanges: list[dict],
              system_prompt: str, quick: bool) -> AdaptJob:
        base_entry = self._validate(tenant, name, base, exchanges)
        job = AdaptJob(uuid.uuid4().hex[:12], tenant, name, base_entry.name, teacher,
                       started_at=time.time())
        out = self._root / _safe(tenant) / name
        spec = JobSpec(str(self._base_dir(base_entry)), str(out), exchanges, system_prompt,
                       quick, overrides=self._overrides)
        with self._lock:
            if any(j.name == name and j.state in (JobState.QUEUED, JobState.RUNNING)
                   for j in self._jobs.values()):
                raise AlreadyExists(f"a job for {name} is already queued or running")
            if len(self._queue) >= MAX_QUEUED:
                raise QuotaExceeded(f"{MAX_QUEUED} adapter jobs are already waiting; see "
                                    "vfmctl model jobs", "adapt_jobs")
            self._jobs[job.id] = job
            self._store.put_job(job)
            self._queue.append((job, spec))
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._work, name="adapt-jobs",
                                                daemon=True)
                self._worker.start()
        return job

    def _validate(self, tenant: str, name: str, base: str, exchanges: list[dict]) -> ModelEntry:
        if not NAME.match(name or ""):
            raise InvalidArgument(f"bad adapter name {name!r}: letters, digits, '-', '_', '.', "
                                  "at most 64, starting with a letter or digit")
        if name in {e.name for e in self._registry.entries()}:
            raise AlreadyExists(f"a model named {name} is registered; pick another name")
        entry = self._registry.get(base)
        if entry.backend != "local-torch" or entry.options.get("adapter_dir"):
            raise InvalidArgument(f"model {entry.name} cannot be adapted: the base must be a "
                                  "local model (not a remote one, not an adapter)")
        if not tenant:
            raise InvalidArgument("an adapter job needs its tenant")
        if not MIN_EXCHANGES <= len(exchanges) <= MAX_EXCHANGES:
            raise InvalidArgument(f"an adapter needs {MIN_EXCHANGES}..{MAX_EXCHANGES} "
                                  f"exchanges, got {len(exchanges)}")
        return entry

    def jobs(self, tenant: str = "") -> list[AdaptJob]:
        with self._lock:
            found = [j for j in self._jobs.values() if not tenant or j.tenant == tenant]
        return sorted(found, key=lambda j: -j.started_at)

    def wait_idle(self, timeout: float) -> bool:
        """Tests and shutdown: whether every job ended within `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if all(j.state in (JobState.DONE, JobState.FAILED) for j in self.jobs()):
                return True
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        self._stopping = True
        child = self._child
        if child is not None and child.poll() is None:
            child.terminate()
        if self._worker is not None:
            self._worker.join(10)
        self._store.close()

    # -- the worker ----------------------------------------------------------------------
    def _work(self) -> None:
        while not self._stopping:
            with self._lock:
                if not self._queue:
                    self._worker = None
                    return
                job, spec = self._queue.pop(0)
            self._run(job, spec)

    def _update(self, job: AdaptJob, **changes) -> None:
        with self._lock:
            for key, value in changes.items():
                setattr(job, key, value)
        self._store.put_job(job)

    def _run(self, job: AdaptJob, spec: JobSpec) -> None:
        job.move(JobState.RUNNING)
        self._update(job, message="starting")
        out = Path(spec.out_dir)
        out.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        spec_path = out.with_name(out.name + ".job.json")
        spec_path.write_text(json.dumps(asdict(spec)))
        result: dict = {}
        try:
            result = self._child_run(job, spec_path)
        except Exception as exc:  # the job fails; the service goes on
            log.exception("adapter job %s failed", job.id)
            result = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            spec_path.unlink(missing_ok=True)
        if result.get("error") or "adapted_quality" not in result:
            job.move(JobState.FAILED)
            self._update(job, error=result.get("error") or "the training process ended early",
                         finished_at=time.time(), message="failed")
            return
        promoted = promote(result["adapted_quality"], result["base_quality"])
        record = AdapterRecord(job.name, job.tenant, job.base, str(out), promoted,
                               result["adapted_quality"], result["base_quality"],
                               spec.system_prompt)
        self._store.put_adapter(record)
        self._register(record)
        job.move(JobState.DONE)
        self._update(job, progress=1.0, promoted=promoted, finished_at=time.time(),
                     base_quality=result["base_quality"],
                     adapted_quality=result["adapted_quality"],
                     train_exchanges=result["train_exchanges"], held_back=result["held_back"],
                     train_seconds=result["train_seconds"],
                     adapter_bytes=result["adapter_bytes"],
                     message="promoted: beats its base on the held-back exchanges" if promoted
                     else "kept as a candidate: it does not beat its base")

    def _child_run(self, job: AdaptJob, spec_path: Path) -> dict:
        args = [sys.executable, "-m", "services.model.adapt_job", str(spec_path),
                "--threads", str(self._threads)]
        # The serving engines hold the cores too: OpenMP threads that spin while waiting for
        # a core made a training step ~20x slower under load (passive waiting does not).
        env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
        self._child = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True, env=env)
        result: dict = {}
        for line in self._child.stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if "progress" in event:
                self._update(job, progress=float(event["progress"]),
                             message=str(event.get("message", "")))
            else:
                result = event
        err = self._child.stderr.read()
        code = self._child.wait()
        self._child = None
        if code != 0 and not result.get("error"):
            result = {"error": f"the training process exited with {code}: "
                               f"{err.strip().splitlines()[-1] if err.strip() else ''}"}
        return result


def _safe(tenant: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", tenant) or "_"
