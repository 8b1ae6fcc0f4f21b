"""Who is calling: peer-credential tickets on the Unix socket, hashed bearer tokens over TCP."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import pwd
import re
import secrets
import socket
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import msgpack

from kernel.keys import KeyLedger, new_record
from kernel.store import KernelStore
from vfmos_runtime.protocol import TICKET_HEADER
from vfmos_runtime.errors import InvalidArgument, NotFound, PermissionDenied, Unauthenticated
from vfmos_runtime.types import TokenLimits
from vfmos_runtime.validate import token_limits

log = logging.getLogger("vfmd.identity")

_UCRED = struct.Struct("3i")  # pid, uid, gid
# Live session tickets one uid may hold (each client object holds one), and how long one
# may go unused; libvfm fetches a new ticket by itself when its own has gone.
MAX_TICKETS_PER_UID = 1024
TICKET_IDLE_S = 3600.0
TOKEN_ID_RE = re.compile(r"[0-9a-f]{12}")
LOCAL_TENANT_PREFIX = "unix:"
TOKEN_TENANT_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
LOCAL_NAME_RE = re.compile(r"[A-Za-z0-9._$-]{1,64}")  # what user names are made of


@dataclass(frozen=True)
class Caller:
    tenant: str
    uid: int
    admin: bool
    transport: str
    key: str = ""  # the bearer token's id, whose limits its calls are held to ("": none)

    def may_touch(self, tenant: str) -> bool:
        return self.admin or self.tenant == tenant


def tenant_of_uid(uid: int) -> str:
    """A local user's tenant: "unix:" and the user name (or "unix:uid<N>" without one).

    Local users and token tenants are two namespaces: a token tenant's name cannot hold a
    ':', so a token made for "root" or "nobody" is never the Unix user of that name."""
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = f"uid{uid}"
    return LOCAL_TENANT_PREFIX + name


def check_tenant(tenant: str) -> str:
    """Any tenant's name: a token tenant, or a local user's ("unix:alice")."""
    local = tenant.startswith(LOCAL_TENANT_PREFIX)
    name = tenant[len(LOCAL_TENANT_PREFIX):] if local else tenant
    if not (LOCAL_NAME_RE if local else TOKEN_TENANT_RE).fullmatch(name):
        raise InvalidArgument(f"bad tenant {tenant!r}: a token tenant (letters, digits, '-', "
                              f"'_') or {LOCAL_TENANT_PREFIX}USER for a local user")
    return tenant


class TicketBook:
    """Session tickets handed to local peers whose uid the kernel read with SO_PEERCRED.

    Python gRPC does not expose a connection's peer credentials, so a client first
    proves its uid on the credentials socket and then presents the ticket it got
    there with every call. Tickets live in memory: after a kernel restart clients
    fetch a new one (libvfm does this by itself).

    Memory is bounded per uid, never across uids: a uid holding `per_uid` tickets loses its
    own least recently used one for a new one, so a flood of handshakes from one user cannot
    log any other user out. A ticket unused for `idle_s` expires.
    """

    def __init__(self, admin_uids: frozenset[int], per_uid: int = MAX_TICKETS_PER_UID,
                 idle_s: float = TICKET_IDLE_S, clock: Callable[[], float] = time.monotonic):
        self._admin_uids = admin_uids
        self._per_uid = per_uid
        self._idle_s = idle_s
        self._clock = clock
        # ticket -> (caller, last use), least recently used first: overall and per uid
        self._tickets: OrderedDict[str, tuple[Caller, float]] = OrderedDict()
        self._by_uid: dict[int, OrderedDict[str, None]] = {}

    def issue(self, uid: int) -> tuple[str, Caller]:
        now = self._clock()
        self._expire(now)
        own = self._by_uid.setdefault(uid, OrderedDict())
        while len(own) >= self._per_uid:
            self._drop(next(iter(own)))
        ticket = secrets.token_urlsafe(24)
        caller = Caller(tenant_of_uid(uid), uid, uid in self._admin_uids, "unix")
        self._tickets[ticket] = (caller, now)
        own[ticket] = None
        return ticket, caller

    def lookup(self, ticket: str) -> Caller | None:
        found = self._tickets.get(ticket)
        if found is None:
            return None
        caller, used = found
        now = self._clock()
        if now - used > self._idle_s:
            self._drop(ticket)
            return None
        self._tickets[ticket] = (caller, now)
        self._tickets.move_to_end(ticket)
        self._by_uid[caller.uid].move_to_end(ticket)
        return caller

    def __len__(self) -> int:
        return len(self._tickets)

    def _expire(self, now: float) -> None:
        while self._tickets:
            ticket, (_, used) = next(iter(self._tickets.items()))
            if now - used <= self._idle_s:
                return
            self._drop(ticket)

    def _drop(self, ticket: str) -> None:
        caller, _ = self._tickets.pop(ticket)
        own = self._by_uid[caller.uid]
        del own[ticket]
        if not own:
            del self._by_uid[caller.uid]


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


class TokenBook:
    """Bearer tokens for TCP clients; only their sha256 is stored, with the token's limits
    and usage (kept live by `keys`)."""

    PREFIX = "vfm_"

    def __init__(self, store: KernelStore, keys: KeyLedger | None = None):
        self._store = store
        self.keys = keys or KeyLedger(store)
        self._cache: dict[bytes, Caller] = {}

    async def create(self, tenant: str, admin: bool, label: str,
                     limits: TokenLimits | None = None) -> tuple[str, str]:
        """A new token, durable before it is shown: (secret, token id). Its tenant is a token
        tenant's plain name, or, when an admin names one explicitly ("unix:alice"), a local
        user's: the one mapping between the two namespaces, and only an admin makes it."""
        check_tenant(tenant)
        limits = token_limits(limits or TokenLimits())
        secret = self.PREFIX + secrets.token_urlsafe(32)
        digest = _digest(secret)
        token_id = digest.hex()[:12]
        info = new_record(token_id, tenant, admin, label[:128], limits, time.time())
        await asyncio.wrap_future(self._store.put_token(digest, info))
        self.keys.add(digest, info)
        return secret, token_id

    def verify(self, secret: str) -> Caller | None:
        digest = _digest(secret)
        caller = self._cache.get(digest)
        if caller is None:
            info = self._store.get_token(digest)
            if info is None:
                return None
            caller = Caller(info["tenant"], -1, bool(info["admin"]), "tcp", info["token_id"])
            self._cache[digest] = caller
        return caller

    def list(self) -> list[dict]:
        """Every token's record, its usage as it is now (the store's may lag a few Asks)."""
        infos = []
        for _, info in self._store.tokens():
            account = self.keys.get(info["token_id"])
            infos.append({**info, **account.usage()} if account is not None else info)
        return infos

    async def revoke(self, token_id: str) -> None:
        # An id is 12 hex digits (what `token list` shows); anything else cannot name a token,
        # and compare_digest refuses non-ASCII text outright.
        if not TOKEN_ID_RE.fullmatch(token_id):
            raise InvalidArgument(f"token_id must be the 12 hex digits 'vfmctl token list' "
                                  f"shows, got {token_id[:40]!r}")
        for digest, info in self._store.tokens():
            if hmac.compare_digest(info["token_id"].encode(), token_id.encode()):
                self._cache.pop(digest, None)
                self.keys.drop(token_id)
                await asyncio.wrap_future(self._store.delete_token(digest))
                return
        raise NotFound(f"no token with id {token_id!r}")


class Authenticator:
    """Turns a call's transport and metadata into a Caller, or refuses it."""

    def __init__(self, tickets: TicketBook, tokens: TokenBook):
        self.tickets = tickets
        self.tokens = tokens

    @property
    def keys(self) -> KeyLedger:
        return self.tokens.keys

    def identify(self, metadata, peer: str) -> Caller:
        ticket = bearer = None
        for key, value in metadata or ():
            if key == TICKET_HEADER:
                ticket = value
            elif key == "authorization" and value.lower().startswith("bearer "):
                bearer = value[7:].strip()
        if bearer:
            caller = self.tokens.verify(bearer)
            if caller is None:
                raise Unauthenticated("invalid or revoked bearer token")
            return caller
        if ticket and peer.startswith("unix:"):
            caller = self.tickets.lookup(ticket)
            if caller is not None:
                return caller
            raise Unauthenticated("unknown session ticket (the kernel restarted?): reconnect")
        if peer.startswith("unix:"):
            raise Unauthenticated("no session ticket: get one on the credentials socket first")
        raise Unauthenticated("TCP callers must send 'authorization: Bearer <token>'")


def require_admin(caller: Caller, what: str) -> None:
    if not caller.admin:
        raise PermissionDenied(f"only an administrator may {what}")


class CredentialsServer:
    """Unix socket that answers each connection with a ticket for the peer's uid."""

    def __init__(self, path: Path, tickets: TicketBook):
        self._path = path
        self._tickets = tickets
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        if self._path.exists() or self._path.is_symlink():
            self._path.unlink()
        self._server = await asyncio.start_unix_server(self._handle, path=str(self._path))
        os.chmod(self._path, 0o666)  # anyone may ask; the kernel reads who they are

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
            _, uid, _ = _UCRED.unpack(raw)
            ticket, caller = self._tickets.issue(uid)
            writer.write(msgpack.packb({"ticket": ticket, "tenant": caller.tenant,
                                        "uid": uid, "admin": caller.admin}))
            await writer.drain()
        except (OSError, ConnectionError) as exc:
            log.warning("credentials handshake failed: %s", exc)
        finally:
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self._path.unlink(missing_ok=True)
