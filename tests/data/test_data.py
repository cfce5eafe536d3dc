import numpy as np
import pytest
import soundfile as sf

from edmsound.audio.io import AudioLoadWarning
from edmsound.data.folder import load_folder, scan_folder, split_indices


def test_loader_skips_and_names_bad_files(tone_tree):
    (tone_tree / "low" / "corrupt.wav").write_bytes(b"RIFF....not a wave")
    sf.write(tone_tree / "high" / "empty.wav", np.zeros((0,), np.float32), 8000)
    sf.write(tone_tree / "high" / "silent.flac", np.zeros(800, np.float32), 8000)
    with pytest.warns(AudioLoadWarning) as rec:
        ds = load_folder(tone_tree, 8000, 2016, progress=False)
    msgs = " ".join(str(w.message) for w in rec)
    assert "corrupt.wav" in msgs and "empty.wav" in msgs
    reasons = dict(ds.skipped)
    assert any("corrupt.wav" in p for p in reasons)
    assert any("silent" in r for p, r in reasons.items() if p.endswith("silent.flac"))
    assert len(ds) == 8 and ds.counts() == {"high": 4, "low": 4}
    assert ds.waves.shape == (8, 2016) and ds.waves.dtype == np.float32
    s = ds.summary()
    assert "skipped 3 file(s)" in s and "corrupt.wav" in s


def test_resample_mono_and_fit(tmp_path):
    (tmp_path / "a").mkdir()
    sr = 44100
    t = np.arange(sr) / sr
    stereo = np.stack([np.sin(2 * np.pi * 1000 * t), np.sin(2 * np.pi * 1000 * t)], 1) * 0.5
    sf.write(tmp_path / "a" / "x.ogg", stereo.astype(np.float32), sr)
    ds = load_folder(tmp_path, 16000, 8000, progress=False, verbose=False)
    w = ds.waves[0]
    assert w.shape == (8000,)
    spec = np.abs(np.fft.rfft(w[1000:7000]))
    peak_hz = np.argmax(spec) * 16000 / 6000
    assert abs(peak_hz - 1000) < 10
    assert 0.4 < np.abs(w).max() < 0.6


def test_class_order_from_checkpoint(tone_tree):
    ds = load_folder(tone_tree, 8000, 2016, classes=["low", "high", "absent"], progress=False, verbose=False)
    assert ds.classes == ["low", "high", "absent"]
    assert set(ds.labels.tolist()) == {0, 1}


def test_missing_and_empty_tree(tmp_path):
    with pytest.raises(FileNotFoundError):
        scan_folder(tmp_path / "nope")
    (tmp_path / "cls").mkdir()
    with pytest.raises(FileNotFoundError, match="class-per-folder"):
        scan_folder(tmp_path)


def test_split_is_deterministic_and_disjoint():
    a, b = split_indices(100, 0.05, seed=3)
    a2, b2 = split_indices(100, 0.05, seed=3)
    assert (a == a2).all() and (b == b2).all()
    assert len(b) == 5 and not set(a) & set(b) and len(a) + len(b) == 100
