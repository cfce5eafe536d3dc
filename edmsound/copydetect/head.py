"""Copy-detection head (EDMSound, Zhu et al. 2023, "Copy detection": fine-tuning).

The paper freezes the CLAP audio encoder and trains a small head on its embeddings with a triplet
loss: anchor = a training clip, positive = an augmented copy of it (noise at SNR 80-100 dB, gain
0.25-1.25, time shift up to 0.2 s, random crop; :class:`edmsound.augment.CopyAugment`), negative = an
augmented *different* clip of the same class; margin 0.2, Adam 1e-4, 200 epochs, batch 256. The head
is an MLP D -> 128 (ReLU, dropout 0.05) -> 128 whose output is L2-normalised.

Here the triplets are built per window (the encoder embeds clips in sliding windows): the anchor is a
window of a clean training clip, the positive the window of its augmented copy that covers the same
content (the copy's time offset is known), the negative the hardest augmented window of another clip
of the same class among the batch's positives (plus a few random ones). The triplet loss is on cosine
distance,
``max(0, cos(a, n) - cos(a, p) + margin)``.

A head directory holds ``head.safetensors`` and ``head.json`` (sizes, the encoder it was trained on,
training record). Its ``weights_hash`` is the sha256 of ``head.safetensors``.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.storage import atomic_save_safetensors, atomic_write_json, load_safetensors

__all__ = ["CopyHead", "load_head", "save_head", "train_head", "augmented_copies", "augmented_copy_embeddings"]

HEAD_FORMAT = "edmsound-copy-head"


class CopyHead(torch.nn.Module):
    """MLP D -> hidden (ReLU, dropout) -> out, L2-normalised (the paper: 512 -> 128 -> 128, dropout 0.05)."""

    def __init__(self, in_dim: int, hidden: int = 128, out_dim: int = 128, dropout: float = 0.05,
                 name: str = "copy-head", encoder_name: str = "", encoder_hash: str = ""):
        super().__init__()
        self.in_dim, self.hidden, self.out_dim, self.dropout = int(in_dim), int(hidden), int(out_dim), float(dropout)
        self.net = torch.nn.Sequential(torch.nn.Linear(self.in_dim, self.hidden), torch.nn.ReLU(),
                                       torch.nn.Dropout(self.dropout), torch.nn.Linear(self.hidden, self.out_dim))
        self.name = name
        self.encoder_name = encoder_name
        self.encoder_hash = encoder_hash
        self.weights_hash = ""   # set when saved / loaded
        self.path = None         # the directory it was saved to / loaded from

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), dim=-1)

    def config(self) -> dict:
        return {"format": HEAD_FORMAT, "version": 1, "name": self.name, "in_dim": self.in_dim,
                "hidden": self.hidden, "out_dim": self.out_dim, "dropout": self.dropout,
                "encoder_name": self.encoder_name, "encoder_hash": self.encoder_hash}


def save_head(head: CopyHead, out_dir, info: dict | None = None) -> Path:
    from ..core.storage import file_sha256
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(out_dir / "head.safetensors", head.state_dict())
    cfg = head.config()
    if info:
        cfg["training"] = info
    atomic_write_json(out_dir / "head.json", cfg)
    head.weights_hash = file_sha256(out_dir / "head.safetensors")
    head.path = str(out_dir.resolve())
    return out_dir


def load_head(path) -> CopyHead:
    """Load a head directory (``head.json`` + ``head.safetensors``)."""
    from ..core.storage import file_sha256
    d = Path(path)
    if not (d / "head.json").is_file() or not (d / "head.safetensors").is_file():
        raise FileNotFoundError(f"{d} is not a copy-detection head directory (expected head.json and "
                                "head.safetensors, as written by 'edmsound encoder finetune-head')")
    cfg = json.loads((d / "head.json").read_text())
    if cfg.get("format") != HEAD_FORMAT:
        raise ValueError(f"{d / 'head.json'}: format {cfg.get('format')!r} is not {HEAD_FORMAT!r}")
    head = CopyHead(cfg["in_dim"], cfg["hidden"], cfg["out_dim"], cfg["dropout"], cfg.get("name", "copy-head"),
                    cfg.get("encoder_name", ""), cfg.get("encoder_hash", ""))
    state = load_safetensors(d / "head.safetensors")
    try:
        head.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"{d}: head weights do not match head.json ({e})") from None
    head.weights_hash = file_sha256(d / "head.safetensors")
    head.path = str(d.resolve())
    return head.eval()


def augmented_copies(waves: np.ndarray, sample_rate: int, views: int, seed: int = 0):
    """``views`` augmented copies of every clip (deterministic in ``seed``):
    (copies (views, N, L), offsets (views, N) content offset of each copy in seconds)."""
    from ..data.augment import CopyAugment
    aug = CopyAugment()
    copies, offs = [], []
    for v in range(views):
        rng = np.random.default_rng([seed, 1000 + v])
        cv, ov = [], []
        for w in waves:
            c, o = aug(w, sample_rate, rng)
            cv.append(c)
            ov.append(o / sample_rate)
        copies.append(np.stack(cv))
        offs.append(ov)
    return np.stack(copies), np.asarray(offs, np.float32)


def augmented_copy_embeddings(encoder, waves: np.ndarray, sample_rate: int, views: int, seed: int = 0,
                              progress: bool = True):
    """Window embeddings (pre-head) of ``views`` augmented copies of every clip.

    Returns (emb (views, N, W, D), offsets (views, N) content offset of each copy in seconds)."""
    copies, offs = augmented_copies(waves, sample_rate, views, seed)
    embs = []
    for cv in copies:
        e, ci, _ = encoder.embed_windows(cv, sample_rate, progress=progress, apply_head=False)
        embs.append(e.reshape(len(waves), -1, e.shape[1]))
    return np.stack(embs), offs


def _window_levels(waves: np.ndarray, starts_s: np.ndarray, window_s: float, sr: int) -> np.ndarray:
    """RMS level (dBFS) of each window of each clip: (..., N, L) -> (..., N, W)."""
    from .windows import level_db
    w = int(round(window_s * sr))
    flat = waves.reshape(-1, waves.shape[-1])
    out = np.array([[level_db(x[int(round(s * sr)):int(round(s * sr)) + w]) for s in starts_s] for x in flat])
    return out.reshape(waves.shape[:-1] + (len(starts_s),))


def _active(levels: np.ndarray) -> np.ndarray:
    """Non-silent windows (same rule as the index: within 60 dB of the clip's loudest, above -90 dBFS)."""
    loudest = levels.max(axis=-1, keepdims=True)
    return ((levels >= loudest - 60.0) & (levels >= -90.0)) | (levels == loudest)


def _equal_length(waves, sample_rate: int, window_seconds: float) -> np.ndarray:
    """Clips of their own lengths -> one (N, L) array: L is the 90th percentile of the lengths, between
    one and eight windows (the head learns window-level invariances; longer clips add more of the same)."""
    if isinstance(waves, np.ndarray) and waves.ndim == 2:
        return waves
    from ..audio.io import fit_length
    lengths = np.array([len(w) for w in waves])
    win = int(round(window_seconds * sample_rate))
    n = int(np.clip(np.percentile(lengths, 90), win, 8 * win))
    return np.stack([fit_length(np.asarray(w, np.float32), n) for w in waves])


def auto_epochs(windows: int, batch_size: int, target_steps: int = 13000, lo: int = 200, hi: int = 2000) -> int:
    """Epochs for about ``target_steps`` optimizer steps (the built-in head's count), within [lo, hi]:
    a small set gets more passes over its (cheap, precomputed) embeddings."""
    steps_per_epoch = max(1, -(-int(windows) // int(batch_size)))
    return int(np.clip(round(target_steps / steps_per_epoch), lo, hi))


def train_head(encoder, data, *, out_dir=None, epochs: int | None = None, batch_size: int = 256, lr: float = 1e-4,
               margin: float = 0.2, views: int = 2, negatives: int = 2, seed: int = 0, progress: bool = True,
               max_minutes: float | None = None, hidden: int = 128, out_dim: int = 128, dropout: float = 0.05,
               cache_dir=None) -> CopyHead:
    """Train the copy-detection head on frozen ``encoder`` window embeddings of ``data`` (an AudioSet;
    clips of their own lengths are cut or padded to a common length first) and save it to ``out_dir`` (if given). ``cache_dir`` keeps the frozen embeddings
    (safetensors) so a second run skips the encoder passes."""
    from .windows import window_starts
    if encoder.head is not None:
        encoder = encoder.with_head(None)
    t0 = time.time()
    sr = data.sample_rate
    waves = _equal_length(data.waves, sr, encoder.window_seconds)
    cache = Path(cache_dir) / f"head-embeddings-{encoder.weights_hash[:16]}-{len(data)}-{views}-{seed}.safetensors" \
        if cache_dir else None
    from_cache = cache is not None and cache.is_file()
    if from_cache:
        st = load_safetensors(cache)
        anchors, pos, pos_off = st["anchors"].numpy(), st["positives"].numpy(), st["offsets"].numpy()
    else:
        e, ci, _ = encoder.embed_windows(waves, sr, progress=progress, apply_head=False)
        anchors = e.reshape(len(data), -1, e.shape[1])
        pos, pos_off = augmented_copy_embeddings(encoder, waves, sr, views, seed, progress)
        if cache is not None:
            atomic_save_safetensors(cache, {"anchors": torch.from_numpy(anchors), "positives": torch.from_numpy(pos),
                                            "offsets": torch.from_numpy(pos_off)})
    t_embed = time.time() - t0
    N, W, D = anchors.shape
    if epochs is None:
        epochs = auto_epochs(N * W, batch_size)
    starts = np.array(window_starts(int(round(waves.shape[1] * encoder.sample_rate / sr)), encoder.window_samples,
                                    encoder.hop_samples)) / encoder.sample_rate
    # positive window for anchor window w of view v: the copy's window whose start is closest to start_w + offset
    target = starts[None, None, :] + pos_off[:, :, None]                                  # (V, N, W)
    pos_win = np.abs(target[..., None] - starts[None, None, None, :]).argmin(-1)          # (V, N, W)
    # silent windows (digital silence embeds identically in every clip) are neither anchors nor negatives
    anchor_ok = _active(_window_levels(waves, starts, encoder.window_seconds, sr))                    # (N, W)
    copies, _ = augmented_copies(waves, sr, views, seed)
    pos_ok = _active(_window_levels(copies, starts, encoder.window_seconds, sr))                       # (V, N, W)
    del copies
    labels = np.asarray(data.labels)
    order = np.argsort(labels, kind="stable")                   # clips grouped by class
    start_of = {c: int(np.searchsorted(labels[order], c)) for c in np.unique(labels)}
    start = np.array([start_of[c] for c in labels])
    count = np.bincount(labels)[labels]
    rank = np.empty(N, np.int64)
    rank[order] = np.arange(N) - start[order]                   # position of each clip within its class

    head = CopyHead(D, hidden, out_dim, dropout, encoder_name=encoder.name, encoder_hash=encoder.weights_hash)
    torch.manual_seed(seed)
    opt = torch.optim.Adam(head.parameters(), lr=lr)
    A = torch.from_numpy(anchors)
    P = torch.from_numpy(pos)
    rng = np.random.default_rng(seed)
    n_items = N * W
    history = []
    bar = tqdm(range(epochs), desc="head", unit="epoch", disable=not progress)
    for ep in bar:
        if max_minutes is not None and time.time() - t0 > 60 * max_minutes:
            break
        perm = rng.permutation(n_items)
        perm = perm[anchor_ok.ravel()[perm]]
        tot, cnt, viol = 0.0, 0, 0.0
        head.train()
        for i in range(0, len(perm), batch_size):        # over the non-silent anchors only
            items = perm[i:i + batch_size]
            clip, win = items // W, items % W
            b = len(items)
            v = rng.integers(0, views, b)
            a = A[clip, win]
            pw = pos_win[v, clip, win]
            p = P[v, clip, pw]
            p_ok = torch.from_numpy(pos_ok[v, clip, pw])
            ha, hp = head(a), head(p)
            sp = (ha * hp).sum(-1)
            # in-batch negatives: the other anchors' augmented copies of a different clip of the same class
            lab = torch.from_numpy(labels[clip])
            cl = torch.from_numpy(clip)
            valid = (lab[:, None] == lab[None, :]) & (cl[:, None] != cl[None, :]) & p_ok[None, :]
            sn = (ha @ hp.t()).masked_fill(~valid, -2.0).max(dim=1).values
            if negatives > 0:
                # plus `negatives` random windows of augmented copies of other same-class clips
                cnt_c = count[clip][:, None]
                r = (rng.random((b, negatives)) * np.maximum(cnt_c - 1, 1)).astype(np.int64)
                r = r + (r >= rank[clip][:, None])                       # skip the anchor's own clip
                neg_clip = order[start[clip][:, None] + np.minimum(r, cnt_c - 1)]
                nv, nw = rng.integers(0, views, (b, negatives)), rng.integers(0, W, (b, negatives))
                n = P[nv, neg_clip, nw]
                hn = head(n.reshape(-1, D)).reshape(b, negatives, -1)
                usable = pos_ok[nv, neg_clip, nw] & (cnt_c > 1)          # a class of one clip has no other
                sk = torch.einsum("bd,bkd->bk", ha, hn).masked_fill(~torch.from_numpy(usable), -2.0)
                sn = torch.maximum(sn, sk.max(dim=1).values)
            ok = (sn > -2.0) & p_ok                                      # a negative exists; positive not silent
            if not bool(ok.any()):
                continue                                                 # no usable triplet in this batch
            sn, sp = sn[ok], sp[ok]
            loss = F.relu(sn - sp + margin).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot += loss.item() * len(sp)
            viol += float((sn - sp + margin > 0).float().sum())
            cnt += len(sp)
        if cnt == 0:
            raise ValueError("no usable training triplets: every window is silent or no class has two clips with "
                             "sound; the head needs at least two non-silent clips per class")
        history.append({"epoch": ep + 1, "loss": round(tot / cnt, 5), "active_triplets": round(viol / cnt, 4)})
        bar.set_postfix(loss=f"{tot / cnt:.4f}", active=f"{viol / cnt:.3f}")
    head.eval()
    info = {"clips": N, "windows_per_clip": W, "views": views, "negatives_per_anchor": negatives,
            "silent_anchor_windows_skipped": int((~anchor_ok).sum()),
            "epochs": len(history), "batch_size": batch_size, "lr": lr, "margin": margin, "seed": seed,
            "embedding_seconds_this_run": round(t_embed, 1), "embeddings_from_cache": bool(from_cache),
            "wall_seconds_this_run": round(time.time() - t0, 1),
            "final": history[-1] if history else None,
            "loss": "triplet on cosine distance; negative = hardest same-class other clip among the batch's "
                    "augmented copies and `negatives` extra random ones",
            "augmentation": "CopyAugment: crop>=80%, SNR 80-100 dB, gain 0.25-1.25, shift <=0.2 s"}
    head.training_info = info
    if out_dir is not None:
        save_head(head, out_dir, info)
    return head
