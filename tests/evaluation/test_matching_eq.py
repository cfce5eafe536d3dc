"""Measuring a matching EQ: the fit recovers a known filter; the command stores, reports and clears it."""
import json
import shutil

import numpy as np
import pytest
import torch

from edmsound.core.codec import make_codec
from edmsound.core.presets import CodecConfig
from edmsound.core.spectral_eq import apply_to_spec, bin_freqs, curve_db
from edmsound.evaluation import fidelity as Fd
from edmsound.evaluation.matching_eq import fit_gains


def test_fit_undoes_a_known_filter_on_other_clips():
    """Clips filtered by a known curve, measured against other (unfiltered) noise clips: the fitted gains are the
    curve's inverse and the band gaps close to within the two sets' own noise."""
    codec = make_codec(CodecConfig(sample_rate=16000, clip_seconds=0.512, n_fft=510, hop_length=128,
                                   frames_multiple=1))
    g = torch.Generator().manual_seed(0)
    ref = (0.1 * torch.randn(48, codec.num_samples, generator=g, dtype=torch.float64)).numpy()
    clips = 0.1 * torch.randn(48, codec.num_samples, generator=g, dtype=torch.float64)
    edges = Fd.band_edges(16000)
    centres = np.sqrt(edges[:-1] * edges[1:])
    true = np.linspace(-8.0, 5.0, len(centres))                  # a tilt the model would have lost
    specs = apply_to_spec(codec, codec.encode(clips), curve_db(centres, true, bin_freqs(codec)))
    fit = fit_gains(codec, specs, ref, length=codec.num_samples)
    assert abs(fit["level_after_db"]) < 1e-6 and abs(fit["level_before_db"]) > 0.5
    assert np.allclose(fit["centres_hz"], centres)
    assert np.abs(fit["gap_before_db"]).max() > 4.0
    after = np.abs(fit["gap_after_db"])
    assert after.max() < 0.3
    assert np.allclose(fit["gains_db"], -true, atol=0.6)
    # white noise: a band of K periodogram bins has per-clip power of relative spread 1 / sqrt(K) (each bin's power
    # is exponential), so each set's mean in dB has SE (10 / ln 10) / sqrt(K n), and the two sets' add in quadrature
    freqs = np.fft.rfftfreq(codec.num_samples, 1 / 16000)
    k = np.array([((freqs >= lo) & ((freqs <= hi) if i == len(centres) - 1 else (freqs < hi))).sum()
                  for i, (lo, hi) in enumerate(zip(edges[:-1], edges[1:]))])
    expected = np.sqrt(2) * 10 / np.log(10) / np.sqrt(k * 48)
    wide = k >= 8
    assert wide.sum() >= 6
    assert np.allclose(fit["gap_se_db"][wide], expected[wide], rtol=0.3)


def test_fit_keeps_gains_within_the_limit():
    codec = make_codec(CodecConfig(sample_rate=16000, clip_seconds=0.512, n_fft=510, hop_length=128,
                                   frames_multiple=1))
    g = torch.Generator().manual_seed(1)
    ref = (0.1 * torch.randn(16, codec.num_samples, generator=g, dtype=torch.float64)).numpy()
    specs = codec.encode(0.001 * torch.randn(16, codec.num_samples, generator=g, dtype=torch.float64))   # -40 dB
    fit = fit_gains(codec, specs, ref, max_gain_db=6.0, length=codec.num_samples)
    assert fit["level_after_db"] < -30
    assert np.allclose(fit["gains_db"], 6.0) and np.all(fit["gap_after_db"] < -30)


def test_calibrate_eq_command_writes_reports_and_clears(tiny_ckpt, tmp_path, capsys):
    from conftest import write_tone_tree
    from edmsound.cli import main
    from edmsound.core.pipeline import EDMSoundPipeline
    model = tmp_path / "model"
    shutil.copytree(tiny_ckpt, model)
    ref = write_tone_tree(tmp_path / "real", per_class=6, seed=3)
    with pytest.raises(SystemExit) as e:
        main(["calibrate-eq", "--checkpoint", str(model), "--reference", str(ref), "--n-per-class", "4"])
    assert e.value.code == 2 and "nothing would be kept" in capsys.readouterr().err
    main(["calibrate-eq", "--checkpoint", str(model), "--reference", str(ref), "--n-per-class", "4",
          "--out", str(tmp_path / "eq"), "--write", "--no-progress"])
    cfg = json.loads((model / "config.json").read_text())
    assert set(cfg["class_eq"]["gains_db"]) == set(cfg["classes"])
    report = json.loads((tmp_path / "eq" / "matching_eq.json").read_text())
    for r in report["rows"]:          # on the clips it was fitted on: the level met, unless the limit held it back
        assert max(map(abs, r["gains_db"])) <= 12.0 + 1e-9
        assert abs(r["level_after_db"]) < 0.05 or max(map(abs, r["gains_db"])) > 11.99
    assert (tmp_path / "eq" / "matching_eq.png").stat().st_size > 1000
    md = (tmp_path / "eq" / "matching_eq.md").read_text()
    assert "| gap before |" in md and "| ± SE |" in md
    assert all(len(r["gap_se_db"]) == len(r["gap_before_db"]) and min(r["gap_se_db"]) > 0 for r in report["rows"])
    pipe = EDMSoundPipeline(model, device="cpu")
    assert pipe.generate(cfg["classes"][0], n=1, sampler="euler", nfe=2).settings["matching_eq"] is True
    main(["calibrate-eq", "--checkpoint", str(model), "--clear"])
    assert "class_eq" not in json.loads((model / "config.json").read_text())


def test_calibration_takes_more_clips_than_one_generate_call(tiny_ckpt, tmp_path):
    """More clips per class than the pipeline makes in one call: they come in several calls, clip i from noise seed
    base + i, exactly as one long call would make them, and the fit sees all of them."""
    from conftest import write_tone_tree
    from edmsound.core.pipeline import EDMSoundPipeline
    from edmsound.evaluation import sweep as E
    from edmsound.evaluation.matching_eq import calibrate_class_eq
    ref = write_tone_tree(tmp_path / "real", per_class=6, seed=3)
    pipe = EDMSoundPipeline(tiny_ckpt, device="cpu")
    cls = pipe.classes[0]
    res = calibrate_class_eq(tiny_ckpt, n_per_class=E.MAX_CLIPS_PER_CALL + 2, seed=1, reference=str(ref),
                             classes=[cls], progress=False, log=lambda *a: None)
    base = E.noise_seed(1, pipe.class_index(cls), 0)
    last_two = pipe.generate(cls, n=2, seed=base + E.MAX_CLIPS_PER_CALL, eq=False).specs
    first = pipe.generate(cls, n=E.MAX_CLIPS_PER_CALL, seed=base, eq=False).specs
    real, _ = E.load_reference(str(ref), [cls], pipe.sample_rate, pipe.codec.num_samples, None)
    want = fit_gains(pipe.codec, torch.cat([first, last_two]), real.waves)["gap_before_db"]
    without_last = fit_gains(pipe.codec, first, real.waves)["gap_before_db"]
    (row,) = res["rows"]
    assert np.allclose(row["gap_before_db"], want, atol=0.006)            # rounded to 0.01 dB in the row
    assert not np.allclose(want, without_last, atol=1e-4)                 # the two clips more do count


@pytest.fixture(scope="module")
def tuned_tiny(tiny_ckpt, tmp_path_factory):
    from conftest import tune_tiny
    return tune_tiny(tiny_ckpt, tmp_path_factory.mktemp("eq_budgets"))


def _flat(classes, db, nfe):
    from edmsound.core.spectral_eq import ClassEQ
    return ClassEQ((100.0, 1000.0), {c: (db, db) for c in classes}, {"nfe": nfe})


def _rms_db(w):
    return 10 * np.log10(np.mean(np.asarray(w, np.float64) ** 2))


def test_a_few_step_model_applies_the_eq_measured_at_the_budget_asked_for(tuned_tiny, tmp_path):
    """A flat EQ multiplies the decoded clip by its gain exactly: +6 dB stored for the default budget (2), -6 dB for
    budget 1. Each budget gets its own; with budget 1's removed, budget 1 falls back on the default budget's."""
    from edmsound.core.pipeline import EDMSoundPipeline
    from edmsound.evaluation.matching_eq import write_class_eq
    model = tmp_path / "model"
    shutil.copytree(tuned_tiny[0], model)
    classes = json.loads((model / "config.json").read_text())["classes"]
    write_class_eq(model, _flat(classes, 6.0, 2))
    write_class_eq(model, _flat(classes, -6.0, 1))
    cfg = json.loads((model / "config.json").read_text())
    assert cfg["class_eq"]["info"]["nfe"] == 2 and list(cfg["class_eq_by_nfe"]) == ["1"]
    pipe = EDMSoundPipeline(model, device="cpu", bf16=False)
    c = classes[0]
    for nfe, gain in ((2, 6.0), (1, -6.0)):
        on = pipe.generate(c, n=1, nfe=nfe, seed=0)
        off = pipe.generate(c, n=1, nfe=nfe, seed=0, eq=False)
        assert _rms_db(on.waves) - _rms_db(off.waves) == pytest.approx(gain, abs=0.05)
        assert on.settings["matching_eq"] is True and on.settings["matching_eq_nfe"] == nfe
        assert off.settings["matching_eq"] is False and "matching_eq_nfe" not in off.settings
    write_class_eq(model, None, 1)                                   # budget 1's only
    cfg = json.loads((model / "config.json").read_text())
    assert "class_eq_by_nfe" not in cfg and "class_eq" in cfg
    pipe = EDMSoundPipeline(model, device="cpu", bf16=False)
    on, off = (pipe.generate(c, n=1, nfe=1, seed=0, eq=e) for e in (True, False))
    assert _rms_db(on.waves) - _rms_db(off.waves) == pytest.approx(6.0, abs=0.05)
    assert on.settings["matching_eq_nfe"] == 2
    write_class_eq(model, _flat(classes, -6.0, 1))
    write_class_eq(model, None)                                      # every one
    cfg = json.loads((model / "config.json").read_text())
    assert "class_eq" not in cfg and "class_eq_by_nfe" not in cfg
    with pytest.raises(ValueError, match="measured at 1 evaluations, not 2"):
        write_class_eq(model, _flat(classes, -6.0, 1), nfe=2)


@pytest.mark.parametrize("by_nfe, match", [({"x": {}}, "'x' is not a budget"), ({"0": {}}, "'0' is not a budget"),
                                           ({"2": {}}, "budget 2 is the model's default"),
                                           ([1], "must map budgets to EQs")])
def test_eqs_by_budget_refuse_what_is_not_a_budget(by_nfe, match):
    from edmsound.core.spectral_eq import load_class_eqs
    with pytest.raises(ValueError, match=match):
        load_class_eqs({"class_eq_by_nfe": by_nfe}, ["a"], 2)


def test_calibrate_eq_measures_and_stores_another_budget(tuned_tiny, tmp_path, capsys):
    from conftest import write_tone_tree
    from edmsound.cli import main
    model = tmp_path / "model"
    shutil.copytree(tuned_tiny[0], model)
    ref = write_tone_tree(tmp_path / "real", per_class=6, seed=3)
    main(["calibrate-eq", "--checkpoint", str(model), "--reference", str(ref), "--n-per-class", "4", "--nfe", "1",
          "--out", str(tmp_path / "eq"), "--write", "--no-progress"])
    assert "stored for 1 evaluations" in capsys.readouterr().out
    cfg = json.loads((model / "config.json").read_text())
    assert "class_eq" not in cfg and cfg["class_eq_by_nfe"]["1"]["info"]["nfe"] == 1
    assert json.loads((tmp_path / "eq" / "matching_eq.json").read_text())["settings"]["nfe"] == 1
    with pytest.raises(SystemExit) as e:
        main(["calibrate-eq", "--checkpoint", str(model), "--reference", str(ref), "--nfe", "3", "--write"])
    assert e.value.code == 2 and "NFE 1 to 2 only" in capsys.readouterr().err
    main(["calibrate-eq", "--checkpoint", str(model), "--clear", "--nfe", "1"])
    assert "the matching EQ for 1 evaluations" in capsys.readouterr().out
    assert "class_eq_by_nfe" not in json.loads((model / "config.json").read_text())
