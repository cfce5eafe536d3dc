"""Sound-designer tools at the checkpoint's shipped settings: are the joins, loop wraps and kept regions clean,
and do long clips stay in their category and at their level?

Measured per class and overall (the checkpoint's default sampler, NFE and guidance throughout):

1. **Joins** (:mod:`edmsound.evaluation.joins`: spectral flux and level step across a position, 40 ms each side).
   * continuation joins: ``generate_long`` to ``--seconds``; its model windows (half a window apart, sampled
     together and averaged where they overlap) begin or end every half window: those edges are scored (from
     :func:`edmsound.core.inpainting.tile_starts`);
   * a control: the same long clips half-way between edges (the model's own changes inside a window);
   * naive crossfade: independent ``generate`` clips, as many as the long clip has windows, concatenated with a
     50-ms linear crossfade (the same number of joins; scored at the crossfades' centres);
   * loop wraps: ``loop`` clips scored at the wrap of ``np.tile(w, 2)``; naive loops: a ``generate_long`` clip of
     the same length tiled as it is;
   * the reference: the same measures at random positions inside real training clips of the class, away from
     their edges. Each figure is the fraction of joins at or below the class's real 95th percentile (real
     positions score 95 % by construction; the target is joins and wraps within it).
2. **Kept regions**: ``regenerate`` over several spans returns the source outside ``settings["kept_outside"]``
   (max abs sample difference); band regeneration keeps the complex spectrogram outside the band (the sampled
   buffer, and the output re-encoded with ``codec.encode``).
3. **Category fit and FAD** of the long clips cut into model-length windows, beside single generated clips and
   beside the noise floor (a real subset of the same size, disjoint from the reference), with the classifier and
   embedding of ``edmsound evaluate`` (top-1 = the asked class; FAD on the default encoder's window embeddings).
   Plain signal measures: mean RMS dBFS / LUFS per model-length window, level drift (RMS of the last window minus
   the first) of long clips beside the difference between two independent single clips, the fraction of clips
   whose sample peak exceeds 0 dBFS.
4. **Time per operation** (one call each, after warm-up).

    python benchmarks/editing.py                                   # 3 long clips per class, all classes
    python benchmarks/editing.py --per-class 2 --classes rain,footstep --seconds 6 --out /tmp/editing

Writes ``<out>/editing.md``, ``editing.json`` and ``editing.png`` (join-score distributions).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from edmsound.audio import loudness as LN  # noqa: E402
from edmsound.audio.io import load_audio  # noqa: E402
from edmsound.core.inpainting import tile_starts  # noqa: E402
from edmsound.evaluation import joins as J  # noqa: E402
from edmsound.evaluation import metrics as M  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
CROSSFADE_S = 0.05
GROUPS = [("real", "real positions (reference)"), ("continuation", "continuation joins (generate_long)"),
          ("control", "long clips between joins (control)"), ("crossfade", "naive 50-ms crossfade joins"),
          ("loop", "loop wraps (loop)"), ("naive_loop", "naive loop wraps (tiled generate_long)")]
Q = 95


# ------------------------------------------------------------------------------------------ helpers
def machine(threads: int, load: tuple) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": threads,
            "torch": torch.__version__, "python": platform.python_version(), "date": date.today().isoformat(),
            "loadavg_before": [round(v, 2) for v in load],
            "shared": bool(load[0] >= 0.5)}


def real_clips(data: Path, class_name: str, sr: int, n: int, seed: int) -> np.ndarray:
    files = sorted((data / class_name).glob("*.wav"))
    if len(files) < n:
        raise SystemExit(f"{data / class_name} holds {len(files)} clips; {n} needed")
    pick = np.random.default_rng(seed).choice(len(files), size=n, replace=False)
    clips = [load_audio(files[i], sr) for i in sorted(pick)]
    L = max(len(c) for c in clips)
    return np.stack([np.pad(np.asarray(c, np.float32), (0, L - len(c))) for c in clips])


def join_frames(p, num_samples: int, context: int | None = None) -> tuple[list[int], int]:
    """Frames where a window of ``generate_long`` begins or ends (with 0 first), and the number of windows."""
    N = p.codec.frames_for(num_samples)
    W = p.window_frames
    starts = tile_starts(np.ones((1, N), bool), W, W - (W // 2 if context is None else context))
    edges = sorted({s for s in starts if s > 0} | {s + W for s in starts if s + W < N})
    return [0] + edges, len(starts)


def crossfade(clips: list[np.ndarray], n: int) -> tuple[np.ndarray, list[int]]:
    """Clips joined with an ``n``-sample linear crossfade; returns the wave and the crossfades' centres."""
    ramp = (np.arange(n) + 0.5) / n
    out, centres = clips[0].astype(np.float64), []
    for c in clips[1:]:
        c = c.astype(np.float64)
        start = len(out) - n
        mixed = out[start:] * (1 - ramp) + c[:n] * ramp
        out = np.concatenate([out[:start], mixed, c[n:]])
        centres.append(start + n // 2)
    return out.astype(np.float32), centres


def windows_of(waves: np.ndarray, n: int) -> np.ndarray:
    """Each long clip cut into consecutive, non-overlapping model-length windows (the remainder dropped)."""
    k = waves.shape[1] // n
    return waves[:, :k * n].reshape(len(waves), k, n)


def rms_db(x) -> np.ndarray:
    return M.rms_dbfs(np.atleast_2d(np.asarray(x, np.float64)))


def _scores_add(acc: dict, s: dict):
    for m in J.MEASURES:
        acc.setdefault(m, []).append(np.asarray(s[m]))


def _cat(acc: dict) -> dict:
    return {m: np.concatenate(acc[m]) if acc.get(m) else np.zeros(0) for m in J.MEASURES}


def wrap_scores(waves, sr: int) -> dict:
    """Join measures at the wrap point of each clip played twice."""
    acc = {}
    for w in waves:
        _scores_add(acc, J.join_scores(np.tile(w, 2), sr, [len(w)]))
    return _cat(acc)


def both_within(scores: dict, ref: dict, q: float = Q) -> float:
    thr = {m: np.percentile(ref[m], q) for m in J.MEASURES}
    ok = np.ones(len(scores[J.MEASURES[0]]), bool)
    for m in J.MEASURES:
        ok &= np.asarray(scores[m]) <= thr[m]
    return float(ok.mean()) if ok.size else float("nan")


# ------------------------------------------------------------------------------------------ the run
def run(a) -> dict:
    from edmsound.copydetect.encoders import load_encoder
    from edmsound.core.pipeline import EDMSoundPipeline
    from edmsound.evaluation.classifier import load_classifier

    load = os.getloadavg()
    threads = a.threads
    if not threads:                      # OpenMP threads that must wait for a busy core slow torch down badly
        busy = int(math.floor(load[0] + 0.5))
        threads = max(1, (os.cpu_count() or 1) - busy)
    torch.set_num_threads(threads)
    info = machine(threads, load)
    p = EDMSoundPipeline(a.checkpoint, device="cpu")
    sr, ns, hop = p.sample_rate, p.codec.num_samples, p.codec.config.hop_length
    classes = p.classes if not a.classes else [c.strip() for c in a.classes.split(",") if c.strip()]
    for c in classes:
        p.class_index(c)
    pre = p.preset
    shipped = {"sampler": pre.default_sampler, "nfe": pre.default_nfe,
               "guidance": {c: pre.guidance_for(c) for c in classes},
               "guidance_interval": {c: p.resolve_guidance_interval("default", c) for c in classes}}
    clf = load_classifier("default")
    enc = load_encoder("default", head=None)
    data = Path(a.data)

    long_len = int(round(a.seconds * sr))
    firsts, n_windows = join_frames(p, long_len)
    join_pos = [f * hop for f in firsts[1:]]
    mid_pos = [(f + p.window_frames // 4) * hop for f in firsts[1:]]      # half-way between edges (64-frame steps)
    n_cut = long_len // ns                                               # model-length windows per long clip
    n_gen = a.per_class * n_cut                                          # clips per class for FAD / fit
    xf = int(round(CROSSFADE_S * sr))

    res = {"settings": {"checkpoint": str(a.checkpoint), "classes": classes, "per_class": a.per_class,
                        "loops_per_class": a.loops_per_class, "seconds": a.seconds, "loop_seconds": a.loop_seconds,
                        "sample_rate": sr, "window_samples": ns, "hop": hop, "windows_per_long_clip": n_windows,
                        "join_frames": firsts[1:], "join_samples": join_pos, "crossfade_s": CROSSFADE_S,
                        "real_per_class_joins": a.real_per_class, "fad_reference_per_class": a.fad_reference,
                        "fad_set_per_class": n_gen, "seed": a.seed, "shipped": shipped,
                        "measure": {"side_s": J.SIDE_S, "n_fft": J.N_FFT, "hop": J.HOP, "n_mels": J.N_MELS,
                                    "floor_db": J.FLOOR_DB, "top_db": J.TOP_DB, "q": Q},
                        "classifier": clf.name, "encoder": enc.name, "machine": info},
           "classes": {}}
    scores = {g: {} for g, _ in GROUPS}
    sets = {k: {} for k in ("long", "single", "real_b", "real_ref")}
    whole_long, singles_all = {}, {}
    preserve = []
    stages = ["real", "long", "single", "loop", "naive_loop", "regen"]
    bar = tqdm(total=len(classes) * len(stages), desc="editing", unit="stage")
    for ci, c in enumerate(classes):
        base = a.seed * 1_000_000 + ci * 10_000
        row = {}
        # real clips: join reference, FAD reference and noise-floor subset (disjoint)
        bar.set_postfix_str(f"{c}: real")
        need = max(a.real_per_class, a.fad_reference + n_gen)
        real = real_clips(data, c, sr, need, seed=a.seed + ci)
        scores["real"][c] = J.reference_scores(real[:a.real_per_class], sr, per_clip=8, seed=a.seed + ci)
        sets["real_ref"][c] = real[:a.fad_reference, :ns]
        sets["real_b"][c] = real[a.fad_reference:a.fad_reference + n_gen, :ns]
        bar.update()
        # continuation: generate_long
        bar.set_postfix_str(f"{c}: generate_long {a.seconds:g} s x{a.per_class}")
        g = p.generate_long(c, a.seconds, n=a.per_class, seed=base)
        assert g.settings["windows"] == n_windows, (g.settings["windows"], n_windows)
        acc, ctl = {}, {}
        for w in g.waves:
            _scores_add(acc, J.join_scores(w, sr, join_pos))
            _scores_add(ctl, J.join_scores(w, sr, mid_pos))
        scores["continuation"][c], scores["control"][c] = _cat(acc), _cat(ctl)
        whole_long[c] = g.waves
        sets["long"][c] = windows_of(g.waves, ns).reshape(-1, ns)
        row["long_seconds"] = g.settings["seconds"]
        bar.update()
        # naive crossfade of independent clips (as many as the long clip's windows); also the single-clip set
        bar.set_postfix_str(f"{c}: generate x{a.per_class * n_windows}")
        s = p.generate(c, n=a.per_class * n_windows, seed=base + 1000)
        acc = {}
        for i in range(a.per_class):
            wave, centres = crossfade(list(s.waves[i * n_windows:(i + 1) * n_windows]), xf)
            _scores_add(acc, J.join_scores(wave, sr, centres))
        scores["crossfade"][c] = _cat(acc)
        sets["single"][c] = s.waves[:n_gen]
        singles_all[c] = s.waves
        bar.update()
        # loops and naive loops
        bar.set_postfix_str(f"{c}: loop {a.loop_seconds:g} s x{a.loops_per_class}")
        lp = p.loop(c, a.loop_seconds, n=a.loops_per_class, seed=base + 2000)
        scores["loop"][c] = wrap_scores(lp.waves, sr)
        bar.update()
        bar.set_postfix_str(f"{c}: naive loop x{a.loops_per_class}")
        nl = p.generate_long(c, a.loop_seconds, n=a.loops_per_class, seed=base + 3000)
        scores["naive_loop"][c] = wrap_scores(nl.waves, sr)
        bar.update()
        # kept regions: a real and a generated source, two spans each, and one band regeneration
        bar.set_postfix_str(f"{c}: regenerate")
        spans = [(0.1, 0.3), (0.4, 0.6), (0.75, 0.95), (0.0, 0.2)]
        sources = [("real", real[-1, :ns]), ("generated", s.waves[-1])]
        for k, (kind, src) in enumerate(sources):
            for j in range(2):
                a0, b0 = spans[(2 * k + j + ci) % len(spans)]
                r = p.regenerate(src, c, a0, b0, seed=base + 4000 + 2 * k + j)
                lo, hi = r.settings["kept_outside"]
                t = np.arange(len(src))
                keep = (t < int(math.floor(lo * sr))) | (t >= int(math.ceil(hi * sr)))
                diff = np.abs(r.waves[0].astype(np.float64) - src.astype(np.float64))
                inside = diff[~keep]
                preserve.append({"class": c, "source": kind, "span": [a0, b0], "kept_outside": [lo, hi],
                                 "max_abs_outside": float(diff[keep].max()),
                                 "rms_change_inside_db": float(rms_db(inside)[0] - rms_db(src[~keep])[0])
                                 if inside.size else float("nan"), "seconds": r.settings["seconds"]})
        src = s.waves[-2]
        band = (a.band_low, a.band_high)
        rb = p.regenerate(src, c, 0.0, len(src) / sr, low_hz=band[0], high_hz=band[1], seed=base + 4100)
        ba, bb = rb.settings["bins"]
        S = p.codec.to_complex(p.codec.encode(torch.from_numpy(src)[None], fit=False))[0]
        O = p.codec.to_complex(p.codec.encode(torch.from_numpy(rb.waves[0])[None], fit=False))[0]
        B = p.codec.to_complex(rb.specs[:1])[0]
        Fb = S.shape[0]
        out_band = np.ones(Fb, bool)
        out_band[ba:bb] = False
        Sx, Ox = p.codec.decompress(S), p.codec.decompress(O)          # linear STFTs
        err, ref = ((Ox - Sx).abs() ** 2).sum(dim=1).numpy(), (Sx.abs() ** 2).sum(dim=1).numpy()
        dist = np.maximum(ba - np.arange(Fb), np.arange(Fb) - (bb - 1))      # bins from the band (<= 0 inside)
        rel = {f"error_db_from_{k}_bins": float(10 * np.log10(max(err[dist >= k].sum(), 1e-30)
                                                              / max(ref[dist >= k].sum(), 1e-30)))
               for k in (1, 2, 4)}
        preserve.append({"class": c, "source": "generated", "band_hz": list(band), "bins": [ba, bb],
                         "buffer_max_abs_outside_band": float((B[out_band] - S[out_band]).abs().max()),
                         "output_max_abs_outside_band": float((O[out_band] - S[out_band]).abs().max()),
                         "source_max_abs_outside_band": float(S[out_band].abs().max()), **rel,
                         "wave_max_abs_diff": float(np.abs(rb.waves[0] - src).max())})
        bar.update()
        res["classes"][c] = row
    bar.close()

    # ---- join summaries
    joins = {}
    for g, _ in GROUPS:
        per = {}
        for c in classes:
            sc = scores[g][c]
            per[c] = {"summary": J.summarize(sc), "within": J.within(sc, scores["real"][c], Q),
                      "both_within": both_within(sc, scores["real"][c])}
        n_tot = {m: sum(per[c]["within"][m]["n"] for c in classes) for m in J.MEASURES}
        overall = {"summary": J.summarize({m: np.concatenate([scores[g][c][m] for c in classes])
                                           for m in J.MEASURES}),
                   "within": {m: {"fraction": float(sum(per[c]["within"][m]["fraction"] * per[c]["within"][m]["n"]
                                                        for c in classes) / max(1, n_tot[m])), "n": n_tot[m]}
                              for m in J.MEASURES},
                   "both_within": float(sum(per[c]["both_within"] * per[c]["within"][J.MEASURES[0]]["n"]
                                            for c in classes) / max(1, n_tot[J.MEASURES[0]]))}
        joins[g] = {"per_class": per, "overall": overall,
                    "scores": {c: {m: [round(float(v), 3) for v in scores[g][c][m]] for m in J.MEASURES}
                               for c in classes}}
    res["joins"] = joins

    # ---- preservation
    regen = [r for r in preserve if "span" in r]
    bandr = [r for r in preserve if "band_hz" in r]
    res["preservation"] = {"regenerate": regen, "band": bandr,
                           "max_abs_outside": max(r["max_abs_outside"] for r in regen),
                           "band_buffer_max_abs": max(r["buffer_max_abs_outside_band"] for r in bandr),
                           "band_output_max_abs": max(r["output_max_abs_outside_band"] for r in bandr),
                           "band_source_max_abs": max(r["source_max_abs_outside_band"] for r in bandr),
                           **{f"band_error_db_from_{k}_bins": max(r[f"error_db_from_{k}_bins"] for r in bandr)
                              for k in (1, 2, 4)}}

    # ---- category fit, FAD, levels
    bar = tqdm(total=len(classes) * 4, desc="fit / FAD", unit="set")
    emb, fit, lev = {k: {} for k in sets}, {k: {} for k in sets}, {k: {} for k in sets}
    for k in sets:
        for c in classes:
            w = sets[k][c]
            emb[k][c] = enc.embed_windows(w, sr, progress=False)[0]
            prob = clf.predict_proba(w, sr)
            fit[k][c] = float(np.mean(prob.argmax(axis=1) == clf.classes.index(c)))
            lev[k][c] = {"rms": rms_db(w), "lufs": np.array([LN.integrated_lufs(x, sr) for x in w]),
                         "peak_over_0": float(np.mean(np.abs(w).max(axis=1) > 1.0))}
            bar.update()
    bar.close()
    quality = {}
    for k in ("long", "single", "real_b"):
        q = {"fit": {c: fit[k][c] for c in classes}, "fad": {c: M.fad(emb[k][c], emb["real_ref"][c]) for c in classes},
             "rms_dbfs": {c: float(lev[k][c]["rms"].mean()) for c in classes},
             "lufs": {c: float(lev[k][c]["lufs"].mean()) for c in classes},
             "peak_over_0": {c: lev[k][c]["peak_over_0"] for c in classes}}
        q["fit"]["overall"] = float(np.mean([fit[k][c] for c in classes]))
        q["fad"]["overall"] = M.fad(np.concatenate([emb[k][c] for c in classes]),
                                    np.concatenate([emb["real_ref"][c] for c in classes]))
        for m, key in (("rms_dbfs", "rms"), ("lufs", "lufs")):
            q[m]["overall"] = float(np.mean(np.concatenate([lev[k][c][key] for c in classes])))
        q["peak_over_0"]["overall"] = float(np.mean([lev[k][c]["peak_over_0"] for c in classes]))
        quality[k] = q
    # whole long clips: peaks, drift; single-clip pairs as the drift reference
    drift, pair, lpeak, llufs = {}, {}, {}, {}
    for c in classes:
        wins = windows_of(whole_long[c], ns)
        first, last = rms_db(wins[:, 0]), rms_db(wins[:, -1])
        drift[c] = (last - first).tolist()
        sw = singles_all[c]
        h = len(sw) // 2
        pair[c] = (rms_db(sw[h:2 * h]) - rms_db(sw[:h])).tolist()
        lpeak[c] = float(np.mean(np.abs(whole_long[c]).max(axis=1) > 1.0))
        llufs[c] = [LN.integrated_lufs(w, sr) for w in whole_long[c]]
    quality["long_whole"] = {
        "drift_db": drift, "single_pair_diff_db": pair, "peak_over_0": lpeak, "lufs": llufs,
        "mean_drift_db": float(np.mean(sum(drift.values(), []))),
        "mean_abs_drift_db": float(np.mean(np.abs(sum(drift.values(), [])))),
        "mean_abs_single_pair_db": float(np.mean(np.abs(sum(pair.values(), [])))),
        "peak_over_0_overall": float(np.mean([lpeak[c] for c in classes])),
        "peak_max_dbfs": float(20 * np.log10(max(np.abs(whole_long[c]).max() for c in classes)))}
    pos_rms = np.array([[rms_db(windows_of(whole_long[c], ns)[:, i]).mean() for i in range(n_cut)] for c in classes])
    quality["long_whole"]["window_rms_by_position_db"] = [float(v) for v in pos_rms.mean(axis=0)]
    res["quality"] = quality

    # ---- time per operation
    res["timing"] = timing(p, classes[0], a, sr) if not a.no_timing else []
    res["settings"]["loadavg_after"] = [round(v, 2) for v in os.getloadavg()]
    return res


def timing(p, c: str, a, sr: int) -> list[dict]:
    src = p.generate(c, n=1, seed=99).waves[0]          # also a warm-up
    ops = [("generate (1 clip)", lambda: p.generate(c, n=1, seed=100)),
           ("vary: generate(init=clip, strength=0.5)", lambda: p.generate(c, n=1, seed=101, init=src, strength=0.5)),
           ("regenerate 0.2 s (0.4-0.6 s)", lambda: p.regenerate(src, c, 0.4, 0.6, seed=102)),
           (f"extend 1.016 s -> {a.seconds:g} s", lambda: p.extend(src, c, a.seconds, seed=103)),
           (f"generate_long {a.long_timing:g} s", lambda: p.generate_long(c, a.long_timing, seed=104)),
           (f"loop {a.loop_seconds:g} s", lambda: p.loop(c, a.loop_seconds, seed=105))]
    out = []
    for name, fn in tqdm(ops, desc="timing", unit="op"):
        t0 = time.perf_counter()
        g = fn()
        wall = time.perf_counter() - t0
        out.append({"operation": name, "seconds": round(wall, 3), "windows": g.settings.get("windows", 1),
                    "nfe_total": g.settings.get("nfe_total", g.settings["nfe"]),
                    "audio_seconds": round(g.waves.shape[1] / sr, 3)})
    return out


# ------------------------------------------------------------------------------------------ report
def _pct(v: float) -> str:
    return "–" if v is None or not np.isfinite(v) else f"{100 * v:.0f} %"


def markdown(res: dict) -> str:
    s, jn, q = res["settings"], res["joins"], res["quality"]
    mc = s["machine"]
    classes = s["classes"]
    sh = s["shipped"]
    gset = sorted({f"{v:g}" for v in sh["guidance"].values()})
    load_note = (f" **A background job shared the CPUs** (1-min load average {mc['loadavg_before'][0]:.2f} before the "
                 f"run, {s['loadavg_after'][0]:.2f} after): absolute times are slower than on an idle machine."
                 if mc["shared"] else "")
    L = ["# Sound-designer tools: joins, loops, kept regions, long-clip quality", "",
         f"Generated by `benchmarks/editing.py` on {mc['date']}: {mc['platform']}, {mc['cpu']}, {mc['cpu_count']} "
         f"CPUs, torch {mc['torch']} with {mc['torch_threads']} thread(s).{load_note}", "",
         f"- checkpoint `{s['checkpoint']}` at its shipped settings: {sh['sampler']}, NFE {sh['nfe']} per window, "
         f"guidance {', '.join(gset)}; classes {', '.join(classes)}",
         f"- {s['per_class']} long clips of {s['seconds']:g} s per class ({s['windows_per_long_clip']} windows, "
         f"{len(s['join_samples'])} joins each, at frames {s['join_frames'][0]}, {s['join_frames'][1]}, ... every "
         f"{s['join_frames'][1] - s['join_frames'][0]}); naive crossfade: {s['windows_per_long_clip']} independent "
         f"clips per long clip, {1000 * s['crossfade_s']:.0f}-ms linear crossfades; {s['loops_per_class']} loops and "
         f"{s['loops_per_class']} naive loops of {s['loop_seconds']:g} s per class",
         f"- join measures (`edmsound.evaluation.joins`): spectral flux = mean |Δ| over {s['measure']['n_mels']} mel "
         f"bands of the mean spectra of the {1000 * s['measure']['side_s']:.0f} ms before and after (dB); level step = "
         f"|Δ RMS dBFS| over the same spans; reference: 8 random positions in each of {s['real_per_class_joins']} real "
         "training clips per class (away from the edges). *within* = fraction at or below the class's real "
         f"{Q}th percentile (real positions: {Q} % by construction; the target for joins and wraps)", ""]
    # overall joins
    L += ["## Joins and loop wraps (all classes)", "",
          "| positions | n | flux median / p95 (dB) | flux within real p95 | level step median / p95 (dB) | "
          "level step within real p95 | both within |", "|---|---|---|---|---|---|---|"]
    for g, name in GROUPS:
        o = jn[g]["overall"]
        f, lv = o["summary"]["flux_db"], o["summary"]["level_step_db"]
        L.append(f"| {name} | {f['n']} | {f['median']:.2f} / {f['p95']:.2f} | {_pct(o['within']['flux_db']['fraction'])} | "
                 f"{lv['median']:.2f} / {lv['p95']:.2f} | {_pct(o['within']['level_step_db']['fraction'])} | "
                 f"{_pct(o['both_within'])} |")
    L += ["", "## Per class: fraction within the class's real p95 (flux / level step)", "",
          "| class | real p95 flux / level (dB) | continuation | control (between joins) | naive crossfade | loop wraps | "
          "naive loop wraps |", "|---|---|---|---|---|---|---|"]
    for c in classes:
        rp = jn["continuation"]["per_class"][c]["within"]
        cells = [f"{_pct(jn[g]['per_class'][c]['within']['flux_db']['fraction'])} / "
                 f"{_pct(jn[g]['per_class'][c]['within']['level_step_db']['fraction'])}"
                 for g in ("continuation", "control", "crossfade", "loop", "naive_loop")]
        L.append(f"| {c} | {rp['flux_db'][f'p{Q}']:.2f} / {rp['level_step_db'][f'p{Q}']:.2f} | " + " | ".join(cells) + " |")
    L += ["", "Medians per class (flux / level step, dB):", "",
          "| class | real | continuation | control | naive crossfade | loop wraps | naive loop wraps |",
          "|---|---|---|---|---|---|---|"]
    for c in classes:
        cells = [f"{jn[g]['per_class'][c]['summary']['flux_db']['median']:.2f} / "
                 f"{jn[g]['per_class'][c]['summary']['level_step_db']['median']:.2f}" for g, _ in GROUPS]
        L.append(f"| {c} | " + " | ".join(cells) + " |")
    # preservation
    pr = res["preservation"]
    L += ["", "## Kept regions", "",
          "| check | result | expected |", "|---|---|---|",
          f"| `regenerate`: max abs sample difference outside `kept_outside` ({len(pr['regenerate'])} calls: "
          f"{len(classes)} classes, real and generated sources, spans of 0.2 s) | {pr['max_abs_outside']:.2e} | "
          "~1e-7 (float32 rounding of the inverse STFT) |",
          f"| band regeneration ({pr['band'][0]['band_hz'][0]:g}-{pr['band'][0]['band_hz'][1]:g} Hz, whole clip): "
          f"sampled spectrogram outside the band, max abs difference | {pr['band_buffer_max_abs']:.2e} | 0 (exact) |",
          f"| the same, output re-encoded with `codec.encode`, max abs difference (compressed) | "
          f"{pr['band_output_max_abs']:.2e} (source's largest value there {pr['band_source_max_abs']:.2f}) | not 0: "
          "the inverse STFT of an edited spectrogram leaks into the bins next to the band |",
          "| the same: change energy / source energy outside the band, from 1 / 2 / 4 bins off the band's edges "
          f"(worst class) | {pr['band_error_db_from_1_bins']:.1f} / {pr['band_error_db_from_2_bins']:.1f} / "
          f"{pr['band_error_db_from_4_bins']:.1f} dB | falling with the distance (the Hann window's main lobe is "
          "2 bins wide) |"]
    # quality
    L += ["", "## Category fit, FAD and level of long clips", "",
          f"Long clips cut into model-length windows ({s['fad_set_per_class']} per class), single generated clips and a "
          f"real subset of the same size (the noise floor), each against a reference of {s['fad_reference_per_class']} "
          f"other real clips per class. Classifier `{s['classifier']}`; FAD on `{s['encoder']}` window embeddings "
          "(as `edmsound evaluate`).", "",
          "| set | category fit | FAD (all classes) | mean RMS dBFS | mean LUFS | sample peak > 0 dBFS |",
          "|---|---|---|---|---|---|"]
    names = {"long": f"{s['seconds']:g}-s continued clips, cut into windows", "single": "single generated clips",
             "real_b": "real clips (noise floor)"}
    for k in ("long", "single", "real_b"):
        r = q[k]
        L.append(f"| {names[k]} | {_pct(r['fit']['overall'])} | {r['fad']['overall']:.3f} | "
                 f"{r['rms_dbfs']['overall']:.1f} | {r['lufs']['overall']:.1f} | {_pct(r['peak_over_0']['overall'])} |")
    L += ["", "| class | fit long / single / real | FAD long / single / real floor | RMS dBFS long / single / real | "
              "LUFS long / single / real |", "|---|---|---|---|---|"]
    for c in classes:
        L.append(f"| {c} | " + " / ".join(_pct(q[k]['fit'][c]) for k in ("long", "single", "real_b")) + " | "
                 + " / ".join(f"{q[k]['fad'][c]:.2f}" for k in ("long", "single", "real_b")) + " | "
                 + " / ".join(f"{q[k]['rms_dbfs'][c]:.1f}" for k in ("long", "single", "real_b")) + " | "
                 + " / ".join(f"{q[k]['lufs'][c]:.1f}" for k in ("long", "single", "real_b")) + " |")
    lw = q["long_whole"]
    L += ["", f"Whole {s['seconds']:g}-s clips: level drift (RMS of the last model-length window minus the first) "
          f"mean {lw['mean_drift_db']:+.1f} dB, mean |drift| {lw['mean_abs_drift_db']:.1f} dB, beside "
          f"{lw['mean_abs_single_pair_db']:.1f} dB between two independent single clips of the class; mean RMS by "
          "window position " + ", ".join(f"{v:.1f}" for v in lw["window_rms_by_position_db"]) + " dBFS; "
          f"sample peak above 0 dBFS in {_pct(lw['peak_over_0_overall'])} of long clips (loudest "
          f"{lw['peak_max_dbfs']:+.1f} dBFS).", ""]
    if res["timing"]:
        L += [f"## Time per operation ({classes[0]}; one call each after warm-up; {mc['cpu']}, {mc['cpu_count']} CPUs, "
              f"{mc['torch_threads']} torch thread(s), {mc['date']}"
              + ("; a background job shared the CPUs" if mc["shared"] else "") + ")", "",
              "| operation | seconds | windows | NFE total | audio s |", "|---|---|---|---|---|"]
        for t in res["timing"]:
            L.append(f"| {t['operation']} | {t['seconds']:.2f} | {t['windows']} | {t['nfe_total']} | "
                     f"{t['audio_seconds']:.2f} |")
    return "\n".join(L) + "\n"


def plot(res: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    classes = res["settings"]["classes"]
    groups = [g for g, _ in GROUPS]
    labels = ["real\npositions", "continuation\njoins", "between\njoins", "naive\ncrossfade", "loop\nwraps",
              "naive\nloops"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, m, title in zip(axes, J.MEASURES, ["spectral flux across the position (dB)", "level step (dB)"]):
        data = [np.concatenate([res["joins"][g]["scores"][c][m] for c in classes]) for g in groups]
        ax.boxplot(data, whis=(5, 95), showfliers=True, flierprops={"markersize": 2, "alpha": 0.5})
        ax.set_xticks(range(1, len(groups) + 1), labels, fontsize=8)
        p95 = np.percentile(data[0], Q)
        ax.axhline(p95, color="k", ls=":", lw=1, label=f"real p{Q} (all classes) {p95:.1f} dB")
        for i, g in enumerate(groups[1:], start=2):
            f = res["joins"][g]["overall"]["within"][m]["fraction"]
            ax.annotate(f"{100 * f:.0f} %", (i, 0), xytext=(0, -2), textcoords="offset points", ha="center",
                        va="top", fontsize=7, color="tab:blue", annotation_clip=False)
        ax.set_title(title + "; % = within the class's real p95", fontsize=9)
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "default"))
    ap.add_argument("--per-class", type=int, default=3, help="long clips per class (and crossfades of as many)")
    ap.add_argument("--loops-per-class", type=int, default=6, help="loops and naive loops per class")
    ap.add_argument("--classes", default=None, help="comma-separated classes (default: all of the checkpoint's)")
    ap.add_argument("--seconds", type=float, default=8.0, help="length of the long clips")
    ap.add_argument("--loop-seconds", type=float, default=2.0)
    ap.add_argument("--long-timing", type=float, default=10.0, help="length of the timed generate_long")
    ap.add_argument("--band-low", type=float, default=2000.0)
    ap.add_argument("--band-high", type=float, default=4000.0)
    ap.add_argument("--data", default=str(ROOT / "data" / "builtin"), help="real clips, one folder per class")
    ap.add_argument("--real-per-class", type=int, default=100, help="real clips per class for the join reference")
    ap.add_argument("--fad-reference", type=int, default=100, help="real clips per class in the FAD reference")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: the CPUs not busy by the 1-min load average, at least 1)")
    ap.add_argument("--no-timing", action="store_true")
    ap.add_argument("--out", default=str(RESULTS))
    a = ap.parse_args(argv)
    if a.per_class < 1 or a.loops_per_class < 1:
        ap.error("--per-class and --loops-per-class must be >= 1")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res = run(a)
    (out / "editing.json").write_text(json.dumps(res, indent=1, default=float) + "\n")
    md = markdown(res)
    (out / "editing.md").write_text(md)
    plot(res, out / "editing.png")
    print(md)
    print(f"wrote {out}/editing.md, editing.json, editing.png")


if __name__ == "__main__":
    main()
