"""Signal-level fingerprints for copy detection: what a clip *is*, as a plain signal measure.

The learned embedding (CLAP + head) judges similarity by what a network was trained to see; this tier
judges it by the signal itself, so a copy is caught even where the network is blind, and a listener can
check the figure. Each clip becomes one vector built from its log-mel spectrogram (``n_mels`` bands,
50 Hz to Nyquist) after three normalisations:

- **gain**: levels are taken relative to the clip's loudest time-frequency cell (a copy at another gain
  is the same vector);
- **onset**: the clip is read from its first sample within ``onset_db`` of its peak (a copy with a
  lead-in of silence or noise starts at the same place), ``seconds`` long, zero-padded when shorter;
- **floor**: cells more than ``floor_db`` below the peak are clamped (noise far below the sound is
  ignored).

The vector concatenates the aligned envelope (bands x frames, the shape of the sound in time) and the
per-band mean and standard deviation over the whole clip (its spectrum, insensitive to alignment),
each part centred and scaled to unit norm, weighted and renormalised: the inner product of two
fingerprints is a correlation in [-1, 1], 1 for gain-scaled, shifted or faintly noisy copies.

Bralios et al. (ICASSP 2024) found mel-spectrogram similarity more reliable than learned embeddings
for spotting training-data replication; this is that measure, made gain- and onset-invariant.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import soxr
import torch

__all__ = ["SignalConfig", "signal_fingerprints", "onset_sample", "calibrate_copy_level"]


@dataclass(frozen=True)
class SignalConfig:
    sample_rate: int = 16000
    n_fft: int = 1024
    hop: int = 512
    n_mels: int = 32
    seconds: float = 1.0           # aligned part compared after the onset
    onset_db: float = 30.0         # onset = first sample within this of the clip's peak
    floor_db: float = 60.0         # cells this far below the loudest are clamped
    envelope_weight: float = 0.7   # share of the aligned envelope vs the whole-clip spectrum (by norm)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def frames(self) -> int:
        return 1 + int(round(self.seconds * self.sample_rate)) // self.hop

    @property
    def dim(self) -> int:
        return self.n_mels * self.frames + 2 * self.n_mels


def _mel_filters(cfg: SignalConfig) -> torch.Tensor:
    """Slaney-style triangular mel filters (n_fft//2+1, n_mels), float64."""
    def hz_to_mel(f):
        return 2595.0 * np.log10(1.0 + np.asarray(f, np.float64) / 700.0)

    def mel_to_hz(m):
        return 700.0 * (10.0 ** (np.asarray(m, np.float64) / 2595.0) - 1.0)

    freqs = np.linspace(0, cfg.sample_rate / 2, cfg.n_fft // 2 + 1)
    edges = mel_to_hz(np.linspace(hz_to_mel(50.0), hz_to_mel(cfg.sample_rate / 2), cfg.n_mels + 2))
    lo, mid, hi = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    up = (freqs[None] - lo) / np.maximum(mid - lo, 1e-9)
    down = (hi - freqs[None]) / np.maximum(hi - mid, 1e-9)
    fb = np.maximum(0.0, np.minimum(up, down)) * (2.0 / (hi - lo))
    return torch.from_numpy(fb.T.copy())


def onset_sample(wave: np.ndarray, onset_db: float) -> int:
    """First sample whose magnitude is within ``onset_db`` of the clip's peak (0 for silence)."""
    a = np.abs(np.asarray(wave))
    peak = float(a.max()) if len(a) else 0.0
    if peak <= 0.0:
        return 0
    return int(np.argmax(a >= peak * 10.0 ** (-onset_db / 20.0)))


def _unit(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(axis=1, keepdims=True)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _log_mel(x: np.ndarray, cfg: SignalConfig, fb: torch.Tensor) -> np.ndarray:
    """(L,) -> (frames, n_mels) power in dB."""
    n = cfg.n_fft
    if len(x) < n:
        x = np.pad(x, (0, n - len(x)))
    t = torch.from_numpy(np.ascontiguousarray(x, np.float64))
    spec = torch.stft(t, n, cfg.hop, window=torch.hann_window(n, dtype=torch.float64), center=True,
                      pad_mode="constant", return_complex=True)
    power = spec.real.square() + spec.imag.square()
    mel = (power.T @ fb).clamp_min(1e-20)
    return (10.0 * torch.log10(mel)).numpy()


def signal_fingerprints(waves, sample_rate: int, cfg: SignalConfig = SignalConfig(),
                        progress: bool = False) -> np.ndarray:
    """(N, cfg.dim) float32 unit vectors, one per clip (list of 1-D arrays or an (N, L) array)."""
    from tqdm.auto import tqdm
    fb = _mel_filters(cfg)
    F = cfg.frames
    out = np.zeros((len(waves), cfg.dim), np.float32)
    for i, w in enumerate(tqdm(waves, desc="signal fingerprints", unit="clip", disable=not progress)):
        w = np.asarray(w, np.float32)
        if int(sample_rate) != cfg.sample_rate:
            w = soxr.resample(w, int(sample_rate), cfg.sample_rate, quality="HQ").astype(np.float32)
        whole = _log_mel(w, cfg, fb)                                       # (T, M)
        top = float(whole.max())
        whole = np.maximum(whole - top, -cfg.floor_db)
        start = onset_sample(w, cfg.onset_db)
        env = np.maximum(_log_mel(w[start:start + int(round(cfg.seconds * cfg.sample_rate))], cfg, fb) - top,
                         -cfg.floor_db)[:F]
        if len(env) < F:
            env = np.pad(env, ((0, F - len(env)), (0, 0)), constant_values=-cfg.floor_db)
        stats = np.concatenate([whole.mean(0), whole.std(0)])
        a = _unit(env.reshape(1, -1))[0] * cfg.envelope_weight
        b = _unit(stats[None])[0] * (1.0 - cfg.envelope_weight)
        v = np.concatenate([a, b])
        out[i] = v / max(np.linalg.norm(v), 1e-12)
    return out


def calibrate_copy_level(waves, sample_rate: int, fingerprints: np.ndarray, cfg: SignalConfig = SignalConfig(),
                         clips: int = 256, seed: int = 0) -> float:
    """The fingerprint similarity a plain copy of a clip reaches (:class:`edmsound.data.augment.LeadInCopy`:
    gain, lead-in, faint noise), measured on up to ``clips`` of the set's own clips: the level above
    which two clips of the set count as near-duplicates."""
    from ..data.augment import LeadInCopy
    from .duplicates import copy_level
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(waves), min(clips, len(waves)), replace=False))
    aug = LeadInCopy()
    copies = [aug(np.asarray(waves[i], np.float32), sample_rate, rng)[0] for i in pick]
    sims = np.sum(signal_fingerprints(copies, sample_rate, cfg) * fingerprints[pick], axis=1)
    return copy_level(sims)
