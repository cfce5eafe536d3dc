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
    assert "| gap before |" in (tmp_path / "eq" / "matching_eq.md").read_text()
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
