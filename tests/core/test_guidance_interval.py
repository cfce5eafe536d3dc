"""Guidance in a limited noise interval (Kynkäänniemi et al. 2024): exact checks on a class-conditional
Gaussian mixture, then the pipeline / CLI / export on a tiny trained checkpoint."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edmsound.core.guidance import GuidedDenoiser, check_guidance_interval, format_guidance_interval
from edmsound.core.pipeline import EDMSoundPipeline
from edmsound.core.presets import Preset
from edmsound.core.samplers import get_sampler, steps_for_nfe
from edmsound.core.schedules import karras_sigmas
from edmsound.core.analytic import ClassConditionalMixture, GaussianMixture

ROOT = Path(__file__).resolve().parents[2]


def two_class_mixture():
    # class 0: two equally likely modes at -0.3 and +0.3; class 1: one mode at +0.4, next to class 0's right mode
    a = GaussianMixture([0.5, 0.5], [[-0.3], [0.3]], [0.03 ** 2, 0.03 ** 2])
    b = GaussianMixture([1.0], [[0.4]], [0.03 ** 2])
    return ClassConditionalMixture([a, b], [0.5, 0.5])


# ------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("value,expected", [(None, None), ("none", None), ("", None), ("0.05,1", (0.05, 1.0)),
                                            (" 0 2.5 ", (0.0, 2.5)), ((0.1, float("inf")), (0.1, float("inf"))),
                                            ([0, 3], (0.0, 3.0))])
def test_interval_parsing(value, expected):
    assert check_guidance_interval(value) == expected


@pytest.mark.parametrize("bad,msg", [((1.0, 0.5), "0 <= lo < hi"), ((0.2, 0.2), "0 <= lo < hi"),
                                     ((-0.1, 1), "0 <= lo < hi"), ("a,b", "LO,HI"), ((1, 2, 3), "two noise levels"),
                                     ("0.5", "two noise levels"), ((float("nan"), 1), "0 <= lo < hi")])
def test_interval_rejects_bad_values(bad, msg):
    with pytest.raises(ValueError, match=msg):
        check_guidance_interval(bad)


def test_format():
    assert format_guidance_interval(None) == "all σ"
    assert format_guidance_interval((0.05, 1.0)) == "σ ∈ (0.05, 1]"


# ------------------------------------------------------------------------------------------ exact denoiser
def test_guided_inside_conditional_outside_exact():
    m = two_class_mixture()
    x = torch.linspace(-1, 1, 9, dtype=torch.float64)[:, None]
    labels = torch.zeros(9, dtype=torch.long)
    den = GuidedDenoiser(m, labels, 3.0, (0.05, 0.5))
    for s, inside in [(0.05, False), (0.0500001, True), (0.2, True), (0.5, True), (0.51, False), (2.0, False)]:
        sigma = torch.full((9,), s, dtype=torch.float64)
        cond, uncond = m(x, sigma, labels), m(x, sigma, None)
        want = uncond + 3.0 * (cond - uncond) if inside else cond
        torch.testing.assert_close(den(x, sigma), want, rtol=0, atol=1e-12)
    assert (den.guided_calls, den.plain_calls) == (3, 3)
    assert not torch.allclose(m(x, torch.full((9,), 0.2, dtype=torch.float64), labels),
                              m(x, torch.full((9,), 0.2, dtype=torch.float64), None))   # guidance changes D there


def test_mixed_noise_levels_in_one_batch_are_handled_per_sample():
    m = two_class_mixture()
    x = torch.tensor([[0.2], [0.35], [-0.1], [0.5]], dtype=torch.float64)
    sigma = torch.tensor([0.01, 0.2, 1.0, 0.3], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1, 0])
    out = GuidedDenoiser(m, labels, 2.0, (0.1, 0.5))(x, sigma)
    cond, uncond = m(x, sigma, labels), m(x, sigma, None)
    inside = torch.tensor([False, True, False, True])[:, None]
    torch.testing.assert_close(out, torch.where(inside, uncond + 2.0 * (cond - uncond), cond), rtol=0, atol=1e-12)
    # the conditional half is computed once: two network passes for the guided scale, two for w 0 as well
    calls = []

    class Counting:
        null_class = m.null_class

        def __call__(self, *args):
            calls.append(args[2])
            return m(*args)

    for w in (2.0, 0.0):
        calls.clear()
        GuidedDenoiser(Counting(), labels, w, (0.1, 0.5))(x, sigma)
        assert len(calls) == 2


def test_no_interval_is_plain_guidance_and_w1_never_guides():
    m = two_class_mixture()
    x = torch.randn(5, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    sigma = torch.full((5,), 0.3, dtype=torch.float64)
    labels = torch.zeros(5, dtype=torch.long)
    cond, uncond = m(x, sigma, labels), m(x, sigma, None)
    torch.testing.assert_close(GuidedDenoiser(m, labels, 2.5)(x, sigma), uncond + 2.5 * (cond - uncond))
    d1 = GuidedDenoiser(m, labels, 1.0, (0.0, 10.0))
    torch.testing.assert_close(d1(x, sigma), cond)
    assert (d1.guided_calls, d1.plain_calls) == (0, 1)


def _mode_share(w, interval, n=4000):
    """Share of class-0 samples that land in its right-hand mode (+0.3; the true share is 0.5)."""
    m = two_class_mixture()
    x0 = torch.randn(n, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sig = karras_sigmas(40, 1e-4, 3.0, 9.0)
    den = GuidedDenoiser(m, torch.zeros(n, dtype=torch.long), w, interval)
    x = get_sampler("dpmpp_2m")(den, x0 * float(sig[0]), sig)
    right = float(((x - 0.3).abs() < 0.1).double().mean())
    on_modes = float((((x - 0.3).abs() < 0.1) | ((x + 0.3).abs() < 0.1)).double().mean())
    return right, on_modes, den


def test_guidance_at_high_noise_collapses_modes_and_an_interval_keeps_them():
    """The point of the interval: strong guidance at every sigma drives class-0 samples away from the mode that
    borders class 1 (share 0.5 -> ~0.05); guidance only at low sigma keeps the exact share while every sample
    still lands on a class-0 mode, and skips the unconditional half where it is not applied."""
    exact, on0, _ = _mode_share(1.0, None)
    full, _, d_full = _mode_share(4.0, None)
    low, on_low, d_low = _mode_share(4.0, (0.0, 0.02))
    high, _, _ = _mode_share(4.0, (0.3, 10.0))
    assert abs(exact - 0.5) < 0.03 and on0 > 0.99             # conditional sampling is right
    assert full < 0.15                                        # mode collapse under full guidance
    assert high < 0.2                                         # ... and it is the high-sigma part that does it
    assert abs(low - 0.5) < 0.03 and on_low > 0.99
    assert d_full.guided_calls == 40 and d_full.plain_calls == 0
    sig = karras_sigmas(40, 1e-4, 3.0, 9.0)[:-1]
    assert d_low.guided_calls == int(((sig > 0) & (sig <= 0.02)).sum()) and d_low.guided_calls + d_low.plain_calls == 40


# ------------------------------------------------------------------------------------------ pipeline
def _sigmas(pipe, sampler, nfe):
    e = pipe.preset.edm
    return karras_sigmas(steps_for_nfe(sampler, nfe), e.sigma_min, e.sigma_max, e.rho)


def test_pipeline_interval_limits(pipe):
    kw = dict(n=2, sampler="dpmpp_2m", nfe=6, seed=4)
    plain = pipe.generate("low", guidance=2.0, guidance_interval=None, **kw)
    every = pipe.generate("low", guidance=2.0, guidance_interval=(0.0, float("inf")), **kw)
    never = pipe.generate("low", guidance=2.0, guidance_interval=(50.0, 60.0), **kw)
    cond = pipe.generate("low", guidance=1.0, **kw)
    torch.testing.assert_close(every.specs, plain.specs)
    torch.testing.assert_close(never.specs, cond.specs)
    assert not torch.allclose(plain.specs, cond.specs)
    assert (plain.settings["guided_nfe"], never.settings["guided_nfe"]) == (6, 0)
    assert never.settings["guidance_interval"] == [50.0, 60.0] and plain.settings["guidance_interval"] is None


@pytest.mark.parametrize("sampler,nfe", [("dpmpp_2m", 8), ("heun", 7), ("deis", 6)])
def test_pipeline_counts_guided_evaluations(pipe, sampler, nfe):
    lo, hi = 0.01, 0.5
    gen = pipe.generate("high", n=1, sampler=sampler, nfe=nfe, guidance=3.0, guidance_interval=f"{lo},{hi}", seed=0)
    assert gen.settings["nfe"] == nfe
    sig = _sigmas(pipe, sampler, nfe)
    if sampler == "heun":         # evaluations at sigma_i for every step, plus at sigma_{i+1} > 0 (corrector)
        levels = [float(s) for s in sig[:-1]] + [float(s) for s in sig[1:-1]]
    else:
        levels = [float(s) for s in sig[:-1]]
    want = sum(lo < s <= hi for s in levels)
    assert 0 < want < nfe and gen.settings["guided_nfe"] == want


def test_pipeline_uses_the_preset_default_interval(tiny_ckpt, tmp_path):
    import dataclasses
    from edmsound.core.storage import read_config, write_model_dir, load_safetensors
    preset, classes = read_config(tiny_ckpt)
    assert preset.default_guidance_interval is None
    p2 = dataclasses.replace(preset, default_guidance_interval=(0.01, 0.5))
    assert Preset.from_dict(json.loads(json.dumps(p2.to_dict()))) == p2       # round trip through JSON
    write_model_dir(tmp_path / "m", p2, classes, load_safetensors(tiny_ckpt / "ema.safetensors"))
    pipe = EDMSoundPipeline(tmp_path / "m", device="cpu")
    kw = dict(n=1, sampler="dpmpp_2m", nfe=6, guidance=2.0, seed=1)
    default = pipe.generate("low", **kw)
    explicit = pipe.generate("low", guidance_interval=(0.01, 0.5), **kw)
    everywhere = pipe.generate("low", guidance_interval="none", **kw)
    assert default.settings["guidance_interval"] == [0.01, 0.5]
    torch.testing.assert_close(default.specs, explicit.specs)
    assert not torch.allclose(default.specs, everywhere.specs)
    with pytest.raises(ValueError, match="0 <= lo < hi"):
        pipe.generate("low", guidance_interval=(1.0, 0.1), **kw)


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "edmsound.cli", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


def test_cli_export_and_generate_with_interval(tiny_ckpt, tmp_path):
    r = _cli("export", "--run", str(tiny_ckpt), "--out", str(tmp_path / "m"), "--guidance", "2.5",
             "--guidance-interval", "0.01,0.5")
    assert r.returncode == 0, r.stderr
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["preset"]["default_guidance_interval"] == [0.01, 0.5]
    r = _cli("export", "--run", str(tiny_ckpt), "--out", str(tmp_path / "bad"), "--guidance-interval", "0.5,0.1")
    assert r.returncode == 2 and "0 <= lo < hi" in r.stderr and not (tmp_path / "bad").exists()
    r = _cli("generate", "--checkpoint", str(tmp_path / "m"), "--class", "low", "--nfe", "6", "--out",
             str(tmp_path / "out"), "--no-figures")
    assert r.returncode == 0, r.stderr
    assert "σ ∈ (0.01, 0.5]" in r.stdout
    meta = json.loads(next((tmp_path / "out").glob("*.json")).read_text())
    assert meta["guidance_interval"] == [0.01, 0.5] and 0 < meta["guided_nfe"] < 6
    r = _cli("generate", "--checkpoint", str(tmp_path / "m"), "--class", "low", "--nfe", "6", "--out",
             str(tmp_path / "out2"), "--no-figures", "--guidance-interval", "none")
    assert r.returncode == 0 and "all σ" in r.stdout
    r = _cli("generate", "--checkpoint", str(tmp_path / "m"), "--class", "low", "--out", str(tmp_path / "o3"),
             "--guidance-interval", "x")
    assert r.returncode == 2 and "LO,HI" in r.stderr


def test_per_class_intervals_round_trip_and_drive_pipeline_service_and_app(tiny_ckpt, tmp_path):
    """A class with its own guidance interval (calibrate-guidance --intervals): the preset stores it, the
    pipeline, service and the app's guidance note use it by default, an explicit interval still wins."""
    from edmsound.app.ui import guidance_info
    from edmsound.evaluation.calibrate import write_class_guidance
    from edmsound.core.storage import load_safetensors, read_config, write_model_dir
    from edmsound.core.presets import format_class_guidance
    from edmsound.app.service import EDMSoundService
    preset, classes = read_config(tiny_ckpt)
    write_model_dir(tmp_path / "m", preset, classes, load_safetensors(tiny_ckpt / "ema.safetensors"))
    write_class_guidance(tmp_path / "m", {"low": 2.0, "high": 2.0}, {"high": (1.0, 10.0)})
    p2, _ = read_config(tmp_path / "m")
    assert p2.guidance_interval_for("high") == (1.0, 10.0) and p2.guidance_interval_for("low") is None
    assert Preset.from_dict(json.loads(json.dumps(p2.to_dict()))) == p2
    assert p2.class_intervals(["low", "high"]) == (("high", (1.0, 10.0)),)
    assert format_class_guidance(p2.class_scales(classes), p2.class_intervals(classes)) in (
        "high=2@1:10 low=2", "low=2 high=2@1:10")
    with pytest.raises(ValueError, match="not in the checkpoint"):
        write_class_guidance(tmp_path / "m", {"low": 2.0}, {"nope": (1.0, 10.0)})
    with pytest.raises(ValueError, match="0 <= lo < hi"):
        write_class_guidance(tmp_path / "m", {"low": 2.0}, {"low": (3.0, 1.0)})

    pipe = EDMSoundPipeline(tmp_path / "m", device="cpu")
    kw = dict(n=1, sampler="dpmpp_2m", nfe=6, seed=2)
    high, low = pipe.generate("high", **kw), pipe.generate("low", **kw)
    sig = [float(s) for s in _sigmas(pipe, "dpmpp_2m", 6)[:-1]]
    assert high.settings["guidance_interval"] == [1.0, 10.0] and low.settings["guidance_interval"] is None
    assert high.settings["guided_nfe"] == sum(1.0 < s <= 10.0 for s in sig) < low.settings["guided_nfe"] == 6
    torch.testing.assert_close(high.specs, pipe.generate("high", guidance_interval=(1.0, 10.0), **kw).specs)
    assert not torch.allclose(high.specs, pipe.generate("high", guidance_interval=None, **kw).specs)

    svc = EDMSoundService(pipe, index=None)
    d = svc.defaults
    assert d["class_guidance_interval"] == {"low": None, "high": [1.0, 10.0]}
    r = svc.generate("high", seed=2, nfe=6, write_files=False)
    assert r.settings["guidance_interval"] == [1.0, 10.0]
    c = svc.compare("high", seed=2, nfe=6, samplers=["dpmpp_2m"], write_files=False)
    assert c.settings["guidance_interval"] == [1.0, 10.0] and c.settings["guidance"] == 2.0
    assert "σ ∈ (1, 10]" in guidance_info(d, "high") and "σ" not in guidance_info(d, "low")
    assert "the default follows the class" in guidance_info(d, "low")
    svc.close()
    write_class_guidance(tmp_path / "m", None, {"high": (1.0, 10.0)})        # clearing clears both
    p3, _ = read_config(tmp_path / "m")
    assert p3.default_class_guidance is None and p3.default_class_guidance_interval is None


def test_speed_benchmark_times_the_class_with_the_most_guided_evaluations(tiny_ckpt, tmp_path):
    """benchmarks/samplers.py --shipped-only must time the slowest class: with per-class intervals that is the
    one with the most guided (two-pass) evaluations, not the one with the largest scale."""
    import importlib.util

    from edmsound.evaluation.calibrate import write_class_guidance
    from edmsound.core.storage import load_safetensors, read_config, write_model_dir
    spec = importlib.util.spec_from_file_location("bench_samplers", ROOT / "benchmarks" / "samplers.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    preset, classes = read_config(tiny_ckpt)
    write_model_dir(tmp_path / "m", preset, classes, load_safetensors(tiny_ckpt / "ema.safetensors"))
    write_class_guidance(tmp_path / "m", {"low": 2.0, "high": 6.0}, {"high": (1.0, 10.0)})
    pipe = EDMSoundPipeline(tmp_path / "m", device="cpu")
    assert bench.slowest_class(pipe) == "low"              # w 2 at every sigma beats w 6 at the top levels only
    rec = bench.shipped_timing(pipe, repeats=2)
    assert rec["class"] == "low" and rec["guided_nfe"] == preset.default_nfe and rec["base_guidance_interval"] is None
    assert rec["class_guidance"] == "high=6@1:10 low=2" and rec["median_sec_per_clip"] > 0


def test_side_by_side_timing_names_each_models_weights_and_settings(tiny_ckpt, tmp_path):
    """benchmarks/samplers.py --versus records every model's EMA sha256 and shipped guidance, so the quality report
    reads the evaluated weights' row out of it (and no other model's)."""
    import hashlib
    import importlib.util

    from edmsound.evaluation.quality import speed_for_weights
    from edmsound.evaluation.calibrate import write_class_guidance
    from edmsound.core.storage import load_safetensors, read_config, write_model_dir
    spec = importlib.util.spec_from_file_location("bench_samplers", ROOT / "benchmarks" / "samplers.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    preset, classes = read_config(tiny_ckpt)
    w = load_safetensors(tiny_ckpt / "ema.safetensors")
    write_model_dir(tmp_path / "m", preset, classes, {k: v * 1.001 for k, v in w.items()})
    write_class_guidance(tmp_path / "m", {"low": 2.0, "high": 1.0}, {})
    bench.compare_shipped([str(tiny_ckpt), str(tmp_path / "m")], ["old", "new"], 1, tmp_path / "out")
    record = json.loads((tmp_path / "out" / "samplers_shipped_compare.json").read_text())
    shas = [hashlib.sha256((d / "ema.safetensors").read_bytes()).hexdigest() for d in (tiny_ckpt, tmp_path / "m")]
    assert [r["ema_sha256"] for r in record["rows"]] == shas and shas[0] != shas[1]
    assert record["rows"][1]["class_guidance"] == "high=1 low=2" and record["rows"][0]["class_guidance"] is None
    view, why = speed_for_weights(record, shas[1])
    assert why == "" and view["label"] == "new" and view["median_sec_per_clip"] == record["rows"][1]["median_all_classes"]
    assert view["versus"]["ratio"] == pytest.approx(record["rows"][1]["median_all_classes"]
                                                    / record["rows"][0]["median_all_classes"])
    assert speed_for_weights(record, shas[0])[0]["versus"] is None        # the first row is the yardstick itself
    assert speed_for_weights(record, "f" * 64)[0] is None


def test_set_guidance_stores_one_classs_scale_and_interval_and_keeps_the_others(tiny_ckpt, tmp_path, capsys):
    """edmsound set-guidance: a hand-chosen scale (and interval) for one class, merged into the model's own per-class
    guidance; bad input is one line and changes nothing."""
    from edmsound.cli import main
    from edmsound.core.storage import load_safetensors, read_config, write_model_dir
    from edmsound.evaluation.calibrate import write_class_guidance
    preset, classes = read_config(tiny_ckpt)
    m = tmp_path / "m"
    write_model_dir(m, preset, classes, load_safetensors(tiny_ckpt / "ema.safetensors"))
    write_class_guidance(m, {"low": 1.5}, {"low": (0.5, 3.0)})
    main(["set-guidance", "--checkpoint", str(m), "--class", "high", "--scale", "2", "--interval", "8,20"])
    assert "high: guidance 2 (8 < sigma <= 20)" in capsys.readouterr().out
    p, _ = read_config(m)
    assert p.guidance_for("high") == 2.0 and p.guidance_interval_for("high") == (8.0, 20.0)
    assert p.guidance_for("low") == 1.5 and p.guidance_interval_for("low") == (0.5, 3.0)      # kept
    main(["set-guidance", "--checkpoint", str(m), "--class", "low", "--scale", "1"])              # interval kept
    p, _ = read_config(m)
    assert p.guidance_for("low") == 1.0 and p.guidance_interval_for("low") == (0.5, 3.0)
    main(["set-guidance", "--checkpoint", str(m), "--class", "high", "--scale", "2", "--interval", "none"])
    p, _ = read_config(m)
    assert p.guidance_interval_for("high") is None                                              # every level
    before = (m / "config.json").read_text()
    for argv, msg in ((["--class", "nope", "--scale", "2"], f"unknown class 'nope'; valid: {', '.join(classes)}"),
                      (["--class", "low", "--scale", "-1"], "guidance"),
                      (["--class", "low", "--scale", "2", "--interval", "3,1"], "0 <= lo < hi")):
        with pytest.raises(SystemExit) as e:
            main(["set-guidance", "--checkpoint", str(m)] + argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], err
    assert (m / "config.json").read_text() == before
