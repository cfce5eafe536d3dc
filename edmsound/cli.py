"""``edmsound`` command line: a thin layer over the library."""
from __future__ import annotations

import argparse
import json
import math
import sys


def _cmd_data_synth(a):
    from .presets import get_preset
    from .synth import write_dataset
    if a.seconds is None:
        a.seconds = get_preset("default").codec.seconds
    manifest = write_dataset(a.out, per_class=a.per_class, seed=a.seed, sample_rate=a.sample_rate,
                             seconds=a.seconds, classes=a.classes.split(",") if a.classes else None)
    print(f"wrote {len(manifest['files'])} clips to {a.out}")


def _cmd_data_info(a):
    from .data import load_folder
    load_folder(a.data, a.sample_rate, int(a.seconds * a.sample_rate))


def _number(text: str, ok, need: str) -> float:
    """argparse type: ``float(text)`` if ``ok`` of it, else an error saying what was ``need``-ed."""
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not (math.isfinite(v) and ok(v)):
        raise argparse.ArgumentTypeError(f"must be {need}, got {text!r}")
    return v


def _positive_steps(text: str) -> float:
    return _number(text, lambda v: v > 0, "a number of steps > 0")


def _finite(text: str) -> float:
    return _number(text, lambda v: True, "a finite number")


def _positive(text: str) -> float:
    return _number(text, lambda v: v > 0, "a number > 0")


def _peak_target(text: str) -> float:
    return _number(text, lambda v: -60 <= v <= 0, "a peak level in [-60, 0] dBFS")


def _lufs_target(text: str) -> float:
    return _number(text, lambda v: -60 <= v <= -5, "a loudness in [-60, -5] LUFS")


def _cmd_train(a):
    import torch
    from .launch import reexec_with_jemalloc
    if a.device == "cpu" and not a.no_jemalloc:
        reexec_with_jemalloc(sys.argv[1:])
    from .presets import get_preset
    from .train import TrainingDiverged, Trainer, init_distributed
    if a.threads:
        torch.set_num_threads(a.threads)
    world, rank = init_distributed(a.device)
    if world > 1 and a.device == "cpu" and not a.threads:
        import os
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    preset = get_preset(a.preset).replace_train(batch_size=a.batch_size, lr=a.lr,
                                                 checkpoint_every=a.checkpoint_every,
                                                 ema_halflife_steps=a.ema_halflife
                                                 ).replace_noise(p_mean=a.p_mean, p_std=a.p_std
                                                 ).replace_sampling(sigma_max=a.sigma_max, rho=a.rho)
    try:
        trainer = Trainer(preset, a.data, a.out, steps=a.steps, resume=a.resume, init=a.init, seed=a.seed,
                          device=a.device, progress=not a.no_progress, max_minutes=a.max_minutes)
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


def with_sampling_defaults(preset, sampler=None, nfe=None, guidance=None, guidance_interval=None):
    """The preset with the shipped sampling settings replaced (validated like the app's inputs).
    ``guidance_interval``: None keeps the preset's, "none" clears it, "LO,HI" / (lo, hi) sets it."""
    import dataclasses
    from .guidance import check_guidance, check_guidance_interval
    from .samplers import get_sampler, steps_for_nfe
    sampler = preset.default_sampler if sampler is None else sampler
    nfe = preset.default_nfe if nfe is None else int(nfe)
    guidance = preset.default_guidance if guidance is None else check_guidance(guidance)
    get_sampler(sampler)              # unknown names -> ValueError listing the registry
    steps_for_nfe(sampler, nfe)       # impossible budgets -> ValueError naming the nearest valid ones
    interval = (preset.default_guidance_interval if guidance_interval is None
                else check_guidance_interval(guidance_interval))
    return dataclasses.replace(preset, default_sampler=sampler, default_nfe=nfe, default_guidance=guidance,
                               default_guidance_interval=interval)


def _cmd_export(a):
    import json as _json
    from pathlib import Path
    from .checkpoint import load_safetensors, read_config, resolve_model_dir, write_model_dir
    src = resolve_model_dir(a.run)
    preset, classes = read_config(src)
    try:
        preset = with_sampling_defaults(preset, a.sampler, a.nfe, a.guidance, a.guidance_interval)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    info = _json.loads((src / "info.json").read_text()) if (src / "info.json").is_file() else None
    model = load_safetensors(src / "model.safetensors") if (src / "model.safetensors").is_file() else None
    write_model_dir(a.out, preset, classes, load_safetensors(src / "ema.safetensors"),
                    None if a.ema_only else model, info)
    print(f"exported {src} -> {Path(a.out)}")


def _cmd_samplers(a):
    from .samplers import SAMPLERS, valid_nfes
    for name in SAMPLERS:
        v = valid_nfes(name, 20)
        print(f"{name:16s} NFE budgets: {', '.join(map(str, v))}, ...")


def _cmd_generate(a):
    from .guidance import format_guidance_interval
    from .loudness import describe
    from .pipeline import EDMSoundPipeline, save_generation
    norm, target = (("peak", a.normalize_peak) if a.normalize_peak is not None else
                    ("lufs", a.normalize_lufs) if a.normalize_lufs is not None else (None, None))
    pipe = EDMSoundPipeline(a.checkpoint, device=a.device)
    try:
        gen = pipe.generate(a.class_name, n=a.n, sampler=a.sampler, nfe=a.nfe, guidance=a.guidance,
                            seed=a.seed, batch_size=a.batch_size, progress=True,
                            guidance_interval=a.guidance_interval, normalize=norm, target=target)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    paths = save_generation(gen, a.out, pipe.codec, figures=not a.no_figures)
    s = gen.settings
    print(f"{len(paths)} clip(s) of {s['class']} with {s['sampler']} at NFE {s['nfe']} (counted), guidance "
          f"{s['guidance']:g} ({format_guidance_interval(s['guidance_interval'])}): {s['seconds']:.2f} s ({s['real_time_factor']:.2f}x real time) -> {a.out}")
    for p, lv, rep in zip(paths, gen.levels, gen.normalization):
        print(f"  {p.name}: {describe(lv, rep)}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edmsound", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    s = data.add_parser("synth", help="write the built-in procedural foley set as a class-per-folder tree")
    s.add_argument("--out", required=True)
    s.add_argument("--per-class", type=int, required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--sample-rate", type=int, default=16000)
    s.add_argument("--seconds", type=float, default=None, help="clip length (default: the default preset's)")
    s.add_argument("--classes", default=None, help="comma-separated subset of classes")
    s.set_defaults(func=_cmd_data_synth)
    s = data.add_parser("info", help="load a class-per-folder tree and print its summary")
    s.add_argument("--data", required=True)
    s.add_argument("--sample-rate", type=int, default=16000)
    s.add_argument("--seconds", type=float, default=1.0)
    s.set_defaults(func=_cmd_data_info)

    t = sub.add_parser("train", help="train or resume an EDMSound model")
    t.add_argument("--preset", default="default")
    t.add_argument("--data", required=True, help="class-per-folder tree")
    t.add_argument("--out", required=True, help="run directory")
    t.add_argument("--steps", type=int, default=None, help="total steps (default: the preset's)")
    t.add_argument("--batch-size", type=int, default=None)
    t.add_argument("--lr", type=float, default=None)
    t.add_argument("--ema-halflife", type=_positive_steps, default=None, metavar="STEPS",
                   help="EMA half-life in optimizer steps (default: the preset's); may change on --resume")
    t.add_argument("--p-mean", type=_finite, default=None, metavar="LN_SIGMA",
                   help="training noise: ln(sigma) ~ N(P_MEAN, P_STD^2) (default: the preset's, -3 for `default`); "
                        "may change on --resume or --init")
    t.add_argument("--p-std", type=_positive, default=None, metavar="STD", help="see --p-mean (default: the preset's)")
    t.add_argument("--sigma-max", type=_positive, default=None, metavar="SIGMA",
                   help="the sampler's starting noise level recorded in the exported model (default: the preset's); "
                        "train at it too (see --p-mean)")
    t.add_argument("--rho", type=_positive, default=None, help="the sampler's Karras rho recorded in the export")
    t.add_argument("--checkpoint-every", type=int, default=None)
    t.add_argument("--resume", action="store_true", help="continue the run in --out")
    t.add_argument("--init", default=None, help="warm start from a model directory (weights only)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--device", default="cpu")
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--max-minutes", type=float, default=None, help="checkpoint and stop after this long")
    t.add_argument("--export", default=None, help="write a model directory here when done")
    t.add_argument("--no-progress", action="store_true")
    t.add_argument("--no-jemalloc", action="store_true")
    t.set_defaults(func=_cmd_train)

    g = sub.add_parser("generate", help="generate clips of one class from a checkpoint")
    g.add_argument("--checkpoint", default="checkpoints/default")
    g.add_argument("--class", dest="class_name", required=True)
    g.add_argument("--n", type=int, default=1)
    g.add_argument("--sampler", default=None, help="default: the checkpoint preset's (see `edmsound samplers`)")
    g.add_argument("--nfe", type=int, default=None, help="network evaluations (exact budget)")
    g.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (default: the class's default in the checkpoint)")
    g.add_argument("--guidance-interval", default="default", metavar="LO,HI",
                   help="guide only for noise levels LO < sigma <= HI; 'none': at every level; "
                        "default: the checkpoint's shipped interval")
    g.add_argument("--seed", type=int, default=0, help="clip i uses seed + i")
    g.add_argument("--batch-size", type=int, default=8)
    g.add_argument("--device", default=None)
    g.add_argument("--out", required=True)
    g.add_argument("--no-figures", action="store_true")
    norm = g.add_mutually_exclusive_group()
    norm.add_argument("--normalize-peak", type=_peak_target, default=None, metavar="DBFS",
                      help="scale each clip so its sample peak reads DBFS (in [-60, 0]); default: no normalisation, "
                           "the clips as the model made them (their LUFS and true peak are printed either way)")
    norm.add_argument("--normalize-lufs", type=_lufs_target, default=None, metavar="LUFS",
                      help="scale each clip to LUFS integrated loudness (in [-60, -5]), true peak held at or below "
                           "-1 dBTP; recorded in the sidecar")
    g.set_defaults(func=_cmd_generate)

    sm = sub.add_parser("samplers", help="list samplers and their valid NFE budgets")
    sm.set_defaults(func=_cmd_samplers)

    from .cli_copy import register as register_copy_detection
    register_copy_detection(sub)     # encoder train / finetune-head, index build / query, copies
    from .cli_eval import register as register_evaluation
    register_evaluation(sub)         # classifier train, evaluate

    e = sub.add_parser("export", help="write a shippable model directory from a run")
    e.add_argument("--run", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--ema-only", action="store_true")
    e.add_argument("--sampler", default=None, help="shipped default sampler (default: the run's)")
    e.add_argument("--nfe", type=int, default=None, help="shipped default NFE (default: the run's)")
    e.add_argument("--guidance", type=float, default=None, help="shipped default guidance (default: the run's)")
    e.add_argument("--guidance-interval", default=None, metavar="LO,HI",
                   help="shipped guidance interval of noise levels ('none': guide at every level; default: the run's)")
    e.set_defaults(func=_cmd_export)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
