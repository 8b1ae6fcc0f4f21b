"""Page tokens of the kernel's list calls: opaque, resumable after the last item, validated."""

import pytest

from kernel.pagination import DEFAULT_PAGE_SIZE, page
from vfmos_runtime.errors import InvalidArgument


def _all_pages(items, size, key=lambda x: x, rpc="ListThings"):
    seen, token = [], ""
    while True:
        chunk, token = page(items, key, rpc, size, token)
        seen.append(chunk)
        if not token:
            return seen


def test_pages_cover_every_item_once_in_order():
    assert _all_pages(list(range(1, 8)), 3) == [[1, 2, 3], [4, 5, 6], [7]]
    assert _all_pages(["a", "b"], 2) == [["a", "b"]]  # no empty trailing page
    assert _all_pages([], 5) == [[]]


def test_zero_means_the_default_size():
    chunk, token = page(list(range(250)), lambda x: x, "ListThings", 0, "")
    assert len(chunk) == DEFAULT_PAGE_SIZE and token


def test_a_token_resumes_after_its_item_even_when_items_change():
    _, token = page([1, 2, 3, 4], lambda x: x, "ListThings", 2, "")
    chunk, _ = page([1, 3, 4, 5], lambda x: x, "ListThings", 2, token)  # 2 gone, 5 new
    assert chunk == [3, 4]


@pytest.mark.parametrize("size", [-1, 1001])
def test_bad_page_size_is_refused(size):
    with pytest.raises(InvalidArgument, match="page_size"):
        page([1], lambda x: x, "ListThings", size, "")


@pytest.mark.parametrize("token", ["garbage", "e30", "WyJMaXN0T3RoZXIiLDFd"])
def test_foreign_or_forged_tokens_are_refused(token):
    with pytest.raises(InvalidArgument, match="page_token"):
        page([1, 2], lambda x: x, "ListThings", 1, token)


def test_a_token_of_another_call_is_refused():
    _, token = page(["a", "b"], lambda x: x, "ListTokens", 1, "")
    with pytest.raises(InvalidArgument):
        page([1, 2], lambda x: x, "ListProcesses", 1, token)
