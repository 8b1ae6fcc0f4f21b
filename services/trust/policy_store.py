"""Trust policies on disk: every put appends a version per scope (tenant, pid) in LMDB; the
latest is read back, the history listed, and nothing is lost across restarts."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

from vfmos_runtime.storage import U64, open_env, pack, unpack


@dataclass(frozen=True)
class PolicyVersion:
    tenant: str
    pid: int
    version: int
    time: float
    author: str
    document: str          # as the user wrote it
    sha256: str            # of the document
    parsed: dict           # the validated, normalised (partial) document
    filename: str = ""


def scope_key(tenant: str, pid: int) -> bytes:
    # tenant names never hold NUL (the boundary refuses them), so the key splits uniquely
    return tenant.encode() + b"\x00" + U64.pack(pid)


class PolicyStore:
    """`policies.lmdb`: sub-databases `versions` (scope + version -> record) and `heads`
    (scope -> latest version), written together in one transaction."""

    def __init__(self, data_dir: Path, map_size: int = 1 << 30):
        self.env = open_env(Path(data_dir) / "policies.lmdb", map_size=map_size, max_dbs=4)
        self._versions = self.env.open_db(b"versions")
        self._heads = self.env.open_db(b"heads")

    def put(self, tenant: str, pid: int, document: str, parsed: dict, author: str = "",
            filename: str = "") -> PolicyVersion:
        scope = scope_key(tenant, pid)
        with self.env.begin(write=True) as txn:
            head = txn.get(scope, db=self._heads)
            version = (U64.unpack(head)[0] if head else 0) + 1
            record = PolicyVersion(tenant, pid, version, time.time(), author, document,
                                   hashlib.sha256(document.encode()).hexdigest(), parsed,
                                   filename)
            txn.put(scope + U64.pack(version), pack(_to_row(record)), db=self._versions)
            txn.put(scope, U64.pack(version), db=self._heads)
        return record

    def latest(self, tenant: str, pid: int) -> PolicyVersion | None:
        scope = scope_key(tenant, pid)
        with self.env.begin() as txn:
            head = txn.get(scope, db=self._heads)
            if head is None:
                return None
            raw = txn.get(scope + head, db=self._versions)
        return _from_row(tenant, pid, unpack(raw))

    def history(self, tenant: str, pid: int) -> list[PolicyVersion]:
        """Every version of the scope, oldest first."""
        scope = scope_key(tenant, pid)
        found = []
        with self.env.begin() as txn:
            cursor = txn.cursor(db=self._versions)
            if cursor.set_range(scope):
                for key, raw in cursor:
                    if not key.startswith(scope) or len(key) != len(scope) + 8:
                        break
                    found.append(_from_row(tenant, pid, unpack(raw)))
        return found

    def close(self) -> None:
        self.env.close()


def _to_row(v: PolicyVersion) -> dict:
    return {"version": v.version, "time": v.time, "author": v.author, "document": v.document,
            "sha256": v.sha256, "parsed": v.parsed, "filename": v.filename}


def _from_row(tenant: str, pid: int, row: dict) -> PolicyVersion:
    return PolicyVersion(tenant, pid, row["version"], row["time"], row["author"],
                         row["document"], row["sha256"], row["parsed"], row.get("filename", ""))
