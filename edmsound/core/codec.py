"""Complex-spectrogram codec: wave <-> compressed complex STFT as 2 real channels.

EDMSound (Zhu et al. 2023, Sec. 2): X = STFT(x) with a periodic Hann window, center=True; amplitude
compression  X~ = alpha * |X|^beta * exp(i * angle(X)); real and imaginary parts become channels.
The inverse undoes the compression exactly and applies the iSTFT with ``length=``: no vocoder and no
phase reconstruction are needed. An optional gain per frequency bin (``freq_scale``, stored with the
model) multiplies both channels after the compression and is divided out before the inverse, so decoding stays
exact; :func:`whitening_scale` chooses it from a training set. An optional gain per class and bin
(``class_scale``) goes one step further: it is not part of the clip's spectrogram but of the diffusion state of
that class (:meth:`SpectrogramCodec.to_model` / :meth:`SpectrogramCodec.from_model`), so each class's every bin
sits at the same scale while encoding and decoding stay class-free; :func:`class_whitening_scale` chooses it.
Besides the model's fixed clip length,
spectrograms of any number of frames (long clips made window by window) and circular ones (loops: the frame
after the last is the first) decode exactly too.
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from .presets import CodecConfig


class SpectrogramCodec:
    def __init__(self, config: CodecConfig):
        if not 0 < config.hop_length <= config.n_fft // 2 + 1:
            raise ValueError(
                f"hop_length must be in [1, n_fft/2 + 1 = {config.n_fft // 2 + 1}] (got {config.hop_length}): with "
                "less than ~50% Hann overlap the STFT is not well conditioned for an exact inverse")
        if not (0 < config.beta <= 1) or config.alpha <= 0:
            raise ValueError(f"need 0 < beta <= 1 and alpha > 0, got beta={config.beta}, alpha={config.alpha}")
        if config.freq_scale is not None:
            if config.representation != "complex":
                raise ValueError("freq_scale applies to the complex representation only")
            if len(config.freq_scale) != config.num_bins:
                raise ValueError(f"freq_scale needs one gain per frequency bin ({config.num_bins}), "
                                 f"got {len(config.freq_scale)}")
            if not all(math.isfinite(g) and g > 0 for g in config.freq_scale):
                raise ValueError("freq_scale gains must be finite and > 0")
        if config.class_scale is not None:
            if config.representation != "complex":
                raise ValueError("class_scale applies to the complex representation only")
            if any(len(row) != config.num_bins for row in config.class_scale):
                raise ValueError(f"class_scale needs one gain per class and frequency bin ({config.num_bins} per "
                                 "class)")
            if not all(math.isfinite(g) and g > 0 for row in config.class_scale for g in row):
                raise ValueError("class_scale gains must be finite and > 0")
        self.config = config
        self._windows: dict[tuple, torch.Tensor] = {}
        self._class_table = (None if config.class_scale is None       # (K, F), built once
                             else torch.tensor(config.class_scale, dtype=torch.float64))

    # --- shape ---------------------------------------------------------------------------------
    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def num_samples(self) -> int:
        return self.config.num_samples

    @property
    def shape(self) -> tuple[int, int, int]:
        """Shape (C, F, T) of one encoded clip (C = 2: real and imaginary)."""
        return (self.config.channels, self.config.num_bins, self.config.num_frames)

    def _window(self, device, dtype) -> torch.Tensor:
        key = (str(device), dtype)
        if key not in self._windows:
            self._windows[key] = torch.hann_window(self.config.n_fft, periodic=True, device=device, dtype=dtype)
        return self._windows[key]

    def fit_length(self, wave: torch.Tensor) -> torch.Tensor:
        """Cut or zero-pad the last axis to ``num_samples``."""
        n = self.num_samples
        if wave.shape[-1] >= n:
            return wave[..., :n]
        return torch.nn.functional.pad(wave, (0, n - wave.shape[-1]))

    # --- forward / inverse -----------------------------------------------------------------------
    def compress(self, X: torch.Tensor) -> torch.Tensor:
        """alpha * |X|^beta * e^{i angle X} for a complex tensor."""
        c = self.config
        return torch.polar(c.alpha * X.abs() ** c.beta, X.angle())

    def decompress(self, Y: torch.Tensor) -> torch.Tensor:
        c = self.config
        return torch.polar((Y.abs() / c.alpha) ** (1.0 / c.beta), Y.angle())

    def _gain(self, like: torch.Tensor) -> torch.Tensor | None:
        """The per-bin gain as an (F, 1) column in ``like``'s real dtype and device, or None."""
        if self.config.freq_scale is None:
            return None
        dtype = like.real.dtype if like.is_complex() else like.dtype
        return torch.tensor(self.config.freq_scale, dtype=torch.float64).to(like.device, dtype)[:, None]

    def frames_for(self, num_samples: int) -> int:
        """Frames of the centred STFT of a wave of ``num_samples`` samples."""
        return 1 + int(num_samples) // self.config.hop_length

    def encode(self, wave, fit: bool = True) -> torch.Tensor:
        """(B, N) or (N,) wave (numpy or torch) -> (B, 2, F, T) float tensor; ``fit=False`` keeps the
        wave's own length (T = 1 + N // hop) instead of cutting or padding it to the model's clip."""
        if isinstance(wave, np.ndarray):
            wave = torch.from_numpy(wave)
        if wave.dim() == 1:
            wave = wave[None]
        if not wave.is_floating_point():
            raise TypeError("encode expects a floating-point wave")
        if fit:
            wave = self.fit_length(wave)
        c = self.config
        X = torch.stft(wave, n_fft=c.n_fft, hop_length=c.hop_length, win_length=c.n_fft,
                       window=self._window(wave.device, wave.dtype), center=True, pad_mode="reflect",
                       return_complex=True)
        Y = self.compress(X)
        g = self._gain(Y)
        if g is not None:
            Y = Y * g
        return torch.stack([Y.real, Y.imag], dim=1).contiguous()

    def to_complex(self, spec: torch.Tensor) -> torch.Tensor:
        """(B, 2, F, T) -> (B, F, T) complex, still compressed (the per-bin gain divided out)."""
        if spec.dim() != 4 or spec.shape[1] != 2:
            raise ValueError(f"expected (B, 2, F, T), got {tuple(spec.shape)}")
        Y = torch.complex(spec[:, 0].contiguous(), spec[:, 1].contiguous())
        g = self._gain(Y)
        return Y if g is None else Y / g

    def decode(self, spec: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """(B, 2, F, T) -> (B, length) wave, the exact inverse of ``encode``; ``length`` defaults to the
        model's clip length (``num_samples``) and may be any length up to (T - 1) * hop."""
        spec = spec.float() if spec.dtype in (torch.float16, torch.bfloat16) else spec
        X = self.decompress(self.to_complex(spec))
        c = self.config
        return torch.istft(X, n_fft=c.n_fft, hop_length=c.hop_length, win_length=c.n_fft,
                           window=self._window(X.device, spec.dtype), center=True,
                           length=self.num_samples if length is None else int(length))

    # --- the diffusion state of a class ---------------------------------------------------------------
    def class_gain(self, labels: torch.Tensor, like: torch.Tensor) -> torch.Tensor | None:
        """The per-class gains of ``labels`` (B,) as a (B, 1, F, 1) tensor in ``like``'s dtype and device, or
        None when the model has none."""
        table = self._class_table
        if table is None:
            return None
        labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1).cpu()
        if len(labels) and (labels.min() < 0 or labels.max() >= len(table)):
            raise ValueError(f"class index out of range: the model's class_scale has {len(table)} classes")
        return table[labels].to(like.device, like.dtype)[:, None, :, None]      # one label broadcasts over B

    def to_model(self, spec: torch.Tensor, labels) -> torch.Tensor:
        """An encoded spectrogram (B, C, F, T) -> the diffusion state of its class (``labels``: B class
        indices, or one for all): multiplied by the class's gains; unchanged without ``class_scale``."""
        g = self.class_gain(labels, spec)
        return spec if g is None else spec * g

    def from_model(self, state: torch.Tensor, labels) -> torch.Tensor:
        """The inverse of :meth:`to_model`: a class's diffusion state -> its encoded spectrogram."""
        g = self.class_gain(labels, state)
        return state if g is None else state / g

    def decode_loop(self, spec: torch.Tensor) -> torch.Tensor:
        """A circular spectrogram (frame T follows frame T - 1 as frame 0) -> one period of T * hop samples.

        The frames are wrapped around on both sides before the inverse STFT, so every sample of the period
        is the overlap-add of the same frames a periodic signal would have: played back to back, the period
        has no seam. Exact: the period of a periodic wave encoded with :meth:`encode` comes back."""
        c = self.config
        T = spec.shape[-1]
        pad = -(-c.n_fft // c.hop_length)           # frames whose windows reach into the period from outside
        if pad > T:
            raise ValueError(f"a loop needs at least {pad} frames, got {T}")
        ring = torch.cat([spec[..., T - pad:], spec, spec[..., :pad]], dim=-1)
        wave = self.decode(ring, length=(T + 2 * pad - 1) * c.hop_length)
        start = pad * c.hop_length
        return wave[..., start:start + T * c.hop_length]

    def magnitude_db(self, spec: torch.Tensor) -> torch.Tensor:
        """Log magnitude (dB) of the uncompressed STFT, for plots."""
        X = self.decompress(self.to_complex(spec))
        return 20 * torch.log10(X.abs().clamp_min(1e-5))


class MagnitudeCodec(SpectrogramCodec):
    """The magnitude-only baseline: the model sees alpha * |X|^beta (one channel) and the phase is recovered at
    decoding by fast Griffin-Lim (Perraudin et al. 2013, momentum 0.99; Griffin & Lim 1984) from a fixed random
    start, ``griffin_lim_iters`` iterations. Decoding is no longer exact: the round trip of a real clip keeps its
    magnitudes only up to what the iterations find a consistent phase for."""

    MOMENTUM = 0.99

    def encode(self, wave, fit: bool = True) -> torch.Tensor:
        spec = super().encode(wave, fit)
        return torch.sqrt(spec[:, 0] ** 2 + spec[:, 1] ** 2)[:, None]

    def magnitude(self, spec: torch.Tensor) -> torch.Tensor:
        """(B, 1, F, T) compressed magnitude -> (B, F, T) linear magnitude (negative values count as 0)."""
        c = self.config
        return (spec[:, 0].float().clamp_min(0) / c.alpha) ** (1.0 / c.beta)

    def decode(self, spec: torch.Tensor, length: int | None = None) -> torch.Tensor:
        if spec.dim() != 4 or spec.shape[1] != 1:
            raise ValueError(f"expected (B, 1, F, T), got {tuple(spec.shape)}")
        return self.griffin_lim(self.magnitude(spec), length)

    def griffin_lim(self, mag: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """(B, F, T) linear STFT magnitudes -> (B, length) wave with a phase found by fast Griffin-Lim."""
        c = self.config
        length = self.num_samples if length is None else int(length)
        win = self._window(mag.device, mag.dtype)
        kw = dict(n_fft=c.n_fft, hop_length=c.hop_length, win_length=c.n_fft, window=win, center=True)
        g = torch.Generator().manual_seed(0)
        phase = torch.rand(mag.shape, generator=g).to(mag.device) * 2 * torch.pi
        X = torch.polar(mag, phase)
        prev = torch.zeros_like(X)
        for _ in range(max(1, c.griffin_lim_iters)):
            wave = torch.istft(X, length=length, **kw)
            Y = torch.stft(wave, pad_mode="reflect", return_complex=True, **kw)
            Z = Y + self.MOMENTUM * (Y - prev) if self.MOMENTUM else Y     # fast Griffin-Lim
            prev = Y
            X = torch.polar(mag, Z.angle())
        return torch.istft(X, length=length, **kw)

    def magnitude_db(self, spec: torch.Tensor) -> torch.Tensor:
        return 20 * torch.log10(self.magnitude(spec).clamp_min(1e-5))

    def to_complex(self, spec: torch.Tensor) -> torch.Tensor:
        raise ValueError("a magnitude-only spectrogram has no phase (its codec recovers one when decoding)")

    def decode_loop(self, spec: torch.Tensor) -> torch.Tensor:
        raise ValueError("loops need the complex representation")


class MelCodec(MagnitudeCodec):
    """The log-mel cascade baseline without a trained vocoder: the model sees a log mel spectrogram (as many mel
    bands as STFT bins, so the U-Net's shape is unchanged), ``(log10(mel power + 1e-5) + 4) / 6`` — centred and
    scaled like the complex codec's data (built-in foley: mean -0.02, std 0.20 = sigma_data), so the same EDM
    preconditioning fits every representation; decoding
    maps it back to linear magnitudes through the filterbank's pseudo-inverse (negative power clipped) and finds a
    phase by fast Griffin-Lim. Both steps lose information: the round trip is further from the clip than the
    magnitude codec's."""

    FLOOR, OFFSET, SCALE = 1e-5, 4.0, 6.0

    def __init__(self, config: CodecConfig):
        super().__init__(config)
        from ..audio.mel import mel_filterbank
        fb = torch.from_numpy(mel_filterbank(config.sample_rate, config.n_fft, config.num_bins))   # (F, M)
        self.fb = fb
        self.fb_pinv = torch.linalg.pinv(fb.double()).float()                                        # (M, F)

    def encode(self, wave, fit: bool = True) -> torch.Tensor:
        mag = super().magnitude(super().encode(wave, fit))             # (B, F, T) linear |X|
        mel = torch.einsum("fm,bft->bmt", self.fb.to(mag.dtype), mag ** 2)
        return ((torch.log10(mel + self.FLOOR) + self.OFFSET) / self.SCALE)[:, None]

    def magnitude(self, spec: torch.Tensor) -> torch.Tensor:
        mel = (10 ** (spec[:, 0].float() * self.SCALE - self.OFFSET) - self.FLOOR).clamp_min(0)
        power = torch.einsum("mf,bmt->bft", self.fb_pinv, mel).clamp_min(0)
        return power.sqrt()


REPRESENTATIONS = ("complex", "magnitude", "mel")


def whitening_scale(codec: SpectrogramCodec, waves, target_rms: float, batch: int = 256,
                    limits: tuple[float, float] = (0.25, 4.0)) -> tuple[float, ...]:
    """Per-bin gains that give every frequency bin of ``waves`` (N, samples) the RMS ``target_rms`` (the
    preconditioning's sigma_data) in ``codec``'s representation without a gain: gain_f = target / RMS_f over
    clips, channels and frames, clipped to ``limits`` (a bin that is almost silent in the data is not blown up).
    Compressed spectra fall with frequency, so the quiet high bins get gains > 1: their detail then survives
    to the same noise levels as the loud low bins' and weighs as much in the training loss."""
    if codec.config.representation != "complex":
        raise ValueError("freq_scale applies to the complex representation only")
    waves = torch.as_tensor(waves)
    if len(waves) == 0:
        raise ValueError("no clips to measure the per-bin scale on")
    plain = SpectrogramCodec(dataclasses.replace(codec.config, freq_scale=None))
    rms, _ = _bin_rms(plain, waves, torch.zeros(len(waves), dtype=torch.long), 1, batch)
    lo, hi = limits
    gains = (target_rms / rms[0].clamp_min(1e-12)).clamp(lo, hi)
    return tuple(round(float(g), 5) for g in gains)


def _bin_rms(codec: SpectrogramCodec, waves: torch.Tensor, labels: torch.Tensor, num_classes: int,
             batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """RMS per (class, bin) of ``codec``'s encoding of ``waves`` over clips, channels and frames, float64, and
    the number of clips per class."""
    power = torch.zeros(num_classes, codec.config.num_bins, dtype=torch.float64)
    clips = torch.zeros(num_classes, dtype=torch.float64)
    for i in range(0, len(waves), batch):
        spec = codec.encode(waves[i:i + batch].float()).double()
        lab = labels[i:i + batch]
        power.index_add_(0, lab, spec.pow(2).mean(dim=(1, 3)))
        clips.index_add_(0, lab, torch.ones(len(lab), dtype=torch.float64))
    return (power / clips.clamp_min(1)[:, None]).sqrt(), clips


def class_whitening_scale(codec: SpectrogramCodec, waves, labels, num_classes: int, target_rms: float,
                          batch: int = 256, limits: tuple[float, float] = (0.25, 4.0)
                          ) -> tuple[tuple[float, ...], ...]:
    """Per-class, per-bin gains on top of ``codec``'s own (its ``freq_scale``): gain_{c,f} = target / RMS of bin f
    over the clips of class c in ``codec``'s representation, clipped to ``limits``. A band that is quiet in one
    class but not in the training set as a whole (an engine's top octave, a gunshot's blast) is then lifted for
    that class alone, so its detail is decided at the same noise levels as every other band's and weighs as much in
    the loss. A class without clips keeps gain 1."""
    if codec.config.representation != "complex":
        raise ValueError("class_scale applies to the complex representation only")
    waves = torch.as_tensor(waves)
    labels = torch.as_tensor(labels, dtype=torch.long)
    if len(waves) == 0 or len(waves) != len(labels):
        raise ValueError("need one label per clip, and at least one clip, to measure the per-class scale")
    rms, clips = _bin_rms(codec, waves, labels, num_classes, batch)     # encoding is class-free
    lo, hi = limits
    gains = (target_rms / rms.clamp_min(1e-12)).clamp(lo, hi)
    gains[clips == 0] = 1.0
    return tuple(tuple(round(float(g), 5) for g in row) for row in gains)


def make_codec(config: CodecConfig) -> SpectrogramCodec:
    """The codec of a preset's representation."""
    if config.representation not in REPRESENTATIONS:
        raise ValueError(f"unknown representation {config.representation!r}; valid: {', '.join(REPRESENTATIONS)}")
    return {"complex": SpectrogramCodec, "magnitude": MagnitudeCodec, "mel": MelCodec}[config.representation](config)
