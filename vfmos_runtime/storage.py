"""LMDB and msgpack helpers every daemon's storage layer uses: one encoding, one way to open."""

from __future__ import annotations

import struct
from pathlib import Path

import lmdb
import msgpack

# Big-endian so LMDB's key order is numeric order (pids, sequence numbers).
U64 = struct.Struct(">Q")


def pack(value) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def unpack(raw):
    return msgpack.unpackb(bytes(raw), raw=False)


def open_env(path: Path, *, map_size: int, max_dbs: int, sync: bool = True,
             metasync: bool = True, **options) -> lmdb.Environment:
    """An LMDB environment in directory `path` (created if missing), readable by its
    owner only: it holds tenants' data."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    return lmdb.open(str(path), map_size=map_size, max_dbs=max_dbs, subdir=True, sync=sync,
                     metasync=metasync, lock=True, mode=0o600, **options)
