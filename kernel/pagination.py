"""Pages of the kernel's list calls: an opaque token names the last item a page returned."""

from __future__ import annotations

import base64
import json
from typing import Callable, Sequence, TypeVar

from vfmos_runtime.errors import InvalidArgument

T = TypeVar("T")
DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


def _encode(rpc: str, key: int | str) -> str:
    return base64.urlsafe_b64encode(json.dumps([rpc, key]).encode()).decode().rstrip("=")


def _decode(rpc: str, token: str) -> int | str:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        name, key = json.loads(raw)
    except (ValueError, TypeError):
        name, key = None, None
    if name != rpc or not isinstance(key, (int, str)):
        raise InvalidArgument(f"bad page_token for {rpc}: pass a next_page_token it returned")
    return key


def encode_token(rpc: str, key: int | str) -> str:
    """The page token of a list call that reads its store page by page (the audit trail)."""
    return _encode(rpc, key)


def decode_token(rpc: str, token: str) -> int | str:
    """The key a token of `rpc` names; InvalidArgument for anything else."""
    return _decode(rpc, token)


def page(items: Sequence[T], key: Callable[[T], int | str], rpc: str, page_size: int,
         page_token: str) -> tuple[list[T], str]:
    """One page of `items` (sorted by `key`) after the token's item, and the next token.

    The token holds the last key returned rather than an offset, so items added or removed
    meanwhile neither repeat nor go missing on later pages.
    """
    if not 0 <= page_size <= MAX_PAGE_SIZE:
        raise InvalidArgument(f"page_size must be 0..{MAX_PAGE_SIZE} (0 = {DEFAULT_PAGE_SIZE}), "
                              f"got {page_size}")
    size = page_size or DEFAULT_PAGE_SIZE
    rest = list(items)
    if page_token:
        after = _decode(rpc, page_token)
        try:
            rest = [item for item in rest if key(item) > after]
        except TypeError:
            raise InvalidArgument(f"bad page_token for {rpc}: pass a next_page_token it "
                                  "returned") from None
    chunk = rest[:size]
    return chunk, (_encode(rpc, key(chunk[-1])) if len(rest) > size else "")
