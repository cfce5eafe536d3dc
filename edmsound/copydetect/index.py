"""FAISS index of training-set window embeddings for copy detection (EDMSound, Zhu et al. 2023).

Every training clip is embedded in sliding windows; each window's L2-normalised embedding is one vector
of an inner-product FAISS index (cosine similarity), with metadata: the clip's source (file path or
``synth://class/seed``), class and the window's offset. Clip-to-clip similarity is, as in the paper, the
maximum over window pairs; :meth:`CopyIndex.search` aggregates window hits per training clip.

Beside the learned embedding, every clip has a signal fingerprint (:mod:`edmsound.copydetect.signal`:
gain-normalised, onset-aligned log-mel), a second, plain measure of similarity reported for every match.

The index also stores the paper's reference distribution, per tier: each training clip's top-1
similarity among the *other* training clips (same class, and all classes), leaving out the clip's own
near-duplicates (:mod:`edmsound.copydetect.duplicates`), so a single query can be judged by its
percentile in that distribution (:meth:`CopyIndex.percentile`, :meth:`CopyIndex.threshold`). A match is a
copy when either tier's similarity exceeds its class's 95th percentile; ``Match.evidence`` says which.

On disk an index is a directory::

    index.faiss          faiss.serialize_index bytes (IndexFlatIP, or IVF-Flat / HNSW-Flat for 100k+ items)
    windows.safetensors  per-vector clip id and offset; per-clip labels, signal fingerprints (float16),
                         reference similarities of both tiers; near-duplicate pairs
    index.json           encoder identity (name, weights hash, where its files were), audio settings,
                         classes, sources, and the sha256 of the two files above (written last)

Loading checks sizes and checksums before FAISS sees a byte, so a truncated or corrupt file is a clear
ValueError. Queries embedded by another encoder (name or weights hash differ) are refused.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import faiss
import numpy as np
import torch

from ..core.storage import atomic_save_safetensors, atomic_write_bytes, atomic_write_json, load_safetensors
from ..core.storage import REPO_ROOT
from .duplicates import duplicate_groups, near_duplicate_pairs, neighbours
from .signal import SignalConfig, calibrate_copy_level, signal_fingerprints
from .windows import WindowEmbeddings

__all__ = ["CopyIndex", "Match", "WindowMatch", "QueryResult", "IndexMismatchError", "CorruptIndexError", "load_training_set",
           "INDEX_KINDS"]

INDEX_FORMAT = "edmsound-copy-index"
INDEX_VERSION = 2
INDEX_KINDS = ("flat", "ivf", "hnsw")
FILES = ("index.faiss", "windows.safetensors")


class IndexMismatchError(ValueError):
    """A query was embedded by a different encoder than the index."""


class CorruptIndexError(ValueError):
    """An index file is missing, truncated or altered."""


@dataclass
class Match:
    """One training clip matched by a query clip (similarity = max over window pairs)."""
    rank: int
    similarity: float
    clip: int                 # row in the index's clip table
    source: str
    class_name: str
    query_offset: float       # start (s) of the query window of the best pair
    train_offset: float       # start (s) of the training window of the best pair
    percentile: float         # of `similarity` in the training set's own top-1 distribution
    signal_similarity: float | None = None    # signal fingerprints' correlation (None: no waves / old index)
    signal_percentile: float | None = None
    evidence: tuple = ()      # tiers above their class's training 95th percentile: "embedding", "signal"

    @property
    def copy(self) -> bool:
        """Closer to this training clip than training recordings are to other recordings (either tier)."""
        return bool(self.evidence)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["similarity"] = round(float(d["similarity"]), 6)
        d["percentile"] = round(float(d["percentile"]), 2)
        if d["signal_similarity"] is not None:
            d["signal_similarity"] = round(float(d["signal_similarity"]), 6)
            d["signal_percentile"] = round(float(d["signal_percentile"]), 2)
        d["evidence"] = list(self.evidence)
        d["copy"] = self.copy
        return d


@dataclass
class WindowMatch:
    """The best training window for one query window."""
    query_offset: float
    similarity: float
    clip: int
    source: str
    train_offset: float


class QueryResult(list):
    """Top-k :class:`Match` list of one query clip; ``.windows`` holds its per-window best matches;
    ``.skipped`` says why a query has no matches (e.g. it is silent)."""

    def __init__(self, matches, windows, skipped: str | None = None):
        super().__init__(matches)
        self.windows: list[WindowMatch] = windows
        self.skipped = skipped


def _sha256_bytes(b) -> str:
    return hashlib.sha256(memoryview(b)).hexdigest()


def _sha256_file(path: Path) -> str:
    from ..core.storage import file_sha256
    return file_sha256(path)


def _inside(path, root: Path) -> bool:
    try:
        Path(path).resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False


def _rel(path, start: Path) -> str | None:
    if path is None:
        return None
    try:
        return os.path.relpath(Path(path).resolve(), start.resolve())
    except ValueError:          # another drive (Windows)
        return str(Path(path).resolve())


class CopyIndex:
    """Inner-product index over window embeddings + clip metadata + the training reference distribution."""

    def __init__(self, index, clip_of_vec, offset_of_vec, labels, classes, sources, encoder_info: dict,
                 audio: dict, ref_same, ref_all, kind: str = "flat", params: dict | None = None, root=None,
                 signal=None, dup_pairs=None, sig_ref_same=None, sig_ref_all=None):
        self.index = index
        self.clip_of_vec = np.asarray(clip_of_vec, np.int64)
        self.offset_of_vec = np.asarray(offset_of_vec, np.float32)
        self.labels = np.asarray(labels, np.int64)
        self.classes = list(classes)
        self.sources = list(sources)
        self.encoder_info = dict(encoder_info)
        self.audio = dict(audio)
        self.ref_same = np.asarray(ref_same, np.float32)
        self.ref_all = np.asarray(ref_all, np.float32)
        self.kind = kind
        self.params = dict(params or {})
        self.root = Path(root) if root is not None else None
        self._encoder = None
        n = len(self.labels)
        self.signal = None if signal is None else np.ascontiguousarray(signal, np.float32)
        self.dup_pairs = np.zeros((0, 2), np.int64) if dup_pairs is None else np.asarray(dup_pairs, np.int64).reshape(-1, 2)
        self.sig_ref_same = np.full(n, np.nan, np.float32) if sig_ref_same is None else np.asarray(sig_ref_same, np.float32)
        self.sig_ref_all = np.full(n, np.nan, np.float32) if sig_ref_all is None else np.asarray(sig_ref_all, np.float32)
        if self.signal is not None and len(self.signal) != n:
            raise CorruptIndexError(f"the index has {len(self.signal)} signal fingerprints for {n} clips")
        self._neighbours = neighbours(self.dup_pairs, n)
        self._thresholds: dict = {}          # decision thresholds and per-class references, computed once
        if len(self.sources) != n or len(self.ref_same) != n or len(self.ref_all) != n:
            raise ValueError("index metadata is inconsistent (per-clip arrays differ in length)")
        if index.ntotal != len(self.clip_of_vec):
            raise CorruptIndexError(f"FAISS index holds {index.ntotal} vectors but the metadata describes "
                                    f"{len(self.clip_of_vec)}")
        # vectors are grouped by class: class c occupies ids [vec_lo[c], vec_hi[c])
        vec_label = self.labels[self.clip_of_vec] if n else np.zeros(0, np.int64)
        if np.any(np.diff(vec_label) < 0):
            raise ValueError("index vectors are not grouped by class")
        self.vec_lo = np.searchsorted(vec_label, np.arange(len(self.classes)), side="left")
        self.vec_hi = np.searchsorted(vec_label, np.arange(len(self.classes)), side="right")
        self.windows_per_clip = np.bincount(self.clip_of_vec, minlength=n) if n else np.zeros(0, np.int64)
        self.clip_lo = np.searchsorted(self.labels, np.arange(len(self.classes)), side="left")
        self.clip_hi = np.searchsorted(self.labels, np.arange(len(self.classes)), side="right")
        if self.kind == "ivf":
            faiss.extract_index_ivf(self.index).make_direct_map()     # window vectors by id (reconstruct)

    # ---------------------------------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self.index.d)

    @property
    def num_clips(self) -> int:
        return len(self.labels)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)

    def __repr__(self):
        return (f"CopyIndex({self.kind}, {self.num_clips} clips / {self.ntotal} windows x {self.dim}, "
                f"{len(self.classes)} classes, encoder {self.encoder_info.get('name')!r})")

    def class_index(self, class_name) -> int:
        if isinstance(class_name, (int, np.integer)):
            if not 0 <= int(class_name) < len(self.classes):
                raise ValueError(f"class index {class_name} out of range (0..{len(self.classes) - 1})")
            return int(class_name)
        try:
            return self.classes.index(class_name)
        except ValueError:
            raise ValueError(f"unknown class {class_name!r}; the index has: {', '.join(self.classes)}") from None

    # --------------------------------------------------------------------------------------------- build
    @classmethod
    def build(cls, data, encoder, *, kind: str = "flat", nlist: int | None = None, nprobe: int = 16,
              hnsw_m: int = 32, ef_search: int = 128, progress: bool = True, sample_rate: int | None = None,
              seconds: float | None = None, query_hop_seconds: float | None = None,
              audio: dict | None = None) -> "CopyIndex":
        """Embed a training set with ``encoder`` and index it.

        ``data`` is an :class:`edmsound.data.AudioSet` or a class-per-folder directory (a tree written by
        ``edmsound data synth`` keeps its ``synth://`` sources and its manifest's rate and length; other
        trees load at ``sample_rate`` (default: the encoder's) and ``seconds`` (default: the longest file)).

        Training clips are indexed at the encoder's hop; queries are embedded at ``query_hop_seconds``
        (default: half the encoder's hop), so a copy shifted in time still has a query window within a
        quarter hop of a training window. The reference distribution is computed the same way (each
        training clip queried at that hop against the others), so percentiles stay calibrated."""
        from ..data.folder import AudioSet
        given = audio
        audio = {"sample_rate": None, "seconds": None, "data": None}
        if not isinstance(data, AudioSet):
            data, audio = load_training_set(data, encoder, sample_rate, seconds, progress)
        else:
            audio.update(sample_rate=int(data.sample_rate), seconds=float(data.lengths.max()) / data.sample_rate)
        audio.update(given or {})
        emb = encoder.embed_windows(data.waves, data.sample_rate, progress=progress)
        qh = float(query_hop_seconds or encoder.hop_seconds / 2)
        ref_q = emb if abs(qh - encoder.hop_seconds) < 1e-9 else \
            _query_windows(encoder, qh, data.waves, data.sample_rate, emb, progress)
        sig_cfg = SignalConfig(sample_rate=int(encoder.sample_rate))
        sig = signal_fingerprints(data.waves, data.sample_rate, sig_cfg, progress=progress)
        level = calibrate_copy_level(data.waves, data.sample_rate, sig, sig_cfg)
        return cls.from_embeddings(emb, data.labels, data.classes, data.sources, encoder, audio=audio, kind=kind,
                                   nlist=nlist, nprobe=nprobe, hnsw_m=hnsw_m, ef_search=ef_search, progress=progress,
                                   reference_queries=ref_q, query_hop_seconds=qh, signal=sig, signal_config=sig_cfg,
                                   copy_level=level)

    @classmethod
    def from_embeddings(cls, emb: WindowEmbeddings, labels, classes, sources, encoder, *, audio: dict | None = None,
                        kind: str = "flat", nlist: int | None = None, nprobe: int = 16, hnsw_m: int = 32,
                        ef_search: int = 128, progress: bool = False, reference_queries: WindowEmbeddings | None = None,
                        query_hop_seconds: float | None = None, signal: np.ndarray | None = None,
                        signal_config: SignalConfig | None = None, copy_level: float | None = None) -> "CopyIndex":
        """Index window embeddings already computed by ``encoder`` (its identity is checked).
        ``reference_queries``: the same clips embedded at the query hop (default: ``emb`` itself, and the
        query hop is then the encoder's hop). ``signal``: the clips' signal fingerprints (made with
        ``signal_config``); with ``copy_level`` (the fingerprint similarity plain copies reach), pairs of
        clips at least that close are near-duplicates, reported and left out of each other's reference."""
        if kind not in INDEX_KINDS:
            raise ValueError(f"unknown index kind {kind!r}; valid: {', '.join(INDEX_KINDS)}")
        _check_identity(emb, encoder.name, encoder.weights_hash)
        e, ci, off = _audible(emb)
        labels = np.asarray(labels, np.int64)
        n = len(labels)
        if len(sources) != n or (len(ci) and ci.max() >= n):
            raise ValueError("labels, sources and the embeddings' clip indices disagree")
        # group clips (and their windows) by class so each class is one contiguous id range
        clip_order = np.argsort(labels, kind="stable")
        new_id = np.empty(n, np.int64)
        new_id[clip_order] = np.arange(n)
        ci2 = new_id[ci]
        vec_order = np.lexsort((off, ci2))
        e, ci2, off = e[vec_order], ci2[vec_order], off[vec_order]
        labels2 = labels[clip_order]
        sources2 = [sources[i] for i in clip_order]
        sig2 = pairs = None
        if signal is not None:
            if len(signal) != n:
                raise ValueError(f"{len(signal)} signal fingerprints for {n} clips")
            sig2 = np.asarray(signal, np.float32)[clip_order]
            if copy_level is not None:
                pairs = np.sort(near_duplicate_pairs(sig2, copy_level), axis=1)
        index, params = _make_faiss(e, kind, nlist, nprobe, hnsw_m, ef_search)
        params["silence_gate_db"] = {"relative": SILENCE_RELATIVE_DB, "absolute": SILENCE_ABSOLUTE_DB}
        if signal is not None:
            params["signal"] = (signal_config or SignalConfig()).to_dict()
            params["copy_level"] = None if copy_level is None else float(copy_level)
        if reference_queries is None:
            rq, rq_clip = e, ci2
            params["query_hop_seconds"] = float(encoder.hop_seconds)
        else:
            _check_identity(reference_queries, encoder.name, encoder.weights_hash)
            rq, rq_ci, _ = _audible(reference_queries)
            rq_clip = new_id[rq_ci]
            params["query_hop_seconds"] = float(query_hop_seconds or encoder.hop_seconds)
        enc = {**encoder.identity(), "path": getattr(encoder, "source", None),
               "head_path": getattr(getattr(encoder, "head", None), "path", None),
               "has_head": getattr(encoder, "head", None) is not None}
        obj = cls(index, ci2, off, labels2, classes, sources2, enc, audio or {}, np.zeros(n), np.zeros(n), kind, params,
                  signal=sig2, dup_pairs=pairs)
        obj._encoder = encoder
        obj.ref_same = obj._reference(rq, rq_clip, same_class=True)
        obj.ref_all = obj._reference(rq, rq_clip, same_class=False)
        if sig2 is not None:
            obj.sig_ref_same = obj._signal_reference(same_class=True)
            obj.sig_ref_all = obj._signal_reference(same_class=False)
        return obj

    def _excluded(self, qc: np.ndarray, tclip: np.ndarray) -> np.ndarray:
        """Mask of (query clip, training clip) pairs that do not count in the reference: the clip itself
        and its near-duplicates."""
        out = (tclip == qc) | (tclip < 0)
        if len(self.dup_pairs):
            n = max(self.num_clips, 1)
            codes = np.concatenate([self.dup_pairs[:, 0] * n + self.dup_pairs[:, 1],
                                    self.dup_pairs[:, 1] * n + self.dup_pairs[:, 0]])
            out |= np.isin(qc * n + np.maximum(tclip, 0), codes)
        return out

    def _reference(self, q: np.ndarray, qclip: np.ndarray, same_class: bool, chunk: int = 4096) -> np.ndarray:
        """Each clip's top-1 similarity among the other clips (max over window pairs) that are not its
        near-duplicates; ``q`` are the clips' query windows and ``qclip`` their clip ids (index order).
        Each query window asks for a few neighbours, and for more only while all it got were its own clip's
        windows or its near-duplicates' (memory stays proportional to the windows, not to the longest clip)."""
        n = self.num_clips
        best = np.full(n, -np.inf, np.float32)
        groups = ([(c, self.vec_lo[c], self.vec_hi[c]) for c in range(len(self.classes))] if same_class
                  else [(None, 0, self.ntotal)])
        for c, lo, hi in groups:
            rows = np.flatnonzero(self.labels[qclip] == c) if c is not None else np.arange(len(qclip))
            if hi - lo == 0 or len(rows) == 0:
                continue
            for i in range(0, len(rows), chunk):
                todo = rows[i:i + chunk]
                k = 16
                while len(todo):
                    sims, ids = self._search_range(q[todo], min(k, hi - lo), lo, hi)
                    qc = np.repeat(qclip[todo], sims.shape[1])
                    tclip = np.where(ids.ravel() >= 0, self.clip_of_vec[np.maximum(ids.ravel(), 0)], -1)
                    ok = ~self._excluded(qc, tclip)
                    np.maximum.at(best, qc[ok], sims.ravel()[ok])
                    found = ok.reshape(sims.shape).any(axis=1)
                    if k >= hi - lo:
                        break
                    todo, k = todo[~found], k * 4
        out = np.where(np.isfinite(best), best, np.nan).astype(np.float32)
        present = np.zeros(n, bool)
        present[np.unique(qclip)] = True
        out[~present] = np.nan
        return out

    def _signal_reference(self, same_class: bool, chunk: int = 2048) -> np.ndarray:
        """Each clip's top-1 signal similarity among the other clips that are not its near-duplicates."""
        n = self.num_clips
        out = np.full(n, np.nan, np.float32)
        spans = ([(self.clip_lo[c], self.clip_hi[c]) for c in range(len(self.classes))] if same_class else [(0, n)])
        for lo, hi in spans:
            block = self.signal[lo:hi]
            for i in range(0, hi - lo, chunk):
                sims = block[i:i + chunk] @ block.T
                for r in range(len(sims)):
                    clip = lo + i + r
                    sims[r, clip - lo] = -np.inf
                    nb = [j - lo for j in self._neighbours[clip] if lo <= j < hi]
                    if nb:
                        sims[r, nb] = -np.inf
                b = sims.max(axis=1) if sims.shape[1] else np.full(len(sims), -np.inf)
                out[lo + i:lo + i + len(sims)] = np.where(np.isfinite(b), b, np.nan)
        return out

    def copy_thresholds(self, class_index: int | None, signal: bool = True, rate: float = 0.05) -> tuple[float, float]:
        """(embedding, signal) similarities above which a match is a copy, for one class (None: all classes).

        With one tier this is its training 95th percentile (the paper's mark). With both, one percentile
        q >= 95 is used for both, the smallest at which no more than ``rate`` of the training recordings
        would be flagged against the others by either tier, so two tiers together keep the paper's 5 %."""
        key = (class_index, bool(signal), float(rate))
        if key in self._thresholds:
            return self._thresholds[key]
        mask = np.ones(self.num_clips, bool) if class_index is None else self.labels == class_index
        e = (self.ref_all if class_index is None else self.ref_same)[mask]
        sg = (self.sig_ref_all if class_index is None else self.sig_ref_same)[mask]
        ok = np.isfinite(e)
        if not ok.any():
            out = (float("inf"), float("inf"))
        elif not signal or self.signal is None or not np.isfinite(sg).any():
            out = (float(np.percentile(e[ok], 100 * (1 - rate))), float("inf"))
        else:
            ok &= np.isfinite(sg)
            e, sg = e[ok], sg[ok]
            lo, hi = 100 * (1 - rate), 100.0
            for _ in range(30):                  # bisection on the shared percentile
                q = (lo + hi) / 2
                flagged = np.mean((e > np.percentile(e, q)) | (sg > np.percentile(sg, q)))
                lo, hi = (lo, q) if flagged <= rate else (q, hi)
            out = (float(np.percentile(e, hi)), float(np.percentile(sg, hi)))
        self._thresholds[key] = out
        return out

    # ------------------------------------------------------------------------------ near-duplicates
    def duplicate_groups(self) -> list[list[int]]:
        """Groups of indexed clips that are near-duplicates of each other (as close as plain copies are),
        largest first: a dataset-hygiene finding (gain-scaled takes, files exported twice, ...)."""
        return [g.tolist() for g in duplicate_groups(self.dup_pairs, self.num_clips)]

    @property
    def query_hop_seconds(self) -> float:
        """Hop of the query windows (finer than the indexed windows' hop; the reference used it too)."""
        return float(self.params.get("query_hop_seconds", self.encoder_info.get("hop_seconds", 0.0)))

    # -------------------------------------------------------------------------------------- search
    def _search_params(self, lo: int, hi: int):
        sel = None if (lo == 0 and hi == self.ntotal) else faiss.IDSelectorRange(int(lo), int(hi))
        if self.kind == "ivf":
            return faiss.SearchParametersIVF(sel=sel, nprobe=int(self.params.get("nprobe", 16)))
        if self.kind == "hnsw":
            return faiss.SearchParametersHNSW(sel=sel, efSearch=int(self.params.get("ef_search", 128)))
        return faiss.SearchParameters(sel=sel) if sel is not None else None

    def _search_range(self, q: np.ndarray, k: int, lo: int, hi: int):
        q = np.ascontiguousarray(q, np.float32)
        k = max(1, min(int(k), int(hi - lo)))
        params = self._search_params(lo, hi)
        return self.index.search(q, k, params=params) if params is not None else self.index.search(q, k)

    @property
    def encoder(self):
        """The encoder (+ head) that built this index, loaded once (from the paths recorded at build time,
        or the default checkpoints when their hash matches)."""
        if self._encoder is None:
            self._encoder = self._resolve_encoder()
        return self._encoder

    def attach_encoder(self, encoder) -> None:
        """Use ``encoder`` to embed wave queries; refused unless it is the one the index was built with."""
        _check_identity_pair(encoder.name, encoder.weights_hash, self.encoder_info)
        self._encoder = encoder

    def _resolve_encoder(self):
        from .encoders import DEFAULT_ENCODER_DIR, DEFAULT_HEAD_DIR, load_encoder
        info = self.encoder_info
        tried = []
        cands = []
        for key_enc, key_head in (("path_rel", "head_path_rel"), ("path", "head_path")):
            p, h = info.get(key_enc), info.get(key_head)
            if p is None:
                continue
            base = self.root if (key_enc.endswith("_rel") and self.root is not None) else Path(".")
            cands.append((base / p, (base / h) if h else None))
        cands.append((DEFAULT_ENCODER_DIR, DEFAULT_HEAD_DIR if info.get("has_head", bool(info.get("head_path"))) else None))
        for p, h in cands:
            if not Path(p).exists() or (h is not None and not Path(h).exists()):
                tried.append(str(p))
                continue
            try:
                enc = load_encoder(p, head=h)
            except Exception as e:  # try the next candidate, report all
                tried.append(f"{p} ({e})")
                continue
            if enc.name == info["name"] and enc.weights_hash == info["weights_hash"]:
                return enc
            tried.append(f"{p} (hash {enc.weights_hash[:12]}...)")
        raise FileNotFoundError(
            f"cannot find the encoder this index was built with ({info['name']}, weights {info['weights_hash'][:12]}...); "
            f"tried: {'; '.join(tried)}. Pass it explicitly (CopyIndex.load(path, encoder=load_encoder(DIR, head=HEAD)) "
            "or --encoder/--head)")

    def embed_queries(self, waves, sample_rate: int | None = None, progress: bool | None = None) -> WindowEmbeddings:
        """Embed query clips with the index's encoder at the index's query hop."""
        sr = int(sample_rate or self.audio.get("sample_rate") or self.encoder.sample_rate)
        enc = self.encoder
        if self.query_hop_seconds and abs(self.query_hop_seconds - enc.hop_seconds) > 1e-9:
            enc = enc.with_hop(self.query_hop_seconds)
        return enc.embed_windows(waves, sr, progress=progress)

    def search(self, queries, k: int = 5, same_class=None, *, sample_rate: int | None = None, encoder=None,
               progress: bool | None = None) -> list[QueryResult]:
        """Top-``k`` training clips per query clip (similarity = max over window pairs, one hit per clip).

        ``queries``: waves ((N, L) array or list of 1-D arrays at ``sample_rate``, embedded with the index's
        encoder), :class:`~edmsound.copydetect.windows.WindowEmbeddings` from ``encoder.embed_windows`` (identity
        checked), or an (N, D) array of one embedding per clip together with ``encoder=`` (an encoder or a
        ``(name, weights_hash)`` pair, checked). ``same_class``: None (all classes), one class name for all
        queries, or a list with one class name (or None) per query clip."""
        emb = self._as_window_embeddings(queries, sample_rate, encoder, progress)
        qsig = None
        if self.signal is not None and encoder is None and not isinstance(queries, WindowEmbeddings):
            cfg = self.signal_config
            sr = int(sample_rate or self.audio.get("sample_rate") or self.encoder.sample_rate)
            qsig = signal_fingerprints(_as_clips(queries), sr, cfg)
        e, qci, qoff = _audible(emb)                 # silent windows match every silence: left out
        if e.shape[1] != self.dim:
            raise IndexMismatchError(f"query embeddings are {e.shape[1]}-d but the index is {self.dim}-d")
        nq = emb.num_clips
        if isinstance(same_class, (list, tuple, np.ndarray)):
            if len(same_class) != nq:
                raise ValueError(f"same_class has {len(same_class)} entries for {nq} query clips")
            per_q = [None if c is None else self.class_index(c) for c in same_class]
        else:
            c = None if same_class is None else self.class_index(same_class)
            per_q = [c] * nq
        all_classes = all(c is None for c in per_q)
        wmax = int(self.windows_per_clip.max()) if self.num_clips else 1
        silent = np.ones(nq, bool)
        if emb.levels_db is not None and len(emb.levels_db):
            loud = np.full(nq, -np.inf)
            np.maximum.at(loud, emb.clip_index, emb.levels_db)
            silent = loud < SILENCE_ABSOLUTE_DB
        elif len(qci):
            silent[np.unique(qci)] = False
        results: list[QueryResult | None] = [None] * nq
        groups: dict = {}
        for qi, c in enumerate(per_q):
            groups.setdefault(c, []).append(qi)
        for c, qis in groups.items():
            lo, hi = (0, self.ntotal) if c is None else (int(self.vec_lo[c]), int(self.vec_hi[c]))
            rows = np.flatnonzero(np.isin(qci, qis))
            if hi - lo == 0 or len(rows) == 0:
                for qi in qis:
                    results[qi] = QueryResult([], [], "silent" if silent[qi] else None)
                continue
            sims, ids = self._search_range(e[rows], k * wmax, lo, hi)
            for qi in qis:
                if silent[qi]:
                    results[qi] = QueryResult([], [], "silent (every window below "
                                                      f"{SILENCE_ABSOLUTE_DB:.0f} dBFS)")
                    continue
                r = np.flatnonzero(qci[rows] == qi)
                results[qi] = self._aggregate(sims[r], ids[r], qoff[rows][r], k, c, e[rows][r],
                                              None if qsig is None else qsig[qi], all_classes)
        return results

    @property
    def signal_config(self) -> SignalConfig:
        return SignalConfig(**self.params["signal"]) if "signal" in self.params else SignalConfig()

    def _reference_of(self, clip: int, same_class: bool, signal: bool) -> np.ndarray:
        """The finite reference similarities a match with ``clip`` is judged against (cached per class)."""
        key = ("ref", int(self.labels[clip]) if same_class else None, bool(signal))
        if key not in self._thresholds:
            ref = (self.sig_ref_same if same_class else self.sig_ref_all) if signal else \
                (self.ref_same if same_class else self.ref_all)
            ref = ref[self.labels == self.labels[clip]] if same_class else ref
            self._thresholds[key] = ref[np.isfinite(ref)]
        return self._thresholds[key]

    def _clip_similarity(self, qwin: np.ndarray, qoffs: np.ndarray, clip: int) -> tuple[float, float, float]:
        """(max over window pairs between query windows and one indexed clip's windows, query offset,
        training offset of that pair)."""
        ids = np.arange(*np.searchsorted(self.clip_of_vec, [clip, clip + 1]))   # a clip's vectors are contiguous
        sims = qwin @ np.stack([self.index.reconstruct(int(i)) for i in ids]).T
        q, t = np.unravel_index(int(np.argmax(sims)), sims.shape)
        return float(sims[q, t]), float(qoffs[q]), float(self.offset_of_vec[ids[t]])

    def _aggregate(self, sims, ids, qoffs, k, c, qwin, qsig, all_classes) -> QueryResult:
        windows = []
        for w in range(len(sims)):
            j = int(np.argmax(sims[w])) if len(sims[w]) else -1
            if j < 0 or ids[w, j] < 0:
                continue
            vid = int(ids[w, j])
            windows.append(WindowMatch(float(qoffs[w]), float(sims[w, j]), int(self.clip_of_vec[vid]),
                                       self.sources[self.clip_of_vec[vid]], float(self.offset_of_vec[vid])))
        s = sims.ravel()
        v = ids.ravel()
        qw = np.repeat(np.arange(len(sims)), sims.shape[1])
        ok = v >= 0
        s, v, qw = s[ok], v[ok], qw[ok]
        order = np.argsort(-s, kind="stable")
        clips = self.clip_of_vec[v[order]]
        _, first = np.unique(clips, return_index=True)
        first = np.sort(first)[:k]
        cand = {}
        for f in first:
            o = order[f]
            cand[int(self.clip_of_vec[v[o]])] = (float(s[o]), float(qoffs[qw[o]]), float(self.offset_of_vec[v[o]]))
        sig_sims = None
        if qsig is not None:
            lo, hi = (0, self.num_clips) if c is None else (int(self.clip_lo[c]), int(self.clip_hi[c]))
            sig_sims = np.full(self.num_clips, -np.inf, np.float32)
            sig_sims[lo:hi] = self.signal[lo:hi] @ qsig
            for clip in np.argsort(-sig_sims[lo:hi], kind="stable")[:k] + lo:     # the signal tier's own top-k
                if int(clip) not in cand:
                    cand[int(clip)] = self._clip_similarity(qwin, qoffs, int(clip))
        same = not all_classes
        matches = []
        for clip, (sim, qo, to) in cand.items():
            ev, ssim, spct = [], None, None
            ref = self._reference_of(clip, same, signal=False)
            pct = _percentile(ref, sim)
            t_emb, t_sig = self.copy_thresholds(int(self.labels[clip]) if same else None, signal=sig_sims is not None)
            if sim > t_emb:
                ev.append("embedding")
            if sig_sims is not None:
                ssim = float(sig_sims[clip])
                spct = _percentile(self._reference_of(clip, same, signal=True), ssim)
                if ssim > t_sig:
                    ev.append("signal")
            matches.append(Match(0, sim, clip, self.sources[clip], self.classes[self.labels[clip]], qo, to, pct,
                                 ssim, spct, tuple(ev)))
        matches.sort(key=_rank_key)
        matches = matches[:k]
        for rank, m in enumerate(matches, start=1):
            m.rank = rank
        return QueryResult(matches, windows)

    def _as_window_embeddings(self, queries, sample_rate, encoder, progress) -> WindowEmbeddings:
        if isinstance(queries, WindowEmbeddings):
            _check_identity_pair(queries.encoder_name, queries.weights_hash, self.encoder_info)
            return queries
        if isinstance(queries, tuple) and len(queries) == 3 and not isinstance(queries[0], (int, float)):
            raise IndexMismatchError("plain (embeddings, clip_index, offsets) tuples carry no encoder identity; "
                                     "pass the WindowEmbeddings returned by encoder.embed_windows(...)")
        if torch.is_tensor(queries):
            queries = queries.detach().cpu().numpy()
        arr = queries if isinstance(queries, np.ndarray) else None
        if encoder is not None:
            if arr is None or arr.ndim != 2:
                raise ValueError("with encoder=..., queries must be an (N, D) array of clip embeddings")
            name, h = (encoder if isinstance(encoder, tuple) else (encoder.name, encoder.weights_hash))
            _check_identity_pair(name, h, self.encoder_info)
            n = len(arr)
            return WindowEmbeddings(arr, np.arange(n), np.zeros(n), name, h)
        if arr is not None and arr.ndim == 2 and arr.shape[1] == self.dim and sample_rate is None:
            raise IndexMismatchError(
                f"an ({arr.shape[0]}, {arr.shape[1]}) array without sample_rate looks like embeddings; raw "
                "embeddings carry no encoder identity: pass encoder.embed_windows(...) output, encoder=..., or "
                "sample_rate=... if these are waves")
        return self.embed_queries(queries, sample_rate, progress)

    # ------------------------------------------------------------------------------- the reference
    def reference(self, class_name=None, all_classes: bool = False, signal: bool = False) -> np.ndarray:
        """Training top-1 similarities (each clip vs the others that are not its near-duplicates; same
        class unless ``all_classes``), of the learned embedding or, with ``signal``, of the fingerprints."""
        if signal:
            ref = self.sig_ref_all if all_classes else self.sig_ref_same
        else:
            ref = self.ref_all if all_classes else self.ref_same
        if class_name is not None:
            ref = ref[self.labels == self.class_index(class_name)]
        return ref[np.isfinite(ref)]

    def percentile(self, sim, class_name=None, all_classes: bool = False, signal: bool = False):
        """Percent of training clips whose own top-1 similarity is <= ``sim`` (scalar or array)."""
        ref = self.reference(class_name, all_classes, signal)
        if np.ndim(sim) == 0:
            return _percentile(ref, float(sim))
        return np.array([_percentile(ref, float(s)) for s in np.ravel(sim)]).reshape(np.shape(sim))

    def threshold(self, q: float = 95, class_name=None, all_classes: bool = False, signal: bool = False) -> float:
        """The ``q``-th percentile of the training top-1 distribution (the paper's reference mark: 95)."""
        ref = self.reference(class_name, all_classes, signal)
        if len(ref) == 0:
            raise ValueError("no reference similarities (classes need at least two clips)")
        return float(np.percentile(ref, q))

    # ---------------------------------------------------------------------------------- audio
    def clip_class(self, clip: int) -> str:
        return self.classes[self.labels[clip]]

    def fetch_audio(self, clip: int, sample_rate: int | None = None) -> tuple[np.ndarray, int]:
        """A training clip's audio: re-synthesised for ``synth://`` sources, read from disk otherwise."""
        from ..audio.io import load_audio
        from ..data.synth import parse_synth_uri, synthesize
        src = self.sources[int(clip)]
        sr = int(sample_rate or self.audio.get("sample_rate") or 16000)
        if src.startswith("synth://"):
            name, seed = parse_synth_uri(src)
            secs = float(self.audio.get("seconds") or 1.0)
            return synthesize(name, seed, sr, secs), sr
        p = Path(src)
        root = str(self.audio.get("data_root") or "")
        if root.startswith("<repo>/"):
            root = str(REPO_ROOT / root[len("<repo>/"):])
        if not p.is_absolute() and root:
            p = Path(root) / p
        if not p.is_file():
            raise FileNotFoundError(f"training clip {src} is not available on this machine")
        return load_audio(p, sr), sr

    # ---------------------------------------------------------------------------------- storage
    def save(self, path) -> Path:
        """Write the index directory (files first, ``index.json`` with their checksums last)."""
        root = Path(path)
        if root.exists() and not root.is_dir():
            raise ValueError(f"{root} exists and is not a directory (an index is a directory)")
        root.mkdir(parents=True, exist_ok=True)
        blob = faiss.serialize_index(self.index)
        atomic_write_bytes(root / "index.faiss", blob.tobytes())
        tensors = {"clip_of_vec": torch.from_numpy(self.clip_of_vec), "offset_of_vec": torch.from_numpy(self.offset_of_vec),
                   "labels": torch.from_numpy(self.labels), "ref_same": torch.from_numpy(self.ref_same),
                   "ref_all": torch.from_numpy(self.ref_all)}
        if self.signal is not None:
            tensors.update(signal=torch.from_numpy(self.signal).half(), dup_pairs=torch.from_numpy(self.dup_pairs),
                           sig_ref_same=torch.from_numpy(self.sig_ref_same),
                           sig_ref_all=torch.from_numpy(self.sig_ref_all))
        atomic_save_safetensors(root / "windows.safetensors", tensors)
        enc = dict(self.encoder_info)
        for key in ("path", "head_path"):
            where = enc.get(key)
            if not where and enc.get(key + "_rel") and self.root is not None:   # a loaded index: rebase
                where = str((self.root / enc[key + "_rel"]).resolve())
            enc[key] = where
            enc[key + "_rel"] = _rel(where, root) if where else None
        for key in ("path", "head_path"):           # no machine-specific paths for files inside the repository
            if enc.get(key) and _inside(enc[key], REPO_ROOT) and _inside(root, REPO_ROOT):
                enc[key] = None
        audio = dict(self.audio)
        for key in ("data", "data_root"):            # paths inside the repository are stored relative to it
            if audio.get(key) and Path(audio[key]).is_absolute() and _inside(audio[key], REPO_ROOT):
                audio[key] = "<repo>/" + Path(audio[key]).resolve().relative_to(REPO_ROOT.resolve()).as_posix()
        meta = {
            "format": INDEX_FORMAT, "version": INDEX_VERSION, "kind": self.kind, "params": self.params,
            "dim": self.dim, "ntotal": self.ntotal, "num_clips": self.num_clips, "encoder": enc,
            "audio": audio, "classes": self.classes, "sources": self.sources,
            "reference": {c: {"n": int(np.isfinite(self.reference(c)).sum()),
                              "p50": _q(self.reference(c), 50), "p95": _q(self.reference(c), 95),
                              "signal_p50": _q(self.reference(c, signal=True), 50),
                              "signal_p95": _q(self.reference(c, signal=True), 95)}
                          for c in self.classes},
            "near_duplicates": {"pairs": int(len(self.dup_pairs)), "groups": len(self.duplicate_groups()),
                                "clips_in_groups": int(sum(len(g) for g in self.duplicate_groups()))},
            "files": {name: {"sha256": _sha256_file(root / name), "bytes": (root / name).stat().st_size}
                      for name in FILES},
        }
        atomic_write_json(root / "index.json", meta)
        self.root = root
        return root

    @classmethod
    def load(cls, path, encoder=None) -> "CopyIndex":
        """Load an index directory, verifying file sizes and sha256 first. ``encoder`` (optional) is
        attached for wave queries after an identity check."""
        root = Path(path)
        meta_path = root / "index.json"
        if not root.is_dir() or not meta_path.is_file():
            raise FileNotFoundError(f"{root} is not a copy index: expected a directory with index.json, "
                                    f"{FILES[0]} and {FILES[1]} (written by 'edmsound index build')")
        try:
            meta = json.loads(meta_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CorruptIndexError(f"{meta_path} is corrupt or truncated ({e})") from None
        if meta.get("format") != INDEX_FORMAT:
            raise CorruptIndexError(f"{meta_path}: not an EDMSound copy index (format {meta.get('format')!r})")
        if int(meta.get("version", 0)) > INDEX_VERSION:
            raise ValueError(f"{meta_path}: index version {meta['version']} is newer than this code ({INDEX_VERSION})")
        for name in FILES:
            f = root / name
            want = meta["files"][name]
            if not f.is_file():
                raise CorruptIndexError(f"{f} is missing; rebuild the index (edmsound index build)")
            size = f.stat().st_size
            if size != want["bytes"]:
                raise CorruptIndexError(f"{f} is truncated or altered: {size} bytes, expected {want['bytes']}; "
                                        "rebuild the index (edmsound index build)")
            got = _sha256_file(f)
            if got != want["sha256"]:
                raise CorruptIndexError(f"{f} is corrupt: sha256 {got[:16]}... does not match the recorded "
                                        f"{want['sha256'][:16]}...; rebuild the index (edmsound index build)")
        blob = np.frombuffer((root / "index.faiss").read_bytes(), dtype=np.uint8)
        try:
            index = faiss.deserialize_index(blob)
        except Exception as e:  # checksums matched, so this is a FAISS version problem
            raise CorruptIndexError(f"{root / 'index.faiss'}: FAISS {faiss.__version__} cannot read it ({e})") from None
        t = load_safetensors(root / "windows.safetensors")
        opt = {k: t[k].numpy() if k in t else None for k in ("dup_pairs", "sig_ref_same", "sig_ref_all")}
        obj = cls(index, t["clip_of_vec"].numpy(), t["offset_of_vec"].numpy(), t["labels"].numpy(), meta["classes"],
                  meta["sources"], meta["encoder"], meta.get("audio", {}), t["ref_same"].numpy(), t["ref_all"].numpy(),
                  meta.get("kind", "flat"), meta.get("params", {}), root=root,
                  signal=t["signal"].float().numpy() if "signal" in t else None, **opt)
        if obj.dim != int(meta["dim"]):
            raise CorruptIndexError(f"{root}: index dimension {obj.dim} differs from index.json ({meta['dim']})")
        if encoder is not None:
            obj.attach_encoder(encoder)
        return obj


# ----------------------------------------------------------------------------------------------- helpers
def _rank_key(m: Match):
    """Matches are ranked by the mean of both tiers' similarities where the signal tier is known (either
    alone can be fooled: the embedding by sounds it was not trained on, the signal by noise-like sounds
    of one shape), else by the embedding similarity."""
    if m.signal_similarity is None:
        return (-m.similarity, m.clip)
    return (-(m.similarity + m.signal_similarity) / 2, m.clip)


def _as_clips(queries) -> list:
    from .windows import _as_clip_list
    return _as_clip_list(queries)


def _q(ref, q):
    ref = ref[np.isfinite(ref)]
    return round(float(np.percentile(ref, q)), 6) if len(ref) else None


def _percentile(ref: np.ndarray, sim: float) -> float:
    ref = ref[np.isfinite(ref)]
    if len(ref) == 0:
        return float("nan")
    return float(100.0 * np.mean(ref <= sim))


SILENCE_RELATIVE_DB = 60.0
SILENCE_ABSOLUTE_DB = -90.0


def _audible(emb: WindowEmbeddings):
    """(embeddings, clip_index, offsets) of the windows that are not silent (see
    :func:`edmsound.copydetect.windows.active_windows`: within 60 dB of the clip's loudest window and above -90 dBFS).
    Digital silence embeds identically in every clip, so silent windows would match any silent window."""
    from .windows import active_windows
    e, ci, off = emb
    levels = getattr(emb, "levels_db", None)
    if levels is None or len(levels) != len(e):
        return e, ci, off
    keep = active_windows(levels, ci, SILENCE_RELATIVE_DB, SILENCE_ABSOLUTE_DB)
    return e[keep], ci[keep], off[keep]


def _check_identity(emb, name, h):
    if isinstance(emb, WindowEmbeddings) and (emb.encoder_name != name or emb.weights_hash != h):
        raise IndexMismatchError(f"embeddings come from encoder {emb.encoder_name!r} ({emb.weights_hash[:12]}...), "
                                 f"not {name!r} ({h[:12]}...)")
    if not isinstance(emb, WindowEmbeddings):
        raise IndexMismatchError("pass the WindowEmbeddings returned by encoder.embed_windows(...) "
                                 "(they carry the encoder's identity)")


def _check_identity_pair(name, h, info):
    if name != info.get("name") or h != info.get("weights_hash"):
        raise IndexMismatchError(
            f"query encoder mismatch: the queries were embedded by {name!r} (weights {str(h)[:12]}...) but the "
            f"index was built with {info.get('name')!r} (weights {str(info.get('weights_hash'))[:12]}...); "
            "embed the queries with the index's encoder (and head)")


def _query_windows(encoder, query_hop: float, waves, sample_rate: int, grid: WindowEmbeddings, progress):
    """The clips' windows at the query hop, reusing the indexed (grid) windows that start at the same time."""
    from .windows import window_starts
    qenc = encoder.with_hop(query_hop)
    sr = qenc.sample_rate
    e, ci, off = grid
    have = [dict() for _ in range(len(waves))]
    for row, (c, o) in enumerate(zip(ci, off)):
        have[c][int(round(float(o) * sr))] = row
    n_enc = [int(round(w.shape[-1] * sr / sample_rate)) for w in waves]
    wanted = [window_starts(n, qenc.window_samples, qenc.hop_samples) for n in n_enc]
    missing = [[s / sr for s in ws if s not in have[i]] for i, ws in enumerate(wanted)]
    extra = qenc.embed_at(waves, sample_rate, missing, progress=progress)
    new_rows = {}
    for row, (c, o) in enumerate(zip(extra[1], extra[2])):
        new_rows[(int(c), int(round(float(o) * sr)))] = row
    rows_e, rows_c, rows_o, rows_l = [], [], [], []
    lg = grid.levels_db if grid.levels_db is not None else np.zeros(len(e), np.float32)
    for i, ws in enumerate(wanted):
        for s in ws:
            if s in have[i]:
                rows_e.append(e[have[i][s]])
                rows_l.append(lg[have[i][s]])
            else:
                rows_e.append(extra[0][new_rows[(i, s)]])
                rows_l.append(extra.levels_db[new_rows[(i, s)]])
            rows_c.append(i)
            rows_o.append(s / sr)
    return WindowEmbeddings(np.stack(rows_e), rows_c, rows_o, grid.encoder_name, grid.weights_hash, rows_l,
                            num_clips=len(waves))


def _make_faiss(e: np.ndarray, kind: str, nlist, nprobe, hnsw_m, ef_search):
    d = e.shape[1]
    e = np.ascontiguousarray(e, np.float32)
    if kind == "flat":
        index, params = faiss.IndexFlatIP(d), {}
    elif kind == "ivf":
        n = len(e)
        nlist = int(nlist or max(1, min(int(4 * np.sqrt(n)), n // 39 if n >= 39 else 1)))
        quant = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quant, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(e)
        params = {"nlist": nlist, "nprobe": int(min(nprobe, nlist))}
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, int(hnsw_m), faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = max(40, int(hnsw_m) * 2)
        params = {"m": int(hnsw_m), "ef_search": int(ef_search)}
    else:
        raise ValueError(f"unknown index kind {kind!r}; valid: {', '.join(INDEX_KINDS)}")
    index.add(e)
    return index, params


def load_training_set(root, encoder, sample_rate, seconds, progress, max_seconds: float = 60.0,
                      own_length: bool = True):
    """A class-per-folder tree -> (AudioSet, audio settings), read by the one folder reader.

    Trees written by ``edmsound data synth`` use their manifest's rate and length. Other trees load at
    ``sample_rate`` (default: the encoder's); each clip keeps its own length, at most ``seconds`` (default
    ``max_seconds``), so one long file costs its own windows only; with ``own_length=False`` every clip is
    cut or padded to ``seconds`` (default: the longest file, at most ``max_seconds``). Cut and skipped
    files are reported."""
    from ..data.folder import load_folder
    root = Path(root).resolve()
    manifest = root / "synth.json"
    if seconds is not None and not seconds > 0:
        raise ValueError(f"seconds must be > 0, got {seconds!r}")
    if manifest.is_file():
        m = json.loads(manifest.read_text())
        sr, secs = int(sample_rate or m["sample_rate"]), float(seconds or m["seconds"])
        data = load_folder(root, sr, int(round(secs * sr)), progress=progress, verbose=progress)
    elif own_length:
        sr = int(sample_rate or getattr(encoder, "sample_rate", 16000))
        secs = float(seconds or max_seconds)
        data = load_folder(root, sr, None, progress=progress, verbose=progress, max_seconds=secs)
    else:
        import soundfile as sf
        from ..data.folder import scan_folder
        sr = int(sample_rate or getattr(encoder, "sample_rate", 16000))
        if seconds is None:
            durs = []
            for f, _ in scan_folder(root)[1]:
                try:
                    durs.append(sf.info(str(f)).duration)
                except Exception:           # unreadable: the reader names it below
                    pass
            seconds = min(max(durs), max_seconds) if durs else 1.0
        secs = float(seconds)
        data = load_folder(root, sr, int(round(secs * sr)), progress=progress, verbose=progress)
    if data.skipped:
        warnings.warn(f"{len(data.skipped)} of {data.report.files} file(s) skipped while reading {root} "
                      f"({', '.join(f'{n} {k}' for k, n in sorted(data.report.reason_counts().items()))})")
    return data, {"sample_rate": sr, "seconds": secs, "data": str(root), "data_root": str(root),
                  "variable_length": own_length and not manifest.is_file(), "read": data.report.to_dict()}
