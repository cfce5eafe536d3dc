"""Exporting kept clips: each format round-trips through soundfile at its bit depth, names carry the settings,
the zip holds every clip with its sidecar (duplicates renamed), and loudness normalisation hits its target."""
import io
import json
import zipfile

import numpy as np
import pytest
import soundfile as sf

from edmsound.audio import export as E
from edmsound.audio import loudness as L

SR = 16000
SETTINGS = {"class": "footsteps", "sampler": "dpmpp_2m", "nfe": 8, "guidance": 1.0, "seed": 3}


def sine(freq=440.0, amp=0.5, seconds=1.0, sr=SR):
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(sr * seconds)) / sr)).astype(np.float32)


def decode(data):
    wave, sr = sf.read(io.BytesIO(data), dtype="float64")
    return wave, sr


@pytest.mark.parametrize("fmt, container, subtype", [("wav16", "WAV", "PCM_16"), ("wav24", "WAV", "PCM_24"),
                                                     ("wav32f", "WAV", "FLOAT"), ("flac", "FLAC", E.FLAC_SUBTYPE)])
def test_each_format_round_trips_with_its_container_and_subtype(tmp_path, fmt, container, subtype):
    x = sine()
    data = E.encode_clip(x, SR, fmt)
    path = tmp_path / f"clip.{'flac' if fmt == 'flac' else 'wav'}"
    path.write_bytes(data)
    info = sf.info(path)
    assert (info.format, info.subtype, info.samplerate, info.channels, info.frames) == \
        (container, subtype, SR, 1, SR)
    y, sr = decode(data)
    assert sr == SR and np.max(np.abs(y - x)) <= 2.0 ** -15


def test_flac_is_24_bit_with_this_libsndfile():
    assert E.FLAC_SUBTYPE == "PCM_24"


def test_24_bit_keeps_a_quiet_sine_that_16_bit_rounds():
    x = sine(amp=1e-3)                                   # -60 dBFS: 16-bit steps are 3 % of its amplitude
    err = {fmt: np.max(np.abs(decode(E.encode_clip(x, SR, fmt))[0] - x)) for fmt in E.EXPORT_FORMATS}
    assert err["wav24"] < 1e-6 and err["wav32f"] < 1e-9
    assert err["flac"] < 1e-6 if E.FLAC_SUBTYPE == "PCM_24" else err["flac"] > 1e-6
    assert err["wav16"] > 1e-6


@pytest.mark.parametrize("fmt", [f for f in E.EXPORT_FORMATS if not E.keeps_overs(f)])
def test_samples_beyond_full_scale_are_clipped_not_wrapped(fmt):
    x = np.array([0.0, 1.5, -1.5, 0.999, -1.0, 2.0], np.float32)
    y, _ = decode(E.encode_clip(x, SR, fmt))
    assert y[1] > 0.999 and y[5] > 0.999 and y[2] == -1.0 and y[4] == -1.0


def test_float_wav_keeps_samples_beyond_full_scale():
    x = np.array([0.0, 1.5, -1.5, 0.999, -1.0, 2.0], np.float32)
    y, _ = decode(E.encode_clip(x, SR, "wav32f"))
    assert np.array_equal(y, x.astype(np.float64))
    assert [f for f in E.EXPORT_FORMATS if E.keeps_overs(f)] == ["wav32f"]
    assert E.extension("wav32f") == ".wav" and E.extension("flac") == ".flac"


def test_the_sidecar_level_is_the_files():
    hot = sine(amp=1.5)                                   # +3.5 dB over full scale
    _, data16, side16 = E.export_clip(hot, SR, SETTINGS, fmt="wav16")
    _, data32, side32 = E.export_clip(hot, SR, SETTINGS, fmt="wav32f")
    assert side16["level"]["sample_peak_dbfs"] == pytest.approx(0.0, abs=0.01)        # clipped in the file
    assert side32["level"]["sample_peak_dbfs"] == pytest.approx(20 * np.log10(1.5), abs=0.01)
    assert np.max(np.abs(decode(data32)[0])) == pytest.approx(1.5, abs=1e-6)


def test_invalid_format_names_the_allowed_ones():
    with pytest.raises(ValueError, match=r"export format must be one of wav16, wav24, wav32f, flac, got 'mp3'"):
        E.check_format("mp3")
    with pytest.raises(ValueError, match="wav16, wav24, wav32f, flac"):
        E.export_clip(sine(), SR, SETTINGS, fmt="ogg")
    assert E.check_format(" FLAC ") == "flac"


def test_bad_waves_are_refused():
    for bad in (np.zeros((2, 10)), np.zeros(0), np.array([0.0, np.nan])):
        with pytest.raises(ValueError):
            E.encode_clip(bad, SR, "wav16")


def test_names_carry_class_sampler_nfe_guidance_seed_and_tool():
    assert E.export_name(SETTINGS, 3, "wav16") == "footsteps_dpmpp_2m_nfe8_w1_seed3.wav"
    assert E.export_name({**SETTINGS, "guidance": 2.5, "tool": "loop"}, 7, "flac") == \
        "footsteps_loop_dpmpp_2m_nfe8_w2p5_seed7.flac"
    assert E.export_name(SETTINGS, 3, "wav24", index=2) == "footsteps_dpmpp_2m_nfe8_w1_seed3-2.wav"
    odd = {**SETTINGS, "class": "../dog bark/é", "tool": "re gen"}
    assert E.export_name(odd, 1, "wav16") == "dog_bark_re_gen_dpmpp_2m_nfe8_w1_seed1.wav"
    with pytest.raises(ValueError, match="'sampler'"):
        E.export_name({"class": "x", "nfe": 8, "guidance": 1.0}, 1, "wav16")


def test_names_match_the_generator_file_stem():
    pipeline = pytest.importorskip("edmsound.core.pipeline")
    for g in (1.0, 2.5, 0.75):
        s = {**SETTINGS, "guidance": g}
        assert E.export_name(s, 11, "wav16") == pipeline.clip_stem(s, 11) + ".wav"


def test_export_clip_returns_name_bytes_and_sidecar():
    x = sine(amp=0.25)
    name, data, side = E.export_clip(x, SR, SETTINGS, fmt="wav24")
    assert name == "footsteps_dpmpp_2m_nfe8_w1_seed3.wav"
    assert sf.info(io.BytesIO(data)).subtype == "PCM_24"
    assert {k: side[k] for k in SETTINGS} == SETTINGS
    assert side["format"] == "wav24" and side["sample_rate"] == SR and side["normalization"] is None
    assert side["level"] == L.measure(x, SR).to_dict()
    with pytest.raises(ValueError, match="'seed'"):
        E.export_clip(x, SR, {k: v for k, v in SETTINGS.items() if k != "seed"})


@pytest.mark.parametrize("fmt", ["wav16", "flac"])
def test_lufs_normalisation_reaches_the_target(fmt):
    x = sine(997, amp=0.5, seconds=2.0)                   # about -9 LUFS
    name, data, side = E.export_clip(x, SR, SETTINGS, fmt=fmt, normalize="lufs", target=-23)
    y, _ = decode(data)
    assert L.integrated_lufs(y, SR) == pytest.approx(-23.0, abs=0.5)
    rep = side["normalization"]
    assert rep["mode"] == "lufs" and rep["target"] == -23.0 and rep["gain_db"] < -10
    assert side["level"]["lufs"] == pytest.approx(-23.0, abs=0.5)


def test_peak_normalisation_and_invalid_target():
    _, data, side = E.export_clip(sine(amp=0.1), SR, SETTINGS, normalize="peak", target=-1.0)
    assert np.max(np.abs(decode(data)[0])) == pytest.approx(10 ** (-1 / 20), abs=1e-3)
    assert side["normalization"]["mode"] == "peak"
    with pytest.raises(ValueError, match="lufs target must be in"):
        E.export_clip(sine(), SR, SETTINGS, normalize="lufs", target=3)


def read_zip(data):
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in zf.infolist())
        return {n: zf.read(n) for n in zf.namelist()}


def test_zip_holds_each_clip_and_its_sidecar():
    items = [(sine(220 * (i + 1), amp=0.3), {**SETTINGS, "seed": i, "tool": "vary" if i == 2 else None})
             for i in range(3)]
    files = read_zip(E.export_zip(items, SR, fmt="flac"))
    audio = sorted(n for n in files if n.endswith(".flac"))
    sidecars = sorted(n for n in files if n.endswith(".json"))
    assert len(files) == 6 and len(audio) == 3 and len(sidecars) == 3
    assert [a[:-5] for a in audio] == [s[:-5] for s in sidecars]
    for (wave, settings) in items:
        name = E.export_name(settings, settings["seed"], "flac")
        side = json.loads(files[name[:-5] + ".json"])
        assert {k: side[k] for k in settings} == settings
        assert side["file"] == name and side["format"] == "flac" and side["normalization"] is None
        y, sr = decode(files[name])
        assert sr == SR and np.max(np.abs(y - wave)) < 1e-6
    assert "footsteps_vary_dpmpp_2m_nfe8_w1_seed2.flac" in files


def test_zip_renames_duplicates():
    items = [(sine(amp=a), dict(SETTINGS)) for a in (0.1, 0.2, 0.3)]
    files = read_zip(E.export_zip(items, SR, normalize="peak", target=-3))
    stem = "footsteps_dpmpp_2m_nfe8_w1_seed3"
    assert sorted(files) == sorted(f"{stem}{s}.{e}" for s in ("", "-2", "-3") for e in ("wav", "json"))
    for s, a in (("", 0.1), ("-2", 0.2), ("-3", 0.3)):
        side = json.loads(files[f"{stem}{s}.json"])
        assert side["file"] == f"{stem}{s}.wav"
        assert side["normalization"]["before"]["sample_peak_dbfs"] == pytest.approx(20 * np.log10(a), abs=0.01)


def test_zip_checks_everything_before_encoding():
    with pytest.raises(ValueError, match="nothing to export"):
        E.export_zip([], SR)
    with pytest.raises(ValueError, match="export format"):
        E.export_zip([(sine(), SETTINGS)], SR, fmt="aiff")
    with pytest.raises(ValueError, match="peak target"):
        E.export_zip([(sine(), SETTINGS)], SR, normalize="peak", target="loud")


def test_sidecar_json_accepts_numpy_values():
    settings = {**SETTINGS, "seed": np.int64(5), "guidance": np.float32(1.5)}
    files = read_zip(E.export_zip([(sine(), settings)], SR))
    side = json.loads(files["footsteps_dpmpp_2m_nfe8_w1p5_seed5.json"])
    assert side["seed"] == 5 and side["guidance"] == 1.5


def test_write_export_is_atomic_and_leaves_no_temporary_file(tmp_path):
    out = tmp_path / "kept.zip"
    out.write_bytes(b"old")
    assert E.write_export(out, [(sine(), SETTINGS)], SR, fmt="wav24") == out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.zip"]
    files = read_zip(out.read_bytes())
    assert sorted(files) == ["footsteps_dpmpp_2m_nfe8_w1_seed3.json", "footsteps_dpmpp_2m_nfe8_w1_seed3.wav"]
    with pytest.raises(ValueError):
        E.write_export(out, [(sine(), SETTINGS)], SR, fmt="mp3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.zip"]      # old zip untouched on failure
    assert read_zip(out.read_bytes()) == files
