"""Copy detection on real recordings: recall of plain copies, copy flags, fresh-clip flags, build cost.

Real sets are fetched from Debian packages by ``benchmarks/real_sets.py`` (drum one-shots and game
foley; nothing is committed). Each set is split once (seeded): 80 % is indexed, 20 % held out as fresh
recordings. Copies are made of indexed clips with :class:`edmsound.data.augment.LeadInCopy` (gain
0.3-1.2, lead-in <= 50 ms, noise at 80-100 dB SNR), every clip shorter than 0.5 s among them included
up to ``--short``. Figures:

- recall@1 / @5 of each copy's source within its class (a gain twin of the source in the set counts);
- share of copies flagged (top-1 match judged a copy) and of fresh held-out recordings flagged;
- index build time and peak memory (resident set of the worker process after the build).

The pipeline is run by this checkout and, with ``--before DIR`` (a copy of an older ``edmsound``
package), by that older code in the same run, side by side. Trivial baselines (signal features only,
no index) are reported for recall. ``--builtin`` adds the built-in set (copies of training clips,
fresh clips of another seed) with the committed default index.

Run: ``python benchmarks/real_sets.py && python benchmarks/copy_detection_real.py [--before /path/to/old]``
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "copy_detection_real.md"
SR = 16000


def split_set(root: Path, work: Path, seed: int = 0) -> tuple[Path, list[tuple[str, str]]]:
    """Symlink 80 % of each class into ``work/index/<class>/``; return it and the held-out (path, class)."""
    from edmsound.data.folder import scan_folder
    classes, files = scan_folder(root)
    rng = np.random.default_rng(seed)
    held = []
    idx_root = work / "index"
    if idx_root.exists():                       # a fresh split every run (the set may have changed)
        shutil.rmtree(idx_root)
    for c in classes:
        fs = [f for f, k in files if k == c]
        mask = np.zeros(len(fs), bool)
        mask[rng.permutation(len(fs))[: len(fs) // 5]] = True
        (idx_root / c).mkdir(parents=True, exist_ok=True)
        for f, h in zip(fs, mask):
            if h:
                held.append((str(f), c))
            else:
                link = idx_root / c / f.name
                if not link.exists():
                    link.symlink_to(f.resolve())
    return idx_root, held


def plain_copy(wave, rng):
    """Gain 0.3-1.2, a lead-in of silence of up to 50 ms, noise at SNR 80-100 dB (independent of the
    package under test, so older code is judged on the same copies)."""
    x = np.concatenate([np.zeros(int(rng.integers(0, int(0.05 * SR) + 1)), np.float32),
                        wave * np.float32(rng.uniform(0.3, 1.2))])
    p = float(np.mean(x.astype(np.float64) ** 2))
    noise = rng.standard_normal(len(x)) * np.sqrt(p / 10 ** (rng.uniform(80, 100) / 10))
    return (x + noise).astype(np.float32)


def read_tree(root: Path):
    """(waves, labels, classes, sources) of a class-per-folder tree at 16 kHz, read without the package
    (files that do not decode or peak below -60 dBFS are left out, as every reader here does)."""
    import soundfile as sf
    import soxr
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    waves, labels, sources = [], [], []
    for k, c in enumerate(classes):
        for f in sorted((root / c).iterdir()):
            try:
                x, sr = sf.read(str(f), dtype="float32", always_2d=True)
            except Exception:
                continue
            x = x.mean(1)[: 60 * sr]
            if len(x) == 0 or np.abs(x).max() < 1e-3:
                continue
            waves.append(soxr.resample(x, sr, SR).astype(np.float32) if sr != SR else x)
            labels.append(k)
            sources.append(str(f))
    return waves, np.array(labels), classes, sources


def make_copies(waves, n_random: int, n_short: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    short = [i for i, w in enumerate(waves) if len(w) < SR // 2][:n_short]
    pick = list(dict.fromkeys(short + [int(i) for i in rng.choice(len(waves), min(n_random, len(waves)), replace=False)]))
    return pick, [plain_copy(waves[i], rng) for i in pick], len(short)


def same_recording(a: np.ndarray, b: np.ndarray, threshold: float = 0.99) -> bool:
    """Whether two clips are one recording up to gain and a time shift: the peak of their normalised
    waveform cross-correlation reaches ``threshold`` (a test on the samples, independent of any feature)."""
    n = len(a) + len(b) - 1
    nfft = 1 << (n - 1).bit_length()
    xc = np.fft.irfft(np.fft.rfft(a, nfft) * np.conj(np.fft.rfft(b, nfft)), nfft)
    return float(np.abs(xc).max() / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-12)) >= threshold


def gain_twins(waves, i, candidates=None) -> set:
    """Clips that are the same recording as clip ``i`` (up to gain and shift; lengths within 25 %)."""
    w = waves[i]
    out = {i}
    for j in (range(len(waves)) if candidates is None else candidates):
        v = waves[j]
        if j != i and 0.8 <= len(v) / len(w) <= 1.25 and same_recording(w, v):
            out.add(j)
    return out


def worker(args) -> dict:
    """One pipeline on one set (run in its own process, so its peak memory is its own)."""
    import torch
    torch.set_num_threads(args.threads)
    from edmsound import CopyIndex, load_encoder
    work = Path(args.work)
    idx_root, held = split_set(Path(args.set_root), work)
    enc = load_encoder("default", head="default")
    t = time.perf_counter()
    idx = CopyIndex.build(str(idx_root), enc, progress=False)
    build_s = time.perf_counter() - t
    rss_build = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    waves_i, labels_i, classes, sources_i = read_tree(idx_root)
    src_to_row = {str(Path(s).resolve()): r for r, s in enumerate(idx.sources)}
    row_of_ds = [src_to_row.get(str(Path(s).resolve()), -1) for s in sources_i]
    pick, copies, n_short = make_copies(waves_i, args.copies, args.short)
    cls = [classes[labels_i[i]] for i in pick]
    res = idx.search(copies, k=5, same_class=cls, sample_rate=SR, progress=False)
    r1 = r5 = flagged = 0
    for q, i in enumerate(pick):
        ok = {row_of_ds[j] for j in gain_twins(waves_i, i, np.flatnonzero(labels_i == labels_i[i]))}
        top = [m.clip for m in res[q]]
        r1 += bool(top[:1] and top[0] in ok)
        r5 += bool(set(top) & ok)
        flagged += bool(res[q] and _is_copy(idx, res[q][0], cls[q]))
    fresh_flag, fresh_n, twins_n, twins_flag = 0, 0, 0, 0
    by_tier = {"embedding": 0, "signal": 0}
    import soundfile as sf
    import soxr
    waves, fcls = [], []
    for path, c in held:
        try:
            x, sr = sf.read(path, dtype="float32", always_2d=True)
        except Exception:
            continue
        x = x.mean(1)[: 60 * sr]
        if len(x) and np.abs(x).max() >= 1e-3:
            waves.append(soxr.resample(x, sr, SR).astype(np.float32) if sr != SR else x)
            fcls.append(c)
    fres = idx.search(waves, k=1, same_class=fcls, sample_rate=SR, progress=False)
    for w, r, c in zip(waves, fres, fcls):
        if not len(r):
            continue
        same = np.flatnonzero(labels_i == classes.index(c))
        if len(gain_twins(waves_i + [w], len(waves_i), same)) > 1:    # the same recording is indexed (up to gain)
            twins_n += 1
            twins_flag += _is_copy(idx, r[0], c)
            continue
        fresh_n += 1
        fresh_flag += _is_copy(idx, r[0], c)
        for t in getattr(r[0], "evidence", ()):
            by_tier[t] += 1
    groups = idx.duplicate_groups() if hasattr(idx, "duplicate_groups") else None
    return {"set": args.name, "code": args.code, "indexed": idx.num_clips, "windows": idx.ntotal,
            "copies": len(pick), "short_copies": n_short, "recall1": r1 / len(pick), "recall5": r5 / len(pick),
            "copies_flagged": flagged / len(pick), "fresh": fresh_n, "fresh_flagged": fresh_flag / max(fresh_n, 1),
            "fresh_flagged_by": {k: v / max(fresh_n, 1) for k, v in by_tier.items()},
            "held_out_twins": twins_n, "held_out_twins_flagged": twins_flag,
            "build_s": build_s, "build_peak_mb": rss_build,
            "dup_groups": None if groups is None else len(groups),
            "dup_clips": None if groups is None else int(sum(len(g) for g in groups))}


def builtin_worker(args) -> dict:
    """The built-in set with a committed-style index: copies of indexed training clips (re-synthesised
    from their sources) and fresh clips of another base seed, 50 of each per class."""
    import torch
    torch.set_num_threads(args.threads)
    from edmsound import CopyIndex
    from edmsound.data.synth import CLASSES, clip_seed, parse_synth_uri, synthesize
    idx = CopyIndex.load(args.index)
    secs = float(idx.audio.get("seconds") or 1.016)
    rng = np.random.default_rng(1)
    rows, copies, cls, fresh, fcls = [], [], [], [], []
    for c in CLASSES:
        members = [i for i in range(idx.num_clips) if idx.clip_class(i) == c]
        for i in rng.choice(members, 50, replace=False):
            name, seed = parse_synth_uri(idx.sources[i])
            copies.append(plain_copy(synthesize(name, seed, SR, secs), rng))
            rows.append(int(i))
            cls.append(c)
        for j in range(50):
            fresh.append(synthesize(c, clip_seed(7, CLASSES.index(c), j), SR, secs))
            fcls.append(c)
    res = idx.search(copies, k=5, same_class=None, sample_rate=SR, progress=False)
    r1 = sum(bool(r) and r[0].clip == i for r, i in zip(res, rows)) / len(rows)
    r5 = sum(i in [m.clip for m in r] for r, i in zip(res, rows)) / len(rows)
    res = idx.search(copies, k=1, same_class=cls, sample_rate=SR, progress=False)
    flagged = sum(bool(r) and _is_copy(idx, r[0], c) for r, c in zip(res, cls)) / len(rows)
    fres = idx.search(fresh, k=1, same_class=fcls, sample_rate=SR, progress=False)
    ff = sum(bool(r) and _is_copy(idx, r[0], c) for r, c in zip(fres, fcls)) / len(fres)
    groups = idx.duplicate_groups() if hasattr(idx, "duplicate_groups") else None
    return {"set": "built-in (recall among all classes)", "code": args.code, "indexed": idx.num_clips,
            "windows": idx.ntotal, "copies": len(rows), "short_copies": 0, "recall1": r1, "recall5": r5,
            "copies_flagged": flagged, "fresh": len(fres), "fresh_flagged": ff, "build_s": float("nan"),
            "build_peak_mb": float("nan"), "dup_groups": None if groups is None else len(groups),
            "dup_clips": None if groups is None else int(sum(len(g) for g in groups))}


def build_worker(args) -> dict:
    """Build cost alone: every clip of all the sets in one index (classes prefixed by their set)."""
    import torch
    torch.set_num_threads(args.threads)
    from edmsound import CopyIndex, load_encoder
    work = Path(args.work) / "all"
    if work.exists():
        shutil.rmtree(work)
    for set_root in args.set_root.split(","):
        set_root = Path(set_root)
        for d in sorted(p for p in set_root.iterdir() if p.is_dir()):
            (work / f"{set_root.name}_{d.name}").mkdir(parents=True)
            for f in d.iterdir():
                (work / f"{set_root.name}_{d.name}" / f.name).symlink_to(f.resolve())
    enc = load_encoder("default", head="default")
    t = time.perf_counter()
    idx = CopyIndex.build(str(work), enc, progress=False)
    return {"set": "all sets, every clip (build cost)", "code": args.code, "indexed": idx.num_clips,
            "windows": idx.ntotal, "build_s": time.perf_counter() - t,
            "build_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def _is_copy(idx, m, c) -> bool:
    if hasattr(m, "evidence"):
        return bool(m.evidence)
    return bool(m.similarity > idx.threshold(95, c))          # older code: the embedding tier alone


def baselines(set_root: Path, work: Path, n_copies: int, n_short: int) -> list[dict]:
    """Recall of trivial signal features without any index: whole-clip log-mel mean+std, and the full
    fingerprint (aligned envelope + spectrum)."""
    from edmsound.copydetect.signal import SignalConfig, signal_fingerprints
    idx_root, _ = split_set(set_root, work)
    waves, labels, _, _ = read_tree(idx_root)
    pick, copies, _ = make_copies(waves, n_copies, n_short)
    out = []
    for name, cfg in [("log-mel mean+std (gain-normalised)", SignalConfig(envelope_weight=0.0)),
                      ("signal fingerprint alone", SignalConfig())]:
        fi = signal_fingerprints(waves, SR, cfg)
        fc = signal_fingerprints(copies, SR, cfg)
        r1 = r5 = 0
        for q, i in enumerate(pick):
            s = fi @ fc[q]
            s[labels != labels[i]] = -np.inf
            top = np.argsort(-s)[:5]
            ok = gain_twins(waves, i, np.flatnonzero(labels == labels[i]))
            r1 += top[0] in ok
            r5 += bool(set(top.tolist()) & ok)
        out.append({"name": name, "recall1": r1 / len(pick), "recall5": r5 / len(pick)})
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets-root", default=str(ROOT / "benchmarks" / ".cache" / "real_sets"))
    ap.add_argument("--sets", default="drums,foley")
    ap.add_argument("--copies", type=int, default=200, help="random copies per set (plus short ones)")
    ap.add_argument("--short", type=int, default=50, help="copies of clips shorter than 0.5 s, at most")
    ap.add_argument("--before", default=None, help="folder holding an older edmsound package, run side by side")
    ap.add_argument("--work", default=str(ROOT / "benchmarks" / ".cache" / "copy_detection_work"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--builtin", action="store_true", help="add the built-in set with the committed index")
    ap.add_argument("--before-index", default=None, help="the older code's built-in index directory")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--index", help=argparse.SUPPRESS)
    ap.add_argument("--build-only", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--set-root", help=argparse.SUPPRESS)
    ap.add_argument("--name", help=argparse.SUPPRESS)
    ap.add_argument("--code", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(builtin_worker(a) if a.index else build_worker(a) if a.build_only else worker(a)))
        return
    sets_root = Path(a.sets_root)
    names = [s for s in a.sets.split(",") if s]
    missing = [s for s in names if not (sets_root / s).is_dir()]
    if missing:
        sys.exit(f"error: real sets {', '.join(missing)} are not in {sets_root}; fetch them first: "
                 f"python benchmarks/real_sets.py --out {sets_root}")
    codes = [("this checkout", str(ROOT))] + ([("before", a.before)] if a.before else [])
    rows, base, builds = [], {}, []
    if a.builtin:
        for label, path in codes:
            index = str(ROOT / "checkpoints" / "index") if label == "this checkout" else a.before_index
            if index is not None:
                rows.append(run_worker(f"built-in: {label}", path, ["--index", index, "--code", label], a))
    for s in names:
        for label, path in codes:
            rows.append(run_worker(f"{s}: {label}", path, [
                "--set-root", str(sets_root / s), "--name", s, "--code", label, "--work", str(Path(a.work) / s),
                "--copies", str(a.copies), "--short", str(a.short)], a))
        base[s] = baselines(sets_root / s, Path(a.work) / s, a.copies, a.short)
    for label, path in codes:
        builds.append(run_worker(f"build of every clip: {label}", path, [
            "--build-only", "--set-root", ",".join(str(sets_root / s) for s in names), "--code", label,
            "--work", a.work], a))
    write_table(rows, base, a, Path(a.out), builds)


def run_worker(what: str, package_path: str, args: list[str], a) -> dict:
    """One worker process with ``package_path`` first on the import path; its JSON result."""
    env = dict(os.environ, PYTHONPATH=package_path, HF_HUB_OFFLINE="1")
    print(f"{what} ...", flush=True)
    out = subprocess.run([sys.executable, __file__, "--worker", "--threads", str(a.threads)] + args, env=env,
                         capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"error: worker failed ({what}):\n{out.stderr[-3000:]}")
    row = json.loads(out.stdout.strip().splitlines()[-1])
    print("  ", row, flush=True)
    return row


def _f(x) -> str:
    return "—" if x != x else f"{x:.0f}"


def write_table(rows, base, a, out: Path, builds=()):
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    lines = [
        "# Copy detection on real recordings",
        "",
        f"Machine: {cpu}, {os.cpu_count()} cores; {a.threads} threads; date {date.today().isoformat()}. "
        "Generated by `benchmarks/copy_detection_real.py`.",
        "",
        "Targets on each set: recall@1 >= 0.97, copies flagged >= 0.90, fresh recordings flagged <= 0.10; "
        "index build <= 2 GB for 1,000 clips. Both codes run in the same session, one after the other, each in "
        "its own process; build times of a row depend on what else ran meanwhile, compare them within a run. "
        "The older code reads WAV/FLAC/Ogg only (it indexed fewer files).",
        "",
        "| set | code | indexed clips (windows) | copies (short) | recall@1 | recall@5 | copies flagged | "
        "fresh flagged (n) | near-duplicate groups (clips) | build s | build peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        dup = "—" if r["dup_groups"] is None else f"{r['dup_groups']} ({r['dup_clips']})"
        lines.append(f"| {r['set']} | {r['code']} | {r['indexed']} ({r['windows']}) | {r['copies']} ({r['short_copies']}) | "
                     f"{r['recall1']:.3f} | {r['recall5']:.3f} | {r['copies_flagged']:.3f} | "
                     f"{r['fresh_flagged']:.3f} ({r['fresh']}) | {dup} | {_f(r['build_s'])} | {_f(r['build_peak_mb'])} |")
    if builds:
        lines += ["", "Index build of every clip of all sets together (time and peak resident memory of the process):",
                  "", "| code | clips | windows | build s | peak MB |", "|---|---|---|---|---|"]
        lines += [f"| {b['code']} | {b['indexed']} | {b['windows']} | {b['build_s']:.0f} | {b['build_peak_mb']:.0f} |"
                  for b in builds]
    lines += ["", "Held-out files that are the same recording as an indexed one (up to gain and shift: waveform "
              "cross-correlation >= 0.99, e.g. velocity layers made by scaling one sample) are not fresh: they are "
              "counted apart, with how many were flagged.", ""]
    lines += ["| set | code | held-out same recordings | of them flagged | fresh flagged by embedding / signal |",
              "|---|---|---|---|---|"]
    for r in rows:
        if "held_out_twins" in r:
            by = r.get("fresh_flagged_by") if r.get("dup_groups") is not None else None   # older code: one tier
            lines.append(f"| {r['set']} | {r['code']} | {r['held_out_twins']} | {r['held_out_twins_flagged']} | "
                         + (f"{by.get('embedding', 0):.3f} / {by.get('signal', 0):.3f} |" if by else "— |"))
    lines += ["", "Trivial baselines (no index; recall of the same copies within their class):", "",
              "| set | features | recall@1 | recall@5 |", "|---|---|---|---|"]
    for s, bs in base.items():
        for b in bs:
            lines.append(f"| {s} | {b['name']} | {b['recall1']:.3f} | {b['recall5']:.3f} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(out.read_text())


if __name__ == "__main__":
    main()
