import math

import pytest

from edmsound import EDMSoundPipeline
from edmsound.evaluation.timing import seconds_per_clip


def test_side_by_side_timing_calls_every_setting_in_turn_and_reduces_per_setting(tiny_ckpt):
    pipe = EDMSoundPipeline(tiny_ckpt, device="cpu")
    cls = pipe.classes[0]
    order = []

    def calls_of(name, nfe):
        return (pipe, cls, {"sampler": "euler", "nfe": nfe,
                            "callback": lambda info: order.append(name) if info["i"] == 0 else None})

    calls = {"one": calls_of("one", 1), "three": calls_of("three", 3)}
    best = seconds_per_clip(calls, n=2, rounds=3)
    assert list(best) == ["one", "three"] and all(math.isfinite(v) and v > 0 for v in best.values())
    # one warm-up each, then three rounds that alternate (batches of 2 clips: one sampler run per call)
    assert order == ["one", "three"] * 4
    order.clear()
    med = seconds_per_clip(calls, n=2, rounds=3, statistic="median")
    assert order == ["one", "three"] * 4 and all(math.isfinite(v) and v > 0 for v in med.values())
    with pytest.raises(ValueError, match="statistic must be one of"):
        seconds_per_clip(calls, statistic="mean")
