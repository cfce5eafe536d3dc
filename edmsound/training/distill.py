"""Progressive distillation (Salimans & Ho 2022, "Progressive Distillation for Fast Sampling of Diffusion Models")
in the EDM parameterisation: a student learns to take in one deterministic step what its teacher takes in two.

The teacher walks a Karras schedule of 2M noise levels t_0 > ... > t_{2M-1} (then 0); the student walks every other
one, S = (t_0, t_2, ..., t_{2M-2}) — itself a Karras schedule with the same sigma_max and rho and sigma_min =
t_{2M-2} — so it samples with ``euler`` at exactly M network evaluations. For a student step t_{2k} -> t_{2k+2}:

    x_a = y + t_{2k} n                              (a training clip, noised)
    x_c = teacher step t_{2k+1} -> t_{2k+2} of teacher step t_{2k} -> t_{2k+1} of x_a     (no gradient)
    target = x_a - t_{2k} (x_c - x_a) / (t_{2k+2} - t_{2k})   (the denoised value one Euler step needs to land
                                                              on x_c; the teacher's x_c itself when t_{2k+2} = 0)
    loss = lambda(t_{2k}) || D_student(x_a, t_{2k}) - target ||^2       (EDM's weighting)

The student starts from the teacher's weights. A teacher that is itself a student takes Euler steps (the steps it
was trained for); the original model takes Heun steps (EDM Alg. 1, twice the evaluations, much closer to the exact
ODE), so the first student learns from a better teacher than Euler at the same grid would be. Classifier-free
guidance: the teacher is the guided denoiser at one scale (default: the teacher's shipped one); the student learns
the guided result and ships with guidance 1. Halving again (8 -> 4 -> 2 -> 1) is ``distill`` with the student as
the teacher.
"""
from __future__ import annotations

import dataclasses

import torch

from ..core.edm import loss_weight
from ..core.guidance import GuidedDenoiser, check_guidance
from ..core.model import load_denoiser
from ..core.schedules import karras_sigmas
from .export import with_sampling_defaults
from .trainer import StudentTrainer, read_teacher

TEACHER_SOLVERS = ("heun", "euler")


def teacher_grid(sigma_min: float, sigma_max: float, rho: float, student_nfe: int) -> torch.Tensor:
    """The teacher's 2M noise levels (then 0) for a student of M evaluations, float64."""
    return karras_sigmas(2 * int(student_nfe), sigma_min, sigma_max, rho)


def student_sigma_min(grid: torch.Tensor) -> float:
    """The student's schedule ends at t_{2M-2} (M = 1: its single level is sigma_max whatever sigma_min says,
    so the teacher's lowest level is recorded)."""
    m = (len(grid) - 1) // 2
    return float(grid[2 * m - 2]) if m > 1 else float(grid[1])


def solver_step(D, x: torch.Tensor, s: torch.Tensor, s_next: torch.Tensor, solver: str) -> torch.Tensor:
    """One deterministic step of the probability-flow ODE from per-sample levels ``s`` to ``s_next`` (may be 0):
    Euler, or Heun (EDM Alg. 1: the second-order correction where ``s_next`` > 0)."""
    b = (-1,) + (1,) * (x.dim() - 1)
    d = (x - D(x, s)) / s.reshape(b)
    x_next = x + (s_next - s).reshape(b) * d
    if solver == "euler":
        return x_next
    pos = s_next > 0
    s2 = torch.where(pos, s_next, s)                       # any positive level where the correction is unused
    d2 = (x_next - D(x_next, s2)) / s2.reshape(b)
    heun = x + (s_next - s).reshape(b) * 0.5 * (d + d2)
    return torch.where(pos.reshape(b), heun, x_next)


def distill_targets(teacher_D, y: torch.Tensor, grid: torch.Tensor, k: torch.Tensor, noise: torch.Tensor,
                    solver: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_a, sigma_a, target) for student steps ``k`` (per sample) from clean ``y`` and unit ``noise``."""
    g = grid.to(device=y.device, dtype=y.dtype)
    sa, sb, sc = g[2 * k], g[2 * k + 1], g[2 * k + 2]
    b = (-1,) + (1,) * (y.dim() - 1)
    x_a = y + sa.reshape(b) * noise
    with torch.no_grad():
        x_b = solver_step(teacher_D, x_a, sa, sb, solver)
        x_c = solver_step(teacher_D, x_b, sb, sc, solver)
    last = (sc == 0).reshape(b)
    target = torch.where(last, x_c, x_a - sa.reshape(b) * (x_c - x_a) / (sc - sa).reshape(b))
    return x_a, sa, target


class Distiller(StudentTrainer):
    """:class:`Trainer` whose loss is progressive distillation from a teacher model directory (resumable,
    checkpointed, logged and exported the same way)."""

    RECORD = "distillation"

    def __init__(self, teacher, data_dir, run_dir, *, student_nfe: int, teacher_solver: str | None = None,
                 guidance: float | None = None, steps: int | None = None, resume: bool = False, seed: int = 0,
                 device: str = "cpu", progress: bool = True, max_minutes: float | None = None,
                 batch_size: int | None = None, lr: float | None = None, checkpoint_every: int | None = None,
                 precision: str = "auto", fit_minutes: float | None = None):
        teacher_dir, tpreset, classes, tinfo = read_teacher(teacher)
        M = int(student_nfe)
        if M < 1 or M != student_nfe:
            raise ValueError(f"the student's NFE must be a whole number >= 1, got {student_nfe!r}")
        if "consistency" in tinfo:
            raise ValueError(f"{teacher_dir} is a consistency-tuned model (it samples with the consistency "
                             "sampler); distil from a diffusion model or a distilled student")
        was_student = "distillation" in tinfo
        solver = teacher_solver or ("euler" if was_student else "heun")
        if solver not in TEACHER_SOLVERS:
            raise ValueError(f"unknown teacher solver {solver!r}; valid: {', '.join(TEACHER_SOLVERS)}")
        if was_student:
            t_nfe = tpreset.student_nfe or tpreset.default_nfe
            if 2 * M != t_nfe:
                raise ValueError(f"the teacher is a {t_nfe}-step student: the next student takes {t_nfe // 2} "
                                 f"steps (got --nfe {M})" if t_nfe % 2 == 0 else
                                 f"the teacher is a {t_nfe}-step student and cannot be halved")
        e = tpreset.edm
        self.grid = teacher_grid(e.sigma_min, e.sigma_max, e.rho, M)
        self.teacher_solver = solver
        w = tpreset.default_guidance if guidance is None else check_guidance(guidance)
        self.teacher_guidance = w
        self.teacher_interval = tpreset.default_guidance_interval
        student = with_sampling_defaults(tpreset, "euler", M, guidance=1.0, guidance_interval="none",
                                         sigma_min=student_sigma_min(self.grid),
                                         clear_class_guidance=True)          # the guided result is learned
        student = dataclasses.replace(student.replace_train(batch_size=batch_size, lr=lr,
                                                            checkpoint_every=checkpoint_every), student_nfe=M,
                                      student_sampler="euler")
        self.distillation = {"teacher": teacher_dir.name, "teacher_nfe_grid": 2 * M, "student_nfe": M,
                             "teacher_solver": solver, "teacher_guidance": w,
                             "teacher_guidance_interval": None if self.teacher_interval is None
                             else list(self.teacher_interval),
                             "grid": [round(float(v), 6) for v in self.grid],
                             "lineage": list(tinfo.get("distillation", {}).get("lineage", [])) + [teacher_dir.name]}
        super().__init__(student, teacher_dir, classes, self.distillation, data_dir, run_dir, steps=steps,
                         resume=resume, seed=seed, device=device, progress=progress, max_minutes=max_minutes,
                         precision=precision, fit_minutes=fit_minutes)
        self.teacher, _, _, _ = load_denoiser(teacher_dir, self.device, "ema", bf16=precision)
        self.teacher.requires_grad_(False).eval()

    def loss(self, model, y, labels, generator):
        M = (len(self.grid) - 1) // 2
        k = torch.randint(M, (y.shape[0],), generator=generator).to(y.device)
        noise = torch.randn(y.shape, generator=generator).to(y.device)
        guided = GuidedDenoiser(self.teacher, labels, self.teacher_guidance, self.teacher_interval)
        x_a, sa, target = self.teacher_targets(
            lambda: distill_targets(guided, y, self.grid, k, noise, self.teacher_solver))
        D = model(x_a, sa, labels)
        return loss_weight(sa, self.preset.edm.sigma_data) * ((D - target) ** 2).flatten(1).mean(dim=1)

