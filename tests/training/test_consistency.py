"""Consistency tuning and sampling: the multistep sampler on an exact consistency function (analytic), ECT's level
schedule and loss (zero exactly for a self-consistent model), and a short resumable run on the tiny checkpoint that
exports a model taking only the consistency sampler at 1..M evaluations, then tunes that model further."""
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from edmsound.core.pipeline import EDMSoundPipeline
from edmsound.core.samplers import FEW_STEP_SAMPLERS, get_sampler, sample, sample_consistency
from edmsound.training.consistency import (ConsistencyTuner, chunk_power, ect_gap_ratio, ect_levels,
                                          ect_loss, envelope_distance)

S = 0.25                      # data: zero-mean Gaussian of std S


def exact_f(x, sigma):
    """The exact consistency function of that data: the probability-flow ODE solved from sigma to 0."""
    s = sigma.reshape((-1,) + (1,) * (x.dim() - 1))
    return x * S / torch.sqrt(S ** 2 + s ** 2)


def posterior_mean(x, sigma):
    s = sigma.reshape((-1,) + (1,) * (x.dim() - 1))
    return S ** 2 / (S ** 2 + s ** 2) * x


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
def test_multistep_consistency_sampling_with_the_exact_function_draws_the_data_distribution(steps):
    g = torch.Generator().manual_seed(steps)
    sigmas = torch.tensor([15.0, 2.0, 0.6, 0.3][:steps] + [0.0], dtype=torch.float64)
    x = torch.randn(20000, 4, generator=g, dtype=torch.float64) * float(np.hypot(S, 15.0))   # the exact marginal
    out = sample_consistency(exact_f, x, sigmas, generator=g)
    assert abs(float(out.std()) / S - 1) < 0.02
    # a diffusion model's one-shot estimate is the posterior mean: nearly silent from sigma 15
    mean_only = sample_consistency(posterior_mean, x, sigmas[[0, -1]], generator=g)
    assert float(mean_only.std()) < 0.02 * S


def test_consistency_sampling_spends_exactly_its_steps_and_item_k_reproduces_alone():
    calls = []

    def den(x, s):
        calls.append(len(x))
        return exact_f(x, s)
    noise = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(0))
    gens = [torch.Generator().manual_seed(10 + i) for i in range(3)]
    out, used = sample("consistency", den, noise, nfe=3, sigma_min=0.3, sigma_max=15.0, rho=2.5, generator=gens)
    assert used == 3 and len(calls) == 3
    alone, _ = sample("consistency", exact_f, noise[2:], nfe=3, sigma_min=0.3, sigma_max=15.0, rho=2.5,
                      generator=[torch.Generator().manual_seed(12)])
    torch.testing.assert_close(out[2:], alone)
    assert get_sampler("consistency") is FEW_STEP_SAMPLERS["consistency"]
    with pytest.raises(ValueError, match=r"unknown sampler 'lcm'.*consistency models: consistency"):
        get_sampler("lcm")


def test_ect_schedule_starts_as_denoising_and_halves_the_gap_each_stage():
    t = torch.logspace(-3, np.log10(15), 50, dtype=torch.float64)
    torch.testing.assert_close(ect_levels(t, 0, 0.2), torch.zeros_like(t))      # stage 0: r = 0 (denoising)
    prev = ect_gap_ratio(t, 1, 0.2)
    for stage in range(2, 9):
        ratio = ect_gap_ratio(t, stage, 0.2)
        below = prev < 1            # n(t) <= 1 + k / 2 < q^3: from stage 3 on no gap is clamped
        torch.testing.assert_close(ratio[below], prev[below] / 2)
        assert bool((ratio <= prev).all()) and (stage < 4 or bool(below.all()))
        r = ect_levels(t, stage, 0.2)
        assert bool(((r >= 0) & (r < t)).all()) and (stage < 3 or bool((r > 0).all()))
        prev = ratio
    assert bool((prev[:-1] >= prev[1:]).all())          # wider relative gaps at low noise (n(t) falls with t)


def test_ect_loss_analytic_zero_for_the_path_oracle_and_no_gradient_through_the_target():
    g = torch.Generator().manual_seed(0)
    y = S * torch.randn(64, 1, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(y.shape, generator=g, dtype=torch.float64)
    t = torch.logspace(-2, 1, 64, dtype=torch.float64)
    lab = torch.zeros(64, dtype=torch.long)
    c = 0.00054 * 0.2 / 0.5
    for stage in (0, 3):
        r = ect_levels(t, stage, 0.2)
        # the oracle that maps every point of the noising path to its clean end is consistent along it: loss 0
        oracle = ect_loss(lambda x, s, labels: y, y, lab, t, r, noise, 0.2)
        assert float(oracle.abs().max()) == 0.0
        # the identity: f(x_t) - f(x_r) = (t - r) n (or t n against y where r = 0), pseudo-Huber over the gap
        ident = ect_loss(lambda x, s, labels: x, y, lab, t, r, noise, 0.2)
        ms = noise.flatten(1).pow(2).mean(1)
        torch.testing.assert_close(ident, ((ms * (t - r) ** 2 + c * c).sqrt() - c) / (t - r))
    # the target is held fixed: d/da of the loss of f = a x is that of the outer evaluation alone
    a = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    r = ect_levels(t, 3, 0.2)
    loss = ect_loss(lambda x, s, labels: a * x, y, lab, t, r, noise, 0.2)
    loss.sum().backward()
    x_t, x_r = y + t.reshape(-1, 1, 1, 1) * noise, y + r.reshape(-1, 1, 1, 1) * noise
    delta = (1.3 * x_t - 1.3 * x_r).flatten(1)
    expect = ((delta * x_t.flatten(1)).mean(1) / ((delta ** 2).mean(1) + c * c).sqrt() / (t - r)).sum()
    torch.testing.assert_close(a.grad, expect)


def test_consistency_tune_runs_resumes_and_exports_a_few_step_model(tiny_ckpt, tone_tree, tmp_path):
    run = tmp_path / "run"
    c = ConsistencyTuner(tiny_ckpt, tone_tree, run, max_nfe=3, stages=2, sigma_mid=0.3, steps=6, progress=False,
                         batch_size=4, checkpoint_every=3)
    assert [c.stage(s) for s in (0, 1, 3, 4, 6)] == [0, 1, 1, 2, 2]
    # tuning levels span the teacher's range, below the student's re-noise floor too (never piled up on it)
    teacher_edm = EDMSoundPipeline(tiny_ckpt, device="cpu").preset.edm
    t = c.draw_levels(4096, torch.Generator().manual_seed(0))
    assert c.preset.edm.sigma_min == pytest.approx(0.3) and teacher_edm.sigma_min < 0.3
    assert float(t.min()) >= teacher_edm.sigma_min and float(t.max()) <= teacher_edm.sigma_max
    assert (t < 0.3).float().mean() > 0.2 and (t == 0.3).sum() == 0
    first = c.run()
    assert first["step"] == 6
    import csv
    losses = [float(r["loss"]) for r in csv.DictReader(open(run / "log.csv"))]
    assert losses and all(np.isfinite(losses))
    c2 = ConsistencyTuner(tiny_ckpt, tone_tree, run, max_nfe=3, stages=2, sigma_mid=0.3, steps=8, progress=False,
                          batch_size=4, checkpoint_every=3, resume=True)
    assert c2.step == 6
    # the stages are spread over the run's total: 4 steps each of 8, 8 steps each of 16 (back in stage 1 at step 6)
    assert [c2.stage(s) for s in (4, 5, 6, 8)] == [1, 2, 2, 2] and c2.stage() == 2
    c3 = ConsistencyTuner(tiny_ckpt, tone_tree, run, max_nfe=3, stages=2, sigma_mid=0.3, steps=16, progress=False,
                          batch_size=4, checkpoint_every=3, resume=True)
    assert c3.step == 6 and c3.stage() == 1 and c3.stage(9) == 2
    c2.run()
    out = tmp_path / "tuned"
    c2.export(out)
    info = json.loads((out / "info.json").read_text())["consistency"]
    assert info["method"] == "ECT" and info["max_nfe"] == 3 and info["final_stage"] == 2
    pipe = EDMSoundPipeline(out, device="cpu")
    assert pipe.samplers == ["consistency"] and pipe.valid_nfes("consistency") == [1, 2, 3]
    assert pipe.preset.default_sampler == "consistency" and pipe.preset.edm.sigma_min == pytest.approx(0.3)
    for nfe in (1, 3):
        gen = pipe.generate(pipe.classes[0], n=2, nfe=nfe, seed=0)
        assert gen.settings["nfe"] == nfe and np.isfinite(gen.waves).all()
    for kw in (dict(sampler="euler", nfe=2), dict(sampler="consistency", nfe=4)):
        with pytest.raises(ValueError, match="consistency-tuned model: it samples with consistency at NFE 1 to 3"):
            pipe.generate(pipe.classes[0], **kw)
    from edmsound.app.service import EDMSoundService
    svc = EDMSoundService(pipe)
    assert svc.samplers == ["consistency"] and svc.nfe_slider("consistency") == {"minimum": 1, "maximum": 3,
                                                                                 "step": 1}
    assert svc.defaults["sampler"] == "consistency" and svc.defaults["nfe"] == 2
    assert svc.snap_nfe("consistency", 9) == 3 and "[1, 3] (the budgets this model was tuned for)" in \
        svc.nfe_rule("consistency")
    svc.close()
    # the diffusion model refuses the few-step sampler; neither kind of student is tuned or distilled again
    base = EDMSoundPipeline(tiny_ckpt, device="cpu")
    with pytest.raises(ValueError, match="needs a consistency-tuned model"):
        base.generate(base.classes[0], sampler="consistency", nfe=2)
    from edmsound.training.distill import Distiller
    with pytest.raises(ValueError, match="consistency-tuned model"):
        Distiller(out, tone_tree, tmp_path / "d", student_nfe=1, steps=1, progress=False)
    # a tuned model is tuned further: its steps, stage, re-noise floor and tuning range go on from where it stopped
    more = ConsistencyTuner(out, tone_tree, tmp_path / "c", max_nfe=3, stages=2, steps=10, progress=False,
                            batch_size=4, checkpoint_every=3)
    assert more.step == 8 and more.stage() == 2 and more.stage(10) == 2
    assert more.preset.edm.sigma_min == pytest.approx(0.3) and more.t_range == c.t_range
    more.run()
    more.export(tmp_path / "tuned2")
    info2 = json.loads((tmp_path / "tuned2" / "info.json").read_text())
    rec = info2["consistency"]
    assert info2["steps"] == 10 and rec["continued_from"] == {"model": "tuned", "steps": 8, "stage": 2}
    assert rec["lineage"] == [tiny_ckpt.name, "tuned"] and rec["teacher"] == tiny_ckpt.name
    w1, w2 = load_file(out / "ema.safetensors"), load_file(tmp_path / "tuned2" / "ema.safetensors")
    assert w1.keys() == w2.keys() and any(not torch.equal(w1[k], w2[k]) for k in w1)      # it trained on
    # resumed, the run keeps the start it was given
    again = ConsistencyTuner(out, tone_tree, tmp_path / "c", max_nfe=3, stages=2, steps=12, progress=False,
                             batch_size=4, checkpoint_every=3, resume=True)
    assert again.step == 10 and again.start_step == 8 and again.stage() == 2
    # stages run on from the one the model stopped in, over the new steps
    wider = ConsistencyTuner(out, tone_tree, tmp_path / "w", max_nfe=3, stages=4, steps=12, progress=False,
                             batch_size=4)
    assert [wider.stage(s) for s in (8, 9, 10, 11, 12)] == [2, 3, 3, 4, 4]
    for kw, msg in ((dict(stages=1, steps=10), "stopped in stage 2; continuing it needs --stages >= 2"),
                    (dict(stages=2, steps=8), "--steps must exceed that, got 8")):
        with pytest.raises(ValueError, match=msg):
            ConsistencyTuner(out, tone_tree, tmp_path / "e", progress=False, **kw)
        assert not (tmp_path / "e").exists()                   # refused before anything is written
    # a model tuned before its range was recorded takes it from its diffusion model beside it, or says what is missing
    old = tmp_path / "old"
    shutil.copytree(out, old / "tuned")
    meta = json.loads((old / "tuned" / "info.json").read_text())
    del meta["consistency"]["t_min"]
    (old / "tuned" / "info.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=f"its diffusion model '{tiny_ckpt.name}' is not beside it"):
        ConsistencyTuner(old / "tuned", tone_tree, tmp_path / "e", steps=10, progress=False)
    shutil.copytree(tiny_ckpt, old / tiny_ckpt.name)
    assert ConsistencyTuner(old / "tuned", tone_tree, tmp_path / "e", steps=10, progress=False).t_range == c.t_range


def test_cli_consistency_tune_and_its_one_line_errors(tiny_ckpt, tone_tree, tmp_path, capsys):
    from edmsound.cli import main
    main(["consistency-tune", "--teacher", str(tiny_ckpt), "--data", str(tone_tree), "--out", str(tmp_path / "r"),
          "--max-nfe", "2", "--steps", "2", "--batch-size", "2", "--no-progress", "--export", str(tmp_path / "s")])
    assert json.loads((tmp_path / "s" / "info.json").read_text())["consistency"]["max_nfe"] == 2
    capsys.readouterr()
    for argv, msg in ((["--teacher", str(tmp_path / "s"), "--stages", "1"], "continuing it needs --stages >= 2"),
                      (["--teacher", str(tmp_path / "s"), "--steps", "2"], "--steps must exceed that, got 2"),
                      (["--teacher", str(tiny_ckpt), "--max-nfe", "0"], "whole number >= 1"),
                      (["--teacher", str(tiny_ckpt), "--sigma-mid", "1e9"], "sigma_mid must be in"),
                      (["--teacher", str(tiny_ckpt), "--p-std", "0"], "--p-std: must be a number > 0"),
                      (["--teacher", str(tiny_ckpt), "--p-mean", "inf"], "--p-mean: must be a finite number"),
                      (["--teacher", str(tiny_ckpt), "--envelope-weight", "-1"], "--envelope-weight: must be a number >= 0"),
                      (["--teacher", str(tiny_ckpt), "--envelope-max-sigma", "0"],
                       "--envelope-max-sigma: must be a number > 0"),
                      (["--teacher", str(tiny_ckpt), "--fit-minutes", "0"], "--fit-minutes: must be a number > 0"),
                      (["--teacher", str(tiny_ckpt), "--ema-halflife", "0"], "--ema-halflife: must be a number > 0"),
                      (["--teacher", str(tiny_ckpt), "--fit-minutes", "5", "--resume"],
                       "a time budget plans a new run"),
                      (["--teacher", str(tiny_ckpt), "--fit-minutes", "5", "--max-minutes", "9"],
                       "give the budget (--fit-minutes) or a time limit (--max-minutes), not both")):
        with pytest.raises(SystemExit) as e:
            main(["consistency-tune", "--data", str(tone_tree), "--out", str(tmp_path / "x"), "--no-progress"]
                 + argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert msg in err[-1], err


def test_tuning_noise_can_be_moved_towards_the_high_levels_and_is_recorded(tiny_ckpt, tone_tree, tmp_path):
    teacher_edm = EDMSoundPipeline(tiny_ckpt, device="cpu").preset.edm
    lo, hi = teacher_edm.sigma_min, teacher_edm.sigma_max
    mid = float(np.sqrt(lo * hi))                       # a level well inside the range: the clamp does not bind
    own = ConsistencyTuner(tiny_ckpt, tone_tree, tmp_path / "own", steps=2, progress=False, batch_size=2)
    high = ConsistencyTuner(tiny_ckpt, tone_tree, tmp_path / "high", steps=2, progress=False, batch_size=2,
                            p_mean=float(np.log(mid)), p_std=0.5)
    assert own.preset.edm.p_mean == teacher_edm.p_mean and own.preset.edm.p_std == teacher_edm.p_std
    t = high.draw_levels(20000, torch.Generator().manual_seed(0)).log()
    assert float(t.median()) == pytest.approx(np.log(mid), abs=0.03)
    assert float(t.std()) == pytest.approx(0.5, rel=0.05)
    assert float(t.min()) >= np.log(lo) - 1e-6 and float(t.max()) <= np.log(hi) + 1e-6
    high.run()
    high.export(tmp_path / "m")
    seg = json.loads((tmp_path / "m" / "info.json").read_text())["segments"][-1]
    assert seg["p_mean"] == pytest.approx(np.log(mid)) and seg["p_std"] == 0.5
    # continued, the model tunes on at the distribution it was tuned with unless told otherwise
    on = ConsistencyTuner(tmp_path / "m", tone_tree, tmp_path / "on", steps=4, progress=False, batch_size=2)
    assert on.preset.edm.p_mean == pytest.approx(np.log(mid)) and on.preset.edm.p_std == 0.5
    for kw, msg in ((dict(p_std=0.0), "p_std must be a positive number"),
                    (dict(p_mean=float("nan")), "p_mean must be a finite number")):
        with pytest.raises(ValueError, match=msg):
            ConsistencyTuner(tiny_ckpt, tone_tree, tmp_path / "bad", steps=2, progress=False, **kw)
        assert not (tmp_path / "bad").exists()


def test_the_student_ema_half_life_is_the_teachers_unless_given_and_is_recorded(tiny_ckpt, tone_tree, tmp_path):
    teacher_hl = EDMSoundPipeline(tiny_ckpt, device="cpu").preset.train.ema_halflife_steps
    own = ConsistencyTuner(tiny_ckpt, tone_tree, tmp_path / "own", steps=2, progress=False, batch_size=2)
    assert own.preset.train.ema_halflife_steps == teacher_hl
    given = teacher_hl * 3 + 7
    t = ConsistencyTuner(tiny_ckpt, tone_tree, tmp_path / "r", steps=2, progress=False, batch_size=2,
                         ema_halflife=given)
    t.run()
    t.export(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "info.json").read_text())["segments"][-1]["ema_halflife_steps"] == given
    with pytest.raises(ValueError, match="EMA half-life must be a finite number of steps > 0"):
        ConsistencyTuner(tiny_ckpt, tone_tree, tmp_path / "bad", steps=2, progress=False, ema_halflife=float("inf"))
    assert not (tmp_path / "bad").exists()


def test_a_new_student_samples_every_class_unguided_a_continued_one_keeps_its_own_guidance(guided_teacher, tone_tree,
                                                                                              tmp_path):
    """The teacher's per-class guidance (set for the teacher, possibly towards a guide model the student does not
    carry) is not the student's: a new student plays the conditional model in every class. A tuned model with
    guidance calibrated for itself keeps it when tuned further."""
    teacher, guided = guided_teacher
    teacher_pipe = EDMSoundPipeline(teacher, device="cpu")
    classes = teacher_pipe.classes
    assert teacher_pipe.preset.guidance_for(guided) == 3.0
    t = ConsistencyTuner(teacher, tone_tree, tmp_path / "r", steps=2, progress=False, batch_size=2)
    t.run()
    t.export(tmp_path / "m")
    student = EDMSoundPipeline(tmp_path / "m", device="cpu").preset
    assert [student.guidance_for(c) for c in classes] == [1.0] * len(classes)
    own = json.loads((tmp_path / "m" / "config.json").read_text())
    assert own["preset"].get("default_class_guidance") is None
    own["preset"].update(default_class_guidance={guided: 1.25})
    (tmp_path / "m" / "config.json").write_text(json.dumps(own))
    on = ConsistencyTuner(tmp_path / "m", tone_tree, tmp_path / "on", steps=4, progress=False, batch_size=2)
    assert on.preset.guidance_for(guided) == 1.25


def test_band_power_averages_each_bin_over_time_chunks_a_short_last_chunk_over_its_own_frames():
    x = torch.zeros(1, 2, 3, 20, dtype=torch.float64)
    x[0, 0, :, :16] = 1.0                   # power 1 in the first 16 frames (real part)
    x[0, 1, :, 16:] = 2.0                   # power 4 in the last 4 (imaginary part)
    p = chunk_power(x, chunk=16)
    assert p.shape == (1, 3, 2)
    torch.testing.assert_close(p, torch.tensor([[[1.0, 4.0]] * 3], dtype=torch.float64))
    x[0, 0, 1, 0] = 3.0                     # one frame of bin 1 louder: its chunk mean moves by (9 - 1) / 16
    assert float(chunk_power(x, chunk=16)[0, 1, 0]) == pytest.approx(1.5)


def test_envelope_distance_ignores_phase_and_gives_the_power_difference_of_a_gain():
    g = torch.Generator().manual_seed(0)
    sd = 0.2
    mag = 0.1 + torch.rand(4, 1, 16, 32, generator=g, dtype=torch.float64)
    phase = 2 * np.pi * torch.rand(4, 1, 16, 32, generator=g, dtype=torch.float64)
    y = torch.cat([mag * phase.cos(), mag * phase.sin()], dim=1)
    turned = 2 * np.pi * torch.rand(4, 1, 16, 32, generator=g, dtype=torch.float64)
    x = torch.cat([mag * turned.cos(), mag * turned.sin()], dim=1)       # the same magnitudes, other phases
    assert float(envelope_distance(x, y, sd).abs().max()) < 1e-20
    # constant power P in every bin: a gain a gives ((a^2 - 1) P / sd^2)^2 exactly
    P, a = 0.09, 0.5
    y = torch.zeros(2, 2, 8, 32, dtype=torch.float64)
    y[:, 0] = P ** 0.5
    torch.testing.assert_close(envelope_distance(a * y, y, sd),
                               torch.full((2,), ((a * a - 1) * P / sd ** 2) ** 2, dtype=torch.float64))
    # a click in one chunk of one bin: only that chunk's mean power differs, by its energy over the chunk length
    x = y.clone()
    x[0, 1, 3, 5] = 1.0                                                  # power +1 in one frame of 32
    d = envelope_distance(x, y, sd, chunk=16)
    assert float(d[1]) == 0.0
    assert float(d[0]) == pytest.approx((1.0 / 16 / sd ** 2) ** 2 / (8 * 2))       # one of 8 bins x 2 chunks


def test_ect_loss_adds_the_envelope_term_only_at_the_low_levels_and_it_trains_the_output_level():
    g = torch.Generator().manual_seed(1)
    y = S * torch.randn(8, 2, 8, 16, generator=g, dtype=torch.float64)
    noise = torch.randn(y.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0.01, 0.1, 0.5, 1.0, 1.5, 3.0, 8.0, 15.0], dtype=torch.float64)
    lab = torch.zeros(8, dtype=torch.long)
    r = ect_levels(t, 3, 0.2)
    a = torch.tensor(0.7, dtype=torch.float64, requires_grad=True)
    model = lambda x, s, labels: a * y          # a dull copy of the clean clip at every level
    base = ect_loss(model, y, lab, t, r, noise, 0.2)
    withenv = ect_loss(model, y, lab, t, r, noise, 0.2, envelope=(2.0, 1.0))
    low = t <= 1.0
    expect = base + 2.0 * low.to(base.dtype) * envelope_distance(0.7 * y, y, 0.2)
    torch.testing.assert_close(withenv, expect)
    assert torch.equal(withenv[~low], base[~low]) and bool((withenv[low] > base[low]).all())
    # its gradient pushes the dull output's gain up, towards the clip's level
    (withenv - base).sum().backward()
    assert float(a.grad) < 0


def test_envelope_term_is_recorded_with_the_tuned_model_and_carried_by_a_continuation(tiny_ckpt, tone_tree, tmp_path):
    tuner = ConsistencyTuner(tiny_ckpt, tone_tree, tmp_path / "run", steps=2, progress=False, batch_size=2,
                             envelope_weight=2.0, envelope_max_sigma=0.5)
    tuner.run()
    tuner.export(tmp_path / "m")
    rec = json.loads((tmp_path / "m" / "info.json").read_text())["consistency"]
    assert rec["envelope"] == {"weight": 2.0, "max_sigma": 0.5, "chunk": 16, "from_step": 0}
    plain = ConsistencyTuner(tmp_path / "m", tone_tree, tmp_path / "on", steps=4, progress=False, batch_size=2)
    assert plain.envelope_weight == 0.0 and plain.consistency["envelope"] == rec["envelope"]
    for kw, msg in ((dict(envelope_weight=-1.0), "envelope weight must be"),
                    (dict(envelope_max_sigma=float("inf")), "envelope's highest level must be")):
        with pytest.raises(ValueError, match=msg):
            ConsistencyTuner(tiny_ckpt, tone_tree, tmp_path / "bad", steps=2, progress=False, **kw)
        assert not (tmp_path / "bad").exists()


def test_a_teacher_with_per_class_gains_is_tuned_and_sampled_in_its_own_representation(tone_tree, tmp_path):
    """The student keeps the teacher's per-bin and per-class gains: it trains on the class-scaled state the teacher
    learned (every free bin of every class at RMS sigma_data), starts as the teacher's denoiser there, and its clips
    are decoded with the gains divided out."""
    from edmsound.core.presets import get_preset
    from edmsound.training.trainer import Trainer
    base = get_preset("tiny").replace_train(checkpoint_every=100)
    tr = Trainer(base, tone_tree, tmp_path / "teacher-run", steps=2, whiten_class=True, progress=False)
    tr.run()
    tr.export(tmp_path / "teacher")
    table = tr.preset.codec.class_scale
    c = ConsistencyTuner(tmp_path / "teacher", tone_tree, tmp_path / "run", max_nfe=2, stages=1, sigma_mid=0.3,
                         steps=2, progress=False, batch_size=4, checkpoint_every=100)
    assert c.preset.codec.class_scale == table and c.preset.codec.freq_scale == tr.preset.codec.freq_scale
    for k in range(len(c.classes)):
        state = c.codec.to_model(c.codec.encode(c.train_waves[c.train_labels == k]), k)
        rms = state.double().pow(2).mean(dim=(0, 1, 3)).sqrt().numpy()
        free = ((torch.tensor(table[k]) > 0.25) & (torch.tensor(table[k]) < 4.0)).numpy()
        if free.any():
            assert abs(rms[free] - base.edm.sigma_data).max() < 1e-3
    # before any tuning the student is the teacher: the same denoised state for the same noisy one
    teacher = EDMSoundPipeline(tmp_path / "teacher", device="cpu")
    y = c.codec.to_model(c.codec.encode(c.train_waves[:2]), c.train_labels[:2])
    x = y + 0.5 * torch.randn(y.shape, generator=torch.Generator().manual_seed(0))
    sigma = torch.full((2,), 0.5)
    with torch.no_grad():
        torch.testing.assert_close(c.ema(x, sigma, c.train_labels[:2]), teacher.model(x, sigma, c.train_labels[:2]))
    c.run()
    c.export(tmp_path / "tuned")
    pipe = EDMSoundPipeline(tmp_path / "tuned", device="cpu")
    assert pipe.codec.config.class_scale == table
    gen = pipe.generate(pipe.classes[0], n=2, nfe=2, seed=0)
    assert np.isfinite(gen.waves).all() and float(np.abs(gen.waves).max()) > 0
    # the clip is its spectrogram decoded, and that spectrogram is the sampled state with the class's gains out
    np.testing.assert_allclose(gen.waves, pipe.codec.decode(gen.specs).numpy(), atol=1e-4)
    k = pipe.class_index(pipe.classes[0])
    state = pipe.codec.to_model(gen.specs.double(), k)
    torch.testing.assert_close(pipe.codec.from_model(state, k), gen.specs.double())
    assert not torch.allclose(state, gen.specs.double())


def test_a_time_budget_spreads_the_whole_stage_schedule_over_the_steps_that_fit(tiny_ckpt, tone_tree, tmp_path):
    import time
    from edmsound.training.trainer import FIT_PROBE_STEPS
    c = ConsistencyTuner(tiny_ckpt, tone_tree, tmp_path / "r", max_nfe=2, stages=4, progress=False, batch_size=2,
                         checkpoint_every=10 ** 6, fit_minutes=0.1)
    start = time.time()
    out = c.run()
    took = time.time() - start
    planned = json.loads((tmp_path / "r" / "consistency.json").read_text())["planned_steps"]
    assert planned > FIT_PROBE_STEPS and c.total_steps == planned
    assert c.stage(planned // 4) == 1 and c.stage(planned) == 4     # the stages spread over the planned steps
    # it ran the planned steps, or stopped at the budget (a machine slower than during the timing probe fits fewer)
    assert out["step"] == planned or (out["step"] < planned and took >= 6)
    assert c.stage() == c.stage(out["step"])
    assert took < 6 + 30                                              # 6 s of tuning, then one check and save
    assert c.all_segments()[-1]["steps"] == [0, out["step"]]         # the timed steps are part of the stretch
    with pytest.raises(ValueError, match="a time budget plans a new run"):
        ConsistencyTuner(tiny_ckpt, tone_tree, tmp_path / "r", progress=False, resume=True, fit_minutes=1)
    with pytest.raises(ValueError, match="a number of minutes > 0"):
        ConsistencyTuner(tiny_ckpt, tone_tree, tmp_path / "z", progress=False, fit_minutes=float("nan"))


def test_a_continued_tuning_names_the_guide_its_kept_guidance_was_set_with_until_the_guide_is_attached(
        guided_teacher, tone_tree, tmp_path, capsys):
    """A tuned model whose per-class guidance was calibrated with a guide model keeps the scales when tuned further,
    but the run carries no guide: its export would guide those classes by classifier-free guidance. The export says
    so (API and CLI) and stops saying so once the guide is attached again."""
    from edmsound.cli import main
    from edmsound.training.export import attach_guide, missing_guide_note
    teacher, guided = guided_teacher
    first = ConsistencyTuner(teacher, tone_tree, tmp_path / "r", steps=2, progress=False, batch_size=2)
    first.run()
    first.export(tmp_path / "m")
    assert missing_guide_note(tmp_path / "m") is None            # guidance 1 everywhere: nothing to miss
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["preset"].update(default_class_guidance={guided: 2.5})
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    attach_guide(tmp_path / "m", teacher, note="its diffusion model")
    assert missing_guide_note(tmp_path / "m") is None            # the guide it was set with is there

    on = ConsistencyTuner(tmp_path / "m", tone_tree, tmp_path / "on", steps=4, progress=False, batch_size=2)
    assert "was set with m's guide model (its diffusion model)" in capsys.readouterr().out
    on.run()
    assert main(["export", "--run", str(tmp_path / "on"), "--out", str(tmp_path / "m2")]) in (None, 0)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: ")
    assert f"({guided} 2.5)" in err[0] and "(its diffusion model)" in err[0] and "attach-guide" in err[0]
    assert EDMSoundPipeline(tmp_path / "m2", device="cpu").preset.guide is None

    # tuned once more without the guide: still named (the record carries it); attached: silent
    again = ConsistencyTuner(tmp_path / "m2", tone_tree, tmp_path / "again", steps=6, progress=False, batch_size=2)
    again.run()
    again.export(tmp_path / "m3")
    assert "(its diffusion model)" in missing_guide_note(tmp_path / "m3")
    cfg = json.loads((tmp_path / "m3" / "config.json").read_text())
    cfg["preset"].update(default_class_guidance={guided: 1.5})       # set again (for classifier-free guidance)
    (tmp_path / "m3" / "config.json").write_text(json.dumps(cfg))
    assert missing_guide_note(tmp_path / "m3") is None
    cfg["preset"].update(default_class_guidance={guided: 2.5})
    (tmp_path / "m3" / "config.json").write_text(json.dumps(cfg))
    assert "(its diffusion model)" in missing_guide_note(tmp_path / "m3")
    attach_guide(tmp_path / "m3", teacher, note="its diffusion model")
    assert missing_guide_note(tmp_path / "m3") is None
    main(["export", "--run", str(tmp_path / "m3"), "--out", str(tmp_path / "m4")])
    assert "warning" not in capsys.readouterr().err
