"""Service registry: daemons register with the kernel, which health-checks them and routes to them."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import asdict, dataclass, field

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kernel.store import KernelStore
from vfmos_runtime.errors import InvalidArgument, Unavailable
from vfmos_runtime.protocol import KERNEL_SECRET_HEADER, KNOWN_SERVICES

log = logging.getLogger("vfmd.registry")

SERVING, NOT_SERVING, UNREACHABLE, UNKNOWN = "SERVING", "NOT_SERVING", "UNREACHABLE", "UNKNOWN"


@dataclass
class ServiceEntry:
    name: str
    address: str
    pid: int
    registered_at: float
    health: str = UNKNOWN
    last_seen: float = 0.0
    down_since: float = field(default=0.0)
    secret: str = field(default="", repr=False)  # presented on every call to the service


class ServiceRegistry:
    """Knows where each service lives and whether it answers its health check."""

    def __init__(self, store: KernelStore, interval_s: float = 2.0, timeout_s: float = 1.0):
        self._store = store
        self.interval_s = interval_s
        self._timeout_s = timeout_s
        self._entries: dict[str, ServiceEntry] = {}
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._checking: set[str] = set()
        for name, info in store.services().items():
            self._entries[name] = ServiceEntry(**{**info, "health": UNKNOWN})

    async def register(self, name: str, address: str, pid: int) -> ServiceEntry:
        """Record where `name` lives; a new address or pid is durable before this returns."""
        if name not in KNOWN_SERVICES:
            raise InvalidArgument(f"unknown service {name!r}; known: {', '.join(KNOWN_SERVICES)}")
        if not address.startswith(("unix:", "dns:", "ipv4:", "ipv6:")) and ":" not in address:
            raise InvalidArgument(f"bad service address {address!r}")
        old = self._entries.get(name)
        same = old is not None and old.address == address and old.pid == pid and old.secret
        entry = ServiceEntry(name, address, pid, time.time(), SERVING, time.time(),
                             secret=old.secret if same else secrets.token_urlsafe(32))
        self._entries[name] = entry
        if not same:
            written = self._store.put_service(name, {
                k: v for k, v in asdict(entry).items()
                if k not in ("health", "last_seen", "down_since")})
            self._drop_channel(name)
            log.info("service %s registered at %s (pid %d)", name, address, pid)
            await asyncio.wrap_future(written)
        return entry

    def metadata(self, name: str) -> tuple[tuple[str, str], ...]:
        """What every call to `name` carries: the secret it was given at registration."""
        entry = self._entries.get(name)
        return ((KERNEL_SECRET_HEADER, entry.secret),) if entry is not None else ()

    def entries(self) -> list[ServiceEntry]:
        return list(self._entries.values())

    def channel(self, name: str) -> grpc.aio.Channel:
        """A channel to a healthy service, or Unavailable saying why not."""
        entry = self._entries.get(name)
        if entry is None:
            raise Unavailable(f"service {name} is not running (never registered); "
                              f"start it with 'vfmctl up'")
        if entry.health not in (SERVING, UNKNOWN):
            since = time.strftime("%H:%M:%S", time.localtime(entry.down_since or time.time()))
            raise Unavailable(f"service {name} is down ({entry.health} since {since}); "
                              f"the kernel will use it again when it is back")
        channel = self._channels.get(name)
        if channel is None:
            channel = grpc.aio.insecure_channel(entry.address)
            self._channels[name] = channel
        return channel

    def suspect(self, name: str) -> None:
        """A call to `name` said UNAVAILABLE: that may be the service itself or something
        behind it (a remote model server). Check its health now instead of assuming."""
        entry = self._entries.get(name)
        if entry is not None and name not in self._checking:
            self._checking.add(name)
            task = asyncio.get_running_loop().create_task(self._check(entry))
            task.add_done_callback(lambda _: self._checking.discard(name))

    async def check_all(self) -> None:
        await asyncio.gather(*(self._check(e) for e in list(self._entries.values())))

    async def run(self) -> None:
        while True:
            await self.check_all()
            await asyncio.sleep(self.interval_s)

    async def _check(self, entry: ServiceEntry) -> None:
        try:
            channel = self._channels.get(entry.name) or grpc.aio.insecure_channel(entry.address)
            self._channels[entry.name] = channel
            stub = health_pb2_grpc.HealthStub(channel)
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""),
                                     timeout=self._timeout_s)
            health = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        except grpc.RpcError:
            health = UNREACHABLE
        if health == SERVING:
            entry.last_seen = time.time()
            entry.down_since = 0.0
        elif entry.health in (SERVING, UNKNOWN):
            entry.down_since = time.time()
            log.warning("service %s is %s", entry.name, health)
        entry.health = health

    def _drop_channel(self, name: str) -> None:
        channel = self._channels.pop(name, None)
        if channel is not None:
            asyncio.get_running_loop().create_task(channel.close())

    async def close(self) -> None:
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
