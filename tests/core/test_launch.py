"""jemalloc re-execution (edmsound.launch): the trainer, app.py and the speed benchmark start under it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from edmsound.core.runtime import find_jemalloc, jemalloc_env

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import os, sys
sys.path.insert(0, {root!r})
from edmsound import jemalloc_loaded, reexec_with_jemalloc
reexec_with_jemalloc(sys.argv[1:], script=__file__)
print(jemalloc_loaded(), os.environ.get("EDMSOUND_REEXEC"), *sys.argv[1:])
"""


def _run(tmp_path, env_extra):
    script = tmp_path / "probe.py"
    script.write_text(SCRIPT.format(root=str(ROOT)))
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "EDMSOUND_REEXEC", "EDMSOUND_NO_JEMALLOC")}
    env.update(env_extra)
    out = subprocess.run([sys.executable, str(script), "a b", "--x"], env=env, capture_output=True, text=True,
                         check=True, timeout=60)
    return out.stdout.strip()


def test_script_reexecutes_once_under_jemalloc_with_its_arguments(tmp_path):
    if find_jemalloc() is None:
        pytest.skip("libjemalloc2 not installed (CI installs it)")
    assert _run(tmp_path, {}) == "True 1 a b --x"       # argv survives, the re-exec marker stops a second exec


def test_opt_out_and_missing_library_leave_the_process_alone(tmp_path):
    assert _run(tmp_path, {"EDMSOUND_NO_JEMALLOC": "1"}) == "False None a b --x"
    env = jemalloc_env({"LD_PRELOAD": "/x/libfoo.so"})
    if find_jemalloc():
        assert env["LD_PRELOAD"].split(":") == [find_jemalloc(), "/x/libfoo.so"] and "MALLOC_CONF" in env
        assert jemalloc_env(env)["LD_PRELOAD"] == env["LD_PRELOAD"]          # never preloaded twice
    else:
        assert env["LD_PRELOAD"] == "/x/libfoo.so"
