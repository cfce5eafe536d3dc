"""What an evaluation sweep evaluates: its points (sampler, NFE, guidance scale or per-class scales, guidance
interval), the grid planner with its policy for budgets a sampler cannot spend, ``--points`` parsing, and the fixed
noise seeds every configuration shares."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ..core.presets import format_class_guidance

__all__ = ["SweepPoint", "CLASS_GUIDANCE", "plan_sweep", "parse_points", "noise_seed", "INVALID_NFE_POLICIES"]

INVALID_NFE_POLICIES = ("nearest", "skip")


CLASS_GUIDANCE = "class"     # the guidance of a point that uses the checkpoint's per-class default scales


@dataclass(frozen=True)
class SweepPoint:
    sampler: str
    nfe: int                 # the budget actually spent (counted by the pipeline)
    guidance: float | str    # a scale, or CLASS_GUIDANCE: each class at its own scale (class_guidance)
    requested_nfe: int
    interval: tuple[float, float] | None = None   # guidance only for lo < sigma <= hi (None: every sigma)
    class_guidance: tuple[tuple[str, float], ...] | None = None   # ((class, w), ...) when guidance == "class"
    # classes guided in their own interval ((class, (lo, hi) | None), ...) when guidance == "class"; the others
    # use ``interval``
    class_intervals: tuple[tuple[str, tuple[float, float] | None], ...] | None = None

    def guidance_for(self, class_name: str) -> float:
        if self.guidance == CLASS_GUIDANCE:
            return dict(self.class_guidance)[class_name]
        return float(self.guidance)

    def interval_for(self, class_name: str) -> tuple[float, float] | None:
        own = dict(self.class_intervals or ())
        return own[class_name] if class_name in own else self.interval

    @property
    def class_guidance_text(self) -> str:
        """``""`` or ``"dog_bark=3 gunshot=1 moving_motor_vehicle=4@2:10 ..."`` (the per-class scales, and
        intervals where a class has its own, of a CLASS_GUIDANCE point)."""
        return format_class_guidance(self.class_guidance, self.class_intervals)

    @property
    def guided(self) -> bool:
        """Whether any class runs guided (two-pass) evaluations."""
        ws = [w for _, w in self.class_guidance] if self.guidance == CLASS_GUIDANCE else [self.guidance]
        return any(w not in (0.0, 1.0) for w in ws)

    @property
    def key(self) -> str:
        if self.guidance == CLASS_GUIDANCE:
            g = "cls-" + "-".join(f"{w:g}".replace(".", "p") for _, w in self.class_guidance)
        else:
            g = f"{self.guidance:g}".replace(".", "p")
        key = f"{self.sampler}_nfe{self.nfe}_w{g}"
        if self.interval is not None:
            key += "_i" + "-".join(f"{v:g}".replace(".", "p") for v in self.interval)
        if self.class_intervals:
            key += "_ci" + hashlib.sha1(self.class_guidance_text.encode()).hexdigest()[:8]
        return key

    @property
    def interval_text(self) -> str:
        """``""`` or ``"LO:HI"`` (the --points syntax)."""
        from ..core.guidance import interval_text
        return interval_text(self.interval)


def _nearest_valid_nfe(sampler: str, nfe: int) -> int:
    from ..core.samplers import valid_nfes
    valid = valid_nfes(sampler, max(nfe + 3, 4))
    return min(valid, key=lambda v: (abs(v - nfe), v))          # ties: the lower budget


def plan_sweep(samplers, nfes, guidances, invalid_nfe: str = "nearest",
               extra_points=(), guidance_interval=None, class_guidance=None,
               class_intervals=None) -> tuple[list[SweepPoint], list[str]]:
    """The configurations to evaluate and notes about (sampler, NFE) pairs that were remapped or skipped.

    The grid samplers x nfes x guidances (any of the three may be empty for no grid) followed by
    ``extra_points``, explicit ``(sampler, nfe, guidance)`` triples (e.g. one expensive reference such as Heun at
    NFE 51 without crossing it with everything else) or ``(sampler, nfe, guidance, (lo, hi))`` with a guidance
    interval. ``guidance_interval`` applies to the guided grid points (w != 1; it is meaningless at w = 1).
    A point's guidance may be ``"class"``: every class at its own scale from ``class_guidance`` (((class, w), ...),
    the checkpoint's calibrated per-class defaults), with the interval applied to the guided classes except those
    in ``class_intervals`` (((class, (lo, hi) | None), ...): classes calibrated with their own interval).
    Invalid pairs (e.g. ``heun`` with an even NFE) are mapped to the nearest valid budget (ties: the lower) with ``invalid_nfe="nearest"``, or dropped with ``"skip"``.
    Duplicates are removed, order is kept."""
    from ..core.guidance import check_guidance, check_guidance_interval
    from ..core.pipeline import MAX_NFE
    from ..core.samplers import get_sampler, steps_for_nfe
    if invalid_nfe not in INVALID_NFE_POLICIES:
        raise ValueError(f"invalid_nfe must be one of {', '.join(INVALID_NFE_POLICIES)}, got {invalid_nfe!r}")
    samplers, nfes, guidances = list(samplers), list(nfes), list(guidances)
    extra_points = [tuple(p) for p in extra_points]
    grid = bool(samplers and nfes and guidances)
    if not grid and not extra_points:
        raise ValueError("need at least one sampler, one NFE and one guidance scale (or explicit points)")
    for p in extra_points:
        if len(p) not in (3, 4):
            raise ValueError(f"a point is (sampler, nfe, guidance) or (sampler, nfe, guidance, (lo, hi)), got {p!r}")
    grid_interval = check_guidance_interval(guidance_interval)

    def interval_for(g, interval):
        return None if g == 1.0 else interval

    def check_nfe(n):
        if isinstance(n, bool) or int(n) != n or not 1 <= int(n) <= MAX_NFE:
            raise ValueError(f"NFE must be an integer in [1, {MAX_NFE}], got {n!r}")
        return int(n)

    requests = []                                 # (sampler, requested NFE, guidance, interval), in order
    if grid:
        for s in samplers:
            get_sampler(s)                                # ValueError naming the valid samplers
        checked = [check_nfe(n) for n in nfes]
        gs = [check_guidance(g) for g in guidances]
        requests += [(s, n, g, interval_for(g, grid_interval)) for s in samplers for n in checked for g in gs]
    for p in extra_points:
        s, n, g = p[:3]
        get_sampler(s)
        iv = check_guidance_interval(p[3] if len(p) == 4 else None)
        if g == CLASS_GUIDANCE:
            if not class_guidance:
                raise ValueError("a point with guidance 'class' needs per-class guidance scales; this checkpoint has "
                                 "none (set them with 'edmsound calibrate-guidance --write')")
            requests.append((s, check_nfe(n), g, iv))
            continue
        g = check_guidance(g)
        requests.append((s, check_nfe(n), g, interval_for(g, iv)))

    points, notes, seen, noted = [], [], set(), set()
    for s, n, g, iv in requests:
        actual = n
        try:
            steps_for_nfe(s, n)
        except ValueError:
            why = (f"{s}: NFE {n} is not a valid budget (Heun-type samplers spend 2*steps-1 evaluations, i.e. "
                   "odd budgets); ")
            if invalid_nfe == "skip":
                note = why + "skipped"
                actual = None
            else:
                actual = _nearest_valid_nfe(s, n)
                note = why + f"using NFE {actual}"
            if note not in noted:
                noted.add(note)
                notes.append(note)
            if actual is None:
                continue
        if (s, actual, g, iv) in seen:
            continue
        seen.add((s, actual, g, iv))
        per_class = g == CLASS_GUIDANCE
        points.append(SweepPoint(s, actual, g, n, iv, tuple(class_guidance) if per_class else None,
                                 tuple(class_intervals) if per_class and class_intervals else None))
    return points, notes


def parse_points(text: str) -> list[tuple]:
    """``"heun:51:2,dpmpp_2m:10:4:0.05:1"`` -> ``[("heun", 51, 2.0), ("dpmpp_2m", 10, 4.0, (0.05, 1.0))]``
    (the optional LO:HI is a guidance interval of noise levels). GUIDANCE may be ``class``: the checkpoint's
    per-class default scales."""
    out = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        parts = item.split(":")
        if len(parts) not in (3, 5):
            raise ValueError(f"a point is SAMPLER:NFE:GUIDANCE[:SIGMA_LO:SIGMA_HI] (e.g. heun:51:2 or "
                             f"dpmpp_2m:10:3:0.05:1), got {item!r}")
        try:
            g = parts[2].strip().lower()
            point = (parts[0], int(parts[1]), CLASS_GUIDANCE if g == CLASS_GUIDANCE else float(g))
            if len(parts) == 5:
                point += ((float(parts[3]), float(parts[4])),)
        except ValueError:
            raise ValueError(f"a point is SAMPLER:NFE:GUIDANCE[:SIGMA_LO:SIGMA_HI] with an integer NFE, a guidance "
                             f"scale or 'class', and numbers, got {item!r}") from None
        out.append(point)
    return out


def noise_seed(seed: int, class_index: int, i: int) -> int:
    """Noise seed of clip ``i`` of the class at ``class_index`` (the same for every configuration)."""
    if not 0 <= i < 100_000 or not 0 <= class_index < 10:
        raise ValueError(f"need 0 <= i < 100000 and 0 <= class_index < 10, got i={i}, class_index={class_index}")
    return int(seed) * 1_000_000 + int(class_index) * 100_000 + int(i)


