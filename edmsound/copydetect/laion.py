"""LAION CLAP ``.pt`` checkpoints -> the Hugging Face CLAP audio-tower layout: the key-mapping table, config
inference from tensor shapes, and :func:`convert_laion_checkpoint` (``torch.load(weights_only=True)`` only)."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.storage import atomic_save_safetensors, atomic_write_json, file_sha256

__all__ = ["convert_laion_checkpoint", "convert_laion_state_dict", "LAION_AUDIO_KEY_RULES", "LAION_IGNORED_KEYS",
           "KeyRule", "LAION_FEATURE_DEFAULTS"]


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


