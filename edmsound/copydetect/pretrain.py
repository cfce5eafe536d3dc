"""The embedded default encoder: a small CLAP audio tower trained contrastively here (audio-audio positives,
NT-Xent with in-batch negatives), written as a project encoder directory."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..core.storage import atomic_save_safetensors, atomic_write_json, load_safetensors
from ..training.checkpoints import optimizer_from_flat, optimizer_to_flat
from .encoders import ENCODER_JSON, ClapFrontend, save_encoder_dir

__all__ = ["default_encoder_config", "train_encoder"]


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


MIN_STEPS = 300            # the built-in default trained 308 steps; fewer leave a small set unlearnt
COLLAPSE_SIMILARITY = 0.98


class EncoderCollapseError(ValueError):
    """The trained encoder maps different clips to (nearly) the same embedding."""


def collapse_check(encoder, waves, sample_rate: int, clips: int = 128, seed: int = 0) -> float:
    """Median cosine similarity between embeddings of different clips (up to ``clips`` of them); a
    collapsed encoder gives ~1.0 for every pair."""
    rng = np.random.default_rng(seed)
    pick = np.sort(rng.choice(len(waves), min(clips, len(waves)), replace=False))
    e = encoder.embed([waves[i] for i in pick], sample_rate, progress=False)
    s = e @ e.T
    off = s[~np.eye(len(s), dtype=bool)]
    return float(np.median(off)) if len(off) else 0.0


def train_encoder(data_dir, out_dir, *, epochs: float | None = None, batch_size: int = 64, lr: float = 2e-3,
                  temperature: float = 0.1, max_minutes: float | None = None, seed: int = 0,
                  state_dir=None, resume: bool = True, progress: bool = True, threads: int | None = None,
                  checkpoint_every: int = 25, config_overrides: dict | None = None,
                  name: str = "edmsound-clap-tiny") -> dict:
    """Train the default encoder contrastively on a class-per-folder tree and write it to ``out_dir``.

    Positives are two views of one clip (windows cut up to 0.15 s apart, gain, noise at high SNR, mild
    EQ: :class:`edmsound.augment.ContrastiveAugment`); negatives are the other clips in the batch
    (NT-Xent). Training state (weights, AdamW moments, step) is saved atomically every
    ``checkpoint_every`` steps to ``state_dir`` (default ``out_dir/train_state``) and resumed from it.
    ``max_minutes`` stops early (the encoder written is the last step's). ``epochs`` defaults to what
    gives at least 300 steps (3.5 epochs on large sets). After training, the median similarity between
    different clips is checked: an encoder that maps every clip to one point raises
    :class:`EncoderCollapseError` (it is still written, for inspection)."""
    from transformers import ClapAudioModelWithProjection
    from ..data.augment import ContrastiveAugment
    from ..data.folder import load_folder
    from ..core.presets import get_preset

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
    if epochs is None:                      # scale with the data: at least MIN_STEPS steps, 3.5 epochs
        epochs = max(3.5, MIN_STEPS / steps_per_epoch)
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
    from .encoders import load_encoder
    med = collapse_check(load_encoder(out_dir, cache=False), data.waves, sr, seed=seed)
    info["training"]["median_similarity_between_clips"] = round(med, 4)
    if med > COLLAPSE_SIMILARITY:
        raise EncoderCollapseError(
            f"the encoder in {out_dir} collapsed: different clips have median similarity {med:.3f} (above "
            f"{COLLAPSE_SIMILARITY}), so it cannot tell clips apart; train longer (--epochs), with a lower --lr, "
            "or on more clips")
    return info
