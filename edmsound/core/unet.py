"""Efficient U-Net (Saharia et al. 2022, Imagen, App. B.1) as EDMSound uses it on complex spectrograms.

- multi-kernel first convolution (cross-embedding with kernels 3/7/15);
- at every level after the first, the feature map is *downsampled before* the residual blocks
  (the "efficient" ordering), and upsampled after them on the way up;
- every level has an initial residual block plus ``num_res_blocks`` more, each feeding a skip connection;
- residual blocks take scale/shift from the noise + class embedding (FiLM);
- self-attention only at the lowest resolutions (and in the middle);
- U-Net skip connections are concatenated and scaled by 2^-1/2;
- the last convolution is zero-initialised, so the raw network output starts at 0.
The network is the raw F_theta of EDM; preconditioning lives in ``edm.py``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .presets import NetConfig

SKIP_SCALE = 2 ** -0.5


def zero_init(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class LearnedSinusoidalEmbedding(nn.Module):
    """c_noise -> [c, sin(2 pi w c), cos(2 pi w c)] with learned frequencies w (Imagen / v-diffusion)."""

    def __init__(self, dim: int):
        super().__init__()
        assert dim % 2 == 0
        self.weights = nn.Parameter(torch.randn(dim // 2))

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        c = c[:, None]
        freqs = c * self.weights[None] * (2 * math.pi)
        return torch.cat([c, freqs.sin(), freqs.cos()], dim=-1)


class CrossEmbedLayer(nn.Module):
    """First convolution: parallel kernels of several sizes, outputs concatenated."""

    def __init__(self, in_ch: int, out_ch: int, kernels: tuple[int, ...]):
        super().__init__()
        kernels = sorted(kernels)
        # Larger kernels get fewer channels (Imagen's cross-embed split).
        splits = [out_ch // (2 ** (i + 1)) for i in range(len(kernels) - 1)]
        splits.append(out_ch - sum(splits))
        self.convs = nn.ModuleList(nn.Conv2d(in_ch, ch, k, padding=k // 2) for k, ch in zip(kernels, splits))

    def forward(self, x):
        return torch.cat([conv(x) for conv in self.convs], dim=1)


NORMS = ("group", "none")


def make_norm(kind: str, groups: int, ch: int) -> nn.Module:
    """The blocks' normalisation: GroupNorm, or none (an ablation switch)."""
    if kind not in NORMS:
        raise ValueError(f"unknown normalisation {kind!r}; valid: {', '.join(NORMS)}")
    return nn.GroupNorm(groups, ch) if kind == "group" else nn.Identity()


class ResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, groups: int, dropout: float = 0.0,
                 norm: str = "group"):
        super().__init__()
        self.norm1 = make_norm(norm, groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = make_norm(norm, groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_init(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.emb(emb)[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift           # FiLM from noise level + class
        h = self.conv2(self.dropout(F.silu(h)))
        return h + self.skip(x)


class AttentionBlock(nn.Module):
    def __init__(self, ch: int, heads: int, head_dim: int, groups: int, norm: str = "group"):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.norm = make_norm(norm, groups, ch)
        self.qkv = nn.Conv2d(ch, 3 * inner, 1, bias=False)
        self.out = zero_init(nn.Conv2d(inner, ch, 1))

    def forward(self, x, emb=None):
        b, c, h, w = x.shape
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, self.head_dim, h * w)
        # (3, B, heads, N, d), each of q/k/v contiguous: a strided view makes CPU SDPA fall back to
        # the math path that materialises N x N in fp32.
        qkv = qkv.permute(1, 0, 2, 4, 3)
        q, k, v = (t.contiguous() for t in qkv.unbind(0))
        o = F.scaled_dot_product_attention(q, k, v)          # (B, heads, N, d)
        o = o.transpose(2, 3).reshape(b, self.heads * self.head_dim, h, w)
        return x + self.out(o)


class Downsample(nn.Module):
    """Space-to-depth (2x2 -> channels) then 1x1 conv: cheap and lossless before the projection."""

    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.proj = nn.Conv2d(in_ch * 4, out_ch, 1)

    def forward(self, x):
        return self.proj(F.pixel_unshuffle(x, 2))


class Upsample(nn.Module):
    def __init__(self, in_ch, out_ch):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class EfficientUNet(nn.Module):
    def __init__(self, config: NetConfig, num_classes: int, in_channels: int = 2):
        super().__init__()
        self.config = config
        self.num_classes = num_classes
        cfg = config
        chans = [cfg.dim * m for m in cfg.dim_mults]
        E = cfg.emb_dim

        # Noise level: c_noise -> learned sinusoidal features -> MLP.
        self.noise_embed = LearnedSinusoidalEmbedding(cfg.dim)
        self.noise_mlp = nn.Sequential(nn.Linear(cfg.dim + 1, E), nn.SiLU(), nn.Linear(E, E))
        # Class: index num_classes is the learned null class used for classifier-free guidance.
        self.class_embed = nn.Embedding(num_classes + 1, cfg.dim)
        self.class_mlp = nn.Sequential(nn.Linear(cfg.dim, E), nn.SiLU(), nn.Linear(E, E))

        self.init_conv = CrossEmbedLayer(in_channels, chans[0], cfg.init_kernels)

        def attention(ch):
            return AttentionBlock(ch, cfg.attn_heads, cfg.attn_head_dim, cfg.groups, cfg.norm) if cfg.attention \
                else None

        def level_blocks(ch_in, ch, level):
            blocks = nn.ModuleList()
            for _ in range(1 + cfg.num_res_blocks):   # Imagen: an initial block + num_res_blocks
                blocks.append(ResBlock(ch_in, ch, E, cfg.groups, cfg.dropout, cfg.norm))
                ch_in = ch
            attn = attention(ch) if level in cfg.attn_levels else None
            return blocks, attn

        self.downs = nn.ModuleList()
        prev = chans[0]
        for i, ch in enumerate(chans):
            level = nn.Module()
            level.down = Downsample(prev, ch) if i > 0 else nn.Identity()
            level.blocks, level.attn = level_blocks(ch, ch, i)
            self.downs.append(level)
            prev = ch

        mid = chans[-1]
        self.mid1 = ResBlock(mid, mid, E, cfg.groups, cfg.dropout, cfg.norm)
        self.mid_attn = attention(mid) or nn.Identity()
        self.mid2 = ResBlock(mid, mid, E, cfg.groups, cfg.dropout, cfg.norm)

        self.ups = nn.ModuleList()
        for i in reversed(range(len(chans))):
            ch = chans[i]
            level = nn.Module()
            level.blocks = nn.ModuleList(
                ResBlock(2 * ch, ch, E, cfg.groups, cfg.dropout, cfg.norm) for _ in range(1 + cfg.num_res_blocks))
            level.attn = attention(ch) if i in cfg.attn_levels else None
            level.up = Upsample(ch, chans[i - 1]) if i > 0 else nn.Identity()
            self.ups.append(level)

        self.out_norm = make_norm(cfg.norm, cfg.groups, chans[0])
        self.out_conv = zero_init(nn.Conv2d(chans[0], in_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        f = self.config.downsample_factor
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"input {tuple(x.shape[-2:])} is not divisible by the U-Net's downsampling factor {f}")
        emb = self.noise_mlp(self.noise_embed(c_noise)) + self.class_mlp(self.class_embed(class_labels))
        emb = F.silu(emb)

        h = self.init_conv(x)
        skips = []
        for level in self.downs:
            h = level.down(h)
            for block in level.blocks:
                h = block(h, emb)
                if level.attn is not None:
                    h = level.attn(h)
                skips.append(h)
        h = self.mid2(self.mid_attn(self.mid1(h, emb)), emb)
        for level in self.ups:
            for block in level.blocks:
                h = block(torch.cat([h, skips.pop() * SKIP_SCALE], dim=1), emb)
                if level.attn is not None:
                    h = level.attn(h)
            h = level.up(h)
        return self.out_conv(F.silu(self.out_norm(h)))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
