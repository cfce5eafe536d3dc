"""``edmsound generate`` and ``edmsound samplers``."""
from __future__ import annotations

import sys

from .args import add_precision, lufs_target, peak_target, positive, positive_int


def _cmd_samplers(a):
    from .. import FEW_STEP_SAMPLERS, SAMPLERS, valid_nfes
    for name in SAMPLERS:
        v = valid_nfes(name, 20)
        print(f"{name:16s} NFE budgets: {', '.join(map(str, v))}, ...")
    for name in FEW_STEP_SAMPLERS:
        print(f"{name:16s} consistency-tuned models only, at the budgets they were tuned for")


def _pair(text: str | None, what: str, example: str):
    if text is None:
        return None
    parts = [t for t in text.replace(",", " ").split() if t]
    try:
        vals = [None if t in ("-", "none") else float(t) for t in parts]
    except ValueError:
        vals = []
    if len(vals) != 2:
        raise ValueError(f"{what} must be two numbers like {example}, got {text!r}")
    return vals


def _read_source(path, flag: str, pipe):
    from .. import read_clip
    MAX_SECONDS = pipe.max_seconds
    wave, why, cut = read_clip(path, pipe.sample_rate, max_samples=int(MAX_SECONDS * pipe.sample_rate))
    if wave is None:
        raise ValueError(f"{flag} {path}: {why}")
    if cut is not None:
        print(f"note: {path} is {cut[0]:.1f} s long; its first {MAX_SECONDS:g} s are used", file=sys.stderr)
    return wave


def _check_tools(a) -> str:
    """Which tool the flags ask for, or a one-line error for flags that do not go together."""
    tools = [t for t in ("vary", "regen", "extend", "loop") if getattr(a, t) is not None]
    if len(tools) > 1:
        raise ValueError(f"choose one of --vary, --regen, --extend, --loop (got {', '.join('--' + t for t in tools)})")
    tool = tools[0] if tools else ("long" if a.seconds is not None else "generate")
    if a.strength is not None and tool not in ("vary", "regen"):
        raise ValueError("--strength goes with --vary FILE (the clip to make variations of) or --regen FILE")
    if (a.span is not None or a.band is not None) and tool != "regen":
        raise ValueError("--span and --band go with --regen FILE (the clip whose region to regenerate)")
    if tool == "regen" and a.span is None:
        a.span = "0,inf"
    if tool == "extend" and a.seconds is None:
        raise ValueError("--extend FILE needs --seconds (the total length to continue it to)")
    if tool in ("vary", "regen") and a.seconds is not None:
        raise ValueError(f"--seconds goes with --extend, --loop or alone (a long clip), not with --{tool}")
    return tool


def _cmd_generate(a):
    from .. import describe_level, EDMSoundPipeline, format_guidance_interval, format_keeps_overs, save_generation
    norm, target = (("peak", a.normalize_peak) if a.normalize_peak is not None else
                    ("lufs", a.normalize_lufs) if a.normalize_lufs is not None else (None, None))
    try:
        tool = _check_tools(a)
        span = _pair(a.span, "--span", "0.2,0.5 (seconds)")
        if span is not None:
            span = [0.0 if span[0] is None else span[0], float("inf") if span[1] is None else span[1]]
        band = _pair(a.band, "--band", "2000,4000 (Hz; '2000,-' up to Nyquist)")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    pipe = EDMSoundPipeline(a.checkpoint, device=a.device, bf16=a.precision)
    common = dict(n=a.n, sampler=a.sampler, nfe=a.nfe, guidance=a.guidance, seed=a.seed,
                  guidance_interval=a.guidance_interval, guidance_reference=a.guidance_reference, normalize=norm,
                  target=target, progress=True, eq=not a.no_eq)
    try:
        if tool == "vary":
            init = _read_source(a.vary, "--vary", pipe)
            gen = pipe.generate(a.class_name, batch_size=a.batch_size, init=init,
                                strength=0.5 if a.strength is None else a.strength, **common)
        elif tool == "regen":
            clip = _read_source(a.regen, "--regen", pipe)
            end = min(span[1], len(clip) / pipe.sample_rate)
            low, high = band if band is not None else (None, None)
            gen = pipe.regenerate(clip, a.class_name, span[0], end, low_hz=low, high_hz=high, strength=a.strength,
                                  **common)
        elif tool == "extend":
            gen = pipe.extend(_read_source(a.extend, "--extend", pipe), a.class_name, a.seconds, **common)
        elif tool == "loop":
            clip = None if a.loop == "" else _read_source(a.loop, "--loop", pipe)
            gen = pipe.loop(a.class_name, a.seconds, clip=clip, **common)
        elif tool == "long":
            gen = pipe.generate_long(a.class_name, a.seconds, **common)
        else:
            gen = pipe.generate(a.class_name, batch_size=a.batch_size, **common)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    paths = save_generation(gen, a.out, pipe.codec, figures=not a.no_figures, fmt=a.format)
    s = gen.settings
    what = {"generate": "clip(s)", "vary": "variation(s)", "regen": "regenerated clip(s)", "extend": "continued clip(s)",
            "loop": "loop(s)", "long": "long clip(s)"}[tool]
    budget = f"NFE {s['nfe']} (counted)"
    if "nfe_total" in s:
        budget += f" x {s['windows']} windows = {s['nfe_total']}"
    print(f"{len(paths)} {what} of {s['class']}, {s['audio_seconds']:.2f} s each, with {s['sampler']} at {budget}, "
          f"guidance {s['guidance']:g} ({format_guidance_interval(s['guidance_interval'])}"
          f"{', autoguidance' if s.get('guidance_reference') == 'guide' else ''}"
          f"{'' if s.get('matching_eq') is None else ', matching EQ ' + ('on' if s['matching_eq'] else 'off')}): "
          f"{s['seconds']:.2f} s "
          f"({s['real_time_factor']:.2f}x real time) -> {a.out}")
    for p, lv, rep in zip(paths, gen.levels, gen.normalization):
        print(f"  {p.name}: {describe_level(lv, rep, keeps_overs=format_keeps_overs(a.format))}")


def register(subparsers) -> None:
    from .. import EXPORT_FORMATS
    g = subparsers.add_parser("generate", help="generate clips of one class from a checkpoint")
    g.add_argument("--checkpoint", default="checkpoints/default")
    g.add_argument("--class", dest="class_name", required=True)
    g.add_argument("--n", type=positive_int, default=1)
    g.add_argument("--sampler", default=None, help="default: the checkpoint preset's (see `edmsound samplers`)")
    g.add_argument("--nfe", type=int, default=None, help="network evaluations (exact budget)")
    g.add_argument("--guidance", type=float, default=None,
                   help="guidance scale (default: the class's default in the checkpoint)")
    g.add_argument("--guidance-reference", choices=["default", "null", "guide"], default="default",
                   help="what guidance pushes away from: 'null' the model's null class (classifier-free), 'guide' "
                        "the checkpoint's weaker guide model (autoguidance); default: the guide where the "
                        "checkpoint has one")
    g.add_argument("--guidance-interval", default="default", metavar="LO,HI",
                   help="guide only for noise levels LO < sigma <= HI; 'none': at every level; "
                        "default: the checkpoint's shipped interval")
    g.add_argument("--seed", type=int, default=0, help="clip i uses seed + i")
    g.add_argument("--no-eq", action="store_true",
                   help="leave out the model's matching EQ (where it has one): the clips as the network made them")
    g.add_argument("--batch-size", type=positive_int, default=8)
    g.add_argument("--device", default=None)
    add_precision(g, "recorded in each sidecar")
    g.add_argument("--out", required=True)
    g.add_argument("--format", choices=EXPORT_FORMATS, default="wav16",
                   help="audio files: 16-bit WAV (default), 24-bit WAV, 32-bit float WAV (keeps peaks above full "
                        "scale, which the others clip) or FLAC")
    g.add_argument("--no-figures", action="store_true")
    tools = g.add_argument_group("sound-designer tools (one at a time; sources in any audio format)")
    tools.add_argument("--vary", default=None, metavar="FILE",
                       help="make variations of this clip (cut or padded to the model's length)")
    tools.add_argument("--strength", type=float, default=None,
                       help="how far --vary's variations (default 0.5) or --regen's region (default: made anew) "
                            "move from the source, in (0, 1]: 0 keeps it, 1 is a fresh generation")
    tools.add_argument("--regen", default=None, metavar="FILE",
                       help="regenerate a region of this clip (--span, optionally --band) and keep the rest")
    tools.add_argument("--span", default=None, metavar="START,END", help="--regen's time span in seconds")
    tools.add_argument("--band", default=None, metavar="LOW,HIGH",
                       help="--regen only this frequency band, in Hz ('2000,-' is everything above 2000 Hz)")
    tools.add_argument("--extend", default=None, metavar="FILE",
                       help="continue this clip to --seconds in total, one model window at a time")
    tools.add_argument("--seconds", type=positive, default=None,
                       help="length of a long clip (alone), of --extend's result, or of a --loop (up to 60 s)")
    tools.add_argument("--loop", nargs="?", const="", default=None, metavar="FILE",
                       help="make a seamless loop (--seconds long; default one model window), or with FILE make "
                            "that clip loop seamlessly")
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

