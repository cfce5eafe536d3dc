"""Evaluation sub-commands of the ``edmsound`` CLI.

``register(subparsers)`` adds::

    edmsound classifier train --data DIR --out DIR [--epochs 10] [--holdout auto|builtin|DIR|none]
    edmsound evaluate --checkpoint DIR --reference builtin|DIR --samplers heun,dpmpp_2m,deis --nfe 5,10,20,50
                      --guidance 1,2,4 --n-per-class 32 --out DIR [--encoder DIR] [--classifier DIR] [--index DIR]

See docs/evaluation.md.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .args import add_precision, non_negative_int, positive, positive_int, set_threads


def _csv_list(text: str, kind, what: str) -> list:
    items = [t.strip() for t in str(text).split(",") if t.strip()]
    if not items:
        raise ValueError(f"--{what} needs a comma-separated list, got {text!r}")
    try:
        return [kind(t) for t in items]
    except ValueError:
        raise ValueError(f"--{what}: cannot read {text!r} as a comma-separated list of {kind.__name__}") from None


def _holdout(a, data_dir: Path, classes, sample_rate: int, num_samples: int):
    """--holdout: auto (builtin for a synth tree of built-in classes), builtin, a directory, or none."""
    from .. import BUILTIN_CLASSES as CLASSES, load_reference
    choice = a.holdout
    manifest = data_dir / "synth.json"
    base = json.loads(manifest.read_text()).get("base_seed") if manifest.is_file() else None
    if choice == "auto":
        choice = "builtin" if (manifest.is_file() and all(c in CLASSES for c in classes)) else "none"
    if choice == "none":
        return None, None
    if choice == "builtin" and base is not None and int(base) == int(a.holdout_seed):
        raise ValueError(f"--holdout-seed {a.holdout_seed} is the training tree's base seed; held-out clips need "
                         "another seed (default 7)")
    ds, desc = load_reference(choice, classes, sample_rate, num_samples, a.holdout_per_class, a.holdout_seed)
    return ds, desc


def _cmd_classifier_train(a):
    from .. import ClassifierConfig, load_training_set, train_classifier
    set_threads(a)
    data_dir = Path(a.data)
    cfg = ClassifierConfig(sample_rate=a.sample_rate)
    ds, _ = load_training_set(data_dir, None, cfg.sample_rate, a.seconds, not a.no_progress, own_length=False)
    try:
        holdout, desc = _holdout(a, data_dir, ds.classes, cfg.sample_rate, ds.waves.shape[1])
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    clf = train_classifier(ds, None, config=cfg, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, seed=a.seed,
                           holdout=holdout, holdout_description=desc, max_minutes=a.max_minutes,
                           progress=not a.no_progress, name=a.name)
    clf.info["training"]["data"] = str(a.data)
    clf.info["training"]["command"] = "edmsound " + " ".join(sys.argv[1:]) if sys.argv[1:2] == ["classifier"] else None
    clf.save(a.out)
    summary = {"out": str(a.out), "parameters": clf.num_parameters, **clf.info["training"]}
    if "holdout" in clf.info:
        summary["holdout_accuracy"] = clf.info["holdout"]["accuracy"]
    print(json.dumps(summary))


def _cmd_evaluate(a):
    from .. import evaluate_sweep, parse_points
    set_threads(a)
    try:
        points = parse_points(a.points) if a.points else []
        no_grid = a.samplers.strip().lower() == "none"
        if no_grid and not points:
            raise ValueError("--samplers none needs --points")
        samplers = [] if no_grid else _csv_list(a.samplers, str, "samplers")
        nfes = [] if no_grid else _csv_list(a.nfe, int, "nfe")
        guid = [] if no_grid else _csv_list(a.guidance, float, "guidance")
        topk = _csv_list(a.top_k, int, "top-k")
        evaluate_sweep(a.checkpoint, a.out, reference=a.reference, samplers=samplers, nfes=nfes, guidances=guid,
                       n_per_class=a.n_per_class, encoder=a.encoder, classifier=a.classifier, index=a.index,
                       train=a.train, reference_per_class=a.reference_per_class, reference_seed=a.reference_seed,
                       fidelity_reference_per_class=a.fidelity_reference_per_class,
                       seed=a.seed, invalid_nfe=a.invalid_nfe, batch_size=a.batch_size, device=a.device,
                       precision=a.precision, topk=topk,
                       kid_subsets=a.kid_subsets, embedding_level=a.embedding_level, regenerate=a.regenerate,
                       dry_run=a.dry_run, progress=not a.no_progress, points=points,
                       guidance_interval=a.guidance_interval)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def _cmd_ablate(a):
    from .. import run_ablation
    set_threads(a)
    rows = run_ablation(a.data, a.out, preset=a.preset, variants=a.variants, steps=a.steps, seed=a.seed,
                        n_per_class=a.n_per_class, reference=a.reference, classifier=a.classifier,
                        encoder=a.encoder, batch_size=a.batch_size, progress=not a.no_progress,
                        max_minutes=a.max_minutes)
    print((Path(a.out) / "ablation.md").read_text())
    if len(rows) < len(a.variants.split(",")):
        print("some variants are not finished: run the same command again to resume them", file=sys.stderr)


def _cmd_quality_report(a):
    from .. import (check_speed_record, format_class_guidance, format_guidance_interval, load_results,
                    quality_targets, read_config, resolve_model_dir, speed_for_weights, targets_markdown)
    try:
        results = load_results(a.results)
        preset, classes = read_config(resolve_model_dir(a.checkpoint))
        per_class = format_class_guidance(preset.class_scales(classes), preset.class_intervals(classes))
        speed = None
        if a.speed and a.speed.lower() != "none":
            sp = Path(a.speed)
            if not sp.is_file():
                raise FileNotFoundError(f"{sp} not found: run `python benchmarks/samplers.py --shipped-only` "
                                        "(or pass --speed none)")
            speed = check_speed_record(json.loads(sp.read_text()), str(sp))
            # the timing of the evaluated weights (a side-by-side record holds several models)
            speed = speed_for_weights(speed, results["settings"].get("ema_sha256"), per_class)[0] or speed
        iv = preset.default_guidance_interval
        own = dict(preset.class_intervals(classes) or ())
        if all(preset.guidance_for(c) == 1.0 or c in own for c in classes):
            # no class is guided at the preset's interval: it changes neither the clips nor their cost
            iv = None
            if speed is not None and "median_sec_per_clip" in speed:
                speed = dict(speed, guidance_interval=None, base_guidance_interval=None)
        shipped_g = "class" if per_class else preset.default_guidance
        if per_class:
            want = per_class
            have = {r.get("guidance_per_class") for r in results["rows"] if r.get("guidance") == "class"}
            if have and want not in have:
                raise ValueError(f"the evaluation's per-class scales ({', '.join(sorted(have))}) are not the "
                                 f"checkpoint's ({want}): re-run the evaluation")
        bars = quality_targets(results, preset.default_sampler, preset.default_nfe, shipped_g, iv, speed)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    s = results["settings"]
    g = per_class or f"{preset.default_guidance:g}"
    title = (f"Shipped settings of `{a.checkpoint}`: {preset.default_sampler}, NFE {preset.default_nfe}, guidance "
             f"{g}{'' if per_class and iv is None else ' (' + format_guidance_interval(iv) + ')'}; "
             f"evaluation `{a.results}` "
             f"(ema {s['ema_sha256'][:12]}, {s['n_per_class']} clips per class)")
    md = targets_markdown(bars, title)
    print(md, end="")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(md)
    if a.check and not all(b["met"] for b in bars):
        sys.exit(1)


def _cmd_calibrate(a):
    from .. import calibrate_class_guidance, chosen_text, write_calibration, write_class_guidance
    try:
        if a.clear:
            print(f"cleared the per-class guidance in {write_class_guidance(a.checkpoint, None)}")
            return
        min_div = None if str(a.min_diversity).lower() == "none" else float(a.min_diversity)
        intervals = None if a.intervals is None else [t for t in a.intervals.split(",") if t.strip()]
        res = calibrate_class_guidance(a.checkpoint, scales=_csv_list(a.scales, float, "scales"),
                                       min_fit=a.min_fit, min_diversity=min_div,
                                       max_level_gap=a.max_level_gap, intervals=intervals,
                                       n_per_class=a.n_per_class, seed=a.seed,
                                       classifier=a.classifier, encoder=a.encoder,
                                       reference=None if a.reference == "none" else a.reference,
                                       fidelity_reference_per_class=a.fidelity_reference_per_class,
                                       batch_size=a.batch_size, stop_at_first=not a.full_grid,
                                       progress=not a.no_progress)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if a.out:
        write_calibration(res, a.out)
        print(f"wrote {Path(a.out) / 'calibration.md'} and calibration.json")
    print("per-class guidance: " + chosen_text(res))
    if a.write:
        path = write_class_guidance(a.checkpoint, res["class_guidance"], res["class_guidance_interval"])
        print(f"stored in {path}")


def _cmd_set_guidance(a):
    from .. import check_guidance, check_guidance_interval, read_config, write_class_guidance
    try:
        preset, classes = read_config(a.checkpoint)
        if a.class_name not in classes:
            raise ValueError(f"unknown class {a.class_name!r}; valid: {', '.join(classes)}")
        scales = dict(preset.class_scales(classes) or {})
        intervals = dict(preset.class_intervals(classes) or ())
        scales[a.class_name] = check_guidance(a.scale)
        if a.interval is not None:
            intervals[a.class_name] = check_guidance_interval(a.interval)      # None: every level
        path = write_class_guidance(a.checkpoint, scales, intervals)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    iv = intervals[a.class_name] if a.class_name in intervals else preset.default_guidance_interval
    print(f"{a.class_name}: guidance {scales[a.class_name]:g} "
          f"({'every level' if iv is None else f'{iv[0]:g} < sigma <= {iv[1]:g}'}); stored in {path}")


def _cmd_calibrate_eq(a):
    from .. import calibrate_class_eq, write_class_eq, write_eq_report
    try:
        if a.clear:
            which = "every matching EQ" if a.nfe is None else f"the matching EQ for {a.nfe} evaluations"
            print(f"removed {which} from {write_class_eq(a.checkpoint, None, a.nfe)}")
            return
        if not a.write and not a.out:
            raise ValueError("nothing would be kept: give --out (the table) and/or --write (store it in the model)")
        classes = None if a.classes is None else [c.strip() for c in a.classes.split(",") if c.strip()]
        res = calibrate_class_eq(a.checkpoint, n_per_class=a.n_per_class, seed=a.seed, reference=a.reference,
                                 classes=classes, max_gain_db=a.max_gain_db, batch_size=a.batch_size,
                                 nfe=a.nfe, progress=not a.no_progress)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if a.out:
        print(f"wrote {write_eq_report(res, a.out)}, matching_eq.json and matching_eq.png")
    if a.write:
        print(f"stored for {res['settings']['nfe']} evaluations in {write_class_eq(a.checkpoint, res['eq'])}")


def _cmd_coverage(a):
    from .. import measure_coverage, write_coverage_report
    classes = None if a.classes is None else [c.strip() for c in a.classes.split(",") if c.strip()]
    res = measure_coverage(a.checkpoint, a.data, n_per_class=a.n_per_class, seed=a.seed, classes=classes, nfe=a.nfe,
                           k=a.k, components=None if a.components == 0 else a.components, cap=a.cap,
                           batch_size=a.batch_size, precision=a.precision, progress=not a.no_progress)
    md = write_coverage_report(res, a.out)
    for c, row in res["classes"].items():
        print(f"{c:<24s} rarely made {100 * row['rarely_made_share']:5.1f} %   weights "
              f"{row['weight_min_max'][0]:.3g} … {row['weight_min_max'][1]:.3g}")
    print(f"wrote {md}, coverage.json, coverage.png and {Path(a.out) / 'clip_weights.csv'} "
          "(for train / consistency-tune --clip-weights)")


def register(subparsers) -> None:
    """Add the ``classifier`` and ``evaluate`` sub-commands to the top-level subparsers."""
    c = subparsers.add_parser("classifier", help="the class classifier used for evaluation").add_subparsers(
        dest="classifier_command", required=True)
    t = c.add_parser("train", help="train a log-mel CNN class classifier on a class-per-folder tree")
    t.add_argument("--data", required=True, help="class-per-folder training tree (e.g. data/builtin)")
    t.add_argument("--out", required=True, help="classifier directory to write")
    t.add_argument("--epochs", type=positive, default=10)
    t.add_argument("--batch-size", type=positive_int, default=64)
    t.add_argument("--lr", type=positive, default=3e-3)
    t.add_argument("--sample-rate", type=positive_int, default=16000)
    t.add_argument("--seconds", type=positive, default=None,
                   help="clip length (default: a synth tree's manifest, else the longest file)")
    t.add_argument("--holdout", default="auto",
                   help="held-out real clips to measure accuracy on: 'builtin' (fresh synth seeds), a class-per-folder "
                        "directory, 'none', or 'auto' (builtin for a synth tree of built-in classes)")
    t.add_argument("--holdout-per-class", type=int, default=100)
    t.add_argument("--holdout-seed", type=int, default=7, help="base seed of built-in held-out clips")
    t.add_argument("--max-minutes", type=positive, default=None, help="stop (and save) after this long")
    t.add_argument("--name", default="edmsound-classifier")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=positive_int, default=None)
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=_cmd_classifier_train)

    b = subparsers.add_parser("quality-report", help="a model's quality targets at its shipped settings (the model "
                                                     "card's table), from an evaluation's results.json and the "
                                                     "shipped-speed benchmark")
    b.add_argument("--results", required=True, help="an `edmsound evaluate` output directory or its results.json")
    b.add_argument("--checkpoint", default="checkpoints/default", help="whose shipped settings to read off")
    b.add_argument("--speed", default="benchmarks/results/samplers_shipped.json",
                   help="a timing record of benchmarks/samplers.py: --shipped-only's, or --versus's (the evaluated weights' row "
                        "is read); 'none' skips the speed target")
    b.add_argument("--out", default=None, help="also write the markdown table here")
    b.add_argument("--check", action="store_true", help="exit 1 unless every target is met")
    b.set_defaults(func=_cmd_quality_report)

    k = subparsers.add_parser("calibrate-guidance", help="choose each class's default guidance scale (and interval): "
                              "recognisable to the classifier while keeping variety (see edmsound/calibrate.py)")
    k.add_argument("--checkpoint", default="checkpoints/default")
    k.add_argument("--scales", default="1,1.5,2,3", help="guidance scales to try, ascending")
    k.add_argument("--min-fit", type=float, default=0.9, help="category fit (classifier accuracy) a scale must reach")
    k.add_argument("--min-diversity", default="0.7", help="diversity ratio a setting must keep ('none': fit only); "
                   "among settings meeting both the cheapest (fewest guided evaluations) wins, else the best worst margin")
    k.add_argument("--max-level-gap", type=positive, default=None, metavar="DB",
                   help="also keep each class's mean RMS level within ±DB of the real clips' (needs --reference); "
                        "scales below 1 then make a class that comes out too loud quieter (default: no level target)")
    k.add_argument("--intervals", default=None, help="guidance intervals to try with every scale, e.g. "
                   "'default,2:10' (LO:HI noise levels, 'none' = every level, 'default' = the checkpoint's); "
                   "default: the checkpoint's only")
    k.add_argument("--n-per-class", type=positive_int, default=16)
    k.add_argument("--seed", type=int, default=1, help="noise seed base (the evaluation uses 0: keep them apart)")
    k.add_argument("--classifier", default="default")
    k.add_argument("--encoder", default="default", help="encoder for the diversity column")
    k.add_argument("--reference", default="builtin", help="real clips for the diversity column: builtin, a "
                   "directory, or none")
    k.add_argument("--fidelity-reference-per-class", type=non_negative_int, default=None, metavar="N",
                   help="real clips per class the level gap is measured against (default: 2000, as 'evaluate'; "
                        "0: the 200 of the diversity column)")
    k.add_argument("--batch-size", type=positive_int, default=8)
    k.add_argument("--full-grid", action="store_true", help="score every scale (default: stop at the first that fits)")
    k.add_argument("--out", default=None, help="write calibration.md / calibration.json here")
    k.add_argument("--write", action="store_true", help="store the chosen scales in the checkpoint's config.json")
    k.add_argument("--clear", action="store_true", help="remove the checkpoint's per-class scales and exit")
    k.add_argument("--no-progress", action="store_true")
    k.set_defaults(func=_cmd_calibrate)

    sg = subparsers.add_parser("set-guidance", help="store one class's default guidance scale (and interval) chosen "
                               "by hand, e.g. from an evaluation; the other classes keep theirs")
    sg.add_argument("--checkpoint", required=True, help="the model directory to change")
    sg.add_argument("--class", dest="class_name", required=True)
    sg.add_argument("--scale", type=float, required=True, help="the class's guidance scale (1: unguided)")
    sg.add_argument("--interval", default=None, metavar="LO,HI",
                    help="guide only for LO < sigma <= HI ('none': every level; default: keep the class's)")
    sg.set_defaults(func=_cmd_set_guidance)

    q = subparsers.add_parser("calibrate-eq", help="measure a model's matching EQ: per class, the band gains that "
                              "bring its clips' mean spectral envelope to real clips' (see edmsound/core/spectral_eq.py)")
    q.add_argument("--checkpoint", default="checkpoints/default")
    q.add_argument("--n-per-class", type=positive_int, default=256,
                   help="clips per class (a band's mean power rests on a class's loudest clips, so a few dozen leave "
                        "the gains off by a decibel or more; the report gives each gap's standard error)")
    q.add_argument("--seed", type=int, default=1, help="noise seed base (the evaluation uses 0: keep them apart)")
    q.add_argument("--reference", default="builtin", help="real clips: builtin or a class-per-folder directory")
    q.add_argument("--classes", default=None, help="comma-separated classes to equalise (default: all)")
    q.add_argument("--max-gain-db", type=positive, default=12.0, help="largest lift or cut of any band (at most 12)")
    q.add_argument("--batch-size", type=positive_int, default=8)
    q.add_argument("--nfe", type=positive_int, default=None,
                   help="the budget to measure at (default: the model's own); a few-step model keeps one EQ per "
                        "budget and applies the one measured at the budget asked for (else its default budget's)")
    q.add_argument("--out", default=None, help="write matching_eq.md / .json / .png here")
    q.add_argument("--write", action="store_true", help="store the EQ in the checkpoint's config.json")
    q.add_argument("--clear", action="store_true",
                   help="remove the checkpoint's matching EQs (with --nfe, that budget's only) and exit")
    q.add_argument("--no-progress", action="store_true")
    q.set_defaults(func=_cmd_calibrate_eq)

    cv = subparsers.add_parser("coverage", help="which training clips a model rarely makes: a density ratio per clip "
                               "(training / model) in a plain signal space, and draw weights from it for "
                               "train / consistency-tune --clip-weights (see edmsound/evaluation/coverage.py)")
    cv.add_argument("--checkpoint", default="checkpoints/default")
    cv.add_argument("--data", required=True, help="the model's class-per-folder training tree")
    cv.add_argument("--out", required=True, help="folder for clip_weights.csv and the coverage.md / .json / .png report")
    cv.add_argument("--n-per-class", type=positive_int, default=512, help="the model's clips per class (default 512)")
    cv.add_argument("--seed", type=int, default=5_000_000,
                    help="noise seed base (default 5,000,000, apart from the evaluation's and the calibrations')")
    cv.add_argument("--classes", default=None, help="comma-separated classes to measure (default: all; the others "
                                                    "keep weight 1)")
    cv.add_argument("--nfe", type=positive_int, default=None, help="the budget to sample at (default: the model's own)")
    cv.add_argument("--k", type=positive_int, default=40, help="nearest neighbours per estimate (default 40)")
    cv.add_argument("--components", type=int, choices=range(0, 14), default=3, metavar="N",
                    help="principal coordinates the neighbours are found in, 1-13, or 0 for all (default 3)")
    cv.add_argument("--cap", type=positive, default=8.0, help="weights are clipped to 1/CAP … CAP before scaling to "
                                                             "mean 1 per class (default 8)")
    cv.add_argument("--batch-size", type=positive_int, default=8)
    add_precision(cv, "the sampling's")
    cv.add_argument("--no-progress", action="store_true")
    cv.set_defaults(func=_cmd_coverage)

    ab = subparsers.add_parser("ablate", help="train and evaluate ablation variants (loss, attention, "
                                              "normalisation, representation) with the same data, steps and seeds")
    ab.add_argument("--data", required=True, help="class-per-folder training tree")
    ab.add_argument("--out", required=True, help="folder for every variant's run, model and evaluation")
    ab.add_argument("--preset", default="default")
    ab.add_argument("--variants", default="base,l1,no-attention,no-norm,magnitude,mel",
                    help="comma-separated: base, l1, no-attention, no-norm, magnitude, mel (combine with '+')")
    ab.add_argument("--steps", type=positive_int, default=2000, help="training steps of every variant")
    ab.add_argument("--batch-size", type=positive_int, default=None)
    ab.add_argument("--n-per-class", type=positive_int, default=32)
    ab.add_argument("--reference", default="builtin", help="held-out real clips ('builtin' or a directory)")
    ab.add_argument("--classifier", default="default", help="classifier directory, 'default' or 'none'")
    ab.add_argument("--encoder", default="default")
    ab.add_argument("--seed", type=int, default=0)
    ab.add_argument("--threads", type=positive_int, default=None)
    ab.add_argument("--max-minutes", type=positive, default=None,
                    help="training budget of this call; unfinished variants resume on the next")
    ab.add_argument("--no-progress", action="store_true")
    ab.set_defaults(func=_cmd_ablate)

    e = subparsers.add_parser("evaluate", help="FAD, KID, classifier scores, diversity and copying per "
                                               "(sampler, NFE, guidance), per class")
    e.add_argument("--checkpoint", default="checkpoints/default", help="model or run directory")
    e.add_argument("--reference", default="builtin",
                   help="held-out real clips: 'builtin' (synth seeds disjoint from training) or a class-per-folder "
                        "directory (never the training clips)")
    e.add_argument("--reference-per-class", type=int, default=200,
                   help="clips per class synthesised for 'builtin', or sampled from a directory (0: all)")
    e.add_argument("--reference-seed", type=int, default=7, help="base seed of the built-in reference")
    e.add_argument("--fidelity-reference-per-class", type=non_negative_int, default=None, metavar="N",
                   help="held-out clips per class for the level, loudness and band gaps, which need no encoder "
                        "(default 2000: a band a few clips carry is estimated from 200 with an error of several dB; "
                        "0: the FAD reference's own)")
    e.add_argument("--train", default="auto",
                   help="training data for the baseline row: 'auto' (the checkpoint's info.json, else builtin), "
                        "'builtin', a directory, or 'none'")
    e.add_argument("--samplers", default="heun,dpmpp_2m,deis",
                   help="samplers of the grid (samplers x --nfe x --guidance); 'none': only --points")
    e.add_argument("--nfe", default="5,10,20,50", help="NFE budgets; invalid ones are handled by --invalid-nfe")
    e.add_argument("--guidance", default="1,2,4")
    e.add_argument("--guidance-interval", default=None, metavar="LO,HI",
                   help="guide the grid's w != 1 points only for noise levels LO < sigma <= HI (default: every level)")
    e.add_argument("--points", default="",
                   help="extra configurations outside the grid, SAMPLER:NFE:GUIDANCE[:SIGMA_LO:SIGMA_HI][,...], e.g. "
                        "heun:51:2 (an expensive reference without crossing it with every sampler) or "
                        "dpmpp_2m:10:3:0.05:1 (guidance only for 0.05 < sigma <= 1); GUIDANCE 'class' uses the "
                        "checkpoint's per-class default scales (dpmpp_2m:10:class:0.1:10)")
    e.add_argument("--n-per-class", type=positive_int, default=32)
    e.add_argument("--out", required=True)
    e.add_argument("--encoder", default="default",
                   help="encoder for FAD/KID/diversity: 'default' (checkpoints/encoder), a project encoder or Hugging "
                        "Face CLAP directory, or a LAION CLAP .pt")
    e.add_argument("--classifier", default="default", help="classifier directory, 'default' or 'none'")
    e.add_argument("--index", default="default", help="copy-detection index directory, 'default' or 'none'")
    e.add_argument("--invalid-nfe", choices=["nearest", "skip"], default="nearest",
                   help="an NFE a sampler cannot spend exactly: use the nearest valid budget (ties: lower) or skip it")
    e.add_argument("--seed", type=int, default=0, help="noise seeds: seed*1e6 + class_index*1e5 + clip index")
    e.add_argument("--batch-size", type=positive_int, default=8)
    e.add_argument("--top-k", default="1,3", help="top-k accuracies to report")
    e.add_argument("--kid-subsets", type=positive_int, default=100)
    e.add_argument("--embedding-level", choices=["windows", "clips"], default="windows",
                   help="FAD/KID on the encoder's window embeddings (like VGGish frames in FAD) or per-clip means")
    e.add_argument("--device", default=None)
    add_precision(e, "recorded with the results; cached clips of another precision are refused")
    e.add_argument("--threads", type=positive_int, default=None)
    e.add_argument("--regenerate", action="store_true", help="regenerate cached clips")
    e.add_argument("--dry-run", action="store_true", help="print the plan and the time estimate, then stop")
    e.add_argument("--no-progress", action="store_true")
    e.set_defaults(func=_cmd_evaluate)
