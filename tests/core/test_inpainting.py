"""Region regeneration, longer clips and loops: the window plan, the kept region held exactly, NFE budgets."""
import numpy as np
import pytest
import torch

from edmsound.core.inpainting import KnownRegionDenoiser, TiledDenoiser, bin_span, frame_span, tile_starts
from edmsound.core.samplers import SAMPLERS

DETERMINISTIC = [s for s in SAMPLERS if s != "edm_stochastic"]


def _src(pipe, seconds=None, seed=0):
    n = pipe.codec.num_samples if seconds is None else int(seconds * pipe.sample_rate)
    t = np.arange(n) / pipe.sample_rate
    rng = np.random.default_rng(seed)
    return (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(n)).astype(np.float32)


def test_frame_span_is_every_frame_whose_window_touches_the_span():
    sr, hop, n_fft, N = 16000, 128, 254, 200
    for a, b in [(0.1, 0.2), (0.0, 0.05), (0.33, 1.5), (0.008, 0.008 + 1 / sr)]:
        fa, fb = frame_span(a, b, sr, hop, n_fft, N)
        for f in range(N):
            lo, hi = f * hop - n_fft / 2, f * hop + n_fft / 2        # the frame's window [lo, hi)
            touches = lo < b * sr and hi > a * sr
            assert (fa <= f < fb) == touches, (a, b, f)


def test_bin_span_covers_the_band():
    a, b = bin_span(2000, 4000, 16000, 128)
    step = 8000 / 127
    assert a * step <= 2000 and (b - 1) * step >= 4000 and (a + 1) * step > 2000 - step
    assert bin_span(None, None, 16000, 128) == (0, 128)


def test_tile_starts_cover_what_is_to_make():
    todo = np.zeros((3, 300), bool)
    todo[:, 100:300] = True
    todo[1, 20:30] = True
    starts = tile_starts(todo, width=64, stride=32)
    covered = np.zeros(300, bool)
    for s0 in starts:
        covered[s0:s0 + 64] = True
        assert todo[:, s0:s0 + 64].any()                              # no window without something to make
    assert covered[todo.any(0)].all() and starts[-1] == 300 - 64     # the last window is clamped to the end
    ring = tile_starts(np.ones((1, 100), bool), 64, 32, circular=True)
    assert ring == [0, 32, 64, 96]                                    # windows wrap around a loop
    with pytest.raises(ValueError, match="shorter than the model's window"):
        tile_starts(np.ones((1, 10), bool), 64, 32)


def test_tiled_denoiser_averages_overlapping_windows():
    """Windows that agree give back their common estimate exactly (the weights are normalised); where they
    disagree each frame is a weighted average, favouring the window whose centre is nearer; a ring wraps."""
    x = torch.randn(2, 2, 4, 100, dtype=torch.float64)
    calls = []

    def double(t, s):
        calls.append(t.shape[0])
        return 2 * t
    tiled = TiledDenoiser(double, [0, 18, 36], 64, 100, chunk=2)
    torch.testing.assert_close(tiled(x, torch.ones(2, dtype=torch.float64)), 2 * x)
    assert calls == [4, 2]                                            # windows evaluated in chunks, batch-major

    def which(t, s):                                                  # each window answers its own number
        k = t.shape[0] // 2
        return torch.arange(k, dtype=t.dtype).repeat_interleave(2)[:, None, None, None].expand_as(t).clone()
    out = TiledDenoiser(which, [0, 36], 64, 100)(x, torch.ones(2, dtype=torch.float64))
    assert torch.all(out[..., :36] == 0) and torch.all(out[..., 64:] == 1)      # one window only
    mid = out[0, 0, 0, 36:64]
    assert torch.all(torch.diff(mid) > 0) and 0 < mid[0] < 0.5 < mid[-1] < 1    # a smooth hand-over
    ring = TiledDenoiser(which, [0, 50], 64, 100, circular=True)(x, torch.ones(2, dtype=torch.float64))
    assert 0 < ring[0, 0, 0, 5] < 1                                   # frame 5 is seen by both (the second wraps)


@pytest.mark.parametrize("sampler", DETERMINISTIC)
def test_kept_entries_ride_their_own_noising_trajectory_and_come_back_exactly(pipe, sampler):
    """The replacement method: in the kept entries the state is known + sigma * noise at every step (the
    network sees the source at the right noise level), and the output there is the source bit for bit."""
    known = pipe.codec.encode(torch.from_numpy(_src(pipe)))
    keep = torch.zeros(1, 1, *known.shape[-2:], dtype=torch.bool)
    keep[..., :, : known.shape[-1] // 2] = True
    noise, _ = pipe.noise([5])
    seen = []

    def cb(info):
        seen.append((info["x"].clone(), info["sigma"]))
    out, count, _ = pipe.sample_specs(pipe.classes[0], [5], sampler, 5, 1.0, callback=cb, known=known, keep=keep)
    assert count == 5
    assert torch.equal(out[keep.expand_as(out)], known[keep.expand_as(known)])
    assert not torch.allclose(out[~keep.expand_as(out)], known[~keep.expand_as(known)])
    for x, sigma in seen:
        expect = known + sigma * noise
        torch.testing.assert_close(x[keep.expand_as(x)], expect[keep.expand_as(expect)].float(), rtol=1e-4,
                                   atol=1e-4 * max(1.0, sigma))


def test_known_region_denoiser_formula():
    known = torch.full((1, 2, 4, 4), 3.0)
    keep = torch.zeros(1, 1, 4, 4)
    keep[..., :2] = 1
    d = KnownRegionDenoiser(lambda x, s: x * 0 + 7.0, known, keep)
    out = d(torch.zeros(2, 2, 4, 4), torch.ones(2))
    assert torch.all(out[..., :2] == 3.0) and torch.all(out[..., 2:] == 7.0)


def test_regenerate_keeps_the_samples_outside_the_border(pipe):
    src = _src(pipe)
    sr, n_fft = pipe.sample_rate, pipe.codec.config.n_fft
    dur = len(src) / sr
    gen = pipe.regenerate(src, pipe.classes[0], 0.4 * dur, 0.6 * dur, n=2, seed=3, sampler="euler", nfe=4)
    a, b = int(0.4 * dur * sr) - n_fft, int(np.ceil(0.6 * dur * sr)) + n_fft
    outside = np.ones(len(src), bool)
    outside[a:b] = False
    assert gen.waves.shape == (2, len(src))
    assert np.abs(gen.waves[:, outside] - src[outside]).max() < 1e-5
    inside = slice(int(0.45 * dur * sr), int(0.55 * dur * sr))
    assert np.abs(gen.waves[:, inside] - src[inside]).max() > 1e-2
    s = gen.settings
    assert s["tool"] == "regen" and s["nfe"] == 4 and s["windows"] == 1 and "nfe_total" not in s
    assert s["kept_outside"][0] == pytest.approx(0.4 * dur - n_fft / sr)
    # a band only: the spectrogram outside the band (and outside the span) is the source's, exactly
    band = pipe.regenerate(src, pipe.classes[0], 0.0, dur, low_hz=1000, high_hz=2000, seed=1, sampler="euler", nfe=4)
    ba, bb = band.settings["bins"]
    ref = pipe.codec.encode(torch.from_numpy(src))
    assert torch.equal(band.specs[0, :, :ba], ref[0, :, :ba]) and torch.equal(band.specs[0, :, bb:], ref[0, :, bb:])
    assert not torch.equal(band.specs[0, :, ba:bb], ref[0, :, ba:bb])
    # batch item k reproduces alone with seed + k
    one = pipe.regenerate(src, pipe.classes[0], 0.4 * dur, 0.6 * dur, n=1, seed=4, sampler="euler", nfe=4)
    assert np.allclose(one.waves[0], gen.waves[1], atol=1e-4)


def test_regenerate_a_span_of_a_clip_longer_than_a_window(pipe):
    src = _src(pipe, seconds=4 * pipe.codec.num_samples / pipe.sample_rate, seed=1)
    dur = len(src) / pipe.sample_rate
    gen = pipe.regenerate(src, pipe.classes[1], 0.5 * dur, 0.55 * dur, seed=2, sampler="euler", nfe=3)
    lo, hi = gen.settings["kept_outside"]
    sr = pipe.sample_rate
    outside = np.ones(len(src), bool)
    outside[int(lo * sr):int(np.ceil(hi * sr))] = False
    assert np.abs(gen.waves[0, outside] - src[outside]).max() < 1e-5
    assert 1 <= gen.settings["windows"] <= 3                      # only the windows that see the span


def test_extend_continues_the_source_window_by_window(pipe):
    src = _src(pipe, seed=2)
    sr = pipe.sample_rate
    total = 3.5 * len(src) / sr
    gen = pipe.extend(src, pipe.classes[0], total, n=2, seed=6, sampler="dpmpp_2m", nfe=4)
    s = gen.settings
    assert gen.waves.shape == (2, int(round(total * sr))) and np.isfinite(gen.waves).all()
    keep = len(src) - pipe.codec.config.n_fft
    assert np.abs(gen.waves[:, :keep] - src[:keep]).max() < 1e-5
    assert s["tool"] == "extend" and s["nfe_total"] == s["windows"] * 4 and s["windows"] >= 5
    assert np.sqrt(np.mean(gen.waves[:, len(src) + 100:] ** 2)) > 1e-3          # it made something
    one = pipe.extend(src, pipe.classes[0], total, n=1, seed=7, sampler="dpmpp_2m", nfe=4)
    assert np.allclose(one.waves[0], gen.waves[1], atol=1e-4)
    long = pipe.generate_long(pipe.classes[1], total, seed=1, sampler="euler", nfe=2)
    assert long.settings["tool"] == "long" and long.waves.shape == (1, int(round(total * sr)))
    with pytest.raises(ValueError, match="already"):
        pipe.extend(np.tile(src, 3), pipe.classes[0], 2 * len(src) / sr)
    with pytest.raises(ValueError, match="between .* s \\(one model window\\) and 60 s"):
        pipe.generate_long(pipe.classes[0], 61)


def test_loop_wraps_without_a_seam_and_keeps_its_source_away_from_it(pipe):
    sr, hop = pipe.sample_rate, pipe.codec.config.hop_length
    W = pipe.window_frames
    gen = pipe.loop(pipe.classes[0], seconds=2 * W * hop / sr, n=1, seed=3, sampler="euler", nfe=4)
    assert gen.waves.shape == (1, 2 * W * hop) and gen.settings["tool"] == "loop"
    assert gen.settings["nfe_total"] == 4 * gen.settings["windows"]
    # a loop from a source: frames away from the wrap point are the source's; the wrap is remade
    src = _src(pipe, seconds=1.5 * W * hop / sr, seed=4)
    src[len(src) // 2:] *= 0.2                 # end and start differ in level: a seam a listener would hear
    lp = pipe.loop(pipe.classes[0], clip=src, seed=2, sampler="euler", nfe=4)
    w = lp.waves[0]
    period = len(w)
    assert period % hop == 0 and period <= len(src)
    seam = lp.settings["seam_frames"] * hop // 2 + pipe.codec.config.n_fft
    mid = slice(seam, period - seam)
    assert np.abs(w[mid] - src[:period][mid]).max() < 1e-5

    def step_db(x, at):
        n = sr // 50
        return abs(10 * np.log10(np.mean(x[at - n:at] ** 2) / np.mean(x[at:at + n] ** 2)))
    naive = np.tile(src[:period], 2)
    assert step_db(naive, period) > 10                           # the source looped as is jumps
    assert step_db(np.tile(w, 2), period) < 6                    # the remade wrap does not


def test_editing_rejects_bad_requests_with_one_line(pipe):
    src = _src(pipe)
    dur = len(src) / pipe.sample_rate
    for kwargs, msg in ((dict(start=0.5 * dur, end=0.2 * dur), "not inside the clip"),
                        (dict(start=0, end=2 * dur), "not inside the clip"),
                        (dict(start=0, end=dur / 2, low_hz=3000, high_hz=1000), "band"),
                        (dict(start=0, end=dur / 2, low_hz=0, high_hz=10 ** 6), "Nyquist")):
        with pytest.raises(ValueError, match=msg) as e:
            pipe.regenerate(src, pipe.classes[0], **kwargs)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="finite samples"):
        pipe.regenerate(np.full(100, np.nan, np.float32), pipe.classes[0], 0, 0.001)
    with pytest.raises(ValueError, match="loop length"):
        pipe.loop(pipe.classes[0], seconds=0.01)


def test_cli_tools_write_clips_with_their_settings(tiny_ckpt, tmp_path, capsys):
    import json
    import soundfile as sf
    from edmsound.cli import main
    from edmsound.core.pipeline import EDMSoundPipeline
    p = EDMSoundPipeline(tiny_ckpt, device="cpu")
    src = tmp_path / "mine.wav"
    sf.write(src, _src(p, seed=5), p.sample_rate)
    dur = p.codec.num_samples / p.sample_rate
    base = ["generate", "--checkpoint", str(tiny_ckpt), "--class", p.classes[0], "--sampler", "euler", "--nfe", "2",
            "--no-figures"]
    runs = {"regen": ["--regen", str(src), "--span", f"{dur / 3},{dur / 2}", "--band", "0,1000"],
            "extend": ["--extend", str(src), "--seconds", f"{3 * dur}"],
            "loop": ["--loop", "--seconds", f"{2 * dur}"],
            "long": ["--seconds", f"{2.5 * dur}"]}
    for tool, argv in runs.items():
        out = tmp_path / tool
        main(base + argv + ["--out", str(out)])
        side = json.loads(next(out.glob("*.json")).read_text())
        wav = next(out.glob("*.wav"))
        assert side["tool"] == tool and f"_{tool}_" in wav.name
        assert sf.info(wav).frames == round(side["audio_seconds"] * p.sample_rate)
    assert json.loads(next((tmp_path / "regen").glob("*.json")).read_text())["band"] == [0.0, 1000.0]
    capsys.readouterr()
    for argv, msg in ((["--regen", str(src), "--extend", str(src)], "choose one of"),
                      (["--span", "0,1"], "--span and --band go with --regen"),
                      (["--extend", str(src)], "needs --seconds"),
                      (["--regen", str(src), "--span", "1"], "--span must be two numbers"),
                      (["--loop", "--strength", "0.5"], "--strength goes with"),
                      (["--seconds", "0.001"], "one model window")):
        with pytest.raises(SystemExit) as e:
            main(base + argv + ["--out", str(tmp_path / "x")])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and msg in err[0], (argv, err)
    assert not (tmp_path / "x").exists()


def test_windows_for_predicts_the_windows_each_tool_samples(pipe):
    src = _src(pipe, seed=3)
    dur = len(src) / pipe.sample_rate
    cases = [("regen", dict(source_seconds=dur, span=(0.2 * dur, 0.5 * dur)),
              lambda: pipe.regenerate(src, pipe.classes[0], 0.2 * dur, 0.5 * dur, sampler="euler", nfe=1)),
             ("extend", dict(seconds=2.7 * dur, source_seconds=dur),
              lambda: pipe.extend(src, pipe.classes[0], 2.7 * dur, sampler="euler", nfe=1)),
             ("long", dict(seconds=3.3 * dur), lambda: pipe.generate_long(pipe.classes[0], 3.3 * dur, sampler="euler", nfe=1)),
             ("loop", dict(seconds=2.2 * dur), lambda: pipe.loop(pipe.classes[0], 2.2 * dur, sampler="euler", nfe=1)),
             ("loop", dict(source_seconds=2 * dur), lambda: pipe.loop(pipe.classes[0], clip=np.tile(src, 2), sampler="euler", nfe=1))]
    for tool, kw, run in cases:
        assert pipe.windows_for(tool, **kw) == run().settings["windows"], tool


def test_many_windows_in_chunks_with_guidance_count_one_call_per_step(pipe):
    """More windows than one chunk holds, guided: labels follow each chunk, and guidance counts each solver
    step once (the NFE per window), not once per chunk."""
    W = pipe.window_frames
    sec = 20 * W * pipe.codec.config.hop_length / pipe.sample_rate     # ~39 windows: 3 chunks of 16
    gen = pipe.generate_long(pipe.classes[0], sec, sampler="euler", nfe=2, guidance=2.0, guidance_interval=None)
    assert gen.settings["windows"] > 32 and gen.settings["guided_nfe"] == 2 and np.isfinite(gen.waves).all()
