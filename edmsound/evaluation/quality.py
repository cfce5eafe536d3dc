"""The quality report of a model: its quality targets read off an evaluation and the shipped-speed benchmark.

``edmsound quality-report --results eval/ --checkpoint checkpoints/default --speed benchmarks/results/samplers_shipped.json``
prints (and with ``--out`` writes) one markdown table — the model card's: every target, its threshold, the measured value at the
checkpoint's shipped settings (sampler, NFE, guidance, guidance interval) and whether it is met. Nothing is
re-measured here: the numbers come from ``edmsound evaluate``'s ``results.json`` and ``benchmarks/samplers.py``'s
``samplers_shipped.json``, so the model card's table is reproducible from those two commands.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from ..core.guidance import interval_text as _interval_text
from . import fidelity as F

__all__ = ["shipped_rows", "quality_targets", "targets_markdown", "load_results", "check_speed_record",
           "speed_for_weights"]

HEUN_REFERENCE_MIN_NFE = 49       # "Heun at NFE 50": Heun spends odd budgets, so 49 or 51 both count
FAD_RATIO_MAX = 2.5               # FAD / FAD of a training subset of the same size
LEVEL_GAP_MAX_DB = 1.5            # |mean RMS dBFS of generated - real|, every class
BAND_GAP_MAX_DB = 4.0             # |mean power gap| in every one of the 12 log-spaced bands, every class
OVER_FULL_SCALE_MAX = 0.05        # share of clips whose sample peak reaches full scale, every class (real clips: 0)


def load_results(path) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    if not p.is_file():
        raise FileNotFoundError(f"{p} not found: run `edmsound evaluate ... --out DIR` first")
    return json.loads(p.read_text())


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _same_guidance(a, b) -> bool:
    """Guidance values are scales, or "class" (each class at its checkpoint default)."""
    if isinstance(a, str) or isinstance(b, str):
        return str(a) == str(b)
    return float(a) == float(b)


def _g_text(guidance) -> str:
    return guidance if isinstance(guidance, str) else f"{guidance:g}"


def shipped_rows(results: dict, sampler: str, nfe: int, guidance, interval=None) -> dict[str, dict]:
    """The generated rows (class -> row, plus "overall") of one configuration; ValueError if the sweep lacks it.
    ``guidance``: a scale, or "class" for the checkpoint's per-class default scales."""
    want = _interval_text(interval)
    rows = {r["class"]: r for r in results["rows"]
            if r["kind"] == "generated" and r["sampler"] == sampler and r["nfe"] == nfe
            and _same_guidance(r["guidance"], guidance) and (r.get("guidance_interval") or "") == want}
    if not rows:
        have = sorted({(r["sampler"], r["nfe"], r["guidance"], r.get("guidance_interval") or "")
                       for r in results["rows"] if r["kind"] == "generated"})
        raise ValueError(f"the evaluation has no rows for {sampler} NFE {nfe} guidance {_g_text(guidance)}"
                         f"{' interval ' + want if want else ''}; it has {have}. Add it with --points "
                         f"{sampler}:{nfe}:{_g_text(guidance)}{':' + want if want else ''}")
    return rows


def _bar(name, target, value, met):
    return {"bar": name, "target": target, "value": value, "met": met}


def _fidelity_bars(results: dict, rows: dict, classes: list[str]) -> list[dict]:
    """Level and spectral-envelope gaps (no learned encoder), the worst class / band, with the floor: the same
    figure for the training subset (real clips) against the same reference."""
    floor = {r["class"]: r for r in results["rows"] if r["kind"] == "baseline: training subset"}
    out = []
    lv = {c: rows[c].get("level_gap_db") for c in classes}
    if lv and all(_finite(v) for v in lv.values()):
        worst = max(lv, key=lambda c: abs(lv[c]))
        fl = [abs(floor[c]["level_gap_db"]) for c in classes if _finite(floor.get(c, {}).get("level_gap_db"))]
        note = f"; floor {max(fl):.1f}" if fl else ""
        se = rows[worst].get("level_gap_se_db")
        pm = f" ± {se:.1f}" if _finite(se) else ""
        out.append(_bar("level gap, every class", f"\\|gap\\| ≤ {LEVEL_GAP_MAX_DB:g} dB",
                        f"{lv[worst]:+.1f}{pm} dB ({worst}{note})", abs(lv[worst]) <= LEVEL_GAP_MAX_DB))
    bands = {c: rows[c].get("band_gap_db") for c in classes}
    if bands and all(isinstance(v, list) and v for v in bands.values()):
        c, b, g = max(((c, b, g) for c in classes for b, g in enumerate(bands[c])), key=lambda t: abs(t[2]))
        fl = [abs(x) for k in classes for x in (floor.get(k, {}).get("band_gap_db") or [])]
        note = f"; floor {max(fl):.1f}" if fl else ""
        se = (rows[c].get("band_gap_se_db") or [None] * len(bands[c]))[b]
        pm = f" ± {se:.1f}" if _finite(se) else ""
        m = F.band_misses([rows[k] for k in classes], BAND_GAP_MAX_DB)
        count = f"; {F.misses_text(m)}" if m["beyond"] else ""
        out.append(_bar(f"band gap, every class and band ({len(bands[c])} bands)", f"\\|gap\\| ≤ {BAND_GAP_MAX_DB:g} dB",
                        f"{g:+.1f}{pm} dB ({c}, band {b + 1}{note}{count})", abs(g) <= BAND_GAP_MAX_DB))
    over = {c: rows[c].get("over_full_scale") for c in classes}
    name, target = "clips reaching full scale (clipped in a 16- or 24-bit file), every class", \
        f"≤ {100 * OVER_FULL_SCALE_MAX:g} %"
    if over and all(_finite(v) for v in over.values()):
        worst = max(over, key=lambda c: over[c])
        fl = [floor[c]["over_full_scale"] for c in classes if _finite(floor.get(c, {}).get("over_full_scale"))]
        note = f"; floor {100 * max(fl):.1f} %" if fl else ""
        n_out = sum(v > OVER_FULL_SCALE_MAX for v in over.values())
        count = f"; {n_out} of {len(classes)} classes above" if n_out else ""
        out.append(_bar(name, target, f"{100 * over[worst]:.1f} % ({worst}{note}{count})", over[worst] <= OVER_FULL_SCALE_MAX))
    else:
        out.append(_bar(name, target, "– (an evaluation from before this measure; run evaluate again)", None))
    return out


def check_speed_record(speed, source: str = "the speed record") -> dict:
    """``speed`` if it is a timing record of ``benchmarks/samplers.py``, else ValueError: a single-model one
    (``--shipped-only``: ``median_sec_per_clip``) or a side-by-side one (``--versus``: ``rows`` of models, each with
    ``median_all_classes``)."""
    single = isinstance(speed, dict) and "median_sec_per_clip" in speed
    side = (isinstance(speed, dict) and isinstance(speed.get("rows"), list) and speed["rows"]
            and all(isinstance(r, dict) and "median_all_classes" in r for r in speed["rows"]))
    if not (single or side):
        raise ValueError(f"{source} is not a speed record of `python benchmarks/samplers.py` (one from "
                         "--shipped-only, with median_sec_per_clip, or one from --versus, with rows of models "
                         "each with median_all_classes). Pass such a record or none")
    return speed


def speed_for_weights(speed: dict, ema_sha256: str | None, class_guidance: str | None = None
                      ) -> tuple[dict | None, str]:
    """The timing of the weights whose EMA file has sha256 ``ema_sha256``, read from a record that
    :func:`check_speed_record` accepts, as a single-model record; or ``(None, why)`` when the record timed other
    weights. From a side-by-side record it is that model's row (median over every class and round) with
    ``versus``: the first row's label and this row's time over the first row's. A record that does not name its
    weights is taken as it is and says so (``weights_unknown``). Where the record timed the same weights at several
    settings (e.g. with and without a guide model), ``class_guidance`` (the per-class scales as
    :func:`format_class_guidance` writes them) picks the row timed at those."""
    speed = check_speed_record(speed)
    if "median_sec_per_clip" in speed:
        have = speed.get("ema_sha256")
        if have and ema_sha256 and have != ema_sha256:
            return None, f"the speed record timed other weights (EMA sha256 {have[:12]}, these are {ema_sha256[:12]})"
        return (speed if have or not ema_sha256 else dict(speed, weights_unknown=True)), ""
    rows = speed["rows"]
    named = [r for r in rows if r.get("ema_sha256")]
    if not ema_sha256 or not named:
        return None, "a side-by-side record is read by the weights' sha256, and one of the two is not known"
    hit = [r for r in named if r["ema_sha256"] == ema_sha256]
    if not hit:
        return None, (f"the side-by-side record times {', '.join(r['ema_sha256'][:12] for r in named)}, not these "
                      f"weights ({ema_sha256[:12]})")
    same = [r for r in hit if class_guidance and (r.get("class_guidance") or "") == class_guidance]
    row, first = (same or hit)[0], rows[0]
    view = {k: row.get(k) for k in ("sampler", "nfe", "guidance", "class_guidance", "guidance_interval",
                                    "ema_sha256", "label")}
    prec = speed.get("precision")
    view.update(median_sec_per_clip=float(row["median_all_classes"]), cpu=speed.get("cpu"), date=speed.get("date"),
                precision="/".join(prec) if isinstance(prec, list) else prec,
                base_guidance_interval=row.get("guidance_interval"),
                rounds=speed.get("repeats"), classes=len(row.get("per_class_median") or {}) or None,
                versus={"label": first.get("label"), "ratio": float(row["median_all_classes"])
                        / float(first["median_all_classes"])} if row is not first else None)
    return view, ""


def quality_targets(results: dict, sampler: str, nfe: int, guidance, interval=None,
               speed: dict | None = None) -> list[dict]:
    """One dict per bar: ``bar``, ``target``, ``value`` (a string), ``met`` (True/False/None = not measured).
    ``guidance``: the shipped scale, or "class" when the checkpoint ships per-class scales."""
    if speed is not None:
        check_speed_record(speed)
    rows = shipped_rows(results, sampler, nfe, guidance, interval)
    classes = [c for c in results["settings"]["classes"] if c in rows]
    overall = rows["overall"]
    out = []
    acc = overall.get("accuracy")
    per = {c: rows[c].get("accuracy") for c in classes}
    out.append(_bar("category fit, mean", "≥ 0.85", f"{acc:.3f}" if _finite(acc) else "–",
                    (acc >= 0.85) if _finite(acc) else None))
    if per and all(_finite(v) for v in per.values()):
        worst = min(per, key=per.get)
        out.append(_bar("category fit, every class", "≥ 0.70", f"{per[worst]:.3f} ({worst})", per[worst] >= 0.70))
    ref = next((r for r in results["rows"] if r["kind"] == "baseline: reference" and r["class"] == "overall"), {})
    racc = ref.get("accuracy")
    out.append(_bar("classifier on held-out real clips", "≥ 0.95", f"{racc:.3f}" if _finite(racc) else "–",
                    (racc >= 0.95) if _finite(racc) else None))
    fvb = overall.get("fad_vs_baseline")
    out.append(_bar("FAD / FAD(training subset)", f"≤ {FAD_RATIO_MAX:g}", f"{fvb:.2f}" if _finite(fvb) else "–",
                    (fvb <= FAD_RATIO_MAX) if _finite(fvb) else None))
    out += _fidelity_bars(results, rows, classes)
    # few steps: Heun at ~50 evaluations with the same guidance (and interval, if the sweep has it)
    heun = [r for r in results["rows"] if r["kind"] == "generated" and r["class"] == "overall"
            and r["sampler"] == "heun" and r["nfe"] >= HEUN_REFERENCE_MIN_NFE and _same_guidance(r["guidance"], guidance)
            and (r.get("guidance_per_class") or "") == (overall.get("guidance_per_class") or "")]
    same = [r for r in heun if (r.get("guidance_interval") or "") == _interval_text(interval)]
    heun = same or heun
    if heun and _finite(overall.get("fad")):
        h = min(heun, key=lambda r: r["nfe"])
        ratio = overall["fad"] / h["fad"]
        note = "" if same else " (Heun guided at every σ)"
        out.append(_bar(f"FAD at NFE {nfe} / FAD of Heun at NFE {h['nfe']}", "≤ 1.1", f"{ratio:.2f}{note}",
                        ratio <= 1.1))
    else:
        out.append(_bar("FAD at the shipped NFE / FAD of Heun at NFE 50", "≤ 1.1", "– (no Heun NFE ≥ 49 row; add "
                        f"--points heun:51:{_g_text(guidance)})", None))
    div = {c: rows[c].get("diversity_ratio") for c in classes}
    if div and all(_finite(v) for v in div.values()):
        worst = min(div, key=div.get)
        out.append(_bar("diversity ratio, every class", "≥ 0.70", f"{div[worst]:.2f} ({worst})", div[worst] >= 0.70))
    cs = overall.get("copy_share")
    out.append(_bar("copying: share above the training p95", "≤ 10 %", f"{100 * cs:.1f} %" if _finite(cs) else "–",
                    (cs <= 0.10) if _finite(cs) else None))
    why = ""
    if speed is not None:
        speed, why = speed_for_weights(speed, results["settings"].get("ema_sha256"))
    side = speed is not None and "rounds" in speed
    name = ("speed: one clip, median over every class, side by side" if side else "speed: one clip, median of 10")
    if speed is None:
        out.append(_bar(name, "≤ 1 s", f"– ({why or 'run benchmarks/samplers.py --shipped-only'})", None))
    else:
        if isinstance(guidance, str):      # per-class scales: the record must be for the same scales
            same_g = (speed.get("class_guidance") or "") == (overall.get("guidance_per_class") or "")
        else:
            same_g = not speed.get("class_guidance") and float(speed.get("guidance", -1)) == float(guidance)
        # the preset's interval (the measured class may have its own; per-class text above covers that)
        speed_interval = speed.get("base_guidance_interval", speed.get("guidance_interval"))
        same_cfg = (speed.get("sampler") == sampler and int(speed.get("nfe", -1)) == int(nfe) and same_g
                    and _interval_text(speed_interval) == _interval_text(interval))
        v = float(speed["median_sec_per_clip"])
        if same_cfg:
            cls = (f"{speed['class']} at w {speed.get('guidance'):g}, {speed.get('guided_nfe', '?')} guided "
                   "evaluations, " if speed.get("class_guidance") and not side else "")
            vs = speed.get("versus") if side else None
            rel = f"× {vs['ratio']:.2f} of {vs['label']} in the same run, " if vs else ""
            unknown = "; the record does not name the weights it timed" if speed.get("weights_unknown") else ""
            prec = f" ({speed['precision']})" if speed.get("precision") else ""
            out.append(_bar(name, "≤ 1 s", f"{v:.3f} s ({cls}{rel}{speed.get('cpu', '?')}{prec}, "
                            f"{speed.get('date', '?')}{unknown})", v <= 1.0))
        else:
            out.append(_bar(name, "≤ 1 s",
                            f"– (the speed record is for other settings: {speed.get('sampler')} NFE {speed.get('nfe')} "
                            f"w {speed.get('guidance')} interval {speed.get('guidance_interval')})", None))
    return out


def targets_markdown(bars: list[dict], title: str = "") -> str:
    mark = {True: "✔ met", False: "✘ not met", None: "not measured"}
    lines = ([title, ""] if title else []) + ["| quality | target | measured | |", "|---|---|---|---|"]
    lines += [f"| {b['bar']} | {b['target']} | {b['value']} | {mark[b['met']]} |" for b in bars]
    return "\n".join(lines) + "\n"
