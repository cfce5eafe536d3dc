"""Audio encoders for copy detection: feature parity with ClapFeatureExtractor, save/load round trips,
the Hugging Face and LAION .pt loading paths (on tiny random CLAP models built here), the committed default."""
import json
import os
import re

import numpy as np
import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from transformers import ClapAudioModelWithProjection, ClapConfig, ClapFeatureExtractor, ClapModel  # noqa: E402

from edmsound.copydetect.encoders import ClapEncoder, ClapFrontend, DEFAULT_ENCODER_DIR, DEFAULT_HEAD_DIR, load_encoder, save_encoder_dir
from edmsound.copydetect.laion import LAION_AUDIO_KEY_RULES, convert_laion_checkpoint
from edmsound.copydetect.windows import WindowEmbeddings, window_starts
from edmsound.copydetect.pretrain import default_encoder_config
from edmsound.copydetect.head import CopyHead, load_head, save_head  # noqa: E402
from edmsound.data.synth import synthesize  # noqa: E402


def _randomize_buffers(model, seed=0):
    """Give zero-initialised tables and BatchNorm statistics random values so a wrong key mapping shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith("relative_position_bias_table"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.5)
            elif name.endswith("running_mean"):
                t.copy_(torch.randn(t.shape, generator=g) * 5 - 40)
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) * 100 + 50)
            elif name.endswith("batch_norm.weight") or name.endswith("batch_norm.bias"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.3 + (1.0 if name.endswith("weight") else 0.0))
    return model.eval()


def _tiny_clap():
    cfg = ClapConfig(
        text_config=dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                         max_position_embeddings=40),
        audio_config=dict(spec_size=64, num_mel_bins=32, patch_embeds_hidden_size=8, depths=[1, 2],
                          num_attention_heads=[1, 2], window_size=4, hidden_size=16, hidden_dropout_prob=0.0),
        projection_dim=24)
    torch.manual_seed(0)
    return _randomize_buffers(ClapModel(cfg))


TINY_FE = dict(feature_size=32, sampling_rate=16000, hop_length=160, fft_window_size=400, max_length_s=1,
               frequency_min=50, frequency_max=8000, truncation="rand_trunc", padding="repeatpad")


def _clips(n=3, seconds=1.6, sr=16000):
    return np.stack([synthesize(c, 7, sr, seconds) for c in ("dog_bark", "rain", "keyboard")[:n]])


# ------------------------------------------------------------------------------------------ features
def test_frontend_matches_clap_feature_extractor():
    rng = np.random.default_rng(0)
    fe = ClapFeatureExtractor(**TINY_FE)
    front = ClapFrontend(fe)
    waves = [0.3 * rng.standard_normal(16000).astype(np.float32), synthesize("gunshot", 3, 16000, 0.37)]
    ours, is_longer = front(waves)
    ref = fe([w.astype(np.float64) for w in waves], sampling_rate=16000, return_tensors="np")["input_features"]
    assert ours.shape == ref.shape == (2, 1, 101, 32)
    assert np.abs(ours.numpy() - ref).max() < 1e-3          # dB
    assert not is_longer.any()
    # fusion mode (fused models): HTK filters, the mel stacked 4 times
    fe2 = ClapFeatureExtractor(**dict(TINY_FE, truncation="fusion"))
    ours2, _ = ClapFrontend(fe2, fusion=True)(waves[:1])
    ref2 = fe2([waves[0].astype(np.float64)], sampling_rate=16000, return_tensors="np")["input_features"]
    assert ours2.shape == ref2.shape == (1, 4, 101, 32)
    assert np.abs(ours2.numpy() - ref2).max() < 1e-3


def test_window_starts():
    assert window_starts(16256, 8000, 4000) == [0, 4000, 8000]          # 1.016 s at 16 kHz: 3 windows
    assert window_starts(5000, 8000, 4000) == [0]
    assert window_starts(14500, 8000, 4000) == [0, 4000, 6500]          # end-aligned last window
    assert window_starts(14000, 8000, 4000) == [0, 4000]                # <= half a hop left over: dropped


# ------------------------------------------------------------------------------------------ own encoder dir
def test_project_encoder_save_load_roundtrip(tmp_path):
    cfg, fe = default_encoder_config(patch_embeds_hidden_size=8, num_attention_heads=[1, 2, 2], projection_dim=32)
    torch.manual_seed(1)
    model = _randomize_buffers(ClapAudioModelWithProjection(cfg))
    mem = ClapEncoder(model, fe, name="tiny", weights_hash="in-memory", window_seconds=0.5, hop_seconds=0.25)
    save_encoder_dir(model, fe, tmp_path / "enc", name="tiny", window_seconds=0.5, hop_seconds=0.25)
    enc = load_encoder(tmp_path / "enc", cache=False)
    assert enc.name == "tiny" and re.fullmatch(r"[0-9a-f]{64}", enc.weights_hash)
    assert (enc.sample_rate, enc.window_seconds, enc.hop_seconds, enc.dim) == (16000, 0.5, 0.25, 32)
    waves = _clips(3, 1.016)
    a = mem.embed_windows(waves, 16000)
    b = enc.embed_windows(waves, 16000)
    assert isinstance(b, WindowEmbeddings) and b.encoder_name == "tiny" and b.weights_hash == enc.weights_hash
    e, ci, off = b
    assert e.shape == (9, 32) and e.dtype == np.float32
    assert ci.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and np.allclose(off, [0, .25, .5] * 3)
    np.testing.assert_allclose(a[0], e, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    clip = enc.embed(waves, 16000)
    assert clip.shape == (3, 32) and np.allclose(np.linalg.norm(clip, axis=1), 1, atol=1e-5)
    # other input rates are resampled to the encoder's
    r = enc.embed_windows(synthesize("rain", 1, 22050, 1.016)[None], 22050)
    assert r[0].shape == (3, 32)
    with pytest.raises(ValueError, match="sample_rate"):
        enc.embed(waves, 0)
    # a head changes name, hash and dimension, and records which encoder it belongs to
    head = CopyHead(32, 16, 8, encoder_name=enc.name, encoder_hash=enc.weights_hash).eval()
    save_head(head, tmp_path / "head")
    with_head = load_encoder(tmp_path / "enc", head=tmp_path / "head", cache=False)
    assert with_head.dim == 8 and with_head.name == "tiny+copy-head" and with_head.weights_hash != enc.weights_hash
    np.testing.assert_allclose(with_head.embed_windows(waves, 16000)[0],
                               head(torch.from_numpy(e)).detach().numpy(), atol=1e-5)
    other = CopyHead(32, 16, 8, encoder_hash="0" * 64)
    save_head(other, tmp_path / "other")
    with pytest.raises(ValueError, match="trained on encoder weights"):
        load_encoder(tmp_path / "enc", head=tmp_path / "other", cache=False)
    with pytest.raises(FileNotFoundError, match="head.json"):
        load_head(tmp_path / "enc")


# ------------------------------------------------------------------------------------------ HF + LAION .pt
def _invert_rules(hf_state: dict) -> dict:
    """HF audio-tower keys -> LAION keys by reading LAION_AUDIO_KEY_RULES backwards (the test's own inversion)."""
    out, pending = {}, {}
    rx = []
    for rule in LAION_AUDIO_KEY_RULES:
        pat = re.escape(rule.hf)
        for ph, g in (("i", r"(?P<i>\d+)"), ("j", r"(?P<j>\d+)"), ("p", r"(?P<p>.+)"), ("part", r"(?P<part>[a-z]+)")):
            pat = pat.replace(re.escape("{" + ph + "}"), g)
        rx.append((re.compile(pat + r"\Z"), rule))
    for k, v in hf_state.items():
        if not k.startswith(("audio_model.", "audio_projection.")):
            continue
        for r, rule in rx:
            m = r.match(k)
            if m:
                f = {n: x for n, x in m.groupdict().items() if x is not None}
                if rule.split:
                    part = f.pop("part")
                    pending.setdefault(rule.laion.format(**f), {})[part] = v
                else:
                    out[rule.laion.format(**f)] = v
                break
        else:
            raise AssertionError(f"no rule maps HF key {k}")
    for k, parts in pending.items():
        rule = next(r for r in LAION_AUDIO_KEY_RULES if r.split)
        out[k] = torch.cat([parts[p] for p in rule.split], dim=0)
    return out


def test_hf_dir_and_laion_pt_paths_give_the_same_embeddings(tmp_path):
    model = _tiny_clap()
    hf_dir = tmp_path / "clap-hf"
    model.save_pretrained(hf_dir, safe_serialization=True)
    ClapFeatureExtractor(**TINY_FE).save_pretrained(hf_dir)
    hf = load_encoder(hf_dir, window_seconds=1.0, hop_seconds=0.5, cache=False)
    assert hf.name == "clap-hf:clap-hf" and hf.dim == 24 and hf.sample_rate == 16000
    waves = _clips(3, 1.6)
    e_hf, ci, off = hf.embed_windows(waves, 16000)
    assert e_hf.shape == (6, 24) and off.tolist() == [0.0, 0.5] * 3
    # the reference: transformers' own ClapModel.get_audio_features on ClapFeatureExtractor output
    fe = ClapFeatureExtractor(**TINY_FE)
    inputs = fe([waves[0, :16000].astype(np.float64)], sampling_rate=16000, return_tensors="pt")
    with torch.no_grad():
        ref = model.get_audio_features(input_features=inputs["input_features"]).pooler_output.numpy()
    np.testing.assert_allclose(e_hf[0], ref[0], atol=1e-4)

    # a LAION-style .pt written from the same weights (keys inverted through the documented table)
    laion = _invert_rules(model.state_dict())
    assert "audio_branch.layers.0.blocks.0.attn.qkv.weight" in laion and "audio_projection.0.weight" in laion
    laion.update({"text_branch.embeddings.word_embeddings.weight": torch.zeros(4, 4),
                  "logit_scale_a": torch.tensor(1.0), "audio_transform.sequential.0.weight": torch.zeros(2, 2),
                  "audio_branch.spectrogram_extractor.stft.conv_real.weight": torch.zeros(3, 1, 4),
                  "audio_branch.layers.0.blocks.0.attn_mask": torch.zeros(1)})
    pt = tmp_path / "tiny_clap.pt"
    # LAION's envelope: DataParallel "module." prefixes and NumPy scalars in the training metadata
    torch.save({"epoch": 3, "best_metric": np.float64(0.9),
                "state_dict": {"module." + k: v for k, v in laion.items()}}, pt)
    overrides = {"spec_size": 64, "hidden_dropout_prob": 0.0}
    conv = convert_laion_checkpoint(pt, tmp_path / "converted", audio_config_overrides=overrides,
                                    feature_extractor_kwargs=TINY_FE)
    assert json.loads((conv / "conversion.json").read_text())["ignored_keys"]
    from_conv = load_encoder(conv, window_seconds=1.0, hop_seconds=0.5, cache=False)
    np.testing.assert_allclose(from_conv.embed_windows(waves, 16000)[0], e_hf, atol=1e-5)
    direct = load_encoder(pt, window_seconds=1.0, hop_seconds=0.5, cache=False, audio_config_overrides=overrides,
                          feature_extractor_kwargs=TINY_FE)
    assert direct.name == "laion-clap:tiny_clap"
    np.testing.assert_allclose(direct.embed_windows(waves, 16000)[0], e_hf, atol=1e-5)

    # a key outside the table is named, not silently dropped
    bad = tmp_path / "bad.pt"
    torch.save({"state_dict": {**laion, "audio_branch.mystery.weight": torch.zeros(1)}}, bad)
    with pytest.raises(ValueError, match="audio_branch.mystery.weight"):
        load_encoder(bad, cache=False)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_encoder(tmp_path / "nowhere")


# ------------------------------------------------------------------------------------------ committed default
def test_committed_default_encoder_and_head():
    files = [p for d in (DEFAULT_ENCODER_DIR, DEFAULT_HEAD_DIR) for p in d.iterdir() if p.is_file()]
    assert sum(p.stat().st_size for p in files) < 10 * 2**20
    meta = json.loads((DEFAULT_ENCODER_DIR / "encoder.json").read_text())
    assert 3e5 <= meta["parameters"] <= 2e6
    enc = load_encoder("default", head="default")
    assert enc.sample_rate == 16000 and enc.window_seconds == 0.5 and enc.hop_seconds == 0.25 and enc.dim == 128
    assert enc.head.encoder_hash == enc.base_hash
    e, ci, off = enc.embed_windows(_clips(2, 1.016), 16000)
    assert e.shape == (6, 128) and np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    # model-load-once: the same tower object comes back
    assert load_encoder("default").model is enc.model


# ------------------------------------------------------------------------------------------ training CLIs
def test_encoder_train_resume_and_finetune_head_cli(tmp_path, capsys):
    from edmsound.cli import main
    from edmsound.data.synth import write_dataset

    run = main   # the real `edmsound` entry point

    data = tmp_path / "data"
    write_dataset(data, per_class=3, seed=0, seconds=1.016, classes=["rain", "keyboard"], progress=False)
    out, state = tmp_path / "enc", tmp_path / "state"
    with pytest.raises(SystemExit) as e:       # 4 steps on 6 clips: a collapsed encoder, said loudly
        run(["encoder", "train", "--data", str(data), "--out", str(out), "--state", str(state), "--epochs", "2",
             "--batch-size", "4", "--no-progress"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "collapsed" in err and "median similarity" in err and "Traceback" not in err
    meta = json.loads((out / "encoder.json").read_text())                # still written, for inspection
    assert meta["training"]["steps"] == 4 and meta["window_seconds"] == 0.5 and meta["hop_seconds"] == 0.25
    assert json.loads((state / "state.json").read_text())["step"] == 4
    first = load_encoder(out, cache=False)
    # resuming continues from the saved state instead of starting over
    with pytest.raises(SystemExit):
        run(["encoder", "train", "--data", str(data), "--out", str(out), "--state", str(state), "--epochs", "2",
             "--batch-size", "4", "--no-progress"])
    assert "resuming encoder training at step 4" in capsys.readouterr().out
    assert load_encoder(out, cache=False).weights_hash == first.weights_hash      # already complete: unchanged
    run(["encoder", "finetune-head", "--encoder", str(out), "--data", str(data), "--out", str(tmp_path / "head"),
         "--epochs", "3", "--batch-size", "8", "--no-progress"])
    info = json.loads((tmp_path / "head" / "head.json").read_text())
    assert info["encoder_hash"] == first.weights_hash and info["training"]["epochs"] == 3
    enc = load_encoder(out, head=tmp_path / "head", cache=False)
    assert enc.dim == 128 and enc.embed(np.zeros((1, 16256), np.float32) + 0.1, 16000).shape == (1, 128)


def test_head_training_skips_silent_windows_without_empty_batches():
    """Clips that are mostly silence: the batches run over the sounding windows only (a loop over all windows left
    later batches empty and crashed with an IndexError)."""
    from edmsound import AudioSet
    from edmsound.copydetect.head import train_head
    from edmsound.data.synth import synthesize
    sr, n = 16000, 48000                                     # 3-s clips, sound only in the first 0.4 s
    waves, labels = [], []
    for ci, c in enumerate(("rain", "keyboard")):
        for s in range(3):
            w = np.zeros(n, np.float32)
            w[:6400] = synthesize(c, s, sr, 1.0)[:6400]
            waves.append(w)
            labels.append(ci)
    data = AudioSet(np.stack(waves), np.asarray(labels), ["rain", "keyboard"], [f"clip{i}" for i in range(6)], sr)
    enc = load_encoder("default")
    head = train_head(enc, data, epochs=2, batch_size=4, progress=False)
    info = head.training_info
    assert info["silent_anchor_windows_skipped"] > info["clips"] * info["windows_per_clip"] / 2
    assert info["epochs"] == 2 and np.isfinite(info["final"]["loss"])
    lonely = data.subset([0, 3])                             # one clip per class: no same-class negative exists
    with pytest.raises(ValueError, match="no usable training triplets"):
        train_head(enc, lonely, epochs=1, batch_size=4, progress=False)
