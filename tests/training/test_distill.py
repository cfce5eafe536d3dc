"""Progressive distillation: nested schedules, the step-matching target (analytic), Heun vs Euler teachers on an
exact ODE, and a short resumable run on the tiny checkpoint that exports an ``euler`` student of M steps."""
import json

import numpy as np
import pytest
import torch

from edmsound.core.pipeline import EDMSoundPipeline
from edmsound.core.schedules import karras_sigmas
from edmsound.training.distill import (Distiller, distill_targets, solver_step, student_sigma_min, teacher_grid)

S2 = 0.25 ** 2          # data variance of a zero-mean Gaussian: D(x, sigma) = S2 / (S2 + sigma^2) x exactly


def gaussian_D(x, sigma):
    s = sigma.reshape((-1,) + (1,) * (x.dim() - 1))
    return S2 / (S2 + s ** 2) * x


def exact_flow(x, s_from, s_to):
    """The probability-flow ODE of that Gaussian, solved exactly: x scales with sqrt(S2 + sigma^2)."""
    r = torch.sqrt((S2 + s_to ** 2) / (S2 + s_from ** 2)).reshape((-1,) + (1,) * (x.dim() - 1))
    return x * r


@pytest.mark.parametrize("M", [1, 2, 3, 4, 8])
def test_the_student_schedule_is_every_other_teacher_level(M):
    grid = teacher_grid(0.002, 15.0, 2.5, M)
    student = karras_sigmas(M, student_sigma_min(grid), 15.0, 2.5)
    torch.testing.assert_close(student[:-1], grid[0:2 * M:2], rtol=1e-9, atol=0)
    assert student[-1] == 0 and grid[-1] == 0 and len(grid) == 2 * M + 1


def test_one_euler_step_with_the_target_lands_where_two_teacher_steps_do():
    torch.manual_seed(0)
    grid = teacher_grid(0.002, 15.0, 2.5, 4)
    y = 0.25 * torch.randn(6, 2, 4, 4, dtype=torch.float64)
    noise = torch.randn_like(y)
    k = torch.tensor([0, 1, 2, 3, 3, 0])
    for solver in ("euler", "heun"):
        x_a, sa, target = distill_targets(gaussian_D, y, grid, k, noise, solver)
        sc = grid[2 * k + 2]
        b = (-1, 1, 1, 1)
        student = x_a + (sc - sa).reshape(b) * (x_a - target) / sa.reshape(b)       # one Euler step, D = target
        x_b = solver_step(gaussian_D, x_a, sa, grid[2 * k + 1], solver)
        x_c = solver_step(gaussian_D, x_b, grid[2 * k + 1], sc, solver)
        last = sc == 0
        torch.testing.assert_close(student[~last], x_c[~last])
        torch.testing.assert_close(target[last], x_c[last])        # the last step: the teacher's output itself


def test_heun_teacher_steps_converge_one_order_faster_than_euler():
    """Local error of one step on the exact flow: Euler O(h^2), Heun O(h^3); halving the step divides them by
    about 4 and 8 (measured from the two smallest steps)."""
    x = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    err = {}
    for h in (0.1, 0.05, 0.025):
        s, s_next = torch.full((4,), 0.5, dtype=torch.float64), torch.full((4,), 0.5 - h, dtype=torch.float64)
        exact = exact_flow(x, s, s_next)
        for sv in ("euler", "heun"):
            err[sv, h] = float((solver_step(gaussian_D, x, s, s_next, sv) - exact).abs().max())
    assert 3.0 < err["euler", 0.05] / err["euler", 0.025] < 5.5
    assert 6.0 < err["heun", 0.05] / err["heun", 0.025] < 10.0
    assert err["heun", 0.025] < 0.2 * err["euler", 0.025]
    s = torch.full((4,), 15.0, dtype=torch.float64)
    zero = solver_step(gaussian_D, x, s, torch.zeros(4, dtype=torch.float64), "heun")
    torch.testing.assert_close(zero, gaussian_D(x, s))              # a step to 0 is the denoised value


def test_distill_runs_resumes_and_exports_a_student(tiny_ckpt, tone_tree, tmp_path):
    run = tmp_path / "run"
    d = Distiller(tiny_ckpt, tone_tree, run, student_nfe=2, steps=6, progress=False, batch_size=4,
                  checkpoint_every=3)
    first = d.run()
    assert first["step"] == 6
    import csv
    losses = [float(r["loss"]) for r in csv.DictReader(open(run / "log.csv"))]
    assert losses and all(np.isfinite(losses)) and d.teacher_solver == "heun"
    info = json.loads((run / "distillation.json").read_text())
    assert info["student_nfe"] == 2 and len(info["grid"]) == 5
    d2 = Distiller(tiny_ckpt, tone_tree, run, student_nfe=2, steps=9, progress=False, batch_size=4,
                   checkpoint_every=3, resume=True)
    assert d2.step == first["step"]
    d2.run()
    out = tmp_path / "student"
    d2.export(out)
    pipe = EDMSoundPipeline(out, device="cpu")
    assert pipe.preset.default_sampler == "euler" and pipe.preset.default_nfe == 2
    assert pipe.preset.edm.sigma_min == pytest.approx(info["grid"][2], rel=1e-5)
    gen = pipe.generate(pipe.classes[0], n=2, seed=0)
    assert gen.settings["nfe"] == 2 and np.isfinite(gen.waves).all()
    # a student samples the way it was distilled, and says so to anyone who asks otherwise
    assert pipe.samplers == ["euler"] and pipe.valid_nfes("euler") == [2] and pipe.student_nfe == 2
    for kw in (dict(sampler="dpmpp_2m", nfe=2), dict(sampler="euler", nfe=4)):
        with pytest.raises(ValueError, match="distilled 2-step student: it samples with euler at NFE 2 only"):
            pipe.generate(pipe.classes[0], **kw)
    from edmsound.app.service import EDMSoundService
    svc = EDMSoundService(pipe)
    assert svc.samplers == ["euler"] and svc.nfe_slider("euler") == {"minimum": 2, "maximum": 2, "step": 1}
    assert svc.defaults["sampler"] == "euler" and svc.defaults["nfe"] == 2 and svc.snap_nfe("euler", 7) == 2
    assert svc.nfe_rule("euler") == "2 only (the budget this model was distilled for)"
    with pytest.raises(ValueError, match="unknown sampler 'heun'; valid: euler"):
        svc.generate(pipe.classes[0], "heun", 2)
    with pytest.raises(ValueError, match="2-step student"):
        svc.generate(pipe.classes[0], "euler", 3)
    svc.close()
    # halving again: the student is the teacher (Euler steps), and only half its steps are allowed
    d3 = Distiller(out, tone_tree, tmp_path / "run1", student_nfe=1, steps=1, progress=False, batch_size=2)
    assert d3.teacher_solver == "euler" and d3.distillation["lineage"][-1] == "student"
    with pytest.raises(ValueError, match="the next student takes 1 steps"):
        Distiller(out, tone_tree, tmp_path / "run2", student_nfe=2, steps=1, progress=False)


def test_cli_distill_and_its_one_line_errors(tiny_ckpt, tone_tree, tmp_path, capsys):
    from edmsound.cli import main
    main(["distill", "--teacher", str(tiny_ckpt), "--data", str(tone_tree), "--out", str(tmp_path / "r"),
          "--nfe", "2", "--steps", "2", "--batch-size", "2", "--no-progress", "--export", str(tmp_path / "s"),
          "--precision", "fp32"])
    info = json.loads((tmp_path / "s" / "info.json").read_text())
    assert info["distillation"]["student_nfe"] == 2 and info["segments"][-1]["precision"] == "fp32"
    capsys.readouterr()
    for argv, msg in ((["--teacher", str(tmp_path / "s"), "--nfe", "2"], "the next student takes 1 steps"),
                      (["--teacher", str(tiny_ckpt), "--nfe", "0"], "whole number >= 1"),
                      (["--teacher", str(tiny_ckpt), "--nfe", "2", "--teacher-solver", "rk4"], "invalid choice")):
        with pytest.raises(SystemExit) as e:
            main(["distill", "--data", str(tone_tree), "--out", str(tmp_path / "x"), "--no-progress"] + argv)
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert msg in err[-1], err


def test_a_time_budget_runs_the_steps_that_fit_and_records_the_plan(tiny_ckpt, tone_tree, tmp_path, capsys):
    import shutil
    import time
    teacher = shutil.copytree(tiny_ckpt, tmp_path / "teacher")
    config = json.loads((teacher / "config.json").read_text())
    config["preset"]["train"]["cooldown_steps"] = 10 ** 6          # a teacher whose training ended in a cooldown
    (teacher / "config.json").write_text(json.dumps(config))
    d = Distiller(teacher, tone_tree, tmp_path / "run", student_nfe=2, progress=False, batch_size=2,
                  checkpoint_every=10 ** 6, fit_minutes=0.03)
    assert d.preset.train.cooldown_steps == 0                       # the student's run does not inherit it
    start = time.time()
    out = d.run()
    took = time.time() - start
    planned = json.loads((tmp_path / "run" / "distillation.json").read_text())["planned_steps"]
    assert d.total_steps == planned > 1 and planned // 2 <= out["step"] <= planned
    assert took < 1.8 + 30                                    # 1.8 s of distillation, then one check and save
    assert f"steps 0 to {planned} (after a stop, continue with --resume --steps {planned})" in capsys.readouterr().out


def test_the_student_samples_every_class_at_guidance_1_whatever_the_teachers_per_class_guidance(guided_teacher,
                                                                                               tone_tree, tmp_path):
    teacher, guided = guided_teacher
    teacher_pipe = EDMSoundPipeline(teacher, device="cpu")
    classes = teacher_pipe.classes
    assert teacher_pipe.preset.guidance_for(guided) == 3.0
    d = Distiller(teacher, tone_tree, tmp_path / "run", student_nfe=2, steps=1, progress=False, batch_size=2)
    d.run()
    d.export(tmp_path / "s")
    student = EDMSoundPipeline(tmp_path / "s", device="cpu").preset
    assert [student.guidance_for(c) for c in classes] == [1.0] * len(classes)
