"""A small class classifier for evaluating generated audio ("category fit", top-k, mAP@10, IS analogue).

The papers score generated audio with a classifier trained on real data: an Inception-style network on
mel-spectrograms for the Inception Score and KID (seed 003, after GANSynth), CLAP zero-shot top-k
accuracy and mAP@10 (seed 002). This module trains such a classifier for the project's class-per-folder
datasets: a compact CNN on log-mel spectrograms.

* Front end: ``torch.stft`` (periodic Hann, centred, reflect padding) -> power -> a mel filter bank
  built here in numpy (HTK mel scale, Slaney area normalisation; no torchaudio) -> dB relative to the
  clip's own maximum, floored at ``-top_db`` and scaled to [-1, 1]. The max-relative dB makes the
  classifier blind to the overall level.
* Network: 4 blocks of conv 3x3 -> BatchNorm -> ReLU -> max-pool 2, then mean + max pooling over
  time and frequency, dropout and a linear layer (about 0.1M parameters).
* Training: AdamW, one-cycle learning rate, label smoothing 0.05, light augmentation of the waveform
  batch (random gain 0.25-1.25, time shift up to +-0.2 s with zero fill, white noise at 20-50 dB SNR
  on half the clips).

A classifier directory holds ``classifier.safetensors`` (weights) and ``classifier.json`` (config,
classes, training record, held-out accuracy), written atomically, JSON last.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soxr
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.storage import atomic_save_safetensors, atomic_write_json, load_safetensors

__all__ = ["ClassifierConfig", "mel_filterbank", "LogMel", "AudioCNN", "AudioClassifier", "augment_batch",
           "train_classifier", "load_classifier", "accuracy_on", "DEFAULT_CLASSIFIER_DIR"]

DEFAULT_CLASSIFIER_DIR = Path(__file__).resolve().parents[2] / "checkpoints" / "classifier"
FORMAT = "edmsound-classifier"
WEIGHTS = "classifier.safetensors"
META = "classifier.json"


@dataclass(frozen=True)
class ClassifierConfig:
    sample_rate: int = 16000
    num_samples: int = 16256          # clip length the classifier sees (inputs are cut / zero-padded)
    n_fft: int = 512
    hop_length: int = 128
    n_mels: int = 64
    f_min: float = 30.0
    f_max: float | None = None        # None: sample_rate / 2
    top_db: float = 80.0
    channels: tuple[int, ...] = (16, 32, 64, 128)
    dropout: float = 0.2

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ClassifierConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown ClassifierConfig fields: {sorted(unknown)}")
        d = dict(d)
        if "channels" in d:
            d["channels"] = tuple(d["channels"])
        return cls(**d)


# ------------------------------------------------------------------------------------------ front end
from ..audio.mel import mel_filterbank  # noqa: E402,F401 - the front end's filters (public here too)


class LogMel(nn.Module):
    """Waves (B, L) -> log-mel (B, 1, n_mels, frames) in [-1, 1] (dB relative to each clip's maximum)."""

    def __init__(self, cfg: ClassifierConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("window", torch.hann_window(cfg.n_fft, periodic=True), persistent=False)
        fb = mel_filterbank(cfg.sample_rate, cfg.n_fft, cfg.n_mels, cfg.f_min, cfg.f_max)
        self.register_buffer("filters", torch.from_numpy(fb), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        if x.shape[-1] <= c.n_fft // 2:              # reflect padding needs more samples than n_fft/2
            x = F.pad(x, (0, c.n_fft // 2 + 1 - x.shape[-1]))
        spec = torch.stft(x.float(), c.n_fft, c.hop_length, window=self.window, center=True,
                          pad_mode="reflect", return_complex=True)
        power = spec.real.square() + spec.imag.square()            # (B, F, T)
        mel = torch.einsum("bft,fm->bmt", power, self.filters)
        db = 10.0 * torch.log10(mel.clamp_min(1e-10))
        db = db - db.amax(dim=(1, 2), keepdim=True)
        db = db.clamp_min(-c.top_db)
        return (db / (c.top_db / 2) + 1.0)[:, None]


class AudioCNN(nn.Module):
    """Log-mel front end + conv blocks + mean/max pooling + linear classifier."""

    def __init__(self, cfg: ClassifierConfig, num_classes: int):
        super().__init__()
        self.frontend = LogMel(cfg)
        blocks, cin = [], 1
        for cout in cfg.channels:
            blocks += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
                       nn.MaxPool2d(2, ceil_mode=True)]
            cin = cout
        self.features = nn.Sequential(*blocks)
        self.dropout = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(2 * cin, num_classes)

    def forward(self, waves: torch.Tensor) -> torch.Tensor:
        h = self.features(self.frontend(waves))
        h = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        return self.fc(self.dropout(h))


# ------------------------------------------------------------------------------------------ wrapper
def _fit_length(waves: np.ndarray, n: int) -> np.ndarray:
    if waves.shape[1] >= n:
        return waves[:, :n]
    return np.pad(waves, ((0, 0), (0, n - waves.shape[1])))


class AudioClassifier:
    """A trained classifier: ``predict_proba(waves, sample_rate) -> (N, K)`` over ``classes``."""

    def __init__(self, model: AudioCNN, classes: list[str], config: ClassifierConfig, info: dict | None = None,
                 path=None):
        self.model = model.eval()
        self.classes = list(classes)
        self.config = config
        self.info = dict(info or {})
        self.path = Path(path) if path is not None else None

    @property
    def name(self) -> str:
        return self.info.get("name", "edmsound-classifier")

    @property
    def num_parameters(self) -> int:
        return int(sum(p.numel() for p in self.model.parameters()))

    def __repr__(self):
        return (f"AudioClassifier({self.name!r}, {len(self.classes)} classes, {self.num_parameters} parameters, "
                f"{self.config.sample_rate} Hz)")

    def prepare(self, waves, sample_rate: int) -> np.ndarray:
        """(N, L) or list of 1-D clips at ``sample_rate`` -> (N, num_samples) float32 at the classifier's rate."""
        if sample_rate is None or int(sample_rate) <= 0:
            raise ValueError(f"sample_rate must be a positive integer, got {sample_rate!r}")
        if isinstance(waves, np.ndarray) and waves.ndim == 1:
            waves = waves[None]
        clips = [np.asarray(w, np.float32) for w in waves]
        if any(c.ndim != 1 for c in clips):
            raise ValueError("waves must be (N, L) or a list of 1-D clips")
        if int(sample_rate) != self.config.sample_rate:
            clips = [soxr.resample(c, int(sample_rate), self.config.sample_rate, quality="HQ").astype(np.float32)
                     for c in clips]
        n = self.config.num_samples
        out = np.zeros((len(clips), n), np.float32)
        for i, c in enumerate(clips):
            if not np.all(np.isfinite(c)):
                raise ValueError(f"clip {i} contains NaN or Inf samples")
            out[i, :min(n, len(c))] = c[:n]
        return out

    @torch.no_grad()
    def logits(self, waves, sample_rate: int, batch_size: int = 128) -> np.ndarray:
        x = self.prepare(waves, sample_rate)
        self.model.eval()
        out = [self.model(torch.from_numpy(x[i:i + batch_size])).float().numpy()
               for i in range(0, len(x), batch_size)]
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), np.float32)

    def predict_proba(self, waves, sample_rate: int, batch_size: int = 128) -> np.ndarray:
        """Class probabilities (N, K), rows summing to 1, columns in the order of ``self.classes``."""
        z = self.logits(waves, sample_rate, batch_size)
        z = z - z.max(axis=1, keepdims=True)
        p = np.exp(z.astype(np.float64))
        return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)

    def predict(self, waves, sample_rate: int) -> list[str]:
        return [self.classes[i] for i in self.predict_proba(waves, sample_rate).argmax(axis=1)]

    def save(self, out_dir) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors(out_dir / WEIGHTS, self.model.state_dict(), metadata={"format": FORMAT})
        meta = {"format": FORMAT, "version": 1, "name": self.name, "classes": self.classes,
                "config": self.config.to_dict(), "parameters": self.num_parameters}
        meta.update({k: v for k, v in self.info.items() if k not in meta})
        atomic_write_json(out_dir / META, meta)
        self.path = out_dir
        return out_dir

    @classmethod
    def load(cls, path) -> "AudioClassifier":
        path = Path(path)
        meta_path = path / META
        if not meta_path.is_file():
            raise FileNotFoundError(f"{path} is not a classifier directory: expected {META} and {WEIGHTS} "
                                    "(written by 'edmsound classifier train')")
        meta = json.loads(meta_path.read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path}: not an EDMSound classifier (format {meta.get('format')!r})")
        cfg = ClassifierConfig.from_dict(meta["config"])
        model = AudioCNN(cfg, len(meta["classes"]))
        state = load_safetensors(path / WEIGHTS)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{path / WEIGHTS} does not fit the classifier config: missing {missing[:4]}, "
                             f"unexpected {unexpected[:4]}")
        info = {k: v for k, v in meta.items() if k not in ("format", "version", "classes", "config", "parameters")}
        return cls(model, meta["classes"], cfg, info, path)


def load_classifier(path="default") -> AudioClassifier:
    """``"default"`` (``checkpoints/classifier``) or a classifier directory."""
    return AudioClassifier.load(DEFAULT_CLASSIFIER_DIR if str(path) == "default" else path)


# ------------------------------------------------------------------------------------------ training
def augment_batch(x: torch.Tensor, gen: torch.Generator, sample_rate: int, max_shift_s: float = 0.2,
                  gain=(0.25, 1.25), snr_db=(20.0, 50.0), noise_prob: float = 0.5) -> torch.Tensor:
    """Light waveform augmentation of a batch (B, L): random gain, time shift with zero fill, white noise."""
    b, n = x.shape
    g = gain[0] + (gain[1] - gain[0]) * torch.rand(b, 1, generator=gen)
    x = x * g
    max_shift = int(round(max_shift_s * sample_rate))
    if max_shift > 0:
        shifts = torch.randint(-max_shift, max_shift + 1, (b,), generator=gen)
        idx = torch.arange(n)[None, :] - shifts[:, None]
        valid = (idx >= 0) & (idx < n)
        x = torch.where(valid, torch.gather(x, 1, idx.clamp(0, n - 1)), torch.zeros(()))
    power = x.square().mean(dim=1, keepdim=True)
    snr = snr_db[0] + (snr_db[1] - snr_db[0]) * torch.rand(b, 1, generator=gen)
    sigma = torch.sqrt(power / 10.0 ** (snr / 10.0))
    use = (torch.rand(b, 1, generator=gen) < noise_prob).float()
    return x + use * sigma * torch.randn(x.shape, generator=gen)


def accuracy_on(clf: AudioClassifier, data) -> dict:
    """Accuracy (overall and per class) of ``clf`` on an :class:`edmsound.data.AudioSet`, mapping labels by
    class name."""
    missing = [c for c in data.classes if c not in clf.classes]
    if missing:
        raise ValueError(f"the classifier does not know the classes {missing}; it has {', '.join(clf.classes)}")
    truth = np.array([clf.classes.index(data.classes[i]) for i in data.labels])
    pred = clf.predict_proba(data.waves, data.sample_rate).argmax(axis=1)
    per = {c: float(np.mean(pred[truth == clf.classes.index(c)] == clf.classes.index(c)))
           for c in data.classes if np.any(truth == clf.classes.index(c))}
    return {"accuracy": float(np.mean(pred == truth)), "per_class": per, "clips": int(len(truth))}


def _load_data(data, sample_rate: int, seconds, progress: bool):
    from ..data.folder import AudioSet
    from ..copydetect.index import load_training_set
    if isinstance(data, AudioSet):
        if data.sample_rate != sample_rate:
            raise ValueError(f"data is at {data.sample_rate} Hz but the classifier is configured for {sample_rate} Hz")
        return data, f"in-memory AudioSet ({len(data)} clips)"
    ds, audio = load_training_set(data, None, sample_rate, seconds, progress, own_length=False)
    return ds, str(data)


def train_classifier(data, out_dir=None, *, config: ClassifierConfig | None = None, epochs: float = 12,
                     batch_size: int = 64, lr: float = 3e-3, weight_decay: float = 1e-4, seed: int = 0,
                     holdout=None, holdout_description: str | None = None, seconds: float | None = None, max_minutes: float | None = None,
                     progress: bool = True, name: str = "edmsound-classifier") -> AudioClassifier:
    """Train a classifier on a class-per-folder tree (or an ``AudioSet``) and optionally save it.

    ``holdout``: an ``AudioSet`` of held-out real clips (e.g. fresh synth seeds) whose accuracy is measured
    after training and stored in the record (it is never used for training or model selection).
    ``config.num_samples`` is set from the data's clip length; ``seconds`` overrides it for non-synth trees
    (default: the longest file, as for the copy index)."""
    cfg = config or ClassifierConfig()
    t0 = time.perf_counter()
    ds, source = _load_data(data, cfg.sample_rate, seconds, progress)
    cfg = dataclasses.replace(cfg, num_samples=int(ds.waves.shape[1]))
    k = len(ds.classes)
    if k < 2:
        raise ValueError(f"need at least 2 classes to train a classifier, got {ds.classes}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = AudioCNN(cfg, k)
    waves = torch.from_numpy(np.ascontiguousarray(ds.waves))
    labels = torch.from_numpy(ds.labels.astype(np.int64))
    n = len(labels)
    bs = max(1, min(int(batch_size), n))
    steps_per_epoch = max(1, n // bs)
    total = max(1, int(round(float(epochs) * steps_per_epoch)))
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.15)
    deadline = t0 + 60.0 * max_minutes if max_minutes else None
    model.train()
    step, perm, pos, ema_loss, ema_acc, stopped = 0, torch.randperm(n, generator=gen), 0, None, None, False
    with tqdm(total=total, desc="classifier", unit="step", disable=not progress) as bar:
        while step < total:
            if pos + bs > n:
                perm, pos = torch.randperm(n, generator=gen), 0
            idx = perm[pos:pos + bs]
            pos += bs
            x = augment_batch(waves[idx], gen, cfg.sample_rate)
            logits = model(x)
            loss = F.cross_entropy(logits, labels[idx], label_smoothing=0.05)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            acc = float((logits.argmax(1) == labels[idx]).float().mean())
            lv = loss.item()
            ema_loss = lv if ema_loss is None else 0.95 * ema_loss + 0.05 * lv
            ema_acc = acc if ema_acc is None else 0.95 * ema_acc + 0.05 * acc
            bar.update(1)
            bar.set_postfix(loss=f"{ema_loss:.3f}", acc=f"{ema_acc:.3f}")
            if deadline is not None and time.perf_counter() > deadline:
                stopped = True
                break
    model.eval()
    info = {"name": name, "training": {
        "data": source, "clips": int(n), "counts": ds.counts(), "epochs": round(step / steps_per_epoch, 3),
        "steps": step, "batch_size": bs, "lr": lr, "weight_decay": weight_decay, "seed": seed,
        "label_smoothing": 0.05, "augmentation": "gain 0.25-1.25, shift <=0.2 s (zero fill), "
                                                 "white noise 20-50 dB SNR on half the clips",
        "final_train_loss": round(ema_loss or float("nan"), 5), "final_train_accuracy": round(ema_acc or 0.0, 5),
        "stopped_early": stopped, "wall_seconds": round(time.perf_counter() - t0, 1),
        "threads": torch.get_num_threads()}}
    clf = AudioClassifier(model, ds.classes, cfg, info)
    if holdout is not None:
        res = accuracy_on(clf, holdout)
        desc = holdout_description or (f"{holdout.sources[0]} ..." if holdout.sources else "")
        clf.info["holdout"] = {"accuracy": round(res["accuracy"], 5),
                               "per_class": {c: round(v, 5) for c, v in res["per_class"].items()},
                               "clips": res["clips"], "source": desc}
    clf.info["training"]["wall_seconds"] = round(time.perf_counter() - t0, 1)
    if out_dir is not None:
        clf.save(out_dir)
    return clf
