"""Audio encoders for copy detection (EDMSound, Zhu et al. 2023, "Copy detection").

The paper embeds audio with the LAION CLAP audio tower (HTSAT + projection, 48 kHz, 512-d) in sliding
windows (4 s, hop 2 s) and compares clips by the maximum cosine similarity over window pairs. This
module gives every encoder one interface::

    enc.embed(waves, sample_rate)          -> (N, D) float32, L2-normalised (mean of windows, renormalised)
    enc.embed_windows(waves, sample_rate)  -> WindowEmbeddings: (embeddings (M, D), clip_index (M,),
                                              offsets_seconds (M,)), carrying enc.name / enc.weights_hash
    enc.name, enc.weights_hash, enc.sample_rate, enc.window_seconds, enc.hop_seconds, enc.dim

Encoders are transformers' ``ClapAudioModelWithProjection`` fed log-mel features computed exactly as
``ClapFeatureExtractor`` computes them (a batched torch port, checked against it in the tests). They
load from

* a Hugging Face CLAP directory (``ClapModel`` or ``ClapAudioModelWithProjection`` safetensors +
  ``config.json`` + ``preprocessor_config.json``, e.g. a local copy of ``laion/clap-htsat-unfused``);
* a LAION CLAP ``.pt`` checkpoint (``torch.load(weights_only=True)``), whose keys are mapped to the HF
  layout by the table :data:`LAION_AUDIO_KEY_RULES` (:func:`convert_laion_checkpoint` writes an HF dir);
* the project's own encoder directory (an HF directory plus ``encoder.json``), e.g. the embedded
  default in ``checkpoints/encoder/``: a small CLAP audio tower trained here contrastively
  (:func:`train_encoder`, audio-audio positives, NT-Xent with in-batch negatives).

:func:`load_encoder` recognises all three and optionally applies a copy-detection head
(:mod:`edmsound.head`). Nothing is downloaded: paths are local.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soxr
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .checkpoint import (atomic_save_safetensors, atomic_write_json, load_safetensors, optimizer_from_flat,
                         optimizer_to_flat)

__all__ = ["WindowEmbeddings", "ClapFrontend", "ClapEncoder", "load_encoder", "convert_laion_checkpoint",
           "convert_laion_state_dict", "LAION_AUDIO_KEY_RULES", "LAION_IGNORED_KEYS", "KeyRule",
           "default_encoder_config", "train_encoder", "save_encoder_dir", "window_starts", "level_db", "active_windows", "file_sha256", "weights_sha256", "REPO_ROOT",
           "DEFAULT_ENCODER_DIR", "DEFAULT_HEAD_DIR"]

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ENCODER_DIR = REPO_ROOT / "checkpoints" / "encoder"
DEFAULT_HEAD_DIR = REPO_ROOT / "checkpoints" / "head"
ENCODER_JSON = "encoder.json"
ENCODER_FORMAT = "edmsound-encoder"


# --------------------------------------------------------------------------------------------------
# Hashing
# --------------------------------------------------------------------------------------------------
def file_sha256(path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def weights_sha256(files) -> str:
    """sha256 over the weight files (sorted by name; each file's name and bytes)."""
    files = sorted(Path(f) for f in files)
    if len(files) == 1:
        return file_sha256(files[0])
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + file_sha256(f).encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# Window embeddings
# --------------------------------------------------------------------------------------------------
class WindowEmbeddings(tuple):
    """``(embeddings (M, D) float32, clip_index (M,) int64, offsets_seconds (M,) float32)``.

    A 3-tuple (unpacks as one) that also carries the identity of the encoder that made it
    (``encoder_name``, ``weights_hash``) so an index can refuse embeddings from another encoder, the
    number of clips, and each window's level (``levels_db``: RMS in dBFS) so silent windows can be
    left out of matching (silence is identical in every clip)."""

    def __new__(cls, embeddings, clip_index, offsets, encoder_name: str, weights_hash: str, levels_db=None,
                num_clips: int | None = None):
        self = super().__new__(cls, (np.ascontiguousarray(embeddings, dtype=np.float32),
                                     np.asarray(clip_index, dtype=np.int64),
                                     np.asarray(offsets, dtype=np.float32)))
        self.encoder_name = encoder_name
        self.weights_hash = weights_hash
        self.levels_db = None if levels_db is None else np.asarray(levels_db, dtype=np.float32)
        self._num_clips = num_clips
        return self

    @property
    def num_clips(self) -> int:
        if self._num_clips is not None:
            return int(self._num_clips)
        return int(self[1].max()) + 1 if len(self[1]) else 0

    embeddings = property(lambda self: self[0])
    clip_index = property(lambda self: self[1])
    offsets = property(lambda self: self[2])


# --------------------------------------------------------------------------------------------------
# Feature extraction: ClapFeatureExtractor's log-mel in batched torch
# --------------------------------------------------------------------------------------------------
class ClapFrontend(torch.nn.Module):
    """Batched torch port of ``ClapFeatureExtractor`` for inputs no longer than ``max_length_s``.

    Same steps as the extractor: pad short inputs to ``max_length`` ("repeatpad": tile, then zero-pad;
    "repeat"; "pad"), centred reflect-padded STFT with a periodic Hann window (``fft_window_size``,
    ``hop_length``), power spectrum, mel filter bank (Slaney-normalised filters for "rand_trunc", HTK
    filters for "fusion"), floor 1e-10, 10*log10. For fused models the mel is stacked 4 times and
    ``is_longer`` is False (windows never exceed ``max_length``, so the extractor's random crop and
    random "longer" flag never apply)."""

    def __init__(self, feature_extractor, fusion: bool = False):
        super().__init__()
        fe = feature_extractor
        self.sample_rate = int(fe.sampling_rate)
        self.n_fft = int(fe.fft_window_size)
        self.hop = int(fe.hop_length)
        self.max_length = int(round(float(fe.max_length_s) * self.sample_rate))
        self.padding = fe.padding if isinstance(fe.padding, str) else "repeatpad"
        if self.padding not in ("repeatpad", "repeat", "pad"):
            raise ValueError(f"unsupported ClapFeatureExtractor padding {self.padding!r}; "
                             "expected repeatpad, repeat or pad")
        self.fusion = bool(fusion)
        filters = fe.mel_filters if self.fusion else fe.mel_filters_slaney
        self.register_buffer("filters", torch.as_tensor(np.asarray(filters), dtype=torch.float64), persistent=False)
        window = np.hanning(self.n_fft + 1)[:-1]
        self.register_buffer("window", torch.as_tensor(window, dtype=torch.float64), persistent=False)

    @property
    def num_mel_bins(self) -> int:
        return int(self.filters.shape[1])

    def pad(self, wave: np.ndarray) -> np.ndarray:
        """One window to exactly ``max_length`` samples, the extractor's way."""
        n = len(wave)
        if n > self.max_length:
            raise ValueError(f"window of {n} samples is longer than the extractor's max_length {self.max_length}")
        if n == 0:
            return np.zeros(self.max_length, np.float32)
        if n < self.max_length:
            if self.padding == "repeat":
                wave = np.tile(wave, self.max_length // n + 1)[: self.max_length]
            elif self.padding == "repeatpad":
                wave = np.tile(wave, self.max_length // n)
            wave = np.pad(wave, (0, self.max_length - len(wave)))
        return np.asarray(wave, np.float32)

    def log_mel(self, x: torch.Tensor) -> torch.Tensor:
        """(B, max_length) -> (B, frames, mel) in dB (computed in float64, like the extractor; float32 out)."""
        half = self.n_fft // 2
        x = F.pad(x.double()[:, None, :], (half, half), mode="reflect")[:, 0]
        frames = x.unfold(-1, self.n_fft, self.hop) * self.window
        spec = torch.fft.rfft(frames, dim=-1)
        power = spec.real.square() + spec.imag.square()
        mel = torch.clamp(power @ self.filters, min=1e-10)
        return (10.0 * torch.log10(mel)).float()

    def forward(self, windows) -> tuple[torch.Tensor, torch.Tensor]:
        """List/array of windows (each <= max_length) -> (input_features (B, C, T, F), is_longer (B, 1))."""
        batch = np.stack([self.pad(np.asarray(w, np.float32)) for w in windows])
        x = torch.from_numpy(batch).to(self.window.device)
        mel = self.log_mel(x)[:, None]
        if self.fusion:
            mel = mel.expand(-1, 4, -1, -1)
        is_longer = torch.zeros(len(batch), 1, dtype=torch.bool, device=mel.device)
        return mel, is_longer


# --------------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------------
def _as_clip_list(waves) -> list[np.ndarray]:
    if isinstance(waves, np.ndarray):
        if waves.ndim == 1:
            return [waves.astype(np.float32, copy=False)]
        if waves.ndim == 2:
            return [w for w in waves.astype(np.float32, copy=False)]
        raise ValueError(f"waves must be (N, L) or a list of 1-D arrays, got shape {waves.shape}")
    if torch.is_tensor(waves):
        return _as_clip_list(waves.detach().cpu().numpy())
    out = []
    for w in waves:
        w = np.asarray(w, dtype=np.float32)
        if w.ndim != 1:
            raise ValueError(f"each clip must be a 1-D array, got shape {w.shape}")
        out.append(w)
    return out


def level_db(x: np.ndarray) -> float:
    """RMS level in dBFS (-240 for digital silence)."""
    x = np.asarray(x, np.float64)
    return float(10.0 * np.log10(np.mean(x * x) + 1e-24)) if len(x) else -240.0


def active_windows(levels_db, clip_index, relative_db: float = 60.0, absolute_db: float = -90.0) -> np.ndarray:
    """Mask of non-silent windows: within ``relative_db`` of their clip's loudest window and above
    ``absolute_db`` dBFS. Every clip keeps at least its loudest window."""
    levels = np.asarray(levels_db, np.float64)
    ci = np.asarray(clip_index, np.int64)
    if len(levels) == 0:
        return np.zeros(0, bool)
    loudest = np.full(ci.max() + 1, -np.inf)
    np.maximum.at(loudest, ci, levels)
    keep = (levels >= loudest[ci] - relative_db) & (levels >= absolute_db)
    keep |= levels == loudest[ci]
    return keep


def window_starts(num_samples: int, window: int, hop: int) -> list[int]:
    """Start samples of the sliding windows over a clip: hop-spaced, plus one end-aligned window when
    more than half a hop would otherwise be left uncovered; one window for clips shorter than it."""
    if num_samples <= window:
        return [0]
    n = 1 + (num_samples - window) // hop
    starts = [i * hop for i in range(n)]
    tail = num_samples - (starts[-1] + window)
    if tail > hop // 2:
        starts.append(num_samples - window)
    return starts


class ClapEncoder:
    """A CLAP audio tower (+ optional copy-detection head) with the windowed-embedding interface."""

    def __init__(self, model, feature_extractor, *, name: str, weights_hash: str, window_seconds: float,
                 hop_seconds: float, head=None, source: str | None = None, batch_size: int = 64,
                 device: str = "cpu"):
        self.model = model.eval().to(device)
        self.feature_extractor = feature_extractor
        self.device = torch.device(device)
        self.frontend = ClapFrontend(feature_extractor, fusion=bool(model.config.enable_fusion)).to(device)
        self.sample_rate = self.frontend.sample_rate
        max_s = self.frontend.max_length / self.sample_rate
        if not 0 < window_seconds <= max_s + 1e-9:
            raise ValueError(f"window_seconds must be in (0, {max_s:g}] (the feature extractor's max_length_s), "
                             f"got {window_seconds}")
        if not 0 < hop_seconds <= window_seconds:
            raise ValueError(f"hop_seconds must be in (0, window_seconds={window_seconds}], got {hop_seconds}")
        self.window_seconds = float(window_seconds)
        self.hop_seconds = float(hop_seconds)
        self.base_name = name
        self.base_hash = weights_hash
        self.source = source
        self.batch_size = int(batch_size)
        self.head = head
        if head is not None:
            head.eval().to(device)
            if head.in_dim != model.config.projection_dim:
                raise ValueError(f"head expects {head.in_dim}-d embeddings but the encoder gives "
                                 f"{model.config.projection_dim}-d")
            if head.encoder_hash and head.encoder_hash != weights_hash:
                raise ValueError(f"head {head.name!r} was trained on encoder weights {head.encoder_hash[:12]}..., "
                                 f"not on {name!r} ({weights_hash[:12]}...); train a head for this encoder "
                                 "(edmsound encoder finetune-head)")

    # identity -------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.base_name if self.head is None else f"{self.base_name}+{self.head.name}"

    @property
    def weights_hash(self) -> str:
        if self.head is None:
            return self.base_hash
        return hashlib.sha256(f"{self.base_hash}+{self.head.weights_hash}".encode()).hexdigest()

    @property
    def dim(self) -> int:
        return self.head.out_dim if self.head is not None else int(self.model.config.projection_dim)

    @property
    def base_dim(self) -> int:
        return int(self.model.config.projection_dim)

    @property
    def window_samples(self) -> int:
        return int(round(self.window_seconds * self.sample_rate))

    @property
    def hop_samples(self) -> int:
        return int(round(self.hop_seconds * self.sample_rate))

    def with_head(self, head) -> "ClapEncoder":
        """The same tower (shared, not copied) with another head (or none)."""
        enc = object.__new__(ClapEncoder)
        enc.__dict__.update(self.__dict__)
        enc.head = None
        if head is not None:
            ClapEncoder.__init__(enc, self.model, self.feature_extractor, name=self.base_name,
                                 weights_hash=self.base_hash, window_seconds=self.window_seconds,
                                 hop_seconds=self.hop_seconds, head=head, source=self.source,
                                 batch_size=self.batch_size, device=str(self.device))
        return enc

    def with_hop(self, hop_seconds: float) -> "ClapEncoder":
        """The same encoder (same identity) sliding its windows with another hop, e.g. finer query windows."""
        if not 0 < hop_seconds <= self.window_seconds:
            raise ValueError(f"hop_seconds must be in (0, {self.window_seconds}], got {hop_seconds}")
        enc = object.__new__(ClapEncoder)
        enc.__dict__.update(self.__dict__)
        enc.hop_seconds = float(hop_seconds)
        return enc

    def identity(self) -> dict:
        return {"name": self.name, "weights_hash": self.weights_hash, "dim": self.dim,
                "sample_rate": self.sample_rate, "window_seconds": self.window_seconds,
                "hop_seconds": self.hop_seconds}

    def __repr__(self):
        return (f"ClapEncoder({self.name!r}, {self.weights_hash[:12]}..., {self.sample_rate} Hz, "
                f"window {self.window_seconds:g} s / hop {self.hop_seconds:g} s, dim {self.dim})")

    # embedding ------------------------------------------------------------------------------------
    def _tower(self, windows, train: bool = False) -> torch.Tensor:
        """Base (pre-head) embeddings of windows at the encoder rate, L2-normalised."""
        feats, is_longer = self.frontend(windows)
        out = self.model(input_features=feats, is_longer=is_longer)
        return F.normalize(out.audio_embeds, dim=-1)

    @torch.no_grad()
    def embed_window_batch(self, windows, apply_head: bool = True) -> np.ndarray:
        """Embed windows (each at most ``window_seconds`` at ``sample_rate``) -> (B, D)."""
        e = self._tower(windows)
        if apply_head and self.head is not None:
            e = self.head(e)
        return e.float().cpu().numpy()

    def prepare(self, waves, sample_rate: int) -> list[np.ndarray]:
        """Mono float32 clips resampled to the encoder's rate (soxr HQ)."""
        if sample_rate is None or int(sample_rate) <= 0:
            raise ValueError(f"sample_rate must be a positive integer, got {sample_rate!r}")
        clips = _as_clip_list(waves)
        if int(sample_rate) != self.sample_rate:
            clips = [soxr.resample(c, int(sample_rate), self.sample_rate, quality="HQ").astype(np.float32)
                     for c in clips]
        for i, c in enumerate(clips):
            if not np.all(np.isfinite(c)):
                raise ValueError(f"clip {i} contains NaN or Inf samples")
        return clips

    def embed_windows(self, waves, sample_rate: int, batch_size: int | None = None, progress: bool | None = None,
                      apply_head: bool = True) -> WindowEmbeddings:
        """Embed each clip in overlapping windows -> (embeddings (M, D), clip_index (M,), offsets (M,) s)."""
        clips = self.prepare(waves, sample_rate)
        starts = [window_starts(len(c), self.window_samples, self.hop_samples) for c in clips]
        return self._embed_at(clips, starts, batch_size, progress, apply_head)

    def embed_at(self, waves, sample_rate: int, starts_seconds, batch_size: int | None = None,
                 progress: bool | None = None, apply_head: bool = True) -> WindowEmbeddings:
        """Embed windows starting at given times: ``starts_seconds[i]`` lists clip i's window starts (s)."""
        clips = self.prepare(waves, sample_rate)
        starts = [[int(round(t * self.sample_rate)) for t in ts] for ts in starts_seconds]
        return self._embed_at(clips, starts, batch_size, progress, apply_head)

    def _embed_at(self, clips, starts, batch_size, progress, apply_head) -> WindowEmbeddings:
        W = self.window_samples
        jobs = [(ci, s) for ci, ss in enumerate(starts) for s in ss]
        bs = int(batch_size or self.batch_size)
        show = progress if progress is not None else len(jobs) > 4 * bs
        dim = self.dim if apply_head else self.base_dim
        out = np.zeros((len(jobs), dim), np.float32)
        with tqdm(total=len(jobs), desc=f"embed ({self.base_name})", unit="win", disable=not show) as bar:
            for i in range(0, len(jobs), bs):
                chunk = jobs[i:i + bs]
                out[i:i + len(chunk)] = self.embed_window_batch([clips[ci][s:s + W] for ci, s in chunk], apply_head)
                bar.update(len(chunk))
        clip_index = np.array([ci for ci, _ in jobs], np.int64)
        offsets = np.array([s / self.sample_rate for _, s in jobs], np.float32)
        levels = np.array([level_db(clips[ci][s:s + W]) for ci, s in jobs], np.float32)
        name, h = (self.name, self.weights_hash) if apply_head else (self.base_name, self.base_hash)
        return WindowEmbeddings(out, clip_index, offsets, name, h, levels, num_clips=len(clips))

    def embed(self, waves, sample_rate: int, batch_size: int | None = None, progress: bool | None = None) -> np.ndarray:
        """One L2-normalised embedding per clip: the mean of its window embeddings, renormalised."""
        emb = self.embed_windows(waves, sample_rate, batch_size, progress)
        e, ci, _ = emb
        sums = np.zeros((emb.num_clips, e.shape[1]), np.float64)
        np.add.at(sums, ci, e)
        sums /= np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
        return sums.astype(np.float32)


# --------------------------------------------------------------------------------------------------
# LAION .pt -> Hugging Face key mapping (audio tower + audio projection)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class KeyRule:
    """One row of the LAION -> HF key table. Placeholders: ``{i}``, ``{j}`` (layer / block numbers) and
    ``{p}`` (the rest of the parameter path). ``split`` names the HF tensors a LAION tensor is cut
    into along dim 0 (``{part}`` in the HF template), e.g. HTSAT's fused qkv -> query, key, value."""
    laion: str
    hf: str
    split: tuple[str, ...] | None = None


#: The mapping table (LAION-AI/CLAP ``HTSAT_Swin_Transformer`` + ``audio_projection`` names -> transformers
#: ``ClapAudioModelWithProjection`` names). Keys are first stripped of DataParallel's ``module.`` prefix.
LAION_AUDIO_KEY_RULES: tuple[KeyRule, ...] = (
    KeyRule("audio_branch.bn0.{p}", "audio_model.audio_encoder.batch_norm.{p}"),
    KeyRule("audio_branch.patch_embed.{p}", "audio_model.audio_encoder.patch_embed.{p}"),
    KeyRule("audio_branch.layers.{i}.blocks.{j}.norm1.{p}",
            "audio_model.audio_encoder.layers.{i}.blocks.{j}.layernorm_before.{p}"),
    KeyRule("audio_branch.layers.{i}.blocks.{j}.attn.qkv.{p}",
            "audio_model.audio_encoder.layers.{i}.blocks.{j}.attention.self.{part}.{p}",
            split=("query", "key", "value")),
    KeyRule("audio_branch.layers.{i}.blocks.{j}.attn.relative_position_bias_table",
            "audio_model.audio_encoder.layers.{i}.blocks.{j}.attention.self.relative_position_bias_table"),
    KeyRule("audio_branch.layers.{i}.blocks.{j}.attn.relative_position_index",
            "audio_model.audio_encoder.layers.{i}.blocks.{j}.attention.self.relative_position_index"),
    KeyRule("audio_branch.layers.{i}.blocks.{j}.attn.proj.{p}",
            "audio_model.audio_encoder.layers.{i}.blocks.{j}.attention.output.dense.{p}"),
    KeyRule("audio_branch.layers.{i}.blocks.{j}.norm2.{p}",
            "audio_model.audio_encoder.layers.{i}.blocks.{j}.layernorm_after.{p}"),
    KeyRule("audio_branch.layers.{i}.blocks.{j}.mlp.fc1.{p}",
            "audio_model.audio_encoder.layers.{i}.blocks.{j}.intermediate.dense.{p}"),
    KeyRule("audio_branch.layers.{i}.blocks.{j}.mlp.fc2.{p}",
            "audio_model.audio_encoder.layers.{i}.blocks.{j}.output.dense.{p}"),
    KeyRule("audio_branch.layers.{i}.downsample.{p}", "audio_model.audio_encoder.layers.{i}.downsample.{p}"),
    KeyRule("audio_branch.norm.{p}", "audio_model.audio_encoder.norm.{p}"),
    KeyRule("audio_projection.0.{p}", "audio_projection.linear1.{p}"),
    KeyRule("audio_projection.2.{p}", "audio_projection.linear2.{p}"),
)

#: LAION keys with no counterpart in the HF audio tower: the text tower, the training-only MLPs
#: (``audio_transform``/``text_transform``), logit scales, HTSAT's in-model STFT/log-mel (done by the
#: feature extractor instead), its classification head (``tscam_conv``, ``head``) and shift masks.
LAION_IGNORED_KEYS: tuple[str, ...] = (
    r"text_branch\..*", r"text_projection\..*", r"text_transform\..*", r"audio_transform\..*",
    r"logit_scale_[at]", r"audio_branch\.spectrogram_extractor\..*", r"audio_branch\.logmel_extractor\..*",
    r"audio_branch\.tscam_conv\..*", r"audio_branch\.head\..*", r"audio_branch\.layers\.\d+\.blocks\.\d+\.attn_mask",
    r"text_model\..*", r"position_ids",
)


def _template_regex(t: str) -> re.Pattern:
    out, pos = "", 0
    for m in re.finditer(r"\{(i|j|p|part)\}", t):
        out += re.escape(t[pos:m.start()])
        out += {"i": r"(?P<i>\d+)", "j": r"(?P<j>\d+)", "p": r"(?P<p>.+)", "part": r"(?P<part>[a-z]+)"}[m.group(1)]
        pos = m.end()
    return re.compile(out + re.escape(t[pos:]) + r"\Z")


_LAION_RES = [(_template_regex(r.laion), r) for r in LAION_AUDIO_KEY_RULES]
_IGNORED_RES = [re.compile(p + r"\Z") for p in LAION_IGNORED_KEYS]


def convert_laion_state_dict(state: dict) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map a LAION CLAP state dict to ``ClapAudioModelWithProjection`` keys -> (hf_state, ignored_keys).

    Raises ValueError naming any key that is neither in :data:`LAION_AUDIO_KEY_RULES` nor ignored."""
    hf, ignored, unknown = {}, [], []
    for key, value in state.items():
        k = key[len("module."):] if key.startswith("module.") else key
        if not torch.is_tensor(value):
            raise ValueError(f"checkpoint entry {key!r} is not a tensor ({type(value).__name__})")
        for rx, rule in _LAION_RES:
            m = rx.match(k)
            if m:
                fields = {n: v for n, v in m.groupdict().items() if v is not None}
                if rule.split:
                    if value.shape[0] % len(rule.split):
                        raise ValueError(f"{key}: dim 0 ({value.shape[0]}) is not divisible by {len(rule.split)}")
                    for part, chunk in zip(rule.split, value.chunk(len(rule.split), dim=0)):
                        hf[rule.hf.format(part=part, **fields)] = chunk.clone()
                else:
                    hf[rule.hf.format(**fields)] = value
                break
        else:
            if any(rx.match(k) for rx in _IGNORED_RES):
                ignored.append(key)
            else:
                unknown.append(key)
    if unknown:
        raise ValueError(f"{len(unknown)} checkpoint key(s) not in the LAION->HF table: {unknown[:8]}"
                         f"{' ...' if len(unknown) > 8 else ''}")
    if not hf:
        raise ValueError("no audio-tower weights found (expected keys like 'audio_branch.patch_embed.proj.weight')")
    return hf, ignored


def _infer_audio_config(hf: dict[str, torch.Tensor], overrides: dict | None = None):
    """ClapAudioConfig from the tensor shapes of a converted state dict (+ explicit overrides)."""
    from transformers import ClapAudioConfig
    pre = "audio_model.audio_encoder."
    try:
        proj = hf[pre + "patch_embed.proj.weight"]
        layers = sorted({int(m.group(1)) for k in hf for m in [re.match(re.escape(pre) + r"layers\.(\d+)\.", k)] if m})
        depths, heads, window = [], [], None
        for i in layers:
            blocks = {int(m.group(1)) for k in hf
                      for m in [re.match(re.escape(pre) + rf"layers\.{i}\.blocks\.(\d+)\.", k)] if m}
            depths.append(max(blocks) + 1)
            table = hf[f"{pre}layers.{i}.blocks.0.attention.self.relative_position_bias_table"]
            heads.append(int(table.shape[1]))
            w = (math.isqrt(int(table.shape[0])) + 1) // 2
            window = w if window is None else window
        dim0 = int(proj.shape[0])
        fc1 = hf[f"{pre}layers.0.blocks.0.intermediate.dense.weight"]
        cfg = dict(
            num_mel_bins=int(hf[pre + "batch_norm.weight"].shape[0]),
            patch_embeds_hidden_size=dim0,
            patch_size=int(proj.shape[-1]),
            patch_embed_input_channels=int(proj.shape[1]),
            depths=depths, num_attention_heads=heads, window_size=int(window),
            hidden_size=int(hf[pre + "norm.weight"].shape[0]),
            projection_dim=int(hf["audio_projection.linear1.weight"].shape[0]),
            mlp_ratio=float(fc1.shape[0]) / dim0,
            enable_fusion=any(".fusion_model." in k for k in hf),
            enable_patch_layer_norm=(pre + "patch_embed.norm.weight") in hf,
        )
    except KeyError as e:
        raise ValueError(f"checkpoint lacks {e.args[0]!r}: not a CLAP HTSAT audio tower") from None
    if cfg["enable_fusion"]:
        cfg["fusion_type"] = "aff_2d"
    cfg.update(overrides or {})
    return ClapAudioConfig(**cfg)


def _load_pt(pt_path) -> dict:
    """``torch.load(weights_only=True)``; NumPy scalars in training metadata are allowed explicitly."""
    pt_path = Path(pt_path)
    if not pt_path.is_file():
        raise FileNotFoundError(f"LAION CLAP checkpoint {pt_path} does not exist")
    try:
        ck = torch.load(pt_path, map_location="cpu", weights_only=True)
    except Exception as first:
        try:   # LAION's training metadata holds NumPy float scalars: allow exactly those, nothing else
            core = np._core if hasattr(np, "_core") else np.core
            allowed = [core.multiarray.scalar, np.dtype, np.dtypes.Float64DType]
            with torch.serialization.safe_globals(allowed):
                ck = torch.load(pt_path, map_location="cpu", weights_only=True)
        except Exception:
            raise ValueError(f"{pt_path} cannot be read with torch.load(weights_only=True): {first}") from None
    if isinstance(ck, dict) and "state_dict" in ck and isinstance(ck["state_dict"], dict):
        ck = ck["state_dict"]
    if not isinstance(ck, dict):
        raise ValueError(f"{pt_path}: expected a state dict (or {{'state_dict': ...}}), got {type(ck).__name__}")
    return ck


LAION_FEATURE_DEFAULTS = dict(sampling_rate=48000, hop_length=480, fft_window_size=1024, frequency_min=50,
                              frequency_max=14000, max_length_s=10, padding="repeatpad")


def _laion_model(pt_path, audio_config_overrides=None, feature_extractor_kwargs=None):
    from transformers import ClapAudioModelWithProjection, ClapFeatureExtractor
    hf, ignored = convert_laion_state_dict(_load_pt(pt_path))
    cfg = _infer_audio_config(hf, audio_config_overrides)
    model = ClapAudioModelWithProjection(cfg)
    _load_state_strict(model, hf, str(pt_path))
    fe_kw = dict(LAION_FEATURE_DEFAULTS, feature_size=cfg.num_mel_bins,
                 truncation="fusion" if cfg.enable_fusion else "rand_trunc")
    fe_kw.update(feature_extractor_kwargs or {})
    return model, ClapFeatureExtractor(**fe_kw), hf, ignored


def _load_state_strict(model, state: dict, where: str):
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k.startswith(("audio_model.", "audio_projection."))}
    missing = [k for k in own if k not in state and not k.endswith(("relative_position_index", "num_batches_tracked"))]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(f"{where}: weights do not fit the CLAP audio config: missing {missing[:6]}, "
                         f"unexpected {unexpected[:6]}")
    bad = [k for k in state if tuple(state[k].shape) != tuple(own[k].shape)]
    if bad:
        raise ValueError(f"{where}: shape mismatch for {[(k, tuple(state[k].shape), tuple(own[k].shape)) for k in bad[:4]]}")
    model.load_state_dict(state, strict=False)


def convert_laion_checkpoint(pt_path, out_dir, audio_config_overrides: dict | None = None,
                             feature_extractor_kwargs: dict | None = None) -> Path:
    """Convert a LAION CLAP ``.pt`` (e.g. ``630k-audioset-best.pt``) to a Hugging Face audio-tower directory:
    ``config.json`` (ClapAudioConfig inferred from tensor shapes, ``audio_config_overrides`` on top),
    ``model.safetensors`` (``ClapAudioModelWithProjection`` keys, via :data:`LAION_AUDIO_KEY_RULES`),
    ``preprocessor_config.json`` (LAION's 48 kHz log-mel settings unless overridden) and
    ``conversion.json`` (source sha256, ignored keys). Loadable by :func:`load_encoder` and by
    ``ClapAudioModelWithProjection.from_pretrained``."""
    out_dir = Path(out_dir)
    model, fe, hf, ignored = _laion_model(pt_path, audio_config_overrides, feature_extractor_kwargs)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "config.json", model.config.to_dict())
    atomic_write_json(out_dir / "preprocessor_config.json", fe.to_dict())
    atomic_save_safetensors(out_dir / "model.safetensors", model.state_dict(), metadata={"format": "pt"})
    atomic_write_json(out_dir / "conversion.json", {"source": str(pt_path), "source_sha256": file_sha256(pt_path),
                                                    "ignored_keys": ignored, "num_tensors": len(hf)})
    return out_dir


# --------------------------------------------------------------------------------------------------
# Hugging Face / project directories
# --------------------------------------------------------------------------------------------------
def _weight_files(d: Path) -> list[Path]:
    files = sorted(d.glob("*.safetensors"))
    if not files:
        bins = sorted(d.glob("*.bin"))
        hint = (" (only pickle .bin weights found: re-save them as safetensors, e.g. with "
                "model.save_pretrained(dir, safe_serialization=True))" if bins else "")
        raise FileNotFoundError(f"{d} has no *.safetensors weights{hint}")
    return files


def _load_hf_dir(d: Path):
    from transformers import ClapAudioConfig, ClapAudioModelWithProjection, ClapConfig, ClapFeatureExtractor
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{d} has no config.json: expected a Hugging Face CLAP directory")
    raw = json.loads(cfg_path.read_text())
    mt = raw.get("model_type")
    if mt == "clap":
        cfg = ClapConfig.from_pretrained(d).audio_config
    elif mt in ("clap_audio_model", None):
        cfg = ClapAudioConfig.from_pretrained(d)
    else:
        raise ValueError(f"{cfg_path}: model_type {mt!r} is not a CLAP model (expected 'clap' or 'clap_audio_model')")
    files = _weight_files(d)
    state = {}
    for f in files:
        state.update(load_safetensors(f))
    model = ClapAudioModelWithProjection(cfg)
    _load_state_strict(model, state, str(d))
    if (d / "preprocessor_config.json").is_file():
        fe = ClapFeatureExtractor.from_pretrained(d)
    else:
        warnings.warn(f"{d} has no preprocessor_config.json; using LAION's 48 kHz CLAP feature settings")
        fe = ClapFeatureExtractor(**dict(LAION_FEATURE_DEFAULTS, feature_size=cfg.num_mel_bins,
                                         truncation="fusion" if cfg.enable_fusion else "rand_trunc"))
    return model, fe, weights_sha256(files)


_CACHE: dict = {}


def load_encoder(path_or_name="default", head=None, *, window_seconds: float | None = None,
                 hop_seconds: float | None = None, device: str = "cpu", cache: bool = True,
                 audio_config_overrides: dict | None = None, feature_extractor_kwargs: dict | None = None) -> ClapEncoder:
    """Load an encoder: ``"default"`` (``checkpoints/encoder``), the project's own encoder directory
    (``encoder.json`` + HF files), a Hugging Face CLAP directory, or a LAION ``.pt`` checkpoint.

    ``head``: None, ``"default"`` (``checkpoints/head``), a head directory or a
    :class:`edmsound.head.CopyHead`; the returned encoder's name/hash then include the head's.
    Windows default to the directory's ``encoder.json`` or, for CLAP weights, the paper's 4 s / 2 s.
    Loaded towers are cached per (path, mtime) so an app loads each model once. For ``.pt`` files,
    ``audio_config_overrides`` / ``feature_extractor_kwargs`` adjust what cannot be read from the tensors
    (as in :func:`convert_laion_checkpoint`)."""
    from .head import CopyHead, load_head
    if isinstance(path_or_name, ClapEncoder):
        enc = path_or_name
    else:
        path = DEFAULT_ENCODER_DIR if str(path_or_name) == "default" else Path(path_or_name)
        if not path.exists():
            raise FileNotFoundError(f"encoder {path_or_name!r} not found: expected 'default', a directory "
                                    "(project encoder or Hugging Face CLAP) or a LAION .pt file")
        key = (str(path.resolve()), path.stat().st_mtime_ns, window_seconds, hop_seconds, device,
               json.dumps(audio_config_overrides, sort_keys=True), json.dumps(feature_extractor_kwargs, sort_keys=True))
        enc = _CACHE.get(key) if cache else None
        if enc is None:
            enc = _load_uncached(path, window_seconds, hop_seconds, device, audio_config_overrides,
                                 feature_extractor_kwargs)
            if cache:
                _CACHE[key] = enc
    if head is None:
        return enc.with_head(None) if enc.head is not None else enc
    if not isinstance(head, CopyHead):
        head = load_head(DEFAULT_HEAD_DIR if str(head) == "default" else head)
    return enc.with_head(head)


def _load_uncached(path: Path, window_seconds, hop_seconds, device, audio_config_overrides=None,
                   feature_extractor_kwargs=None) -> ClapEncoder:
    if path.is_file():
        if path.suffix not in (".pt", ".pth", ".ckpt"):
            raise ValueError(f"{path}: expected a LAION CLAP checkpoint (.pt) or a directory")
        model, fe, _, _ = _laion_model(path, audio_config_overrides, feature_extractor_kwargs)
        return ClapEncoder(model, fe, name=f"laion-clap:{path.stem}", weights_hash=file_sha256(path),
                           window_seconds=window_seconds or 4.0, hop_seconds=hop_seconds or 2.0,
                           source=str(path), device=device)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is neither a file nor a directory")
    model, fe, h = _load_hf_dir(path)
    meta_path = path / ENCODER_JSON
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != ENCODER_FORMAT:
            raise ValueError(f"{meta_path}: not an EDMSound encoder description (format {meta.get('format')!r})")
        name = meta["name"]
        ws, hs = meta["window_seconds"], meta["hop_seconds"]
    else:
        name, ws, hs = f"clap-hf:{path.resolve().name}", min(4.0, float(fe.max_length_s)), None
        hs = min(2.0, ws / 2) if hs is None else hs
    return ClapEncoder(model, fe, name=name, weights_hash=h, window_seconds=window_seconds or ws,
                       hop_seconds=hop_seconds or hs, source=str(path), device=device)


def save_encoder_dir(model, feature_extractor, out_dir, *, name: str, window_seconds: float, hop_seconds: float,
                     info: dict | None = None) -> Path:
    """Write the project's encoder directory: an HF CLAP audio-tower directory (``config.json``,
    ``preprocessor_config.json``, ``model.safetensors``) plus ``encoder.json`` (name, windows, record)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out_dir / "config.json", model.config.to_dict())
    atomic_write_json(out_dir / "preprocessor_config.json", feature_extractor.to_dict())
    atomic_save_safetensors(out_dir / "model.safetensors", model.state_dict(), metadata={"format": "pt"})
    meta = {"format": ENCODER_FORMAT, "version": 1, "name": name, "window_seconds": float(window_seconds),
            "hop_seconds": float(hop_seconds), "parameters": int(sum(p.numel() for p in model.parameters()))}
    meta.update(info or {})
    atomic_write_json(out_dir / ENCODER_JSON, meta)
    return out_dir


# --------------------------------------------------------------------------------------------------
# The embedded default: a small CLAP audio tower trained contrastively here
# --------------------------------------------------------------------------------------------------
def default_encoder_config(**overrides):
    """(ClapAudioConfig, ClapFeatureExtractor) of the embedded default encoder: 16 kHz, 0.5 s windows,
    32 mel bins (n_fft 512, hop 64 -> 126 frames), spec_size 64, depths [1, 1, 1], 0.4M parameters."""
    from transformers import ClapAudioConfig, ClapFeatureExtractor
    fe_kw = dict(feature_size=32, sampling_rate=16000, hop_length=64, fft_window_size=512, max_length_s=0.5,
                 frequency_min=50, frequency_max=8000, truncation="rand_trunc", padding="repeatpad")
    fe_kw.update(overrides.pop("feature_extractor", {}))
    cfg = dict(spec_size=64, num_mel_bins=fe_kw["feature_size"], patch_embeds_hidden_size=32, depths=[1, 1, 1],
               num_attention_heads=[2, 4, 8], window_size=4, projection_dim=256, hidden_dropout_prob=0.0,
               enable_fusion=False)
    cfg.update(overrides)
    cfg["hidden_size"] = cfg["patch_embeds_hidden_size"] * 2 ** (len(cfg["depths"]) - 1)
    return ClapAudioConfig(**cfg), ClapFeatureExtractor(**fe_kw)


def _nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> tuple[torch.Tensor, float]:
    """Symmetric InfoNCE over 2B views (SimCLR's NT-Xent): each view's positive is its pair."""
    z = torch.cat([z1, z2])
    sim = z @ z.t() / temperature
    sim.fill_diagonal_(float("-inf"))
    b = len(z1)
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(0, b)]).to(z.device)
    loss = F.cross_entropy(sim, target)
    acc = (sim.argmax(1) == target).float().mean().item()
    return loss, acc


def _views(waves: np.ndarray, idx: np.ndarray, window: int, sr: int, aug, rng) -> tuple[list, list]:
    """Two augmented windows per clip, cut at offsets up to ``aug.max_offset_seconds`` apart (windows may
    run up to 0.1 s past either end, zero-filled, like a shifted copy)."""
    L = waves.shape[1]
    slack = int(0.1 * sr)
    dmax = int(aug.max_offset_seconds * sr)
    a, b = [], []
    for i in idx:
        x = np.pad(waves[i], (slack, slack))
        lo, hi = 0, len(x) - window
        base = int(rng.integers(lo, hi + 1))
        for out in (a, b):
            s = int(np.clip(base + rng.integers(-dmax, dmax + 1), lo, hi))
            out.append(aug(x[s:s + window], rng))
    return a, b


def train_encoder(data_dir, out_dir, *, epochs: float = 2.0, batch_size: int = 64, lr: float = 2e-3,
                  temperature: float = 0.1, max_minutes: float | None = None, seed: int = 0,
                  state_dir=None, resume: bool = True, progress: bool = True, threads: int | None = None,
                  checkpoint_every: int = 25, config_overrides: dict | None = None,
                  name: str = "edmsound-clap-tiny") -> dict:
    """Train the default encoder contrastively on a class-per-folder tree and write it to ``out_dir``.

    Positives are two views of one clip (windows cut up to 0.15 s apart, gain, noise at high SNR, mild
    EQ: :class:`edmsound.augment.ContrastiveAugment`); negatives are the other clips in the batch
    (NT-Xent). Training state (weights, AdamW moments, step) is saved atomically every
    ``checkpoint_every`` steps to ``state_dir`` (default ``out_dir/train_state``) and resumed from it.
    ``max_minutes`` stops early (the encoder written is the last step's)."""
    from transformers import ClapAudioModelWithProjection
    from .augment import ContrastiveAugment
    from .data import load_folder
    from .presets import get_preset

    if threads:
        torch.set_num_threads(int(threads))
    out_dir = Path(out_dir)
    state_dir = Path(state_dir) if state_dir is not None else out_dir / "train_state"
    cfg, fe = default_encoder_config(**(config_overrides or {}))
    codec = get_preset("default").codec
    sr = int(fe.sampling_rate)
    data = load_folder(data_dir, sr, int(round(codec.seconds * sr)), progress=progress, verbose=progress)
    torch.manual_seed(seed)
    model = ClapAudioModelWithProjection(cfg)
    frontend = ClapFrontend(fe, fusion=False)
    window = frontend.max_length
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    steps_per_epoch = max(1, math.ceil(len(data) / batch_size))
    total = max(1, int(round(epochs * steps_per_epoch)))
    warmup = min(50, total // 10 + 1)
    step, history = 0, []
    if resume and (state_dir / "state.json").is_file():
        st = json.loads((state_dir / "state.json").read_text())
        model.load_state_dict(load_safetensors(state_dir / "model.safetensors"))
        optimizer_from_flat(opt, load_safetensors(state_dir / "optimizer.safetensors"), st["optimizer"])
        step, history = int(st["step"]), list(st.get("history", []))
        total = int(st.get("total_steps", total))
        print(f"resuming encoder training at step {step}/{total}")
    aug = ContrastiveAugment()

    def lr_at(s):
        if s < warmup:
            return lr * (s + 1) / warmup
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warmup) / max(1, total - warmup)))))

    def save_state():
        tensors, meta = optimizer_to_flat(opt)
        atomic_save_safetensors(state_dir / "model.safetensors", model.state_dict())
        atomic_save_safetensors(state_dir / "optimizer.safetensors", tensors)
        atomic_write_json(state_dir / "state.json", {"step": step, "total_steps": total, "optimizer": meta,
                                                     "history": history[-200:]})

    t0 = time.time()
    model.train()
    bar = tqdm(total=total, initial=step, desc="encoder", unit="step", disable=not progress)
    stopped_early = False
    while step < total:
        if max_minutes is not None and time.time() - t0 > 60 * max_minutes:
            stopped_early = True
            break
        rng = np.random.default_rng([seed, step])
        epoch, pos = divmod(step, steps_per_epoch)
        perm = np.random.default_rng([seed, epoch]).permutation(len(data))
        idx = perm[pos * batch_size:(pos + 1) * batch_size]
        if len(idx) < 2:
            idx = perm[:batch_size]
        a, b = _views(data.waves, idx, window, sr, aug, rng)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        feats, _ = frontend(a + b)
        z = F.normalize(model(input_features=feats).audio_embeds, dim=-1)
        loss, acc = _nt_xent(z[:len(a)], z[len(a):], temperature)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        history.append({"step": step, "loss": round(loss.item(), 4), "acc": round(acc, 4)})
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.2f}")
        bar.update(1)
        if step % checkpoint_every == 0:
            save_state()
    bar.close()
    save_state()
    wall = time.time() - t0
    model.eval()
    recent = history[-20:]
    training = {
        "data": str(data_dir), "clips": len(data), "classes": data.classes, "steps": step,
        "total_steps": total, "epochs": round(step / steps_per_epoch, 3), "batch_size": batch_size,
        "lr": lr, "temperature": temperature, "seed": seed, "wall_seconds_this_session": round(wall, 1),
        "stopped_early": stopped_early,
        "final_loss": float(np.mean([h["loss"] for h in recent])) if recent else None,
        "final_in_batch_top1": float(np.mean([h["acc"] for h in recent])) if recent else None,
        "objective": "NT-Xent (in-batch negatives), audio-audio positives (ContrastiveAugment)",
    }
    save_encoder_dir(model, fe, out_dir, name=name, window_seconds=window / sr, hop_seconds=window / sr / 2,
                     info={"training": training})
    info = json.loads((out_dir / ENCODER_JSON).read_text())
    return info
