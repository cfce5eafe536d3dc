"""Teacher matching of a few-step model: the pairs are the teacher's own samples from the pipeline's noise for
their seeds (kept, extended, refused when they belong to another teacher), the teacher term is minimised where the
model's jump from that same noise lands on them, and a short resumable run moves the model towards its teacher and
exports a model that samples as before with the round recorded."""
import csv
import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from edmsound.core.pipeline import EDMSoundPipeline
from edmsound.training.teacher_match import TeacherMatcher, pair_noise, pair_seed, teacher_pairs


@pytest.fixture(scope="module")
def tuned(tiny_ckpt, tmp_path_factory):
    from conftest import tune_tiny
    return tune_tiny(tiny_ckpt, tmp_path_factory.mktemp("teacher"))


def test_pairs_are_the_teachers_samples_from_the_pipelines_noise_kept_and_extended(tiny_ckpt, tmp_path):
    out = tmp_path / "pairs"
    tg, lab, seeds, settings = teacher_pairs(tiny_ckpt, out, 2, seed=7, batch=3, precision="fp32", progress=False)
    pipe = EDMSoundPipeline(tiny_ckpt, device="cpu", bf16="fp32")
    C = len(pipe.classes)
    assert tg.shape == (2 * C, *pipe.codec.shape) and lab.tolist() == [c for c in range(C) for _ in range(2)]
    assert seeds.tolist()[:3] == [7_000_000, 7_000_001, 7_100_000] == [pair_seed(7, 0, 0), pair_seed(7, 0, 1),
                                                                     pair_seed(7, 1, 0)]
    # the same noise a pipeline draws for a seed
    torch.testing.assert_close(pair_noise(seeds[:3].tolist(), pipe.codec.shape), pipe.noise(seeds[:3].tolist())[0])
    # each target is the teacher's sample at its shipped settings for its seed, in its class's diffusion state
    k = 3                                                               # class 1, pair 1
    s = settings[pipe.classes[1]]
    assert (s["sampler"], s["nfe"]) == (pipe.preset.default_sampler, pipe.preset.default_nfe)
    spec, _, _ = pipe.sample_specs(pipe.classes[1], [int(seeds[k])], s["sampler"], s["nfe"], s["guidance"],
                                   guidance_interval=s["interval"], reference=s["reference"])
    torch.testing.assert_close(pipe.codec.from_model(tg[k:k + 1], 1), spec, rtol=1e-4, atol=1e-5)
    # read back as stored; more pairs per class extend the stored ones
    again = teacher_pairs(tiny_ckpt, out, 3, seed=7, precision="fp32", progress=False)
    torch.testing.assert_close(again[0].reshape(C, 3, *tg.shape[1:])[:, :2], tg.reshape(C, 2, *tg.shape[1:]))
    assert again[2].tolist()[:3] == [7_000_000, 7_000_001, 7_000_002]
    with pytest.raises(ValueError, match="holds pairs of another teacher or other settings"):
        teacher_pairs(tiny_ckpt, out, 2, seed=8, precision="fp32", progress=False)
    with pytest.raises(ValueError, match="pair seed base 0 is the evaluation's or the calibration's"):
        teacher_pairs(tiny_ckpt, tmp_path / "p0", 2, seed=0, progress=False)


class InputGain(torch.nn.Module):
    """D(x, sigma, label) = g · x: one learnable gain on the model's input."""

    def __init__(self, g: float, null_class: int):
        super().__init__()
        self.g = torch.nn.Parameter(torch.tensor(float(g)))
        self.null_class = null_class

    def forward(self, x, sigma, labels):
        return self.g * x


def test_the_teacher_term_is_least_where_the_jump_from_the_pairs_noise_lands_on_their_targets(tiny_ckpt, tuned,
                                                                                           tmp_path):
    model, data = tuned
    m = TeacherMatcher(model, data, tmp_path / "run", diffusion_model=tiny_ckpt, steps=1, per_class=2,
                       progress=False, precision="fp32")
    # targets that are 0.3 x the sigma_max-scaled noise of their own seeds: the term is 0 at gain 0.3 exactly, and
    # only if the model is shown the noise of each pair's own seed
    x = pair_noise(m.pair_seeds.tolist(), m.codec.shape) * m.preset.edm.sigma_max
    m.pair_targets = 0.3 * x
    idx = torch.arange(len(m.pair_seeds))
    with torch.no_grad():
        assert float(m.teacher_term(InputGain(0.3, 99), idx).max()) < 1e-10
        m.pair_targets = m.pair_targets[torch.roll(idx, 1)]
        assert float(m.teacher_term(InputGain(0.3, 99), idx).min()) > 1.0     # another seed's target is far off
    m.pair_targets = 0.3 * x
    toy = InputGain(1.0, 99)
    opt = torch.optim.Adam(toy.parameters(), lr=0.02)
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        opt.zero_grad()
        m.round_loss(toy, g).backward()
        opt.step()
    assert float(toy.g.detach()) == pytest.approx(0.3, abs=0.01)


def test_match_teacher_runs_resumes_and_exports_a_model_closer_to_its_teacher(tiny_ckpt, tuned, tmp_path):
    model, data = tuned
    start = json.loads((model / "info.json").read_text())["steps"]
    kw = dict(diffusion_model=tiny_ckpt, per_class=4, progress=False, batch_size=4, checkpoint_every=5,
              precision="fp32", lr=1e-3)
    m = TeacherMatcher(model, data, tmp_path / "run", steps=10, **kw)
    idx = torch.arange(len(m.pair_seeds))
    with torch.no_grad():
        before = float(m.teacher_term(m.frozen, idx).mean())
        y = m.codec.encode(m.train_waves[:4])      # validation: the anchor alone, 0 for the starting model itself
        assert float(m.loss(m.frozen, y, m.train_labels[:4], torch.Generator().manual_seed(1)).max()) == 0.0
    m.preset = m.preset.replace_train(log_every=1, warmup_steps=1)
    m.run()
    again = TeacherMatcher(model, data, tmp_path / "run", steps=20, resume=True, **kw)
    assert again.step == start + 10 and again.total_steps == start + 20
    again.preset = again.preset.replace_train(log_every=1, warmup_steps=1)
    again.run()
    with open(tmp_path / "run" / "teacher.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == list(range(start + 1, start + 21))      # kept across the resume
    out = tmp_path / "matched"
    again.export(out)
    pipe = EDMSoundPipeline(out, device="cpu", bf16="fp32")
    with torch.no_grad():
        after = float(again.teacher_term(pipe.model, idx).mean())
    assert after < 0.8 * before, (before, after)                  # its jumps land nearer the teacher's samples
    rec = json.loads((out / "info.json").read_text())["consistency"]
    r = rec["matched_teacher"]
    assert r["from_step"] == start and r["per_class"] == 4 and r["teacher"] == tiny_ckpt.name
    assert set(r["teacher_settings"]) == set(pipe.classes)
    assert pipe.samplers == ["consistency"] and pipe.valid_nfes("consistency") == [1, 2]
    gen = pipe.generate(pipe.classes[0], n=2, seed=0)
    assert gen.settings["guidance"] == 1.0 and gen.settings["nfe"] == 2 and np.isfinite(gen.waves).all()
    w0, w1 = load_file(model / "ema.safetensors"), load_file(out / "ema.safetensors")
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)


def test_match_teacher_refuses_what_it_cannot_tune(tiny_ckpt, tuned, tmp_path, capsys):
    model, data = tuned
    with pytest.raises(ValueError, match="is not a consistency-tuned model"):
        TeacherMatcher(tiny_ckpt, data, tmp_path / "x", diffusion_model=tiny_ckpt, steps=1, progress=False)
    with pytest.raises(ValueError, match="which is not beside it; name the diffusion model"):
        TeacherMatcher(model, data, tmp_path / "x", steps=1, progress=False)
    with pytest.raises(ValueError, match="is a few-step model; the teacher is the diffusion model"):
        TeacherMatcher(model, data, tmp_path / "x", diffusion_model=model, steps=1, progress=False)
    from edmsound.cli import main
    for argv, msg in ((["--weight", "0"], "argument --weight: must be a number > 0, got '0'"),
                      (["--pair-seed", "1"], "pair seed base 1 is the evaluation's or the calibration's"),
                      (["--per-class", "0"], "pairs per class must be a whole number in [1, 100000], got 0"),
                      (["--steps", "0"], "steps must be a whole number >= 1, got 0")):
        with pytest.raises(SystemExit) as e:
            main(["match-teacher", "--teacher", str(model), "--diffusion-model", str(tiny_ckpt), "--data", str(data),
                  "--out", str(tmp_path / "x"), "--no-progress"] + argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert msg in err[-1], err
        assert not (tmp_path / "x").exists()                  # refused before any pair is made
