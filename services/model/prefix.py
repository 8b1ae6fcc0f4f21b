"""Prefix reuse: KV of recent token prefixes, so a shared start of a prompt is computed once."""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [rows, heads, T, dim]


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix; slices compare in C, so bisect on them."""
    a, b = tuple(a), tuple(b)
    low, high = 0, min(len(a), len(b))
    while low < high:
        mid = (low + high + 1) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid - 1
    return low


def kv_bytes(kv: KV) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)


class PrefixCache:
    """An LRU of token sequences and their one-row KV, bounded in bytes. A new prompt
    reuses the longest prefix it shares with any entry."""

    def __init__(self, max_bytes: int = 256 << 20, min_tokens: int = 8):
        self._entries: OrderedDict[tuple[int, ...], KV] = OrderedDict()
        self._bytes = 0
        self.max_bytes = max_bytes
        self.min_tokens = min_tokens

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, ids: Sequence[int], limit: int) -> tuple[int, KV | None]:
        """(n, KV of ids[:n]) for the longest cached prefix, n <= limit; (0, None) when the
        best is too short to be worth a copy."""
        best, best_key = 0, None
        for key in self._entries:
            n = min(common_prefix(key, ids), limit)
            if n > best:
                best, best_key = n, key
        if best < self.min_tokens:
            return 0, None
        self._entries.move_to_end(best_key)
        return best, [(k[:, :, :best], v[:, :, :best]) for k, v in self._entries[best_key]]

    def store(self, ids: Sequence[int], kv: KV) -> None:
        """Keep a copy of `kv` (the KV of exactly `ids`); entries it extends become redundant."""
        key = tuple(ids)
        size = kv_bytes(kv)
        if len(key) < self.min_tokens or size > self.max_bytes:
            return
        holder = next((k for k in self._entries if k[:len(key)] == key), None)
        if holder is not None:  # an entry already holds this prefix
            self._entries.move_to_end(holder)
            return
        for old in [k for k in self._entries if key[:len(k)] == k]:
            self._drop(old)
        self._entries[key] = [(k.clone(), v.clone()) for k, v in kv]
        self._bytes += size
        while self._bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: tuple[int, ...]) -> None:
        self._bytes -= kv_bytes(self._entries.pop(key))
