"""The evaluation classifier: mel filter bank, training on the built-in set, held-out accuracy, save/load, CLI."""
import argparse
import json

import numpy as np
import pytest
import torch

from edmsound.evaluation.classifier import (DEFAULT_CLASSIFIER_DIR, AudioClassifier, accuracy_on, augment_batch,
    load_classifier, mel_filterbank, train_classifier)
from edmsound.cli.evaluate import register
from edmsound.evaluation.sweep import synth_audioset
from edmsound.data.synth import CLASSES


def _parser():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command", required=True)
    register(sub)
    return p


def test_mel_filterbank_shape_peaks_and_area():
    fb = mel_filterbank(16000, 512, 64, 30.0)
    assert fb.shape == (257, 64) and (fb >= 0).all()
    assert (fb.max(axis=0) > 0).all()                         # no empty filter
    peaks = fb.argmax(axis=0)
    assert (np.diff(peaks) >= 0).all() and peaks[-1] > 200    # centres rise up to near Nyquist
    df = 16000 / 512
    np.testing.assert_allclose(fb[:, 20:].sum(axis=0) * df, 1.0, rtol=0.1)   # unit area (Slaney)
    with pytest.raises(ValueError, match="f_min < f_max"):
        mel_filterbank(16000, 512, 64, 30.0, 9000.0)


def test_augment_batch_shift_and_gain():
    x = torch.zeros(4, 1000)
    x[:, 500] = 1.0
    y = augment_batch(x, torch.Generator().manual_seed(0), 1000, max_shift_s=0.1, noise_prob=0.0)
    pos = y.abs().argmax(dim=1)
    assert ((pos - 500).abs() <= 100).all() and (pos != 500).any()
    assert ((y.abs().amax(1) >= 0.25) & (y.abs().amax(1) <= 1.25)).all()


@pytest.fixture(scope="module")
def small_builtin():
    sr, n = 16000, 16256
    train = synth_audioset(CLASSES, 30, 0, sr, n)             # training seeds (base 0)
    held = synth_audioset(CLASSES, 10, 7, sr, n)              # fresh seeds (base 7)
    return train, held


@pytest.fixture(scope="module")
def small_classifier(small_builtin, tmp_path_factory):
    train, held = small_builtin
    out = tmp_path_factory.mktemp("clf")
    clf = train_classifier(train, out, epochs=10, batch_size=30, lr=5e-3, seed=0, holdout=held,
                           holdout_description="synth base seed 7", progress=False)
    return clf, out


def test_classifier_trained_in_test_beats_chance_on_held_out_seeds(small_classifier, small_builtin):
    clf, out = small_classifier
    _, held = small_builtin
    res = accuracy_on(clf, held)
    chance = 1 / len(CLASSES)
    assert res["accuracy"] >= 0.6 > 3 * chance, res
    assert clf.info["holdout"]["accuracy"] == pytest.approx(res["accuracy"], abs=1e-4)
    assert clf.info["holdout"]["clips"] == 70


def test_classifier_save_load_roundtrip(small_classifier, small_builtin):
    clf, out = small_classifier
    _, held = small_builtin
    meta = json.loads((out / "classifier.json").read_text())
    assert meta["format"] == "edmsound-classifier" and meta["classes"] == list(CLASSES)
    assert meta["config"]["num_samples"] == 16256 and meta["holdout"]["source"] == "synth base seed 7"
    loaded = AudioClassifier.load(out)
    p1 = clf.predict_proba(held.waves[:6], 16000)
    p2 = loaded.predict_proba(held.waves[:6], 16000)
    np.testing.assert_allclose(p1, p2, atol=1e-5)
    np.testing.assert_allclose(p2.sum(axis=1), 1.0, atol=1e-5)
    # other rates and lengths are resampled / fitted
    p3 = loaded.predict_proba([held.waves[0][::2], held.waves[1][:5000]], 8000)
    assert p3.shape == (2, len(CLASSES)) and np.isfinite(p3).all()
    with pytest.raises(FileNotFoundError, match="not a classifier directory"):
        AudioClassifier.load(out / "nope")


def test_cli_classifier_train_on_tone_tree(tone_tree, tmp_path):
    out = tmp_path / "clf"
    a = _parser().parse_args(["classifier", "train", "--data", str(tone_tree), "--out", str(out), "--epochs", "2",
                              "--batch-size", "4", "--sample-rate", "8000", "--no-progress"])
    a.func(a)
    clf = load_classifier(out)
    assert clf.classes == ["high", "low"] and clf.config.sample_rate == 8000
    assert "holdout" not in clf.info                            # auto: not a synth tree -> no held-out set
    assert clf.info["training"]["steps"] == 4


def test_cli_classifier_rejects_holdout_seed_of_training_tree(tmp_path):
    from edmsound.data.synth import write_dataset
    data = tmp_path / "syn"
    write_dataset(data, per_class=2, seed=0, seconds=0.3, classes=["rain", "gunshot"], progress=False)
    a = _parser().parse_args(["classifier", "train", "--data", str(data), "--out", str(tmp_path / "c"),
                              "--holdout-seed", "0", "--no-progress"])
    with pytest.raises(SystemExit) as e:
        a.func(a)
    assert e.value.code == 2


@pytest.mark.skipif(not (DEFAULT_CLASSIFIER_DIR / "classifier.json").is_file(), reason="no committed classifier")
def test_committed_classifier_on_fresh_seeds():
    clf = load_classifier("default")
    assert clf.classes == list(CLASSES)
    assert clf.info["holdout"]["accuracy"] >= 0.95
    held = synth_audioset(CLASSES, 4, 11, clf.config.sample_rate, clf.config.num_samples)   # unseen base seed
    assert accuracy_on(clf, held)["accuracy"] >= 0.85
