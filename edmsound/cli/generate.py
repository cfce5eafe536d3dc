"""``edmsound generate`` and ``edmsound samplers``."""
from __future__ import annotations

import sys

from .args import lufs_target, peak_target


def _cmd_samplers(a):
    from .. import SAMPLERS, valid_nfes
    for name in SAMPLERS:
        v = valid_nfes(name, 20)
        print(f"{name:16s} NFE budgets: {', '.join(map(str, v))}, ...")


def _cmd_generate(a):
    from .. import describe_level, EDMSoundPipeline, format_guidance_interval, save_generation
    norm, target = (("peak", a.normalize_peak) if a.normalize_peak is not None else
                    ("lufs", a.normalize_lufs) if a.normalize_lufs is not None else (None, None))
    pipe = EDMSoundPipeline(a.checkpoint, device=a.device)
    init = None
    if a.vary is not None:
        from .. import read_clip
        init, why, _ = read_clip(a.vary, pipe.sample_rate)
        if init is None:
            raise ValueError(f"--vary {a.vary}: {why}")
    elif a.strength is not None:
        raise ValueError("--strength goes with --vary FILE (the clip to make variations of)")
    try:
        gen = pipe.generate(a.class_name, n=a.n, sampler=a.sampler, nfe=a.nfe, guidance=a.guidance,
                            seed=a.seed, batch_size=a.batch_size, progress=True,
                            guidance_interval=a.guidance_interval, normalize=norm, target=target,
                            init=init, strength=(0.5 if a.strength is None else a.strength) if init is not None
                            else None)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    paths = save_generation(gen, a.out, pipe.codec, figures=not a.no_figures)
    s = gen.settings
    print(f"{len(paths)} clip(s) of {s['class']} with {s['sampler']} at NFE {s['nfe']} (counted), guidance "
          f"{s['guidance']:g} ({format_guidance_interval(s['guidance_interval'])}): {s['seconds']:.2f} s ({s['real_time_factor']:.2f}x real time) -> {a.out}")
    for p, lv, rep in zip(paths, gen.levels, gen.normalization):
        print(f"  {p.name}: {describe_level(lv, rep)}")


def register(subparsers) -> None:
    g = subparsers.add_parser("generate", help="generate clips of one class from a checkpoint")
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
    g.add_argument("--vary", default=None, metavar="FILE",
                   help="make variations of this clip (any audio format; cut or padded to the model's length)")
    g.add_argument("--strength", type=float, default=None,
                   help="how far variations move from --vary's clip, in (0, 1]: 0 keeps it, 1 is a fresh "
                        "generation (default 0.5)")
    norm = g.add_mutually_exclusive_group()
    norm.add_argument("--normalize-peak", type=peak_target, default=None, metavar="DBFS",
                      help="scale each clip so its sample peak reads DBFS (in [-60, 0]); default: no normalisation, "
                           "the clips as the model made them (their LUFS and true peak are printed either way)")
    norm.add_argument("--normalize-lufs", type=lufs_target, default=None, metavar="LUFS",
                      help="scale each clip to LUFS integrated loudness (in [-60, -5]), true peak held at or below "
                           "-1 dBTP; recorded in the sidecar")
    g.set_defaults(func=_cmd_generate)

    sm = subparsers.add_parser("samplers", help="list samplers and their valid NFE budgets")
    sm.set_defaults(func=_cmd_samplers)

