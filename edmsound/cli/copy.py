"""Copy-detection sub-commands of the ``edmsound`` CLI (EDMSound, Zhu et al. 2023, "Copy detection").

``register(subparsers)`` adds::

    edmsound encoder train          --data DIR --out DIR [--epochs E] [--max-minutes M]
    edmsound encoder finetune-head  --encoder DIR --data DIR --out DIR [--epochs 200]
    edmsound encoder convert-laion  --pt FILE.pt --out DIR
    edmsound index build            --data DIR --out INDEX_DIR [--finetune-head] [--encoder DIR] [--head DIR]
    edmsound index query            --index INDEX_DIR --audio FILE... [-k 5] [--class NAME]
    edmsound index duplicates       --index INDEX_DIR [--json]
    edmsound copies                 --generated DIR --index INDEX_DIR --out REPORT_DIR [--all-classes]
"""
from __future__ import annotations

import json
import sys

import numpy as np

from .args import non_negative_int, positive, positive_int, set_threads


def _encoder_and_head(a, default_head: bool = True):
    """--encoder / --head: the default head goes with the default encoder unless --head none."""
    from .. import load_encoder
    enc = a.encoder or "default"
    head = a.head
    if head is None and enc == "default" and default_head:
        head = "default"
    if head is not None and str(head).lower() == "none":
        head = None
    return load_encoder(enc, head=head)


def _cmd_encoder_train(a):
    from .. import train_encoder
    info = train_encoder(a.data, a.out, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, max_minutes=a.max_minutes,
                         seed=a.seed, state_dir=a.state, resume=not a.restart, progress=not a.no_progress,
                         threads=a.threads, name=a.name)
    print(json.dumps(info["training"]))


def _cmd_encoder_finetune_head(a):
    from .. import load_encoder, load_training_set, train_head
    set_threads(a)
    enc = load_encoder(a.encoder)
    data, _ = load_training_set(a.data, enc, None, None, not a.no_progress)
    head = train_head(enc, data, out_dir=a.out, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, margin=a.margin,
                      views=a.views, negatives=a.negatives, seed=a.seed, progress=not a.no_progress,
                      max_minutes=a.max_minutes, cache_dir=a.cache)
    print(json.dumps(head.training_info))


def _builtin_classes() -> list[str]:
    from .. import BUILTIN_CLASSES
    return list(BUILTIN_CLASSES)


def _cmd_encoder_convert(a):
    from .. import convert_laion_checkpoint
    out = convert_laion_checkpoint(a.pt, a.out)
    print(f"wrote Hugging Face CLAP audio tower to {out}")


def _cmd_index_build(a):
    from pathlib import Path
    from .. import CopyIndex, load_encoder, load_training_set, train_head
    set_threads(a)
    progress = not a.no_progress
    if a.finetune_head:                 # the paper's path: a head trained on this set's own augmentations
        if a.head is not None:
            raise ValueError("--finetune-head trains the head; leave out --head")
        base = load_encoder(a.encoder or "default")
        data, _ = load_training_set(a.data, base, a.sample_rate, a.seconds, progress)
        head_dir = Path(a.out) / "head"
        head = train_head(base, data, out_dir=head_dir, seed=0, progress=progress)
        print(f"head trained on {len(data)} clips of {a.data} ({head.training_info['epochs']} epochs) -> {head_dir}")
        enc = load_encoder(a.encoder or "default", head=head_dir)
        idx = CopyIndex.build(data, enc, kind=a.kind, nlist=a.nlist, nprobe=a.nprobe, progress=progress,
                              query_hop_seconds=a.query_hop, audio=_audio_of(a, data))
    else:
        enc = _encoder_and_head(a)
        idx = CopyIndex.build(a.data, enc, kind=a.kind, nlist=a.nlist, nprobe=a.nprobe, sample_rate=a.sample_rate,
                              seconds=a.seconds, progress=progress, query_hop_seconds=a.query_hop)
    idx.save(a.out)
    print(f"{idx!r} -> {a.out}")
    print(f"  {'class':<24s} {'embedding top-1 p50/p95':>24s} {'signal top-1 p50/p95':>22s}   (near-duplicates left out)")
    for c in idx.classes:
        ref, sref = idx.reference(c), idx.reference(c, signal=True)
        if len(ref):
            sig = f"{np.median(sref):.3f} / {idx.threshold(95, c, signal=True):.3f}" if len(sref) else "—"
            print(f"  {c:<24s} {np.median(ref):>14.3f} / {idx.threshold(95, c):.3f} {sig:>22s}")
    groups = idx.duplicate_groups()
    if groups:
        print(f"  {len(groups)} group(s) of near-duplicates ({sum(len(g) for g in groups)} clips, as close as plain "
              f"copies are): edmsound index duplicates --index {a.out}")
    if not a.finetune_head and a.head is None and set(idx.classes) != set(_builtin_classes()):
        print("  note: the default head was trained on the built-in set; to fine-tune one on this set's own "
              f"augmentations (the paper's procedure): edmsound index build --data {a.data} --out {a.out} --finetune-head")


def _audio_of(a, data) -> dict:
    from pathlib import Path
    root = str(Path(a.data).resolve())
    return {"sample_rate": int(data.sample_rate), "seconds": float(a.seconds or 60.0), "data": root, "data_root": root}


def _cmd_index_duplicates(a):
    from .. import CopyIndex
    idx = CopyIndex.load(a.index)
    groups = idx.duplicate_groups()
    if a.json:
        print(json.dumps([[{"source": idx.sources[i], "class": idx.clip_class(i)} for i in g] for g in groups]))
        return
    print(f"{len(groups)} group(s) of near-duplicates among {idx.num_clips} clips "
          f"(signal similarity >= {idx.params.get('copy_level', float('nan')):.4f}, what plain copies reach)")
    for n, g in enumerate(groups, 1):
        print(f"group {n} ({len(g)} clips):")
        for i in g:
            print(f"  [{idx.clip_class(i)}] {idx.sources[i]}")


def _load_index(a):
    from .. import CopyIndex
    idx = CopyIndex.load(a.index)
    if a.encoder or a.head:
        idx.attach_encoder(_encoder_and_head(a, default_head=False))
    return idx


def _cmd_index_query(a):
    from .. import read_clip
    set_threads(a)
    idx = _load_index(a)
    if a.class_name is not None:
        idx.class_index(a.class_name)               # an unknown class is one line before any work
    sr = int(idx.audio.get("sample_rate") or idx.encoder.sample_rate)
    failed = 0
    for path in a.audio:
        wave, why, _ = read_clip(path, sr)
        res = None
        if wave is not None:
            res = idx.search([wave], k=a.k, same_class=a.class_name, sample_rate=sr, progress=False)[0]
            why = res.skipped
        if why is not None:
            failed += 1
            print(f"warning: skipped {path}: {why}", file=sys.stderr)
            print(json.dumps({"query": str(path), "skipped": why}))
            continue
        for m in res:
            d = m.to_dict()
            d = {"query": str(path), "rank": d["rank"], "similarity": d["similarity"],
                 "signal_similarity": d["signal_similarity"], "copy": d["copy"], "evidence": d["evidence"],
                 "class": d["class_name"], "source": d["source"], "query_offset": _r(d["query_offset"]),
                 "train_offset": _r(d["train_offset"]), "percentile": d["percentile"],
                 "signal_percentile": d["signal_percentile"]}
            print(json.dumps(d))
        sys.stdout.flush()
    if failed:
        print(f"{failed} of {len(a.audio)} file(s) skipped", file=sys.stderr)
        if failed == len(a.audio):
            sys.exit(1)


def _r(x):
    return None if x is None or x != x else round(x, 3)


def _cmd_copies(a):
    from .. import analyse_copies
    set_threads(a)
    idx = _load_index(a)
    s = analyse_copies(idx, a.generated, a.out, all_classes=a.all_classes, top_pairs=a.top,
                       progress=not a.no_progress)
    print(f"report: {a.out}/report.md ({s['generated_clips']} generated clips, {len(s['stitching'])} stitching)")
    for c, r in s["per_class"].items():
        print(f"  {c:<24s} n={r['generated']:<5d} train p95 {r['train_p95']:.3f}  gen p95 {r['generated_p95']:.3f}  "
              f"diff {r['p95_difference']:+.3f}  above {100 * r['share_above_train_p95']:.1f}%")


def _enc_args(p, help_head="head directory ('none' for no head; default: the default head with the default encoder)"):
    p.add_argument("--encoder", default=None, help="'default', an encoder directory, a Hugging Face CLAP "
                                                   "directory or a LAION .pt (default: checkpoints/encoder)")
    p.add_argument("--head", default=None, help=help_head)


def register(subparsers) -> None:
    """Add the ``encoder``, ``index`` and ``copies`` sub-commands to the top-level subparsers."""
    enc = subparsers.add_parser("encoder", help="copy-detection audio encoders").add_subparsers(
        dest="encoder_command", required=True)
    t = enc.add_parser("train", help="train the small default CLAP audio encoder contrastively")
    t.add_argument("--data", required=True, help="class-per-folder training tree")
    t.add_argument("--out", required=True, help="encoder directory to write")
    t.add_argument("--epochs", type=positive, default=None,
                   help="passes over the data (default: at least 300 steps and 3.5 epochs, by data size)")
    t.add_argument("--batch-size", type=positive_int, default=64, help="clips per step (two views each)")
    t.add_argument("--lr", type=positive, default=2e-3)
    t.add_argument("--max-minutes", type=positive, default=None, help="stop (and write the encoder) after this long")
    t.add_argument("--state", default=None, help="training-state directory (default OUT/train_state); resumed")
    t.add_argument("--restart", action="store_true", help="ignore existing training state")
    t.add_argument("--name", default="edmsound-clap-tiny")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=positive_int, default=None)
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=_cmd_encoder_train)

    h = enc.add_parser("finetune-head", help="train the copy-detection head (triplet loss) on frozen embeddings")
    h.add_argument("--encoder", required=True, help="encoder ('default', directory or .pt)")
    h.add_argument("--data", required=True, help="class-per-folder training tree")
    h.add_argument("--out", required=True, help="head directory to write")
    h.add_argument("--epochs", type=positive_int, default=None,
                   help="passes over the embeddings (default: about 13,000 steps, 200-2,000 epochs, by data size)")
    h.add_argument("--batch-size", type=positive_int, default=256)
    h.add_argument("--lr", type=positive, default=1e-4)
    h.add_argument("--margin", type=positive, default=0.2)
    h.add_argument("--views", type=positive_int, default=2, help="augmented copies embedded per training clip")
    h.add_argument("--negatives", type=non_negative_int, default=2,
                   help="extra random same-class negatives per anchor, besides the batch's (hardest used)")
    h.add_argument("--max-minutes", type=positive, default=None)
    h.add_argument("--cache", default=None, help="directory to cache the frozen embeddings in")
    h.add_argument("--seed", type=int, default=0)
    h.add_argument("--threads", type=positive_int, default=None)
    h.add_argument("--no-progress", action="store_true")
    h.set_defaults(func=_cmd_encoder_finetune_head)

    c = enc.add_parser("convert-laion", help="convert a LAION CLAP .pt checkpoint to a Hugging Face directory")
    c.add_argument("--pt", required=True)
    c.add_argument("--out", required=True)
    c.set_defaults(func=_cmd_encoder_convert)

    ix = subparsers.add_parser("index", help="training-set similarity index").add_subparsers(
        dest="index_command", required=True)
    b = ix.add_parser("build", help="embed a training set and write a FAISS index directory")
    b.add_argument("--data", required=True, help="class-per-folder training tree")
    b.add_argument("--out", required=True, help="index directory to write")
    _enc_args(b)
    b.add_argument("--kind", choices=("flat", "ivf", "hnsw"), default="flat",
                   help="flat: exact (default); ivf / hnsw: approximate, for 100k+ windows")
    b.add_argument("--nlist", type=positive_int, default=None, help="IVF lists (default 4*sqrt(n))")
    b.add_argument("--nprobe", type=positive_int, default=16)
    b.add_argument("--query-hop", type=positive, default=None,
                   help="hop (s) of query windows and of the reference (default: half the encoder's hop)")
    b.add_argument("--finetune-head", action="store_true",
                   help="train the copy-detection head on this set's own augmented copies first (the paper's "
                        "procedure; written to OUT/head)")
    b.add_argument("--sample-rate", type=positive_int, default=None, help="load rate (default: manifest's or encoder's)")
    b.add_argument("--seconds", type=positive, default=None,
                   help="longest stretch of a file that is indexed (default 60 s; clips keep their own length)")
    b.add_argument("--threads", type=positive_int, default=None)
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=_cmd_index_build)

    q = ix.add_parser("query", help="nearest training clips of audio files (JSON lines)")
    q.add_argument("--index", required=True, help="index directory")
    q.add_argument("--audio", required=True, nargs="+", help="audio file(s): WAV, FLAC, Ogg, Opus, MP3, AIFF, ...")
    q.add_argument("-k", type=positive_int, default=5)
    q.add_argument("--class", dest="class_name", default=None, help="search only this class")
    _enc_args(q, "head directory (default: the one the index was built with)")
    q.add_argument("--threads", type=positive_int, default=None)
    q.set_defaults(func=_cmd_index_query)

    d = ix.add_parser("duplicates", help="groups of near-duplicate clips inside an index (dataset hygiene)")
    d.add_argument("--index", required=True, help="index directory")
    d.add_argument("--json", action="store_true", help="print the groups as JSON")
    d.set_defaults(func=_cmd_index_duplicates)

    cp = subparsers.add_parser("copies", help="replication analysis of generated clips against the training set")
    cp.add_argument("--generated", required=True, help="class-per-folder tree, or flat with JSON sidecars {\"class\"}")
    cp.add_argument("--index", required=True, help="index directory of the training set")
    cp.add_argument("--out", required=True, help="report directory")
    cp.add_argument("--all-classes", action="store_true", help="top-1 among all training clips, not just the same class")
    cp.add_argument("--top", type=non_negative_int, default=8, help="closest pairs to render (WAVs + figure)")
    _enc_args(cp, "head directory (default: the one the index was built with)")
    cp.add_argument("--threads", type=positive_int, default=None)
    cp.add_argument("--no-progress", action="store_true")
    cp.set_defaults(func=_cmd_copies)
