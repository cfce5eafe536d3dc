"""Copy-detection sub-commands of the ``edmsound`` CLI (EDMSound, Zhu et al. 2023, "Copy detection").

``register(subparsers)`` adds::

    edmsound encoder train          --data DIR --out DIR [--epochs E] [--max-minutes M]
    edmsound encoder finetune-head  --encoder DIR --data DIR --out DIR [--epochs 200]
    edmsound encoder convert-laion  --pt FILE.pt --out DIR
    edmsound index build            --data DIR --out INDEX_DIR [--encoder DIR] [--head DIR] [--kind flat|ivf|hnsw]
    edmsound index query            --index INDEX_DIR --audio WAV [-k 5] [--class NAME]
    edmsound copies                 --generated DIR --index INDEX_DIR --out REPORT_DIR [--all-classes]
"""
from __future__ import annotations

import json
import sys

from .args import set_threads


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


def _cmd_encoder_convert(a):
    from .. import convert_laion_checkpoint
    out = convert_laion_checkpoint(a.pt, a.out)
    print(f"wrote Hugging Face CLAP audio tower to {out}")


def _cmd_index_build(a):
    from .. import CopyIndex
    set_threads(a)
    enc = _encoder_and_head(a)
    idx = CopyIndex.build(a.data, enc, kind=a.kind, nlist=a.nlist, nprobe=a.nprobe, sample_rate=a.sample_rate,
                          seconds=a.seconds, progress=not a.no_progress, query_hop_seconds=a.query_hop)
    idx.save(a.out)
    print(f"{idx!r} -> {a.out}")
    for c in idx.classes:
        ref = idx.reference(c)
        if len(ref):
            print(f"  {c:<24s} training top-1 p50 {sorted(ref)[len(ref) // 2]:.3f}  p95 {idx.threshold(95, c):.3f}")


def _load_index(a):
    from .. import CopyIndex
    idx = CopyIndex.load(a.index)
    if a.encoder or a.head:
        idx.attach_encoder(_encoder_and_head(a, default_head=False))
    return idx


def _cmd_index_query(a):
    from .. import load_audio
    set_threads(a)
    idx = _load_index(a)
    sr = int(idx.audio.get("sample_rate") or idx.encoder.sample_rate)
    for path in a.audio:
        wave = load_audio(path, sr)
        res = idx.search([wave], k=a.k, same_class=a.class_name, sample_rate=sr, progress=False)[0]
        for m in res:
            d = m.to_dict()
            d = {"query": str(path), "rank": d["rank"], "similarity": d["similarity"], "class": d["class_name"],
                 "source": d["source"], "query_offset": round(d["query_offset"], 3),
                 "train_offset": round(d["train_offset"], 3), "percentile": d["percentile"]}
            print(json.dumps(d))
        sys.stdout.flush()


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
    t.add_argument("--epochs", type=float, default=3.5)
    t.add_argument("--batch-size", type=int, default=64, help="clips per step (two views each)")
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--max-minutes", type=float, default=None, help="stop (and write the encoder) after this long")
    t.add_argument("--state", default=None, help="training-state directory (default OUT/train_state); resumed")
    t.add_argument("--restart", action="store_true", help="ignore existing training state")
    t.add_argument("--name", default="edmsound-clap-tiny")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--threads", type=int, default=None)
    t.add_argument("--no-progress", action="store_true")
    t.set_defaults(func=_cmd_encoder_train)

    h = enc.add_parser("finetune-head", help="train the copy-detection head (triplet loss) on frozen embeddings")
    h.add_argument("--encoder", required=True, help="encoder ('default', directory or .pt)")
    h.add_argument("--data", required=True, help="class-per-folder training tree")
    h.add_argument("--out", required=True, help="head directory to write")
    h.add_argument("--epochs", type=int, default=200)
    h.add_argument("--batch-size", type=int, default=256)
    h.add_argument("--lr", type=float, default=1e-4)
    h.add_argument("--margin", type=float, default=0.2)
    h.add_argument("--views", type=int, default=2, help="augmented copies embedded per training clip")
    h.add_argument("--negatives", type=int, default=2,
                   help="extra random same-class negatives per anchor, besides the batch's (hardest used)")
    h.add_argument("--max-minutes", type=float, default=None)
    h.add_argument("--cache", default=None, help="directory to cache the frozen embeddings in")
    h.add_argument("--seed", type=int, default=0)
    h.add_argument("--threads", type=int, default=None)
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
    b.add_argument("--nlist", type=int, default=None, help="IVF lists (default 4*sqrt(n))")
    b.add_argument("--nprobe", type=int, default=16)
    b.add_argument("--query-hop", type=float, default=None,
                   help="hop (s) of query windows and of the reference (default: half the encoder's hop)")
    b.add_argument("--sample-rate", type=int, default=None, help="load rate (default: manifest's or encoder's)")
    b.add_argument("--seconds", type=float, default=None, help="clip length (default: manifest's or longest file)")
    b.add_argument("--threads", type=int, default=None)
    b.add_argument("--no-progress", action="store_true")
    b.set_defaults(func=_cmd_index_build)

    q = ix.add_parser("query", help="nearest training clips of audio files (JSON lines)")
    q.add_argument("--index", required=True, help="index directory")
    q.add_argument("--audio", required=True, nargs="+", help="WAV/FLAC/OGG file(s)")
    q.add_argument("-k", type=int, default=5)
    q.add_argument("--class", dest="class_name", default=None, help="search only this class")
    _enc_args(q, "head directory (default: the one the index was built with)")
    q.add_argument("--threads", type=int, default=None)
    q.set_defaults(func=_cmd_index_query)

    cp = subparsers.add_parser("copies", help="replication analysis of generated clips against the training set")
    cp.add_argument("--generated", required=True, help="class-per-folder tree, or flat with JSON sidecars {\"class\"}")
    cp.add_argument("--index", required=True, help="index directory of the training set")
    cp.add_argument("--out", required=True, help="report directory")
    cp.add_argument("--all-classes", action="store_true", help="top-1 among all training clips, not just the same class")
    cp.add_argument("--top", type=int, default=8, help="closest pairs to render (WAVs + figure)")
    _enc_args(cp, "head directory (default: the one the index was built with)")
    cp.add_argument("--threads", type=int, default=None)
    cp.add_argument("--no-progress", action="store_true")
    cp.set_defaults(func=_cmd_copies)
