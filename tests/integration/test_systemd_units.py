"""The systemd units render, pass `systemd-analyze verify` and keep the settings VFMOS relies on."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "deploy" / "install-systemd.sh"
TEMPLATES = REPO / "deploy" / "systemd"
SHARED_MARKER = "# --- shared by every VFMOS service unit"
# The interpreter running the tests has VFMOS installed, so its bin/ holds vfmd and vfm-modeld.
PREFIX = Path(sys.prefix)
SERVICES = sorted(p.name.removesuffix(".in") for p in TEMPLATES.glob("*.service.in"))
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")

# Lines systemd-analyze may print that say nothing about our units. Anything else fails.
BENIGN_OUTPUT = (
    # systemd 255 logs this at warning level for every verb (systemd/systemd#30162).
    re.compile(r"^Using systemd-executor binary from '[^']+'\.?$"),
    # A distribution unit loaded as a dependency of ours (basic.target pulls in sockets and
    # the like), e.g. "/lib/systemd/system/dbus.socket:4: ListenStream= references a path
    # below legacy directory /var/run/" (systemd/systemd#15342). Not ours to fix, and
    # --recursive-errors=no keeps it out of the exit status.
    re.compile(r"^(/usr)?/lib/systemd/system/[^/:]+:\d+: "),
)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("units")
    result = subprocess.run([str(SCRIPT), "--render-only", str(out), "--prefix", str(PREFIX)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stdout, result.stdout
    return out


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Section -> key -> every value in file order (Environment= and friends repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path.name}: {line!r} before any section"
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def last(unit: dict, section: str, key: str) -> str | None:
    values = unit.get(section, {}).get(key)
    return values[-1] if values else None


def words(unit: dict, section: str, key: str) -> set[str]:
    """Space-separated list settings (PartOf=, Wants=, WantedBy=), all assignments merged."""
    return {w for value in unit.get(section, {}).get(key, []) for w in value.split()}


def test_render_is_complete_repeatable_and_world_readable(rendered, tmp_path):
    names = sorted(p.name for p in rendered.iterdir())
    assert names == sorted(p.name.removesuffix(".in") for p in TEMPLATES.glob("*.in"))
    assert "vfmos.target" in names and {"vfmd.service", "vfm-modeld.service"} <= set(SERVICES)
    again = tmp_path / "again"
    subprocess.run([str(SCRIPT), "--render-only", str(again), "--prefix", str(PREFIX)],
                   check=True, capture_output=True)
    for name in names:
        text = (rendered / name).read_text()
        assert "@PREFIX@" not in text and not re.search(r"@[A-Z_]+@", text)
        assert (again / name).read_text() == text
        assert stat.S_IMODE((rendered / name).stat().st_mode) == 0o644


def test_target_starts_with_the_machine():
    target = parse_unit(TEMPLATES / "vfmos.target.in")
    assert "multi-user.target" in words(target, "Install", "WantedBy")


@pytest.mark.parametrize("name", SERVICES)
def test_service_has_the_settings_vfmos_relies_on(rendered, name):
    unit = parse_unit(rendered / name)
    expected = {
        ("Service", "Type"): "notify",
        ("Service", "NotifyAccess"): "main",
        ("Service", "Restart"): "on-failure",
        ("Service", "RestartSec"): "1",
        ("Service", "User"): "vfmos",
        ("Service", "Group"): "vfmos",
        ("Service", "RuntimeDirectory"): "vfmos",
        ("Service", "RuntimeDirectoryPreserve"): "yes",
        ("Service", "StateDirectory"): "vfmos",
        ("Service", "CacheDirectory"): "vfmos",
        # Tenants' data is private; only the socket dir may be passed through by anyone.
        ("Service", "UMask"): "0077",
        ("Service", "RuntimeDirectoryMode"): "0711",
        ("Service", "StateDirectoryMode"): "0700",
        ("Service", "CacheDirectoryMode"): "0700",
        ("Service", "NoNewPrivileges"): "yes",
        ("Service", "ProtectSystem"): "strict",
        ("Service", "ProtectHome"): "read-only",
        ("Service", "PrivateTmp"): "yes",
    }
    for (section, key), value in expected.items():
        assert last(unit, section, key) == value, f"{name}: {key}="
    assert "vfmos.target" in words(unit, "Unit", "PartOf")
    assert "vfmos.target" in words(unit, "Install", "WantedBy")
    env = unit["Service"]["Environment"]
    assert "VFM_STATE_DIR=/run/vfmos" in env and "VFM_CACHE_DIR=/var/cache/vfmos" in env
    # Each of these closes the device policy or forbids W+X pages: CUDA or torch JIT breaks.
    for key in ("PrivateDevices", "ProtectClock", "DeviceAllow", "MemoryDenyWriteExecute"):
        assert key not in unit["Service"], f"{name}: {key}= is not torch-safe"

    argv = last(unit, "Service", "ExecStart").split()
    binary = Path(argv[0])
    assert binary == PREFIX / "bin" / name.removesuffix(".service"), argv
    assert os.access(binary, os.X_OK), f"{binary} missing: pip install -e . into {PREFIX}"
    assert argv[argv.index("--state-dir") + 1] == "/run/vfmos"


def test_kernel_keeps_its_data_in_the_state_directory(rendered):
    argv = last(parse_unit(rendered / "vfmd.service"), "Service", "ExecStart").split()
    assert argv[argv.index("--data-dir") + 1] == "/var/lib/vfmos"


def test_kernel_unit_gives_vfmd_its_default_cpu_priority(rendered):
    """The vfmos user cannot lower its own nice value: the unit does it for vfmd."""
    from kernel.config import KernelConfig

    unit = parse_unit(rendered / "vfmd.service")
    assert int(last(unit, "Service", "Nice")) == KernelConfig(state_dir=Path(".")).nice


@pytest.mark.parametrize("name", [s for s in SERVICES if s != "vfmd.service"])
def test_service_follows_the_kernel_but_survives_its_restart(rendered, name):
    unit = parse_unit(rendered / name)
    assert "vfmd.service" in words(unit, "Unit", "Wants")
    assert "vfmd.service" in words(unit, "Unit", "After")
    for hard in ("Requires", "BindsTo", "Requisite"):
        assert "vfmd.service" not in words(unit, "Unit", hard), f"{name}: {hard}=vfmd.service"


def test_shared_block_is_identical_in_every_service_template():
    tails = {}
    for name in SERVICES:
        text = (TEMPLATES / f"{name}.in").read_text()
        assert SHARED_MARKER in text, f"{name}.in lacks the shared block marker"
        tails[name] = text[text.index(SHARED_MARKER):]
    reference = tails["vfmd.service"]
    for name, tail in tails.items():
        assert tail == reference, f"{name}.in: shared block differs from vfmd.service.in"


def systemd_version() -> int:
    first = subprocess.run([SYSTEMD_ANALYZE, "--version"], capture_output=True, text=True).stdout
    match = re.match(r"systemd (\d+)", first)
    return int(match.group(1)) if match else 0


def verify(unit_dir: Path) -> tuple[int, list[str]]:
    """Verify every unit in unit_dir: (exit status, output lines about ours or unexplained)."""
    # Pinned logging: an inherited SYSTEMD_LOG_LEVEL=debug would flood the output, and
    # SYSTEMD_UNIT_PATH would change which units are found.
    env = {k: v for k, v in os.environ.items() if not k.startswith("SYSTEMD_")}
    env.update(SYSTEMD_LOG_LEVEL="info", SYSTEMD_LOG_TARGET="console", SYSTEMD_LOG_COLOR="0",
               SYSTEMD_LOG_LOCATION="0", SYSTEMD_LOG_TIME="0", SYSTEMD_COLORS="0")
    # All units in one call: their directory joins the unit search path, so vfmd.service and
    # vfmos.target resolve for each other. --man=no: no man-db in containers.
    # --generators=no: generators need privileges and a booted system.
    argv = [SYSTEMD_ANALYZE, "verify", "--man=no", "--generators=no"]
    if systemd_version() >= 250:
        # Stated explicitly, it also turns parse warnings ("Unknown key", "Failed to parse")
        # in the named units into a non-zero exit; "no" ignores the host's own units.
        argv.append("--recursive-errors=no")
    argv += sorted(str(p) for p in unit_dir.iterdir())
    result = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=unit_dir)
    ours = [str(unit_dir)] + [p.name for p in unit_dir.iterdir()]
    problems = []
    for line in (result.stdout + result.stderr).splitlines():
        if not line.strip():
            continue
        if any(name in line for name in ours) or not any(p.match(line) for p in BENIGN_OUTPUT):
            problems.append(line)
    return result.returncode, problems


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_accepts_the_units(rendered):
    returncode, problems = verify(rendered)
    assert problems == []
    assert returncode == 0


@pytest.mark.skipif(SYSTEMD_ANALYZE is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_catches_a_broken_unit(rendered, tmp_path):
    """Guards the check above: a typo must not pass silently in this environment."""
    broken = tmp_path / "broken"
    shutil.copytree(rendered, broken)
    unit = broken / "vfm-modeld.service"
    unit.write_text(unit.read_text().replace("Type=notify", "Type=notifyy\nRestartSecs=1"))
    returncode, problems = verify(broken)
    assert returncode != 0
    assert any("Unknown key" in line and "RestartSecs" in line for line in problems), problems
    assert any("notifyy" in line for line in problems), problems
