"""API keys to kernel clients, and model names to the caller's FM processes.

An API key is a VFMOS bearer token: the gateway presents it to the kernel on every syscall,
so the kernel names the tenant and applies its quotas, the key's budgets and the trust
policy. The gateway itself decides nothing about who may do what."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections import OrderedDict
from pathlib import Path

from libvfm import AsyncClient
from libvfm.types import Process
from vfmos_runtime.errors import NotFound, Unauthenticated

MAX_KEYS = 1024            # kernel clients kept open (least recently used closed first)
NAMES_TTL_S = 2.0          # how long a key's process list is trusted before asking again
KEY_PREFIX = "vfm_"
MAX_KEY_CHARS = 512
CLOSE_AFTER_S = 60.0       # an evicted key's client may still carry a streaming answer


class Key:
    """One API key's kernel client and its last look at the key tenant's processes."""

    def __init__(self, client: AsyncClient):
        self.client = client
        self.processes: dict[str, Process] = {}
        self.looked_at = 0.0


class Keys:
    def __init__(self, kernel_socket: Path, timeout_s: float, max_keys: int = MAX_KEYS):
        self._socket, self._timeout = kernel_socket, timeout_s
        self._keys: OrderedDict[bytes, Key] = OrderedDict()
        self._max = max_keys
        self._closing: set[asyncio.Task] = set()

    def key(self, authorization: str | None) -> Key:
        """The Key of an `Authorization: Bearer vfm_...` header, or Unauthenticated."""
        scheme, _, secret = (authorization or "").partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            raise Unauthenticated("send your VFMOS token as 'Authorization: Bearer vfm_...' "
                                  "(make one with 'vfmctl token create TENANT')")
        if not secret.startswith(KEY_PREFIX) or len(secret) > MAX_KEY_CHARS \
                or not secret.isascii():
            raise Unauthenticated("that is not a VFMOS token (they start with 'vfm_')")
        digest = hashlib.sha256(secret.encode()).digest()
        key = self._keys.get(digest)
        if key is None:
            key = self._keys[digest] = Key(AsyncClient(self._socket, token=secret,
                                                       timeout=self._timeout))
            while len(self._keys) > self._max:
                self._close_later(self._keys.popitem(last=False)[1].client)
        self._keys.move_to_end(digest)
        return key

    async def process(self, key: Key, model: str, fresh: bool = False) -> Process:
        """The caller's live FM process that `model` names (its name, or its pid)."""
        now = time.monotonic()
        if fresh or now - key.looked_at > NAMES_TTL_S or model not in key.processes:
            await self._look(key, now)
        found = key.processes.get(model)
        if found is None:
            raise NotFound(f"the model {model!r} does not exist: no FM process of yours has "
                           "that name (GET /v1/models lists them; 'vfmctl spawn NAME' makes one)")
        return found

    async def processes(self, key: Key) -> list[Process]:
        await self._look(key, time.monotonic())
        return sorted({p.pid: p for p in key.processes.values()}.values(), key=lambda p: p.pid)

    async def _look(self, key: Key, now: float) -> None:
        live = await key.client.ps()
        named: dict[str, Process] = {}
        for proc in sorted(live, key=lambda p: p.pid):  # the newest of a name wins
            named[proc.name] = named[str(proc.pid)] = proc
        key.processes, key.looked_at = named, now

    def _close_later(self, client: AsyncClient) -> None:
        async def close() -> None:
            await asyncio.sleep(CLOSE_AFTER_S)
            await client.close()
        task = asyncio.get_running_loop().create_task(close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        for task in list(self._closing):
            task.cancel()
        for key in self._keys.values():
            await key.client.close()
        self._keys.clear()
