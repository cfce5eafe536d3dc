"""Generation pipeline on a tiny checkpoint trained in the test: NFE accounting, guidance, seeds, CLI."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from edmsound.core.guidance import GuidedDenoiser
from edmsound.core.pipeline import EDMSoundPipeline
from edmsound.core.samplers import SAMPLERS, get_sampler, steps_for_nfe
from edmsound.core.schedules import karras_sigmas

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("sampler", list(SAMPLERS))
@pytest.mark.parametrize("guidance", [0.0, 1.0, 2.5])
def test_nfe_counted_equals_request(pipe, sampler, guidance):
    for nfe in (1, 3, 5, 7):
        gen = pipe.generate("low", n=2, sampler=sampler, nfe=nfe, guidance=guidance, seed=1)
        assert gen.settings["nfe"] == nfe
        assert gen.waves.shape == (2, pipe.codec.num_samples) and np.isfinite(gen.waves).all()


def test_invalid_budgets_and_ranges_rejected(pipe):
    with pytest.raises(ValueError, match="nearest valid budgets: 9, 11"):
        pipe.generate("low", sampler="heun", nfe=10)
    with pytest.raises(ValueError, match=r"allowed \[1, 200\]"):
        pipe.generate("low", sampler="euler", nfe=0)
    with pytest.raises(ValueError, match=r"allowed \[0, 20\]"):
        pipe.generate("low", guidance=25)
    with pytest.raises(ValueError, match="unknown sampler 'dpm'.*euler"):
        pipe.generate("low", sampler="dpm")
    with pytest.raises(ValueError, match="valid: high, low"):
        pipe.generate("mid")
    with pytest.raises(ValueError, match=r"n must be in \[1, 64\]"):
        pipe.generate("low", n=0)


def test_guidance_one_is_conditional_sampling(pipe):
    gen = pipe.generate("high", n=2, sampler="dpmpp_2m", nfe=6, guidance=1.0, seed=3)
    # the same sampler run by hand on the conditional denoiser
    e = pipe.preset.edm
    sigmas = karras_sigmas(steps_for_nfe("dpmpp_2m", 6), e.sigma_min, e.sigma_max, e.rho)
    noise, _ = pipe.noise([3, 4])
    labels = torch.tensor([pipe.class_index("high")] * 2)
    with torch.no_grad():
        x = get_sampler("dpmpp_2m")(lambda x, s: pipe.model(x, s, labels), noise * float(sigmas[0]), sigmas)
    torch.testing.assert_close(gen.specs, x.float())


def test_guided_denoiser_formula_and_its_two_calls_on_a_cpu(pipe):
    calls = []
    model = pipe.model

    def spy(x, sigma, labels):
        calls.append(len(x))
        return model(x, sigma, labels)
    spy.null_class = model.null_class
    x = torch.randn(3, *pipe.codec.shape) * 0.5
    sigma = torch.full((3,), 0.3)
    labels = torch.tensor([0, 1, 0])
    with torch.no_grad():
        out = GuidedDenoiser(spy, labels, 3.0)(x, sigma)
        assert calls == [3, 3]                    # on a CPU the halves run as two calls (cheaper than one batch)
        cond = model(x, sigma, labels)
        uncond = model(x, sigma, None)
    torch.testing.assert_close(out, uncond + 3.0 * (cond - uncond), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(cond, uncond)


@pytest.mark.parametrize("sampler,options", [("deis", {}), ("edm_stochastic", {"S_churn": 5.0})])
def test_batch_reproduces_single_calls(pipe, sampler, options):
    nfe = 5
    batch = pipe.generate("low", n=3, sampler=sampler, nfe=nfe, guidance=2.0, seed=10, **options)
    # to rounding, relative to the peak: this untrained test model's guided clips reach ~10-100
    scale = max(1.0, float(np.abs(batch.waves).max()))
    for i in range(3):
        single = pipe.generate("low", n=1, sampler=sampler, nfe=nfe, guidance=2.0, seed=10 + i, **options)
        np.testing.assert_allclose(batch.waves[i], single.waves[0], atol=5e-4 * scale, rtol=0)
    other = pipe.generate("low", n=1, sampler=sampler, nfe=nfe, guidance=2.0, seed=99, **options)
    assert np.abs(other.waves[0] - batch.waves[0]).max() > 1e-3


def test_state_dtype_is_float_regardless_of_autocast(tiny_ckpt):
    p64 = EDMSoundPipeline(tiny_ckpt, device="cpu", dtype=torch.float64, bf16=True)
    seen = []
    p64.generate("low", n=1, sampler="euler", nfe=3, callback=lambda d: seen.append(d["x"].dtype))
    assert p64.model.autocast_dtype == torch.bfloat16
    assert seen and all(dt == torch.float64 for dt in seen)


def test_cli_generate_writes_wav_png_json(tiny_ckpt, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = tmp_path / "gen"
    r = subprocess.run([sys.executable, "-m", "edmsound.cli", "generate", "--checkpoint", str(tiny_ckpt),
                        "--class", "high", "--n", "2", "--sampler", "unipc", "--nfe", "4", "--guidance", "1.5",
                        "--seed", "7", "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    wavs = sorted(out.glob("*.wav"))
    assert [w.name for w in wavs] == ["high_unipc_nfe4_w1p5_seed7.wav", "high_unipc_nfe4_w1p5_seed8.wav"]
    for w in wavs:
        info = sf.info(str(w))
        assert info.samplerate == 8000 and info.subtype == "PCM_16" and info.frames == 2016
        assert w.with_suffix(".png").stat().st_size > 5000
        side = json.loads(w.with_suffix(".json").read_text())
        for key in ("class", "sampler", "nfe", "guidance", "seed", "sample_rate", "seconds", "checkpoint"):
            assert key in side
        assert side["nfe"] == 4 and side["class"] == "high" and side["sampler"] == "unipc"
    assert json.loads(wavs[1].with_suffix(".json").read_text())["seed"] == 8
    bad = subprocess.run([sys.executable, "-m", "edmsound.cli", "generate", "--checkpoint", str(tiny_ckpt),
                          "--class", "high", "--sampler", "heun", "--nfe", "4", "--out", str(out)],
                         env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "nearest valid budgets: 3, 5" in bad.stderr
    # each clip's level is printed and kept in its sidecar; nothing was normalised
    side = json.loads(wavs[0].with_suffix(".json").read_text())
    assert side["normalization"] is None and side["normalize"] is None
    assert f"{wavs[0].name}: " in r.stdout and "LUFS" in r.stdout and "dBTP" in r.stdout


def test_cli_generate_normalises_only_when_asked_and_records_it(tiny_ckpt, tmp_path):
    from edmsound.audio import loudness
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = tmp_path / "norm"
    r = subprocess.run([sys.executable, "-m", "edmsound.cli", "generate", "--checkpoint", str(tiny_ckpt),
                        "--class", "low", "--n", "2", "--sampler", "euler", "--nfe", "3", "--normalize-lufs", "-20",
                        "--no-figures", "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for w in sorted(out.glob("*.wav")):
        side = json.loads(w.with_suffix(".json").read_text())
        wave, sr = sf.read(str(w), dtype="float64")
        n = side["normalization"]
        assert side["normalize"] == {"mode": "lufs", "target": -20.0} and n["mode"] == "lufs"
        got = loudness.integrated_lufs(wave, sr)
        if n["limited_by"] is None:             # on target, or held at the -1 dBTP ceiling (and said so)
            assert got == pytest.approx(-20.0, abs=0.1)
        else:
            assert loudness.true_peak_dbtp(wave, sr) == pytest.approx(-1.0, abs=0.1) and got < -20.0
        assert side["level"]["lufs"] == pytest.approx(got, abs=0.1)
        assert n["after"]["lufs"] - n["before"]["lufs"] == pytest.approx(n["gain_db"], abs=0.02)
    for flag, value, msg in (("--normalize-lufs", "0", "a loudness in [-60, -5] LUFS"),
                             ("--normalize-peak", "3", "a peak level in [-60, 0] dBFS")):
        bad = subprocess.run([sys.executable, "-m", "edmsound.cli", "generate", "--checkpoint", str(tiny_ckpt),
                              "--class", "low", flag, value, "--out", str(out)], env=env, capture_output=True,
                             text=True, timeout=300)
        assert bad.returncode == 2 and msg in bad.stderr and "Traceback" not in bad.stderr


def test_float_wav_keeps_what_16_bit_clips(tiny_ckpt, tmp_path, capsys):
    import dataclasses
    from edmsound.audio import loudness
    from edmsound.cli import main
    from edmsound.core.pipeline import save_generation
    p = EDMSoundPipeline(tiny_ckpt, device="cpu")
    gen = p.generate("low", n=2, sampler="euler", nfe=3, seed=3)
    hot = gen.waves * (np.array([[2.0], [0.5]], np.float32) / np.abs(gen.waves).max(axis=1, keepdims=True))
    gen = dataclasses.replace(gen, waves=hot)               # clip 0 peaks at +6 dBFS, clip 1 at -6
    files = {fmt: save_generation(gen, tmp_path / fmt, p.codec, figures=False, fmt=fmt) for fmt in ("wav16", "wav32f")}
    for i, (w16, w32) in enumerate(zip(files["wav16"], files["wav32f"])):
        assert sf.info(str(w16)).subtype == "PCM_16" and sf.info(str(w32)).subtype == "FLOAT"
        x32, _ = sf.read(str(w32), dtype="float32")
        x16, _ = sf.read(str(w16), dtype="float32")
        np.testing.assert_array_equal(x32, hot[i])
        assert np.abs(x16).max() <= 1.0 and (np.abs(x16).max() < 0.51) == (i == 1)
        s16, s32 = (json.loads(w.with_suffix(".json").read_text()) for w in (w16, w32))
        assert s16["clipped"] == (i == 0) and s32["clipped"] is False
        assert (s16["format"], s32["format"]) == ("wav16", "wav32f") and s16["peak"] == pytest.approx(s32["peak"])
    with pytest.raises(ValueError, match="wav16, wav24, wav32f, flac"):
        save_generation(gen, tmp_path / "x", p.codec, figures=False, fmt="mp3")
    # the CLI writes the chosen format, and its level line says what the file holds
    main(["generate", "--checkpoint", str(tiny_ckpt), "--class", "low", "--n", "1", "--sampler", "euler", "--nfe",
          "3", "--seed", "3", "--format", "flac", "--no-figures", "--out", str(tmp_path / "cli")])
    (f,) = sorted((tmp_path / "cli").glob("*.flac"))
    assert sf.info(str(f)).format == "FLAC" and json.loads(f.with_suffix(".json").read_text())["file"] == f.name
    assert f"{f.name}: " in capsys.readouterr().out
    hot_level = loudness.measure(hot[0], p.sample_rate).to_dict()
    assert "kept in the 32-bit float file" in loudness.describe(hot_level, keeps_overs=True)


def test_cli_user_errors_are_one_line_and_tracebacks_only_on_request(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("EDMSOUND_DEBUG", None)
    cmd = [sys.executable, "-m", "edmsound.cli", "generate", "--checkpoint", str(tmp_path / "nope"), "--class", "x",
           "--out", str(tmp_path / "o")]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope'} is neither a model directory "
                                             "(config.json + ema.safetensors) nor a run directory with a checkpoint"]
    assert not (tmp_path / "o").exists()
    r = subprocess.run(cmd[:3] + ["--debug"] + cmd[3:], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" in r.stderr and "FileNotFoundError" in r.stderr
    r = subprocess.run(cmd, env=dict(env, EDMSOUND_DEBUG="1"), capture_output=True, text=True, timeout=120)
    assert "Traceback" in r.stderr


def test_variations_stay_near_the_source_at_low_strength_and_reproduce_alone(pipe):
    """SDEdit variations: strength 0.02 keeps the clip (the denoiser is near identity at sigma_min), strength
    1 moves far from it; the NFE budget is exact; variation i reproduces alone with seed + i."""
    import numpy as np
    src = pipe.generate(pipe.classes[0], n=1, sampler="euler", nfe=4, seed=3).waves[0]
    near = pipe.generate(pipe.classes[0], n=2, sampler="euler", nfe=4, seed=10, init=src, strength=0.02)
    far = pipe.generate(pipe.classes[0], n=2, sampler="euler", nfe=4, seed=10, init=src, strength=1.0)
    assert near.settings["nfe"] == 4 and near.settings["variation"]["strength"] == 0.02

    def rel(a):
        return float(np.linalg.norm(a - src) / np.linalg.norm(src))
    assert max(rel(w) for w in near.waves) < 0.05
    assert min(rel(w) for w in far.waves) > 5 * max(rel(w) for w in near.waves)
    one = pipe.generate(pipe.classes[0], n=1, sampler="euler", nfe=4, seed=11, init=src, strength=0.02)
    assert np.allclose(one.waves[0], near.waves[1], atol=1e-4)
    with pytest.raises(ValueError, match=r"strength must be in \(0, 1\]"):
        pipe.generate(pipe.classes[0], init=src, strength=0.0)
    with pytest.raises(ValueError, match="both a source clip"):
        pipe.generate(pipe.classes[0], strength=0.5)


def test_cli_variations_of_a_file(tiny_ckpt, tmp_path, capsys):
    import json
    import numpy as np
    import soundfile as sf
    from edmsound.cli import main
    from edmsound.core.pipeline import EDMSoundPipeline
    p = EDMSoundPipeline(tiny_ckpt, device="cpu")
    src = tmp_path / "mine.flac"
    sf.write(src, 0.3 * np.sin(np.arange(p.codec.num_samples + 500) / 7).astype(np.float32), p.sample_rate)
    main(["generate", "--checkpoint", str(tiny_ckpt), "--class", p.classes[0], "--vary", str(src), "--strength",
          "0.3", "--n", "2", "--sampler", "euler", "--nfe", "3", "--out", str(tmp_path / "out"), "--no-figures"])
    sidecars = sorted((tmp_path / "out").glob("*.json"))
    assert len(sidecars) == 2
    side = json.loads(sidecars[0].read_text())
    assert side["variation"]["strength"] == 0.3 and side["nfe"] == 3
    for argv, msg in ((["--strength", "0.5"], "--strength goes with --vary"),
                      (["--vary", str(tmp_path / "missing.wav")], "unreadable"),
                      (["--vary", str(src), "--strength", "2"], "strength must be in (0, 1]")):
        with pytest.raises(SystemExit) as e:
            main(["generate", "--checkpoint", str(tiny_ckpt), "--class", p.classes[0], "--out",
                  str(tmp_path / "x"), "--no-figures"] + argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0]


def test_class_gains_are_divided_out_of_what_the_sampler_makes(tiny_ckpt):
    """Data N(0, v) per entry in every class's spectrogram is N(0, g_c^2 v) in the model's state of class c. With
    that state's exact (Gaussian) denoiser, the probability-flow ODE ends at the data's scale in every class only if
    the pipeline samples in the state and divides the class's gains out, as the training multiplied them in."""
    import dataclasses
    from edmsound.core.codec import make_codec
    pipe = EDMSoundPipeline(tiny_ckpt)
    F, v = pipe.codec.config.num_bins, 0.2 ** 2
    table = tuple(tuple([4.0 if c == 0 else 1.0] * F) for c in range(len(pipe.classes)))
    pipe.codec = make_codec(dataclasses.replace(pipe.codec.config, class_scale=table))

    def gaussian(x, sigma, labels):
        var = pipe.codec.class_gain(labels, x) ** 2 * v
        s2 = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1) ** 2
        return x * var / (var + s2)
    pipe.model = gaussian
    for c, name in enumerate(pipe.classes[:2]):
        specs, _, _ = pipe.sample_specs(name, list(range(8)), "heun", 39, 1.0)
        rms = float(specs.double().pow(2).mean().sqrt())
        assert abs(rms - 0.2) < 0.01, (name, rms)
    # a known region comes back exactly, in the spectrogram's own scale
    known = pipe.codec.encode(torch.randn(1, pipe.codec.num_samples, generator=torch.Generator().manual_seed(0)))
    keep = torch.zeros_like(known, dtype=torch.bool)
    keep[..., :8] = True
    out, _, _ = pipe.sample_specs(pipe.classes[0], [0], "euler", 4, 1.0, known=known, keep=keep)
    assert torch.equal(out[..., :8], known[..., :8])
