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
  layout by the table in :mod:`edmsound.copydetect.laion` (``convert_laion_checkpoint`` writes an HF dir);
* the project's own encoder directory (an HF directory plus ``encoder.json``), e.g. the embedded
  default in ``checkpoints/encoder/``: a small CLAP audio tower trained here contrastively
  (:func:`edmsound.copydetect.pretrain.train_encoder`, audio-audio positives, NT-Xent with in-batch negatives).

:func:`load_encoder` recognises all three and optionally applies a copy-detection head
(:mod:`edmsound.head`). Nothing is downloaded: paths are local.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import soxr
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.storage import (REPO_ROOT, atomic_save_safetensors, atomic_write_json, file_sha256, load_safetensors,
                            weights_sha256)
from .laion import LAION_FEATURE_DEFAULTS, _laion_model, _load_state_strict
from .windows import WindowEmbeddings, _as_clip_list, level_db, window_starts

__all__ = ["ClapFrontend", "ClapEncoder", "load_encoder", "save_encoder_dir", "DEFAULT_ENCODER_DIR",
           "DEFAULT_HEAD_DIR"]

DEFAULT_ENCODER_DIR = REPO_ROOT / "checkpoints" / "encoder"
DEFAULT_HEAD_DIR = REPO_ROOT / "checkpoints" / "head"
ENCODER_JSON = "encoder.json"
ENCODER_FORMAT = "edmsound-encoder"


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


def _window(clip: np.ndarray, start: int, length: int) -> np.ndarray:
    """``clip[start:start + length]``, zero-padded to ``length``: a clip shorter than a window is embedded
    the same way whether it is indexed or queried (never tiled by the front end)."""
    w = clip[start:start + length]
    return w if len(w) == length else np.pad(w, (0, length - len(w)))


# --------------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------------
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
                out[i:i + len(chunk)] = self.embed_window_batch([_window(clips[ci], s, W) for ci, s in chunk],
                                                                apply_head)
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


