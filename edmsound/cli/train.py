"""``edmsound data`` (the built-in set, a folder's summary), ``edmsound train`` and ``edmsound export``."""
from __future__ import annotations

import json
import sys

from .args import (add_precision, class_weight, class_weights, finite, non_negative, positive, positive_int,
                   positive_steps)


def _cmd_data_synth(a):
    from .. import get_preset, write_dataset
    if a.seconds is None:
        a.seconds = get_preset("default").codec.seconds
    manifest = write_dataset(a.out, per_class=a.per_class, seed=a.seed, sample_rate=a.sample_rate,
                             seconds=a.seconds, classes=a.classes.split(",") if a.classes else None)
    print(f"wrote {len(manifest['files'])} clips to {a.out}")


def _cmd_data_info(a):
    from .. import load_folder
    load_folder(a.data, a.sample_rate, int(a.seconds * a.sample_rate))


def _cmd_train(a):
    import torch
    from .. import reexec_with_jemalloc
    if a.device == "cpu" and not a.no_jemalloc:
        reexec_with_jemalloc(sys.argv[1:])
    from .. import get_preset, init_distributed, Trainer, TrainingDiverged
    if a.threads:
        torch.set_num_threads(a.threads)
    world, rank = init_distributed(a.device)
    if world > 1 and a.device == "cpu" and not a.threads:
        import os
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    preset = get_preset(a.preset).replace_train(batch_size=a.batch_size, lr=a.lr,
                                                 cooldown_steps=a.cooldown, checkpoint_every=a.checkpoint_every,
                                                 ema_halflife_steps=a.ema_halflife, loss=a.loss
                                                 ).replace_net(attention=False if a.no_attention else None,
                                                               norm=a.norm
                                                 ).replace_codec(representation=a.representation
                                                 ).replace_noise(p_mean=a.p_mean, p_std=a.p_std
                                                 ).replace_sampling(sigma_max=a.sigma_max, rho=a.rho,
                                                                    sigma_min=a.sigma_min)
    try:
        trainer = Trainer(preset, a.data, a.out, steps=a.steps, resume=a.resume, init=a.init, seed=a.seed,
                          device=a.device, progress=not a.no_progress, max_minutes=a.max_minutes,
                          whiten=a.freq_scale == "whiten",
                          whiten_class=a.freq_scale == "whiten-class", precision=a.precision,
                          class_weights=class_weights(a.class_weight), clip_weights=a.clip_weights)
        result = trainer.run()
        if a.export and rank == 0:
            trainer.export(a.export)
            print(f"exported model to {a.export}")
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if rank == 0:
        print(json.dumps(result))


def _student_io_args(p, teacher_help: str, data_help: str = "class-per-folder tree (the teacher's training data)"
                     ) -> None:
    """The model a few-step command starts from, its training data and the run directory."""
    p.add_argument("--teacher", required=True, help=teacher_help)
    p.add_argument("--data", required=True, help=data_help)
    p.add_argument("--out", required=True, help="run directory")


def _student_run_args(p, steps: int, steps_help: str = "total optimizer steps") -> None:
    """The run options every few-step student command shares with ``train``."""
    p.add_argument("--steps", type=positive_int, default=steps, help=f"{steps_help} (default {steps})")
    p.add_argument("--batch-size", type=positive_int, default=None)
    p.add_argument("--lr", type=positive, default=None)
    p.add_argument("--checkpoint-every", type=positive_int, default=None)
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    add_precision(p, "the student's and the teacher's; recorded per stretch in info.json")
    p.add_argument("--threads", type=positive_int, default=None)
    p.add_argument("--max-minutes", type=positive, default=None, help="checkpoint and stop after this long")
    p.add_argument("--fit-minutes", type=positive, default=None, metavar="MINUTES",
                   help="instead of --steps: time the first steps, then run the steps that fit in this many minutes "
                        "and stop there, so the run ends where its schedule ends (a new run; the number is printed "
                        "for a later --resume --steps; not with --max-minutes)")
    p.add_argument("--export", default=None, help="write the student's model directory here when done")
    p.add_argument("--no-progress", action="store_true")


def _run_student(a, make, what: str):
    """Build the student trainer with the shared run options, run it, export it when asked."""
    import torch
    from .. import TrainingDiverged
    if a.threads:
        torch.set_num_threads(a.threads)
    try:
        t = make(a.teacher, a.data, a.out, steps=a.steps, resume=a.resume, seed=a.seed, device=a.device,
                 progress=not a.no_progress, max_minutes=a.max_minutes, batch_size=a.batch_size, lr=a.lr,
                 checkpoint_every=a.checkpoint_every, precision=a.precision, fit_minutes=a.fit_minutes)
        result = t.run()
        if a.export:
            t.export(a.export)
            print(f"exported {what} to {a.export}")
            _warn_missing_guide(a.export)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)
    print(json.dumps(result))


def _cmd_consistency(a):
    from .. import ConsistencyTuner
    _run_student(a, lambda *x, **kw: ConsistencyTuner(*x, max_nfe=a.max_nfe, stages=a.stages,
                                                      sigma_mid=a.sigma_mid, p_mean=a.p_mean, p_std=a.p_std,
                                                      envelope_weight=a.envelope_weight,
                                                      envelope_max_sigma=a.envelope_max_sigma,
                                                      ema_halflife=a.ema_halflife,
                                                      clip_weights=a.clip_weights,
                                                      class_weights=class_weights(a.class_weight), **kw),
                 f"the consistency-tuned model (NFE 1 to {a.max_nfe})")


def _cmd_bake(a):
    from .. import GuidanceBaker
    _run_student(a, lambda *x, **kw: GuidanceBaker(*x, share=a.share, ema_halflife=a.ema_halflife, **kw),
                 "the model with its guidance baked in (guidance 1 in every class)")


def _cmd_match_spectrum(a):
    from .. import SpectrumMatcher
    _run_student(a, lambda *x, **kw: SpectrumMatcher(*x, weight=a.weight, per_class=a.per_class,
                                                     momentum=a.momentum, push=a.push, guided=a.guided,
                                                     ema_halflife=a.ema_halflife, **kw),
                 "the model with its class spectra matched")


def _cmd_blend(a):
    from .. import blend_models
    print(f"wrote {blend_models(a.start, a.end, a.out, weight=a.weight)}: "
          f"{1 - a.weight:g} x {a.start} + {a.weight:g} x {a.end}")


def _cmd_distill(a):
    from .. import Distiller
    _run_student(a, lambda *x, **kw: Distiller(*x, student_nfe=a.nfe, teacher_solver=a.teacher_solver,
                                               guidance=a.guidance, **kw),
                 f"the {a.nfe}-step student")


def _cmd_export(a):
    from .. import export_model
    try:
        src = export_model(a.run, a.out, ema_only=a.ema_only, sampler=a.sampler, nfe=a.nfe, guidance=a.guidance,
                           guidance_interval=a.guidance_interval, sigma_min=a.sigma_min, sigma_max=a.sigma_max,
                           rho=a.rho)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"exported {src} -> {a.out}")
    _warn_missing_guide(a.out)


def _warn_missing_guide(model_dir):
    from .. import missing_guide_note
    note = missing_guide_note(model_dir)
    if note:
        print(f"warning: {note}", file=sys.stderr)


def _cmd_attach_guide(a):
    from .. import attach_guide
    try:
        note = attach_guide(a.checkpoint, None if a.remove else a.guide, weights=a.weights, note=a.note)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"{a.checkpoint}: guide model removed (classifier-free guidance)" if note is None else
          f"{a.checkpoint}: guidance now pushes away from {note} (autoguidance)")


def _tuning_parser(subparsers, name: str, help: str, model_help: str, own_args, *, ema_default: float, steps: int,
                   steps_help: str, func) -> None:
    """A command that goes on training a consistency-tuned model: its model and data, ``own_args(parser)``, the EMA
    half-life (default ``ema_default``) and the run options."""
    p = subparsers.add_parser(name, help=help)
    _student_io_args(p, model_help, "class-per-folder tree (the model's training data)")
    own_args(p)
    p.add_argument("--ema-halflife", type=positive, default=None, metavar="STEPS",
                   help=f"EMA half-life in steps (default {ema_default:g})")
    _student_run_args(p, steps=steps, steps_help=steps_help)
    p.set_defaults(func=func)


def register(subparsers) -> None:
    data = subparsers.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    s = data.add_parser("synth", help="write the built-in procedural foley set as a class-per-folder tree")
    s.add_argument("--out", required=True)
    s.add_argument("--per-class", type=positive_int, required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--sample-rate", type=positive_int, default=16000)
    s.add_argument("--seconds", type=positive, default=None, help="clip length (default: the default preset's)")
    s.add_argument("--classes", default=None, help="comma-separated subset of classes")
    s.set_defaults(func=_cmd_data_synth)
    s = data.add_parser("info", help="load a class-per-folder tree and print its summary")
    s.add_argument("--data", required=True)
    s.add_argument("--sample-rate", type=positive_int, default=16000)
    s.add_argument("--seconds", type=positive, default=1.0)
    s.set_defaults(func=_cmd_data_info)

    t = subparsers.add_parser("train", help="train or resume an EDMSound model")
    t.add_argument("--preset", default="default")
    t.add_argument("--data", required=True, help="class-per-folder tree")
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--steps", type=positive_int, default=None, help="total steps (default: the preset's)")
    t.add_argument("--batch-size", type=positive_int, default=None)
    t.add_argument("--lr", type=positive, default=None)
    t.add_argument("--cooldown", type=positive_int, default=None, metavar="STEPS",
                   help="the learning rate falls linearly to 0 over the last STEPS steps before --steps (give the "
                        "same on --resume); for a final stretch whose weights are to ship (default: constant)")
    t.add_argument("--ema-halflife", type=positive_steps, default=None, metavar="STEPS",
                   help="EMA half-life in optimizer steps (default: the preset's); may change on --resume")
    t.add_argument("--p-mean", type=finite, default=None, metavar="LN_SIGMA",
                   help="training noise: ln(sigma) ~ N(P_MEAN, P_STD^2) (default: the preset's, -3 for `default`); "
                        "may change on --resume or --init")
    t.add_argument("--p-std", type=positive, default=None, metavar="STD", help="see --p-mean (default: the preset's)")
    t.add_argument("--sigma-max", type=positive, default=None, metavar="SIGMA",
                   help="the sampler's starting noise level recorded in the exported model (default: the preset's); "
                        "train at it too (see --p-mean)")
    t.add_argument("--rho", type=positive, default=None, help="the sampler's Karras rho recorded in the export")
    t.add_argument("--sigma-min", type=positive, default=None, help="the sampler's lowest noise level in the export")
    t.add_argument("--class-weight", type=class_weight, action="append", default=None, metavar="CLASS=W",
                   help="draw CLASS's clips W times as often as the others' (W > 0; repeat for more classes; "
                        "default: every clip alike); may change on --resume")
    t.add_argument("--clip-weights", default=None, metavar="CSV",
                   help="draw each training clip in proportion to its weight in this clip,weight file (e.g. from "
                        "`edmsound coverage`: more of the clips the model rarely makes); clips it does not name: 1; "
                        "repeat on --resume (default: every clip alike)")
    t.add_argument("--checkpoint-every", type=positive_int, default=None)
    ab = t.add_argument_group("ablation switches (recorded in the checkpoint's config)")
    ab.add_argument("--loss", choices=["l2", "l1"], default=None,
                    help="training loss, both with EDM's per-noise-level balance (default: the preset's, l2)")
    ab.add_argument("--no-attention", action="store_true", help="no self-attention in the U-Net")
    ab.add_argument("--norm", choices=["group", "none"], default=None,
                    help="the U-Net blocks' normalisation (default: the preset's, group)")
    ab.add_argument("--representation", choices=["complex", "magnitude", "mel"], default=None,
                    help="what the model sees: the complex spectrogram (default), its magnitude only or a log-mel "
                         "spectrogram, the phase recovered by Griffin-Lim when decoding (baselines)")
    t.add_argument("--freq-scale", choices=["none", "whiten", "whiten-class"], default="none",
                   help="whiten: measure a gain per frequency bin on the training clips so that every bin has RMS "
                        "sigma_data (quiet high bins are lifted), stored with the model and undone exactly at "
                        "decoding; whiten-class: that, and a gain per class and bin on top so that every bin of "
                        "every class has RMS sigma_data; complex representation only; chosen when a run starts "
                        "(default none)")
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--init", default=None, help="warm start from a model directory (weights only)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu")
    add_precision(t, "recorded per stretch in info.json")
    t.add_argument("--threads", type=positive_int, default=None)
    t.add_argument("--max-minutes", type=positive, default=None, help="checkpoint and stop after this long")
    t.add_argument("--export", default=None, help="write a model directory here when done")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--no-jemalloc", action="store_true")
    t.set_defaults(func=_cmd_train)

    d = subparsers.add_parser("distill", help="progressive distillation: a student that takes in one step what "
                                              "its teacher takes in two")
    _student_io_args(d, "a model directory (the shipped model, or a student)")
    d.add_argument("--nfe", type=int, required=True,
                   help="the student's steps (network evaluations); a student teacher of N steps needs N/2")
    d.add_argument("--teacher-solver", choices=["heun", "euler"], default=None,
                   help="the teacher's steps (default: heun for a trained model, euler for a student)")
    d.add_argument("--guidance", type=float, default=None,
                   help="the teacher's guidance scale the student learns (default: the teacher's shipped one)")
    _student_run_args(d, steps=2000)
    d.set_defaults(func=_cmd_distill)

    c = subparsers.add_parser("consistency-tune", help="easy consistency tuning: a model that samples in 1 to a "
                                                        "few evaluations with the consistency sampler")
    _student_io_args(c, "a model directory: a diffusion model (e.g. the shipped one), or a consistency-tuned model "
                        "to tune further (its stages and step count go on from where it stopped)")
    c.add_argument("--max-nfe", type=int, default=4,
                   help="the largest budget the tuned model accepts (it samples at 1 to this; default 4)")
    c.add_argument("--stages", type=int, default=8,
                   help="times the gap between the paired noise levels halves over the run (default 8)")
    c.add_argument("--sigma-mid", type=float, default=None,
                   help="the lowest level multistep sampling re-noises to (default 0.3, or a tuned model's own)")
    c.add_argument("--p-mean", type=finite, default=None, metavar="LN_SIGMA",
                   help="tuning noise: ln(sigma) ~ N(P_MEAN, P_STD^2) over the teacher's range (default: the model's "
                        "own); larger spends more of the tuning where a jump from noise starts; repeat on --resume")
    c.add_argument("--p-std", type=positive, default=None, metavar="STD", help="see --p-mean (default: the model's own)")
    c.add_argument("--envelope-weight", type=non_negative, default=0.0, metavar="W",
                   help="add a spectral-envelope term (the output's power per bin and 128-ms chunk against the "
                        "clip's, phase ignored) at the low noise levels the last jump starts from, against dull "
                        "quiet bands; 0 turns it off (default 0); repeat on --resume")
    c.add_argument("--envelope-max-sigma", type=positive, default=1.0, metavar="SIGMA",
                   help="the highest noise level the envelope term applies at (default 1.0)")
    c.add_argument("--ema-halflife", type=positive, default=None, metavar="STEPS",
                   help="EMA half-life in steps (default: the model's own); repeat on --resume")
    c.add_argument("--clip-weights", default=None, metavar="CSV",
                   help="draw each training clip in proportion to its weight in this clip,weight file (e.g. from "
                        "`edmsound coverage`: more of the clips the model rarely makes); clips it does not name: 1; "
                        "repeat on --resume (default: every clip alike)")
    c.add_argument("--class-weight", type=class_weight, action="append", default=None, metavar="CLASS=W",
                   help="draw CLASS's clips W times as often as the others' (W > 0; repeatable; default: every clip "
                        "alike); repeat on --resume")
    _student_run_args(c, steps=4000)
    c.set_defaults(func=_cmd_consistency)

    def bake_args(b):
        b.add_argument("--share", type=float, default=0.5,
                       help="share of the noise levels drawn from the guided interval; the rest keep the model as it "
                            "was elsewhere (default 0.5)")
    _tuning_parser(subparsers, "bake-guidance", "teach a consistency-tuned model to give its guided output in one "
                   "evaluation, so guided classes sample as fast as the others",
                   "a consistency-tuned model with per-class guidance (e.g. checkpoints/fast); it is also where the "
                   "baking starts", bake_args, ema_default=250, steps=1500, steps_help="baking steps, counted on "
                   "from the model's own", func=_cmd_bake)

    def match_args(m):
        m.add_argument("--weight", type=positive, default=0.01,
                       help="weight of the spectrum term against the anchor to the starting model (default 0.01)")
        m.add_argument("--per-class", type=positive_int, default=4, metavar="N",
                       help="samples of every class drawn per step to measure its spectrum (default 4)")
        m.add_argument("--momentum", type=float, default=0.9,
                       help="running mean of the measured spectra, 0 to below 1 (default 0.9)")
        m.add_argument("--push", choices=["clip", "mean", "rank"], default="clip",
                       help="how a class's error moves its clips: 'clip' every clip by the same dB in a band (keeps "
                            "their spread; default), 'mean' each by its share of the band's power, 'rank' each "
                            "towards the training clips' dB at its rank in its class (matches the spread too; a "
                            "resumed run keeps the push it started with)")
        m.add_argument("--guided", action="store_true",
                       help="draw the samples with the model's own per-class guidance (and guide model), as it is "
                            "sampled; the exported model is given that guidance back with attach-guide and "
                            "set-guidance")
    _tuning_parser(subparsers, "match-spectrum", "tune a consistency-tuned model so its own samples have each "
                   "class's spectral envelope and level of its training clips",
                   "a consistency-tuned model (e.g. checkpoints/fast); it is also where the tuning starts",
                   match_args, ema_default=100, steps=600, steps_help="matching steps, counted on from the model's "
                   "own", func=_cmd_match_spectrum)

    bl = subparsers.add_parser("blend", help="a model between two of the same network (e.g. before and after a "
                                             "tuning): their weights interpolated")
    bl.add_argument("--start", required=True, help="model directory at weight 0 (e.g. the model before tuning)")
    bl.add_argument("--end", required=True, help="model directory at weight 1 (its config and sampling are kept)")
    bl.add_argument("--weight", type=float, required=True, help="how far from --start towards --end, 0 to 1")
    bl.add_argument("--out", required=True, help="new model directory")
    bl.set_defaults(func=_cmd_blend)

    e = subparsers.add_parser("export", help="write a shippable model directory from a run")
    e.add_argument("--run", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--ema-only", action="store_true")
    e.add_argument("--sampler", default=None, help="shipped default sampler (default: the run's)")
    e.add_argument("--nfe", type=int, default=None, help="shipped default NFE (default: the run's)")
    e.add_argument("--guidance", type=float, default=None, help="shipped default guidance (default: the run's)")
    e.add_argument("--guidance-interval", default=None, metavar="LO,HI",
                   help="shipped guidance interval of noise levels ('none': guide at every level; default: the run's)")
    e.add_argument("--sigma-min", type=positive, default=None, help="shipped schedule: lowest noise level")
    e.add_argument("--sigma-max", type=positive, default=None, help="shipped schedule: starting noise level")
    e.add_argument("--rho", type=positive, default=None, help="shipped schedule: Karras rho")
    e.set_defaults(func=_cmd_export)

    g = subparsers.add_parser("attach-guide", help="give a model a weaker version of itself to guide with "
                              "(autoguidance) instead of its null class")
    g.add_argument("--checkpoint", required=True, help="the model directory to change")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--guide", help="model or run directory of the same network, classes and gains "
                     "(an earlier or less trained version)")
    src.add_argument("--remove", action="store_true", help="drop the guide model: classifier-free guidance again")
    g.add_argument("--weights", choices=["ema", "model"], default="ema", help="which of the guide's weights")
    g.add_argument("--note", default=None, help="how the model card and sidecars name the guide "
                   "(default: its step and weights)")
    g.set_defaults(func=_cmd_attach_guide)
