"""Figures of complex spectrograms (matplotlib, Agg backend)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

MODES = ("magphase", "realimag")


def spectrogram_figure(spec: torch.Tensor, codec, mode: str = "magphase", title: str | None = None,
                       marks: list[tuple[float, float, str]] | None = None):
    """One clip's complex spectrogram (2, F, T): log magnitude + phase, or the real/imag channels as
    the model sees them. ``marks`` = [(start_s, end_s, label)] shades time windows (copy detection)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(MODES)}")
    spec = spec.detach().float().cpu()
    if spec.dim() == 4:
        spec = spec[0]
    cfg = codec.config
    dur = (spec.shape[-1] - 1) * cfg.hop_length / cfg.sample_rate          # any length (long clips, loops)
    extent = [0, dur, 0, cfg.sample_rate / 2000]
    if spec.shape[0] == 1:                       # a magnitude-only representation: no phase to show
        mag = codec.magnitude_db(spec[None])[0].numpy()
        panels = [("log magnitude (dB)", mag, "magma", (mag.max() - 80, mag.max())),
                  ("compressed magnitude (the model's channel)", spec[0].numpy(), "magma",
                   (0.0, float(spec.max()) or 1.0))]
    elif mode == "magphase":
        X = codec.decompress(codec.to_complex(spec[None])[0])
        mag = 20 * np.log10(np.maximum(X.abs().numpy(), 1e-5))
        panels = [("log magnitude (dB)", mag, "magma", (mag.max() - 80, mag.max())),
                  ("phase (rad)", X.angle().numpy(), "twilight", (-np.pi, np.pi))]
    else:
        v = float(spec.abs().max()) or 1.0
        panels = [("real (compressed)", spec[0].numpy(), "RdBu_r", (-v, v)),
                  ("imaginary (compressed)", spec[1].numpy(), "RdBu_r", (-v, v))]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.2), constrained_layout=True)
    for ax, (name, img, cmap, (lo, hi)) in zip(axes, panels):
        im = ax.imshow(img, origin="lower", aspect="auto", cmap=cmap, vmin=lo, vmax=hi, extent=extent,
                       interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("time (s)")
        ax.set_ylabel("kHz")
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02)
        for start, end, label in marks or []:
            ax.axvspan(start, end, color="cyan", alpha=0.18)
            ax.text(start, extent[3] * 0.93, label, color="cyan", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig


def save_figure(fig, path):
    fig.savefig(path, dpi=100)
    plt.close(fig)
