"""CPU launch helpers: preload jemalloc by re-executing once.

About 2x faster CPU training here (benchmarks/train_speed.py) and a few to ~15 % faster single-clip generation
(repeated same-size allocations are served from jemalloc's cache instead of fresh pages), so the trainer, the app
and the speed benchmark all start under it when the library is installed (Debian: libjemalloc2).

Freed pages are kept for reuse (no decay), which is where the speed comes from. Every allocation still goes through
jemalloc's size classes: with ``oversize_threshold:1`` (each allocation in its own extent, never returned) a
float32 training step on an AVX2 CPU grew the process by 0.2–0.4 GB per step until the kernel killed it
(benchmarks/allocator.py)."""
from __future__ import annotations

import os
import sys
from pathlib import Path

JEMALLOC_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
    "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2",
    "/usr/lib64/libjemalloc.so.2",
    "/usr/local/lib/libjemalloc.so.2",
)
MALLOC_CONF = "background_thread:false,metadata_thp:auto,dirty_decay_ms:-1,muzzy_decay_ms:-1"


def find_jemalloc() -> str | None:
    for p in JEMALLOC_CANDIDATES:
        if Path(p).is_file():
            return p
    return None


def jemalloc_env(env: dict | None = None) -> dict:
    """A copy of ``env`` with jemalloc preloaded (unchanged if jemalloc is absent)."""
    env = dict(os.environ if env is None else env)
    lib = find_jemalloc()
    if lib and "jemalloc" not in env.get("LD_PRELOAD", ""):
        env["LD_PRELOAD"] = ":".join(filter(None, [lib, env.get("LD_PRELOAD", "")]))
        env.setdefault("MALLOC_CONF", MALLOC_CONF)
    return env


def jemalloc_loaded() -> bool:
    """Whether this process was started with jemalloc preloaded."""
    return "jemalloc" in os.environ.get("LD_PRELOAD", "")


def reexec_with_jemalloc(argv: list[str], script: str | None = None) -> None:
    """Replace this process with ``python -m edmsound.cli argv`` (or ``python script argv``) under jemalloc, once.

    No-op when jemalloc is missing, already loaded, disabled with EDMSOUND_NO_JEMALLOC=1, or when
    running under torchrun (the launcher's environment is left alone; preload it there yourself)."""
    if os.environ.get("EDMSOUND_NO_JEMALLOC") == "1" or os.environ.get("EDMSOUND_REEXEC") == "1":
        return
    if "WORLD_SIZE" in os.environ or "jemalloc" in os.environ.get("LD_PRELOAD", ""):
        return
    if find_jemalloc() is None:
        return
    env = jemalloc_env()
    env["EDMSOUND_REEXEC"] = "1"
    sys.stdout.flush()
    sys.stderr.flush()
    head = [sys.executable, str(script)] if script else [sys.executable, "-m", "edmsound.cli"]
    os.execve(sys.executable, [*head, *argv], env)
