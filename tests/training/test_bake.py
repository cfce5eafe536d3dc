"""Baking per-class guidance into a consistency-tuned model: the guided targets (analytic, with a denoiser whose
conditional and unconditional outputs are known), the guided region, and a short resumable run on a tuned tiny model
that exports a model sampling at guidance 1 with the baking recorded."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from edmsound.core.pipeline import EDMSoundPipeline
from edmsound.evaluation.calibrate import write_class_guidance
from edmsound.training.bake import GuidanceBaker, baked_targets, guided_region
from edmsound.training.consistency import ConsistencyTuner


class Affine:
    """D(x, sigma, label) = (label + 1) x + sigma: distinct conditional and unconditional outputs."""
    null_class = 3

    def __init__(self):
        self.calls = []

    def __call__(self, x, sigma, labels):
        self.calls.append(len(x))
        b = (-1,) + (1,) * (x.dim() - 1)
        return (labels.to(x.dtype) + 1).reshape(b) * x + sigma.reshape(b)


def test_baked_targets_are_the_guided_output_inside_the_interval_and_the_plain_one_elsewhere():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 2, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([12.0, 12.0, 5.0, 12.0, 12.0, 20.0], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 2, 3, 0])                   # 3: the dropped label
    scale = torch.tensor([1.5, 1.0, 1.5, 2.0, 1.0, 1.5], dtype=torch.float64)
    lo = torch.tensor([8.0, 0.0, 8.0, 0.0, 0.0, 8.0], dtype=torch.float64)
    hi = torch.tensor([15.0, np.inf, 15.0, np.inf, np.inf, 15.0], dtype=torch.float64)
    D = Affine()
    target, guided = baked_targets(D, x, t, labels, scale, lo, hi)
    assert guided.tolist() == [True, False, False, True, False, False]
    b = (-1, 1, 1)
    cond = (labels.double() + 1).reshape(b) * x + t.reshape(b)
    un = 4 * x + t.reshape(b)
    expect = cond.clone()
    for i, w in ((0, 1.5), (3, 2.0)):
        expect[i] = un[i] + w * (cond[i] - un[i])
    torch.testing.assert_close(target, expect)
    assert D.calls == [6, 2]                 # the unconditional pass only for the guided samples


def test_guided_region_spans_the_guided_classes_within_the_models_range():
    scales = {"a": 1.5, "b": 1.25, "c": 1.0}
    iv = {"a": (8.0, 20.0), "b": (5.0, 12.0), "c": None}
    assert guided_region(scales, iv, (0.002, 15.0)) == (5.0, 15.0)
    assert guided_region(scales, dict(iv, b=None), (0.002, 15.0)) is None       # guided at every level
    with pytest.raises(ValueError, match=r"outside the model's noise range \[0.002, 3\]"):
        guided_region({"a": 2.0}, {"a": (8.0, 20.0)}, (0.002, 3.0))


def test_with_a_guide_model_the_guides_conditional_output_replaces_the_unconditional_one():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 2, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([12.0, 12.0, 5.0, 12.0], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 2])
    scale = torch.tensor([3.0, 1.0, 3.0, 1.0], dtype=torch.float64)
    lo = torch.full((4,), 8.0, dtype=torch.float64)
    hi = torch.full((4,), 20.0, dtype=torch.float64)
    D, guide = Affine(), Affine()
    guide_out = lambda x, s, lab: 0.5 * D(x, s, lab)             # noqa: E731  a quieter model of the same labels
    target, guided = baked_targets(D, x, t, labels, scale, lo, hi, reference=guide_out)
    assert guided.tolist() == [True, False, False, False]
    b = (-1, 1, 1)
    cond = (labels.double() + 1).reshape(b) * x + t.reshape(b)
    expect = cond.clone()
    expect[0] = 0.5 * cond[0] + 3.0 * (cond[0] - 0.5 * cond[0])    # D_guide + w (D_c - D_guide), the same label
    torch.testing.assert_close(target, expect)


def test_bake_guidance_bakes_an_autoguided_class_and_exports_a_model_without_the_guide(tiny_ckpt, tmp_path):
    """A tuned model whose first class is guided away from a guide model: the bake's targets use the guide, the
    record says so, and the exported model samples at guidance 1 with no guide file or note."""
    from conftest import tune_tiny
    from edmsound.training.export import attach_guide
    model, data = tune_tiny(tiny_ckpt, tmp_path)
    classes = json.loads((model / "config.json").read_text())["classes"]
    attach_guide(model, tiny_ckpt, note="the diffusion model it was tuned from")
    write_class_guidance(model, {classes[0]: 3.0}, {classes[0]: [0.5, 20.0]})
    b = GuidanceBaker(model, data, tmp_path / "bake-run", steps=2, progress=False, batch_size=4, checkpoint_every=2)
    assert b.reference is not None
    rec = b.record["baked_guidance"]
    assert rec["reference"] == "guide" and rec["guide"] == "the diffusion model it was tuned from"
    assert rec["scales"] == {classes[0]: 3.0}
    b.run()
    b.export(tmp_path / "baked")
    pipe = EDMSoundPipeline(tmp_path / "baked", device="cpu")
    assert pipe.guide is None and not (tmp_path / "baked" / "guide.safetensors").exists()
    assert pipe.preset.guidance_for(classes[0]) == 1.0
    assert np.isfinite(pipe.generate(classes[0], n=1, seed=0).waves).all()


@pytest.fixture(scope="module")
def tuned(tiny_ckpt, tmp_path_factory):
    """A consistency-tuned tiny model with one guided class (w 2 for sigma in (0.5, its sigma_max])."""
    from conftest import tune_tiny
    d = tmp_path_factory.mktemp("bake")
    _, data = tune_tiny(tiny_ckpt, d)
    top = EDMSoundPipeline(d / "tuned", device="cpu").preset.edm.sigma_max
    classes = json.loads((d / "tuned" / "config.json").read_text())["classes"]
    write_class_guidance(d / "tuned", {classes[0]: 2.0, classes[1]: 1.0}, {classes[0]: [0.5, 2 * top]})
    return d / "tuned", data, classes


def test_bake_guidance_runs_resumes_and_exports_a_model_at_guidance_one(tuned, tmp_path):
    model, data, classes = tuned
    before = EDMSoundPipeline(model, device="cpu")
    assert before.preset.guidance_for(classes[0]) == 2.0
    start = json.loads((model / "info.json").read_text())["steps"]
    b = GuidanceBaker(model, data, tmp_path / "run", steps=4, share=0.5, progress=False, batch_size=4,
                      checkpoint_every=2)
    assert b.step == start and b.total_steps == start + 4
    hi = before.preset.edm.sigma_max
    assert b.region == (0.5, pytest.approx(hi))
    t = b.draw_levels(20000, torch.Generator().manual_seed(0))
    inside = ((t > 0.5) & (t <= hi + 1e-6)).float().mean()
    own = ConsistencyTuner(model, data, tmp_path / "own", max_nfe=2, stages=1, steps=start + 1, progress=False)
    base = own.draw_levels(20000, torch.Generator().manual_seed(1))
    base_inside = ((base > 0.5) & (base <= hi + 1e-6)).float().mean()
    assert float(inside) == pytest.approx(0.5 + 0.5 * float(base_inside), abs=0.015)
    # the frozen model itself as the student: zero loss where nothing is guided, positive where guidance applies
    y = b.codec.encode(b.train_waves[:4])
    b.share = 1.0                                   # every level inside the guided region
    losses = [b.loss(b.teacher, y, torch.full((4,), lab), torch.Generator().manual_seed(3)) for lab in (1, 0)]
    assert float(losses[0].max()) == 0.0                                  # the unguided class: its own output
    assert float(losses[1].max()) > 0.0                                   # the guided class: pulled towards w 2
    b.share = 0.5
    b.run()
    again = GuidanceBaker(model, data, tmp_path / "run", steps=6, progress=False, batch_size=4, checkpoint_every=2,
                          resume=True)
    assert again.step == start + 4 and again.total_steps == start + 6          # counts from the same start
    again.run()
    # validation noise is fixed and the teacher frozen: its targets are computed at the first check and kept
    again.val_waves, again.val_labels = again.train_waves[:40], again.train_labels[:40]   # (this set is too small
    counted, frozen = Affine(), again.teacher                                                # to hold any out)
    again.teacher = lambda x, sigma, labels: (counted(x, sigma, labels), frozen(x, sigma, labels))[1]
    again.teacher.null_class = frozen.null_class
    first = again.validate()
    assert np.isfinite(first) and len(counted.calls) >= 2                       # two batches of at most 32
    n = len(counted.calls)
    assert again.validate() == pytest.approx(first, rel=1e-6) and len(counted.calls) == n
    again._val_targets = None                                   # forgotten: computed again, the same figure
    assert again.validate() == pytest.approx(first, rel=1e-6) and len(counted.calls) == 2 * n
    again.teacher = frozen
    out = tmp_path / "baked"
    again.export(out)
    info = json.loads((out / "info.json").read_text())
    rec = info["consistency"]
    assert info["steps"] == start + 6
    assert rec["baked_guidance"]["scales"] == {classes[0]: 2.0} and rec["baked_guidance"]["from_step"] == start
    assert rec["baked_guidance"]["intervals"] == {classes[0]: [0.5, pytest.approx(2 * hi)]}
    assert rec["lineage"][-1] == "tuned" and rec["method"] == "ECT" and rec["max_nfe"] == 2
    pipe = EDMSoundPipeline(out, device="cpu")
    assert all(pipe.preset.guidance_for(c) == 1.0 for c in pipe.classes)
    assert pipe.preset.default_class_guidance is None and pipe.preset.default_class_guidance_interval is None
    assert pipe.samplers == ["consistency"] and pipe.valid_nfes("consistency") == [1, 2]
    gen = pipe.generate(classes[0], n=2, seed=0)
    assert gen.settings["guidance"] == 1.0 and gen.settings["nfe"] == 2 and np.isfinite(gen.waves).all()
    w0, w1 = load_file(model / "ema.safetensors"), load_file(out / "ema.safetensors")
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)                   # it trained
    # a run resumes only from the frozen model it started with, and bakes the scales it started with
    import shutil
    moved = tmp_path / "moved"
    shutil.copytree(model, moved)
    write_class_guidance(moved, {classes[0]: 3.0, classes[1]: 1.0}, None)    # new scales, same weights
    same = GuidanceBaker(moved, data, tmp_path / "run", steps=6, progress=False, batch_size=4, resume=True)
    assert float(same.scale_of[0]) == 2.0 and float(same.lo_of[0]) == 0.5
    with pytest.raises(ValueError, match="is not the model this run started from"):
        GuidanceBaker(out, data, tmp_path / "run", steps=6, progress=False, resume=True)
    # a baked model has nothing left to bake
    with pytest.raises(ValueError, match="has no guidance to bake: every class samples at guidance 1"):
        GuidanceBaker(out, data, tmp_path / "again", steps=1, progress=False)
    assert not (tmp_path / "again").exists()
    # given guidance again, a baked model bakes once more and keeps its first bake on record
    write_class_guidance(out, {classes[1]: 1.5}, None)
    second = GuidanceBaker(out, data, tmp_path / "second", steps=1, progress=False, batch_size=4)
    second.run()
    second.export(tmp_path / "twice")
    rec2 = json.loads((tmp_path / "twice" / "info.json").read_text())["consistency"]
    assert rec2["baked_guidance"]["scales"] == {classes[1]: 1.5}
    assert rec2["baked_guidance"]["from_step"] == start + 6 and rec2["baked_guidance"]["intervals"] == {classes[1]: None}
    assert rec2["earlier_bakes"] == [rec["baked_guidance"]]


def test_bake_guidance_refuses_what_it_cannot_bake(tiny_ckpt, tuned, tmp_path, capsys):
    model, data, _ = tuned
    with pytest.raises(ValueError, match="is not a consistency-tuned model"):
        GuidanceBaker(tiny_ckpt, data, tmp_path / "x", steps=1, progress=False)
    from edmsound.cli import main
    for argv, msg in ((["--share", "1.5"], "share must be between 0 and 1, got 1.5"),
                      (["--steps", "0"], "argument --steps: must be a whole number > 0, got '0'"),
                      (["--teacher", str(tiny_ckpt)], "is not a consistency-tuned model")):
        with pytest.raises(SystemExit) as e:
            main(["bake-guidance", "--teacher", str(model), "--data", str(data), "--out", str(tmp_path / "x"),
                  "--no-progress"] + argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert msg in err[-1], err
        assert not (tmp_path / "x").exists()


def test_a_time_budget_plans_the_baking_and_prints_the_steps_to_resume_with(tuned, tmp_path, capsys):
    from edmsound.cli import main
    model, data, classes = tuned
    start = json.loads((model / "info.json").read_text())["steps"]
    b = GuidanceBaker(model, data, tmp_path / "run", progress=False, batch_size=2, checkpoint_every=10 ** 6,
                      fit_minutes=0.03)
    out = b.run()
    planned = json.loads((tmp_path / "run" / "consistency.json").read_text())["planned_steps"]
    assert b.total_steps == planned > start + 1 and out["step"] <= planned
    printed = capsys.readouterr().out
    # --steps counts the baking steps on from the model's own, so the plan is given in those
    assert f"--resume --steps {planned - start}" in printed, printed
    with pytest.raises(SystemExit) as e:
        main(["bake-guidance", "--teacher", str(model), "--data", str(data), "--out", str(tmp_path / "x"),
              "--fit-minutes", "1", "--max-minutes", "1", "--no-progress"])
    assert e.value.code == 2
    assert "not both" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "x").exists()
