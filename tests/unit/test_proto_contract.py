"""The gRPC contract stays lint-clean (buf STANDARD + COMMENTS) and compatible with its baseline."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROTO = REPO / "proto"
BASELINE = PROTO / "baseline" / "v1.binpb"


def _buf() -> str:
    local = REPO / ".tools" / "node_modules" / ".bin" / "buf"
    found = os.environ.get("BUF") or (str(local) if local.exists() else shutil.which("buf"))
    if not found:
        pytest.skip("buf is not installed: `make buf` puts it under .tools/ (needs npm)")
    return found


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([_buf(), *args], cwd=PROTO, capture_output=True, text=True, timeout=120)


def test_buf_lint_is_clean():
    result = _run("lint")
    assert result.returncode == 0, f"buf lint found:\n{result.stdout}{result.stderr}"


def test_no_breaking_change_against_the_release_baseline():
    assert BASELINE.exists(), "proto/baseline/v1.binpb is missing (see docs/grpc.md)"
    result = _run("breaking", "--against", str(BASELINE.relative_to(PROTO)))
    assert result.returncode == 0, (
        "the contract breaks its baseline; if that is meant (pre-1.0 release), say so in the "
        f"release note and refresh the baseline (docs/grpc.md):\n{result.stdout}{result.stderr}")


def test_kernel_contract_does_not_depend_on_the_data_service():
    text = (PROTO / "vfmos" / "kernel" / "v1" / "kernel.proto").read_text()
    assert "vfmos/data/" not in text
