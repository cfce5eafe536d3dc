"""argparse value types shared by the command families: a bad value is one line naming what is allowed."""
from __future__ import annotations

import argparse
import math

from .. import PRECISIONS


def number(text: str, ok, need: str) -> float:
    """argparse type: ``float(text)`` if ``ok`` of it, else an error saying what was ``need``-ed."""
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not (math.isfinite(v) and ok(v)):
        raise argparse.ArgumentTypeError(f"must be {need}, got {text!r}")
    return v


def positive_steps(text: str) -> float:
    return number(text, lambda v: v > 0, "a number of steps > 0")


def positive_int(text: str) -> int:
    v = number(text, lambda v: v > 0 and v == int(v), "a whole number > 0")
    return int(v)


def non_negative_int(text: str) -> int:
    v = number(text, lambda v: v >= 0 and v == int(v), "a whole number >= 0")
    return int(v)


def finite(text: str) -> float:
    return number(text, lambda v: True, "a finite number")


def positive(text: str) -> float:
    return number(text, lambda v: v > 0, "a number > 0")


def non_negative(text: str) -> float:
    return number(text, lambda v: v >= 0, "a number >= 0")


def class_weight(text: str) -> tuple[str, float]:
    """argparse type: ``CLASS=W`` with W a number > 0."""
    name, sep, w = text.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"must be CLASS=W (a class name and a number > 0), got {text!r}")
    return name.strip(), number(w, lambda v: v > 0, "CLASS=W with W a number > 0")


def class_weights(pairs) -> dict[str, float] | None:
    """The repeated ``--class-weight`` values as ``{class: w}``; a class named twice is an error."""
    out: dict[str, float] = {}
    for name, w in pairs or ():
        if name in out:
            raise ValueError(f"--class-weight names {name!r} twice; give each class once")
        out[name] = w
    return out or None


def peak_target(text: str) -> float:
    return number(text, lambda v: -60 <= v <= 0, "a peak level in [-60, 0] dBFS")


def lufs_target(text: str) -> float:
    return number(text, lambda v: -60 <= v <= -5, "a loudness in [-60, -5] LUFS")


def set_threads(a) -> None:
    """Apply a command's ``--threads`` (if it has one and it is set) to torch."""
    if getattr(a, "threads", None):
        import torch
        torch.set_num_threads(int(a.threads))


def add_precision(p, note: str = "") -> None:
    """``--precision``: the network's arithmetic (see :func:`edmsound.core.model.resolve_bf16`)."""
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="the network's arithmetic (default auto: bf16 autocast where the hardware computes bfloat16, "
                        "e.g. AVX512-BF16/AMX CPUs and recent GPUs; fp32 where it would be emulated and several "
                        "times slower)" + (f"; {note}" if note else ""))
