"""Copy detection on recordings of their own lengths: one reader, windows over each clip's length,
the signal tier, near-duplicate groups and a reference that leaves them out, silent queries, the CLI's
per-file errors, encoder collapse and data-scaled defaults. Real files, the real encoder, real FAISS."""
import json
import os

import numpy as np
import pytest
import soundfile as sf
import torch

os.environ["HF_HUB_OFFLINE"] = "1"

from edmsound.cli import main as cli_main  # noqa: E402
from edmsound.copydetect.encoders import load_encoder  # noqa: E402
from edmsound.copydetect.head import CopyHead, auto_epochs  # noqa: E402
from edmsound.copydetect.index import CopyIndex  # noqa: E402
from edmsound.copydetect.pretrain import collapse_check  # noqa: E402
from edmsound.copydetect.signal import SignalConfig, onset_sample, signal_fingerprints  # noqa: E402
from edmsound.data.augment import LeadInCopy  # noqa: E402

SR = 16000


def hit(freq, seconds, decay, seed, noise=0.3):
    """A percussive one-shot: a decaying partial plus a noise burst."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * SR)) / SR
    env = np.exp(-t * decay)
    x = env * (np.sin(2 * np.pi * freq * t) + noise * rng.standard_normal(len(t)))
    return (0.5 * x / np.abs(x).max()).astype(np.float32)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """Two classes of one-shots of different lengths (0.12 s to 6 s), with a gain twin and an MP3/AIFF."""
    root = tmp_path_factory.mktemp("real") / "data"
    specs = {"kick": [(60 + 7 * i, 0.12 + 0.25 * i, 9 + i) for i in range(6)],
             "hat": [(5000 + 300 * i, 0.15 + 0.2 * i, 25 + 3 * i) for i in range(6)]}
    for c, items in specs.items():
        (root / c).mkdir(parents=True)
        for i, (f, secs, d) in enumerate(items):
            sf.write(root / c / f"{c}{i}.wav", hit(f, secs, d, seed=i + (0 if c == "kick" else 50)), SR)
    sf.write(root / "kick" / "long.flac", hit(80, 6.0, 0.4, seed=99), SR)                  # one long file
    sf.write(root / "kick" / "kick0_soft.aiff", 0.4 * hit(60, 0.12, 9, seed=0), SR, format="AIFF")   # gain twin
    sf.write(root / "hat" / "hat5.mp3", hit(6500, 1.15, 40, seed=55), SR, format="MP3")
    return root


@pytest.fixture(scope="module")
def encoder():
    return load_encoder("default", head="default")


@pytest.fixture(scope="module")
def index(tree, encoder):
    return CopyIndex.build(str(tree), encoder, progress=False)


def test_windows_follow_each_clips_own_length(index, encoder, tree):
    assert index.num_clips == 15                                   # every format read, nothing skipped
    assert {s.rsplit(".", 1)[1] for s in index.sources} == {"wav", "flac", "aiff", "mp3"}
    per_clip = dict(zip(index.sources, index.windows_per_clip))
    long = next(v for s, v in per_clip.items() if s.endswith("long.flac"))
    short = next(v for s, v in per_clip.items() if s.endswith("kick0.wav"))
    assert short == 1                                              # 0.12 s: one window, not 6 s of padding
    assert long >= (6.0 - encoder.window_seconds) / encoder.hop_seconds - 1
    assert index.ntotal < 15 * long / 2                            # bounded by the audio, not by the longest file


def test_short_query_is_embedded_like_the_indexed_clip(index, tree):
    """A 0.12 s clip queried as it is finds itself with similarity 1 in both tiers."""
    from edmsound.audio.io import load_audio
    w = load_audio(tree / "kick" / "kick0.wav", SR)
    m = index.search([w], k=3, same_class="kick", sample_rate=SR)[0]
    top = m[0]
    assert top.source.endswith(("kick0.wav", "kick0_soft.aiff"))
    assert top.similarity == pytest.approx(1.0, abs=1e-5) and top.signal_similarity == pytest.approx(1.0, abs=1e-3)
    assert {x.source.rsplit("/", 1)[1] for x in m[:2]} == {"kick0.wav", "kick0_soft.aiff"}   # the twin is next


def test_gain_twin_is_a_near_duplicate_group_left_out_of_the_reference(index, tree):
    groups = index.duplicate_groups()
    names = [sorted(index.sources[i].rsplit("/", 1)[1] for i in g) for g in groups]
    assert ["kick0.wav", "kick0_soft.aiff"] in names
    a = next(i for i, s in enumerate(index.sources) if s.endswith("kick0.wav"))
    b = next(i for i, s in enumerate(index.sources) if s.endswith("kick0_soft.aiff"))
    twin_sim = float(index.signal[a] @ index.signal[b])
    assert twin_sim > 0.999
    assert index.sig_ref_same[a] < twin_sim - 1e-3                 # its reference is the nearest *other* recording
    assert index.ref_same[a] < 0.9999


def test_plain_copies_flag_with_both_tiers_reported(index, tree):
    from edmsound.audio.io import load_audio
    rng = np.random.default_rng(3)
    aug = LeadInCopy()
    copies, classes, sources = [], [], []
    for c in ("kick", "hat"):
        for f in sorted((tree / c).glob("*.wav"))[1:4]:
            copies.append(aug(load_audio(f, SR), SR, rng)[0])
            classes.append(c)
            sources.append(f.name)
    res = index.search(copies, k=5, same_class=classes, sample_rate=SR)
    for r, src in zip(res, sources):
        assert r[0].source.endswith(src)
        assert r[0].signal_similarity > 0.99 and r[0].copy and "signal" in r[0].evidence
        assert all(m.signal_similarity is not None and m.signal_percentile is not None for m in r)
        d = r[0].to_dict()
        assert d["copy"] is True and "signal" in d["evidence"]


def test_silent_query_has_no_match(index):
    r = index.search([np.zeros(SR, np.float32)], k=3, sample_rate=SR)[0]
    assert len(r) == 0 and r.skipped.startswith("silent")


def test_save_load_keeps_both_tiers(index, tmp_path):
    index.save(tmp_path / "ix")
    back = CopyIndex.load(tmp_path / "ix")
    assert np.allclose(back.signal, index.signal, atol=2e-3)                # stored as float16
    assert (back.dup_pairs == index.dup_pairs).all()
    assert np.allclose(back.sig_ref_same, index.sig_ref_same, equal_nan=True)
    meta = json.loads((tmp_path / "ix" / "index.json").read_text())
    assert meta["near_duplicates"]["groups"] >= 1 and "signal_p95" in meta["reference"]["kick"]


def test_signal_fingerprint_is_gain_and_onset_invariant():
    x = hit(200, 0.8, 6, seed=1)
    y = hit(900, 0.8, 6, seed=2)
    lead = np.concatenate([np.zeros(int(0.037 * SR), np.float32), 0.3 * x])
    f = signal_fingerprints([x, 0.25 * x, lead, y], SR)
    assert f.shape == (4, SignalConfig().dim)
    assert np.allclose(np.linalg.norm(f, axis=1), 1, atol=1e-5)
    assert f[0] @ f[1] == pytest.approx(1.0, abs=1e-5)           # gain: exactly the same vector
    assert f[0] @ f[2] > 0.995                                   # a 37 ms lead-in: aligned at the onset
    assert f[0] @ f[3] < 0.9                                     # another sound is not
    assert onset_sample(lead, 30) == int(0.037 * SR)
    assert onset_sample(np.zeros(10), 30) == 0


def test_cli_query_reports_bad_files_and_goes_on(index, tree, tmp_path, capsys):
    index.save(tmp_path / "ix")
    bad = tmp_path / "broken.ogg"
    bad.write_bytes(b"OggS not really")
    silent = tmp_path / "silence.wav"
    sf.write(silent, np.zeros(SR, np.float32), SR)
    good = tree / "hat" / "hat2.wav"
    cli_main(["index", "query", "--index", str(tmp_path / "ix"), "--audio", str(bad), str(silent), str(good), "-k", "2"])
    out, err = capsys.readouterr()
    rows = [json.loads(line) for line in out.splitlines()]
    assert rows[0]["skipped"].startswith("unreadable") and rows[1]["skipped"].startswith("silent")
    assert [r["rank"] for r in rows[2:]] == [1, 2] and rows[2]["source"].endswith("hat2.wav")
    assert rows[2]["signal_similarity"] > 0.999 and rows[2]["copy"] is True
    assert "broken.ogg" in err and "silence.wav" in err and "2 of 3 file(s) skipped" in err
    with pytest.raises(SystemExit) as e:
        cli_main(["index", "query", "--index", str(tmp_path / "ix"), "--audio", str(bad)])
    assert e.value.code == 1


def test_cli_duplicates_and_argument_errors(index, tree, tmp_path, capsys):
    index.save(tmp_path / "ix")
    cli_main(["index", "duplicates", "--index", str(tmp_path / "ix")])
    out = capsys.readouterr().out
    assert "group 1 (2 clips)" in out and "kick0_soft.aiff" in out
    for flag, value in (("--seconds", "0"), ("--sample-rate", "0"), ("--sample-rate", "8000.5")):
        with pytest.raises(SystemExit) as e:
            cli_main(["index", "build", "--data", str(tree), "--out", str(tmp_path / "x"), flag, value])
        assert e.value.code == 2
        err = capsys.readouterr().err
        last = err.strip().splitlines()[-1]                          # argparse: usage, then one error line
        assert flag in last and "must be" in last and "Traceback" not in err


def test_empty_class_folder_is_refused(tmp_path, encoder):
    root = tmp_path / "d"
    (root / "ok").mkdir(parents=True)
    (root / "broken").mkdir()
    sf.write(root / "ok" / "a.wav", hit(300, 0.5, 5, 0), SR)
    sf.write(root / "ok" / "b.wav", hit(500, 0.5, 5, 1), SR)
    (root / "broken" / "x.wav").write_bytes(b"junk")
    with pytest.raises(ValueError, match="broken"):
        CopyIndex.build(str(root), encoder, progress=False)


def test_collapse_check_sees_a_collapsed_encoder(encoder, tree):
    from edmsound.audio.io import load_audio
    waves = [load_audio(f, SR) for f in sorted(tree.glob("*/*.wav"))]
    assert collapse_check(encoder, waves, SR) < 0.9
    head = CopyHead(encoder.base_dim)
    with torch.no_grad():
        for p in head.parameters():
            p.zero_()
        head.net[-1].bias.fill_(1.0)                               # every window -> the same vector
    dead = load_encoder("default", head=head)
    assert collapse_check(dead, waves, SR) > 0.999


def test_head_epochs_scale_with_the_data():
    assert auto_epochs(5600 * 3, 256) == 200                       # the built-in set: its 200 epochs
    assert auto_epochs(600 * 4, 256) == 1300                       # a small set: more passes, same steps
    assert auto_epochs(10, 256) == 2000                            # capped


def test_index_build_finetunes_the_head_on_the_sets_own_copies(tree, tmp_path, capsys):
    """The paper's procedure in one command: a head trained on this set's augmented copies, then the index."""
    out = tmp_path / "idx"
    cli_main(["index", "build", "--data", str(tree), "--out", str(out), "--finetune-head", "--no-progress"])
    text = capsys.readouterr().out
    assert "head trained on 15 clips" in text and "group(s) of near-duplicates" in text
    head = json.loads((out / "head" / "head.json").read_text())
    assert head["training"]["epochs"] >= 200 and head["training"]["clips"] == 15
    idx = CopyIndex.load(out)
    assert idx.encoder_info["has_head"] and idx.encoder.name.endswith("+copy-head")
    assert idx.encoder.weights_hash != load_encoder("default", head="default").weights_hash
    m = idx.search([hit(60 + 7, 0.37, 10, seed=1)], k=1, same_class="kick", sample_rate=SR)[0][0]
    assert m.source.endswith("kick1.wav") and m.copy


def test_index_build_on_another_set_says_how_to_finetune(tree, tmp_path, capsys):
    cli_main(["index", "build", "--data", str(tree), "--out", str(tmp_path / "i2"), "--no-progress"])
    assert "--finetune-head" in capsys.readouterr().out
