"""Syscalls of memory and knowledge: the kernel names the tenant, checks the pid, forwards."""

from __future__ import annotations

import asyncio
import logging

from google.protobuf.message import DecodeError

from kernel.adapters import INGEST_PART_TIMEOUT_S
from kernel.context import ContextManager
from kernel.convert import process_to_pb
from kernel.identity import Caller
from kernel.memory import Item
from kernel.pagination import page
from kernel.ports import DataRelay
from kernel.syscall import syscall
from kernel.table import ProcessTable
from vfmos_runtime import validate
from vfmos_runtime.convert import enum_value, timestamp
from vfmos_runtime.errors import DeadlineExceeded, InvalidArgument, VfmError
from vfmos.kernel.v1 import kernel_pb2 as pb

log = logging.getLogger("vfmd.syscall")
MAX_QUESTION_CHARS = 64 * 1024


def item_to_pb(item: Item) -> pb.ContextItem:
    return pb.ContextItem(kind=enum_value(pb.ContextItemKind, item.kind), text=item.text,
                          tokens=item.tokens, source_ids=item.source_ids, meta=item.meta,
                          score=item.score, page=item.page, speaker=item.speaker,
                          time=timestamp(item.time))


def _for_own_tenant(method: str):
    """A syscall that forwards its request to vfm-datad as the caller's tenant."""
    async def forward(self, caller: Caller, request):
        return await self.relay.forward(method, caller.tenant, request)
    forward.__name__ = forward.__qualname__ = method
    return syscall(forward)


class MemorySyscalls:
    """Mixed into KernelServicer: needs `self.auth`, `self.table` and `self.context`."""

    table: ProcessTable
    context: ContextManager

    @property
    def relay(self) -> DataRelay:
        return self.context.data  # the gRPC data adapter serves both the domain and the relay

    def _owned(self, caller: Caller, pid: int):
        return self.table.get(caller, pid)  # another tenant's pid is NOT_FOUND

    @syscall
    async def GetWorkingSet(self, caller: Caller, request: pb.GetWorkingSetRequest):
        record = self._owned(caller, request.pid)
        if len(request.question) > MAX_QUESTION_CHARS:
            raise InvalidArgument(f"the question is longer than {MAX_QUESTION_CHARS} characters")
        ws = await self.context.working_set(record, request.question, request.budget,
                                            validate.time_field(request, "now"), request.touch)
        return pb.GetWorkingSetResponse(working_set=pb.WorkingSet(
            pid=record.pid, budget=ws.assembly.budget, used=ws.assembly.used,
            items=[item_to_pb(i) for i in ws.assembly.items], page_faults=ws.faults,
            page_hits=ws.hits, resident_pages=ws.resident, pages=ws.pages,
            pagein_ms=ws.pagein_ms))

    @syscall
    async def Remember(self, caller: Caller, request: pb.RememberRequest):
        record = self._owned(caller, request.pid)
        for i, entry in enumerate(request.entries):
            validate.time_field(entry, "time", f"entries[{i}].time")
        return await self.relay.forward("Remember", record.tenant, request)

    @syscall
    async def Recall(self, caller: Caller, request: pb.RecallRequest):
        record = self._owned(caller, request.pid)
        validate.integer(request.k, "k", 0, validate.MAX_RESULTS)
        validate.time_field(request, "now")
        return await self.relay.forward("Recall", record.tenant, request)

    @syscall
    async def ForkProcess(self, caller: Caller, request: pb.ForkProcessRequest):
        parent, child = await self.table.fork(caller, request.pid, request.name)
        try:
            await self.context.data.fork_memory(parent.tenant, parent.pid, child.pid)
        except VfmError as err:
            log.warning("fork %d -> %d without memory: %s", parent.pid, child.pid, err.message)
        return pb.ForkProcessResponse(process=process_to_pb(child, 0))

    # knowledge: always the caller's own tenant (the kernel's requests cannot name one)
    CreateCollection = _for_own_tenant("CreateCollection")
    DeleteCollection = _for_own_tenant("DeleteCollection")
    DeleteSource = _for_own_tenant("DeleteSource")

    @syscall
    async def Search(self, caller: Caller, request: pb.SearchRequest):
        validate.integer(request.k, "k", 0, validate.MAX_RESULTS)
        since, until = validate.time_field(request, "since"), validate.time_field(request, "until")
        if since and until and since > until:
            raise InvalidArgument(f"since ({since}) is after until ({until})")
        return await self.relay.forward("Search", caller.tenant, request)

    @syscall
    async def Embed(self, caller: Caller, request: pb.EmbedRequest):
        validate.embed_texts(request.texts)
        return await self.relay.forward("Embed", caller.tenant, request)

    @syscall
    async def ListCollections(self, caller: Caller, request: pb.ListCollectionsRequest):
        """vfm-datad lists them all (by name); the kernel pages them."""
        reply = await self.relay.forward("ListCollections", caller.tenant, request)
        found, token = page(reply.collections, lambda c: c.name, "ListCollections",
                            request.page_size, request.page_token)
        return pb.ListCollectionsResponse(collections=found, next_page_token=token)

    @syscall
    async def Ingest(self, caller: Caller, request_iterator):
        """A document streamed through: parts are forwarded as they come, as the caller's tenant."""
        return await self.relay.ingest(caller.tenant, ingest_parts(request_iterator))

    @syscall
    async def IngestWithProgress(self, caller: Caller, request_iterator):
        """Ingest, answered with vfm-datad's progress as it parses and embeds, then the result."""
        async for message in self.relay.ingest_progress(
                caller.tenant, ingest_parts(_parts_of(request_iterator))):
            yield message


async def _parts_of(messages):
    """IngestWithProgress wraps each part; a message that cannot be decoded stays an error."""
    async for message in messages:
        yield message.part


async def ingest_parts(request_iterator):
    """The parts of a client's Ingest stream, refusing a malformed one at once: a part that
    is not an IngestRequest, a first part that names no collection or source, no part at all.
    Each part must come within INGEST_PART_TIMEOUT_S of the one before."""
    parts, n = aiter(request_iterator), 0
    while True:
        try:
            part = await asyncio.wait_for(anext(parts), INGEST_PART_TIMEOUT_S)
        except StopAsyncIteration:
            break
        except DecodeError:
            raise InvalidArgument(f"part {n} of the Ingest stream is not an IngestRequest "
                                  "message") from None
        except asyncio.TimeoutError:
            raise DeadlineExceeded(f"no part of the Ingest stream for "
                                   f"{INGEST_PART_TIMEOUT_S:.0f} s after part {n - 1}") from None
        if n == 0:  # only the head's kind and mtime count; refuse bad ones here
            validate.enum_field(pb.DocumentKind, part.kind, "kind")
            validate.time_field(part, "mtime")
            for name in ("collection", "source"):
                if not getattr(part, name):
                    raise InvalidArgument(f"{name}: the first part of an Ingest stream names "
                                          "the collection and the source")
        n += 1
        yield part
    if n == 0:
        raise InvalidArgument("collection: empty Ingest stream, no document header")
