"""Named presets as typed dataclasses (EDM2 style).

A preset fixes everything that defines a model: the spectrogram codec, the network, the EDM
training distribution and the sampling defaults. Training-loop knobs (batch size, lr, ...) live in
``TrainConfig`` and may be overridden on the command line without changing the model.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class CodecConfig:
    sample_rate: int = 22050
    clip_seconds: float = 4.0
    n_fft: int = 510
    hop_length: int = 256
    beta: float = 0.5          # amplitude compression exponent: |X|^beta
    alpha: float = 0.3         # scale after compression
    frames_multiple: int = 32  # T is rounded up to a multiple of this (U-Net downsampling)
    # What the model sees: "complex" (real + imaginary of the compressed STFT, exact inverse; the paper's) or
    # "magnitude" (the compressed magnitude only, phase recovered by Griffin-Lim: a baseline).
    representation: str = "complex"
    griffin_lim_iters: int = 64   # "magnitude": iterations of fast Griffin-Lim at decoding
    # "complex" only: a gain per frequency bin (num_bins values) applied after the compression, chosen by
    # `edmsound train --freq-scale whiten` so that every bin of the training set has RMS sigma_data. None: no
    # per-bin gain (every bin keeps the compressed data's own scale; the paper's).
    freq_scale: tuple[float, ...] | None = None
    # "complex" only: one more gain per (class, frequency bin), applied on top of ``freq_scale`` to the diffusion
    # state of that class (`edmsound train --freq-scale whiten-class`), so that every bin of every class has RMS
    # sigma_data; the pipeline divides it out before decoding. None: every class shares ``freq_scale``.
    class_scale: tuple[tuple[float, ...], ...] | None = None

    @property
    def channels(self) -> int:
        return 2 if self.representation == "complex" else 1

    @property
    def num_bins(self) -> int:
        # n_fft = 2^k - 2 gives F = n_fft/2 + 1 = 2^(k-1) bins (510 -> 256), which the U-Net divides.
        return self.n_fft // 2 + 1

    @property
    def num_frames(self) -> int:
        target = int(round(self.clip_seconds * self.sample_rate))
        frames = 1 + math.ceil(target / self.hop_length)  # center=True framing
        m = self.frames_multiple
        return int(math.ceil(frames / m) * m)

    @property
    def num_samples(self) -> int:
        """Clip length in samples: the longest wave whose centred STFT has exactly num_frames frames."""
        return self.hop_length * (self.num_frames - 1)

    @property
    def seconds(self) -> float:
        return self.num_samples / self.sample_rate


@dataclass(frozen=True)
class NetConfig:
    dim: int = 128
    dim_mults: tuple[int, ...] = (1, 1, 2, 2)
    num_res_blocks: int = 2                 # per level, after Imagen's initial block
    attn_levels: tuple[int, ...] = (2, 3)   # level indices (0 = full resolution) with self-attention
    attn_heads: int = 2
    attn_head_dim: int = 64
    groups: int = 8
    init_kernels: tuple[int, ...] = (3, 7, 15)
    emb_dim: int = 512
    dropout: float = 0.0
    channels_last: bool = False
    attention: bool = True                  # False: no self-attention anywhere (attn_levels and the middle ignored)
    norm: str = "group"                     # "group": GroupNorm in every block; "none": no normalisation

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.dim_mults) - 1)


@dataclass(frozen=True)
class EDMConfig:
    sigma_data: float = 0.2
    p_mean: float = -3.0
    p_std: float = 1.0
    label_dropout: float = 0.1
    # Sampling defaults (Karras schedule)
    sigma_min: float = 1e-4
    sigma_max: float = 3.0
    rho: float = 9.0


# The network's arithmetic when it runs (see edmsound.core.model.resolve_bf16): bf16 autocast where the hardware
# computes bfloat16 and TrainConfig.bf16 says so ("auto"), or forced.
PRECISIONS = ("auto", "bf16", "fp32")


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = 16
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    warmup_steps: int = 200
    cooldown_steps: int = 0             # the learning rate falls linearly to 0 over the run's last steps (0: none)
    grad_clip: float = 1.0
    ema_halflife_steps: float = 500.0   # EMA decay = 0.5 ** (1 / halflife), ramped up early
    ema_rampup: float = 0.1             # halflife <= ramp * step (EDM's ema_rampup_ratio)
    checkpoint_every: int = 250
    loss: str = "l2"                    # "l2" or "l1", both with EDM's lambda(sigma) balance (see edm_loss)
    log_every: int = 10
    steps: int = 100_000
    bf16: bool = True
    num_workers: int = 0


def class_guidance_pairs(mapping) -> tuple[tuple[str, float], ...] | None:
    """``{class: w}`` / ``[(class, w), ...]`` / None -> sorted ``((class, w), ...)`` pairs (None if empty)."""
    if not mapping:
        return None
    items = mapping.items() if isinstance(mapping, dict) else mapping
    return tuple(sorted((str(c), float(w)) for c, w in items))


def class_interval_pairs(mapping) -> tuple[tuple[str, tuple[float, float] | None], ...] | None:
    """``{class: [lo, hi] | None}`` / ``[(class, (lo, hi)), ...]`` / None -> sorted ``((class, (lo, hi) | None), ...)``
    (None if empty): classes whose guidance interval differs from the preset's ``default_guidance_interval``."""
    from .guidance import check_guidance_interval
    if not mapping:
        return None
    items = mapping.items() if isinstance(mapping, dict) else mapping
    return tuple(sorted((str(c), check_guidance_interval(iv)) for c, iv in items))


def format_class_guidance(pairs, intervals=None) -> str:
    """``((class, w), ...)`` -> ``"dog_bark=2 footstep=1.5 ..."`` (``""`` for None): the one text form of
    per-class scales, shared by evaluation rows, the bars check and the speed record. ``intervals``: the classes
    with their own guidance interval (``((class, (lo, hi) | None), ...)``), written ``class=w@LO:HI`` (``@all``:
    guided at every noise level)."""
    if not pairs:
        return ""
    own = dict(intervals or ())

    def one(c, w):
        if c not in own:
            return f"{c}={w:g}"
        iv = own[c]
        return f"{c}={w:g}@" + ("all" if iv is None else f"{iv[0]:g}:{iv[1]:g}")
    return " ".join(one(c, w) for c, w in pairs)


@dataclass(frozen=True)
class Preset:
    name: str
    codec: CodecConfig
    net: NetConfig
    edm: EDMConfig = field(default_factory=EDMConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    # Sampler the app and CLI use when none is given.
    default_sampler: str = "dpmpp_2m"
    default_nfe: int = 10
    default_guidance: float = 2.0
    # Guidance only for sigma in (lo, hi] (Kynkäänniemi et al. 2024); None = at every noise level.
    default_guidance_interval: tuple[float, float] | None = None
    # Per-class guidance scales that replace default_guidance for those classes, as ((class, w), ...) pairs;
    # chosen on a trained checkpoint by `edmsound calibrate-guidance` (classes differ: some are recognisable
    # without guidance and only lose variety with it, others need it). None: default_guidance for every class.
    default_class_guidance: tuple[tuple[str, float], ...] | None = None
    # Per-class guidance intervals that replace default_guidance_interval for those classes, as
    # ((class, (lo, hi) | None), ...): a class whose variety collapses when guided at mid noise levels can be
    # guided only at the highest ones (also chosen by calibrate-guidance). None: the preset interval for all.
    default_class_guidance_interval: tuple[tuple[str, tuple[float, float] | None], ...] | None = None
    # A few-step student samples with its own sampler only: a distilled one (`edmsound distill`, sampler euler)
    # at exactly ``student_nfe`` evaluations on its own schedule; a consistency-tuned one (`edmsound
    # consistency-tune`, sampler consistency) at any budget from 1 to ``student_nfe``. None: any sampler and
    # budget.
    student_nfe: int | None = None
    student_sampler: str | None = None
    # Autoguidance: the model directory also holds ``guide.safetensors``, a weaker version of the same network
    # (same classes and representation; `edmsound attach-guide`), and guidance pushes away from its conditional
    # estimate instead of the null class's (see :mod:`edmsound.core.guidance`). The text says which model it is.
    # None: classifier-free guidance.
    guide: str | None = None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if self.default_class_guidance is not None:
            d["default_class_guidance"] = {c: w for c, w in self.default_class_guidance}
        if self.default_class_guidance_interval is not None:
            from .guidance import interval_list
            d["default_class_guidance_interval"] = {c: interval_list(iv) for c, iv in self.default_class_guidance_interval}
        return d

    def guidance_for(self, class_name: str) -> float:
        """The default guidance scale of ``class_name`` (its calibrated value, else ``default_guidance``)."""
        return dict(self.default_class_guidance or ()).get(class_name, self.default_guidance)

    def guidance_interval_for(self, class_name: str) -> tuple[float, float] | None:
        """The default guidance interval of ``class_name`` (its own, else ``default_guidance_interval``)."""
        own = dict(self.default_class_guidance_interval or ())
        return own[class_name] if class_name in own else self.default_guidance_interval

    def class_intervals(self, classes) -> tuple[tuple[str, tuple[float, float] | None], ...] | None:
        """The classes (of ``classes``, in that order) with their own guidance interval, or None."""
        own = dict(self.default_class_guidance_interval or ())
        out = tuple((c, own[c]) for c in classes if c in own)
        return out or None

    def class_scales(self, classes) -> tuple[tuple[str, float], ...] | None:
        """Every class's default scale as ((class, w), ...) in the given (checkpoint) order, or None if the preset
        has no per-class scales (or intervals)."""
        if not self.default_class_guidance and not self.default_class_guidance_interval:
            return None
        return tuple((c, self.guidance_for(c)) for c in classes)

    @classmethod
    def from_dict(cls, d: dict) -> "Preset":
        def build(kind, values):
            names = {f.name: f for f in dataclasses.fields(kind)}
            unknown = set(values) - set(names)
            if unknown:
                raise ValueError(f"unknown {kind.__name__} fields: {sorted(unknown)}")
            out = {}
            for k, v in values.items():
                out[k] = (tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list)
                          else v)
            return kind(**out)

        return cls(
            name=d["name"],
            codec=build(CodecConfig, d["codec"]),
            net=build(NetConfig, d["net"]),
            edm=build(EDMConfig, d.get("edm", {})),
            train=build(TrainConfig, d.get("train", {})),
            default_sampler=d.get("default_sampler", "dpmpp_2m"),
            default_nfe=d.get("default_nfe", 10),
            default_guidance=d.get("default_guidance", 2.0),
            default_guidance_interval=(None if d.get("default_guidance_interval") is None
                                       else tuple(float(v) for v in d["default_guidance_interval"])),
            default_class_guidance=class_guidance_pairs(d.get("default_class_guidance")),
            default_class_guidance_interval=class_interval_pairs(d.get("default_class_guidance_interval")),
            student_nfe=None if d.get("student_nfe") is None else int(d["student_nfe"]),
            student_sampler=d.get("student_sampler") or ("euler" if d.get("student_nfe") is not None else None),
            guide=d.get("guide"),
        )

    def replace_codec(self, **kw) -> "Preset":
        """The codec's settings replaced (None keeps the preset's), e.g. ``representation="magnitude"``."""
        kw = {k: v for k, v in kw.items() if v is not None}
        return dataclasses.replace(self, codec=dataclasses.replace(self.codec, **kw)) if kw else self

    def replace_net(self, **kw) -> "Preset":
        """The network's settings replaced (None keeps the preset's), e.g. the ablation switches
        ``attention=False`` or ``norm="none"``; a different network, so a run cannot resume across it."""
        kw = {k: v for k, v in kw.items() if v is not None}
        return dataclasses.replace(self, net=dataclasses.replace(self.net, **kw)) if kw else self

    def replace_train(self, **kw) -> "Preset":
        kw = {k: v for k, v in kw.items() if v is not None}
        return dataclasses.replace(self, train=dataclasses.replace(self.train, **kw))

    def replace_noise(self, p_mean: float | None = None, p_std: float | None = None) -> "Preset":
        """The training noise distribution ln(sigma) ~ N(p_mean, p_std^2) replaced (None keeps the preset's).
        A training knob: the network, codec and preconditioning stay the same, so a run may change it on resume."""
        kw = {k: float(v) for k, v in (("p_mean", p_mean), ("p_std", p_std)) if v is not None}
        if "p_mean" in kw and not math.isfinite(kw["p_mean"]):
            raise ValueError(f"p_mean must be a finite number, got {p_mean!r}")
        if "p_std" in kw and not (math.isfinite(kw["p_std"]) and kw["p_std"] > 0):
            raise ValueError(f"p_std must be a positive number, got {p_std!r}")
        return dataclasses.replace(self, edm=dataclasses.replace(self.edm, **kw)) if kw else self

    def replace_sampling(self, sigma_max: float | None = None, rho: float | None = None,
                         sigma_min: float | None = None) -> "Preset":
        """The sampler's default noise range (``sigma_min``, ``sigma_max``) and Karras ``rho`` replaced (None keeps
        the preset's). Sampling defaults, not part of the network: a run may change them on resume or export."""
        kw = {k: float(v) for k, v in (("sigma_max", sigma_max), ("rho", rho), ("sigma_min", sigma_min))
              if v is not None}
        if not kw:
            return self
        edm = dataclasses.replace(self.edm, **kw)
        for name in ("sigma_min", "sigma_max", "rho"):
            v = getattr(edm, name)
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a positive finite number, got {v}")
        if not edm.sigma_min < edm.sigma_max:
            raise ValueError(f"need sigma_min < sigma_max, got {edm.sigma_min:g} and {edm.sigma_max:g}")
        return dataclasses.replace(self, edm=edm)


PRESETS: dict[str, Preset] = {
    # The paper's DCASE2023 Task 7 configuration (~37M parameters at dim 128).
    "paper-dcase": Preset(
        name="paper-dcase",
        codec=CodecConfig(sample_rate=22050, clip_seconds=4.0, n_fft=510, hop_length=256, frames_multiple=32),
        net=NetConfig(dim=128, dim_mults=(1, 1, 2, 2), num_res_blocks=2, attn_levels=(2, 3)),
        edm=EDMConfig(sigma_data=0.2, p_mean=-3.0, p_std=1.0, sigma_min=1e-4, sigma_max=3.0, rho=9.0),
        train=TrainConfig(batch_size=12, lr=1e-4),
    ),
    # Speech Commands digits (SC09).
    "paper-sc09": Preset(
        name="paper-sc09",
        codec=CodecConfig(sample_rate=16000, clip_seconds=1.0, n_fft=510, hop_length=128, frames_multiple=32),
        net=NetConfig(dim=128, dim_mults=(1, 2, 2, 2), num_res_blocks=2, attn_levels=(2, 3)),
    ),
    # Sized for a 2-core CPU: 16 kHz, ~1.02 s clips as a 2x128x128 complex spectrogram.
    "default": Preset(
        name="default",
        # alpha 0.6 (paper: 0.3) puts the built-in set's compressed-spectrogram std near sigma_data = 0.2
        # (measured 0.098 at alpha 0.3), keeping the paper's noise settings valid relative to the data.
        codec=CodecConfig(sample_rate=16000, clip_seconds=1.0, n_fft=254, hop_length=128, alpha=0.6,
                          frames_multiple=8),
        net=NetConfig(dim=32, dim_mults=(1, 2, 3, 4), num_res_blocks=1, attn_levels=(2, 3), attn_heads=2,
                      attn_head_dim=32, groups=8, emb_dim=256, channels_last=True),
        edm=EDMConfig(sigma_data=0.2, p_mean=-3.0, p_std=1.0, sigma_min=1e-4, sigma_max=3.0, rho=9.0),
        train=TrainConfig(batch_size=16, lr=2e-4, warmup_steps=200, ema_halflife_steps=500.0,
                          checkpoint_every=200),
        # guidance 3 only for sigma in (0.1, 10] (the first 5 of dpmpp_2m's 10 evaluations): the step-5,749 model's
        # category fit is 0.97 either way, and skipping the unconditional half below sigma 0.1 makes a clip
        # ~20 % faster (README, evaluation); without guidance the fit is 0.80
        default_guidance=3.0,
        default_guidance_interval=(0.1, 10.0),
    ),
    # For ablation grids on a 2-core CPU: the default codec and the shipped model's noise settings, a U-Net at half
    # width trained at batch 8 (~6,000 steps an hour on 2 cores, ~4x the default's).
    "small": Preset(
        name="small",
        codec=CodecConfig(sample_rate=16000, clip_seconds=1.0, n_fft=254, hop_length=128, alpha=0.6,
                          frames_multiple=8),
        net=NetConfig(dim=16, dim_mults=(1, 2, 3, 4), num_res_blocks=1, attn_levels=(2, 3), attn_heads=2,
                      attn_head_dim=16, groups=4, emb_dim=128, channels_last=True),
        edm=EDMConfig(sigma_data=0.2, p_mean=-1.5, p_std=2.0, sigma_min=0.002, sigma_max=15.0, rho=2.5),
        train=TrainConfig(batch_size=8, lr=3e-4, warmup_steps=100, ema_halflife_steps=200.0,
                          checkpoint_every=250),
        default_nfe=8,
    ),
    # For tests: a few thousand parameters, 8 kHz, 0.25 s.
    "tiny": Preset(
        name="tiny",
        codec=CodecConfig(sample_rate=8000, clip_seconds=0.25, n_fft=62, hop_length=32, frames_multiple=4),
        net=NetConfig(dim=16, dim_mults=(1, 2), num_res_blocks=0, attn_levels=(1,), attn_heads=1,
                      attn_head_dim=8, groups=4, init_kernels=(3, 7), emb_dim=32),
        train=TrainConfig(batch_size=8, lr=2e-3, warmup_steps=10, ema_halflife_steps=20.0,
                          checkpoint_every=50, log_every=5),
    ),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}") from None
