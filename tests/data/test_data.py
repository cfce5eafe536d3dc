import numpy as np
import pytest
import soundfile as sf

from edmsound.audio.io import AUDIO_EXTENSIONS, AudioLoadWarning, AudioReadError, load_audio
from edmsound.data.folder import load_folder, read_clip, scan_folder, split_indices


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
    assert ds.report.reason_counts() == {"unreadable": 1, "empty": 1, "silent": 1}
    assert len(ds) == 8 and ds.counts() == {"high": 4, "low": 4}
    assert ds.waves.shape == (8, 2016) and ds.waves.dtype == np.float32
    s = ds.summary()
    assert "skipped 3 of 11 file(s): 1 empty, 1 silent, 1 unreadable" in s and "corrupt.wav" in s
    assert "Format not recognised" in reasons[str(tone_tree / "low" / "corrupt.wav")]


def test_every_listed_format_reads_the_same(tmp_path):
    """AIFF, MP3, Opus, FLAC and WAV all load through the one reader (MP3/Opus within codec error)."""
    sr = 48000
    t = np.arange(sr // 2) / sr
    x = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    formats = {".wav": ("WAV", "PCM_16"), ".flac": ("FLAC", "PCM_16"), ".aiff": ("AIFF", "PCM_16"),
               ".aif": ("AIFF", "PCM_24"), ".mp3": ("MP3", "MPEG_LAYER_III"), ".opus": ("OGG", "OPUS"),
               ".ogg": ("OGG", "VORBIS")}
    (tmp_path / "tone").mkdir()
    for ext, (fmt, sub) in formats.items():
        assert ext in AUDIO_EXTENSIONS
        sf.write(tmp_path / "tone" / f"x{ext}", x, sr, format=fmt, subtype=sub)
    ds = load_folder(tmp_path, 16000, None, progress=False, verbose=False)
    assert len(ds) == len(formats) and not ds.skipped
    for w, src in zip(ds.waves, ds.sources):
        rms = np.sqrt(np.mean(w[2000:6000] ** 2))
        assert abs(20 * np.log10(rms / (0.5 / np.sqrt(2)))) < 0.5, src       # level kept
        assert abs(len(w) - 8000) < 700, (src, len(w))                        # own length (codec padding aside)


def test_skip_reasons_say_what_happened(tmp_path):
    sr = 8000
    (tmp_path / "a").mkdir()
    tone = (0.5 * np.sin(np.arange(sr) / 3)).astype(np.float32)
    sf.write(tmp_path / "a" / "ok.wav", tone, sr)
    sf.write(tmp_path / "a" / "quiet.wav", tone * 1e-3, sr, subtype="FLOAT")                # -66 dBFS peak
    sf.write(tmp_path / "a" / "hiss.wav", np.full(sr, 3e-6, np.float32), sr, subtype="FLOAT")   # -110 dBFS
    late = np.concatenate([np.zeros(2 * sr, np.float32), tone])                            # starts at 2 s
    sf.write(tmp_path / "a" / "late.wav", late, sr)
    ds = load_folder(tmp_path, sr, sr // 2, progress=False, verbose=False)
    r = {p.split("/")[-1]: why for p, why in ds.skipped}
    assert r["quiet.wav"].startswith("too quiet (peak -66")
    assert r["hiss.wav"].startswith("silent (peak -110")
    assert r["late.wav"].startswith("onset outside the clip (sound starts at 2.00 s")
    assert len(ds) == 1


def test_cut_report_counts_lost_energy(tmp_path):
    sr = 8000
    (tmp_path / "a").mkdir()
    x = np.zeros(2 * sr, np.float32)
    x[:sr] = 0.5
    x[sr:] = 0.5                                         # half the energy after 1 s
    sf.write(tmp_path / "a" / "long.wav", x, sr)
    sf.write(tmp_path / "a" / "short.wav", x[: sr // 2], sr)
    ds = load_folder(tmp_path, sr, sr, progress=False, verbose=False)
    assert len(ds.report.cut) == 1
    path, secs, lost = ds.report.cut[0]
    assert path.endswith("long.wav") and secs == pytest.approx(2.0) and lost == pytest.approx(0.5, abs=1e-3)
    assert "1 lost more than 10 %" in ds.summary() and "long.wav: 2.00 s, 50 %" in ds.summary()
    var = load_folder(tmp_path, sr, None, progress=False, verbose=False)       # own lengths: nothing cut
    assert sorted(var.lengths.tolist()) == [sr // 2, 2 * sr] and not var.report.cut


def test_empty_class_is_refused_by_name(tone_tree):
    (tone_tree / "broken").mkdir()
    (tone_tree / "broken" / "x.wav").write_bytes(b"nope")
    with pytest.raises(ValueError, match=r"without a usable clip: broken \(1 unreadable\)"):
        load_folder(tone_tree, 8000, 2016, progress=False, verbose=False)


def test_class_order_from_checkpoint(tone_tree):
    with pytest.raises(ValueError, match="absent"):
        load_folder(tone_tree, 8000, 2016, classes=["low", "high", "absent"], progress=False, verbose=False)
    ds = load_folder(tone_tree, 8000, 2016, classes=["low", "high", "absent"], progress=False, verbose=False,
                     allow_empty_classes=True)
    assert ds.classes == ["low", "high", "absent"]
    assert set(ds.labels.tolist()) == {0, 1}


@pytest.mark.parametrize("sr,n,why", [(0, 100, "sample rate"), (-5, 100, "sample rate"), (8000.5, 100, "sample rate"),
                                      (8000, 0, "clip length")])
def test_bad_arguments_are_one_clear_error(tone_tree, sr, n, why):
    with pytest.raises(ValueError, match=why):
        load_folder(tone_tree, sr, n, progress=False, verbose=False)


def test_read_clip_and_load_audio_errors(tmp_path):
    p = tmp_path / "x.mp3"
    p.write_bytes(b"\x00" * 100)
    wave, why, _ = read_clip(p, 16000)
    assert wave is None and why.startswith("unreadable")
    with pytest.raises(AudioReadError) as e:
        load_audio(tmp_path / "missing.wav", 16000)
    assert "missing.wav" in str(e.value) and e.value.reason.startswith("unreadable")


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
