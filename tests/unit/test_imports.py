"""The shape of the house, checked: every part imports only what its arrows allow."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PARTS = ("kernel", "services", "libvfm", "vfmctl", "vfmos_runtime")
# What each part must never import (the shared runtime and the generated protos are open to all).
FORBIDDEN = {
    "kernel": {"services", "libvfm", "vfmctl"},
    "services": {"kernel", "vfmctl"},
    "libvfm": {"kernel", "services", "vfmctl"},
    "vfmctl": {"kernel", "services"},
    "vfmos_runtime": {"kernel", "services", "libvfm", "vfmctl"},
}


def imported(path: Path) -> list[tuple[int, str]]:
    """Every module `path` imports, absolute, with its line (relative imports resolved)."""
    tree = ast.parse(path.read_text(), str(path))
    package = ".".join(path.relative_to(REPO).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(p for p in (*parts, base) if p)
            found.append((node.lineno, base))
    return found


def violations(part: str) -> list[str]:
    bad = []
    for path in sorted((REPO / part).rglob("*.py")):
        rel = path.relative_to(REPO)
        own_service = rel.parts[1] if part == "services" and len(rel.parts) > 2 else None
        for line, module in imported(path):
            top = module.split(".")[0]
            if top in FORBIDDEN[part]:
                bad.append(f"{rel}:{line} imports {module}")
            elif own_service and module.startswith("services."):
                other = module.split(".")[1]
                # services.registration is the services' shared life with the kernel
                if other not in (own_service, "registration"):
                    bad.append(f"{rel}:{line} imports another service: {module}")
    return bad


@pytest.mark.parametrize("part", PARTS)
def test_a_part_imports_only_what_the_architecture_allows(part):
    assert violations(part) == []


def test_the_checker_sees_a_forbidden_import(tmp_path):
    fake = tmp_path / "services" / "trust"
    fake.mkdir(parents=True)
    (fake / "x.py").write_text("from kernel.table import ProcessTable\n"
                               "from services.model import local\n"
                               "from . import y\nimport vfmos_runtime.errors\n")
    globals()["REPO"] = tmp_path
    try:
        found = violations("services")
    finally:
        globals()["REPO"] = Path(__file__).resolve().parents[2]
    assert found == ["services/trust/x.py:1 imports kernel.table",
                     "services/trust/x.py:2 imports another service: services.model"]
