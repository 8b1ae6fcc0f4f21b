"""Typed daemon config: file, then environment, then flags; one clear line for a bad value."""

from __future__ import annotations

from pathlib import Path

import pytest

from kernel import config as kconfig
from services.data import config as dconfig
from services.model import config as mconfig
from vfmos_runtime.config import ConfigError


def test_later_sources_win_and_values_get_their_types(tmp_path):
    toml = tmp_path / "vfmd.toml"
    toml.write_text('policy = "fifo"\nmax_slots = 3\nhealth_interval_s = 5.0\n'
                    '[tenant_weights]\nalice = 2\n')
    env = {"VFM_MAX_SLOTS": "4", "VFM_HEALTH_INTERVAL_S": "1.5"}
    cfg = kconfig.load(["--config", str(toml), "--max-slots", "6", "--state-dir",
                        str(tmp_path)], env)
    assert (cfg.policy, cfg.max_slots, cfg.health_interval_s) == ("fifo", 6, 1.5)
    assert cfg.tenant_weights == {"alice": 2.0}
    assert cfg.data_dir == tmp_path and cfg.socket == tmp_path / "vfmd.sock"


@pytest.mark.parametrize("load, argv, env, message", [
    (kconfig.load, [], {"VFM_MAX_SLOTS": "many"}, r"bad max_slots from \$VFM_MAX_SLOTS"),
    (kconfig.load, ["--max-slots", "-1"], {}, "--max-slots must be >= 0"),
    (kconfig.load, ["--nice", "-21"], {}, "--nice must be -20..19, got -21"),
    (kconfig.load, [], {"VFM_TENANT_WEIGHTS": "alice"}, "bad tenant weight"),
    (kconfig.load, ["--tls-cert", "/x.pem"], {}, "go together"),
    (mconfig.load, ["--max-batch", "0"], {}, "--max-batch must be between 1 and 256"),
    (mconfig.load, [], {"VFM_MODELD_PRELOAD": "maybe"}, "not a boolean"),
    (dconfig.load, [], {"VFM_DATAD_SUMMARY_INTERVAL": "nan"}, "NaN"),
    (dconfig.load, ["--threads", "0"], {}, "--threads must be >= 1"),
])
def test_a_bad_value_is_one_line_naming_the_setting(load, argv, env, message, tmp_path):
    with pytest.raises(ConfigError, match=message) as info:
        load(["--state-dir", str(tmp_path), *argv], env)
    assert "\n" not in str(info.value)


def test_unknown_settings_in_a_file_are_refused(tmp_path):
    toml = tmp_path / "modeld.toml"
    toml.write_text("max_bacth = 4\n")
    with pytest.raises(ConfigError, match="unknown settings.*max_bacth"):
        mconfig.load(["--config", str(toml)], {})


def test_service_defaults_follow_the_state_dir(tmp_path):
    cfg = mconfig.load(["--state-dir", str(tmp_path), "--no-prefix-cache", "--no-preload"],
                       {"VFM_CACHE_DIR": "/c"})
    assert cfg.socket == tmp_path / "modeld.sock" and cfg.kernel_socket == tmp_path / "vfmd.sock"
    assert (cfg.prefix_cache_mb, cfg.preload, cfg.cache_dir) == (0, False, Path("/c"))
    data = dconfig.load([], {"VFM_STATE_DIR": str(tmp_path), "VFM_DATAD_THREADS": "2"})
    assert data.data_dir == tmp_path and data.socket == tmp_path / "datad.sock"
    assert data.threads == 2


def test_vfmd_takes_its_cpu_priority_for_every_thread_it_starts():
    """prioritize() runs before vfmd starts any thread; a thread started after it inherits
    the nice value (Linux keeps one per thread). Run in a child so this process keeps its own."""
    import subprocess
    import sys

    code = ("import os, threading\n"
            "from kernel import config, main\n"
            "main.prioritize(config.KernelConfig(state_dir='.', nice=7))\n"
            "seen = []\n"
            "t = threading.Thread(target=lambda: seen.append(os.getpriority(os.PRIO_PROCESS, 0)))\n"
            "t.start(); t.join()\n"
            "print(os.getpriority(os.PRIO_PROCESS, 0), seen[0])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.split() == ["7", "7"]
