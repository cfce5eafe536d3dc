"""The sound-designer tools in the app: uploads, region regeneration, continuation, long clips, loops, and the
session history with keep / remove / export — through the handlers and through the real server."""
from __future__ import annotations

import io
import json
import zipfile

import httpx
import numpy as np
import pytest
import soundfile as sf
from gradio_client import Client, handle_file

from test_app import assets, server, service  # noqa: F401 - the app tests' fixtures, shared

from edmsound.app.service import MAX_TOOL_SECONDS
from edmsound.app.ui import Handlers

pytestmark = pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated")

KNOBS = ("low", "euler", 3, 1.0)          # class, sampler, NFE, guidance


def _tone(path, seconds, sr=44100, channels=2, fmt=None):
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * 330 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    sf.write(path, np.stack([x] * channels, 1) if channels > 1 else x, sr, format=fmt)
    return path


def test_tools_through_the_handlers_and_the_session_history(service, tmp_path):
    h = Handlers(service)
    sr = service.sample_rate
    dur = service.pipeline.codec.num_samples / sr
    s, st, _ = h.generate(*KNOBS, 0, 2)
    src = s["clips"][0].wave
    # region: the samples outside the border overlap are the source's
    s, st, files = h.regenerate("clip", 1, dur / 3, dur / 2, 0, 0, 1.0, *KNOBS, 5, 1, "off", None, s)
    out, _ = sf.read(files[0], dtype="float32")
    lo, hi = st["kept_outside"]
    mask = np.ones(len(src), bool)
    mask[int(lo * sr):int(np.ceil(hi * sr))] = False
    assert st["tool"] == "regen" and np.abs(out[mask] - src[mask]).max() <= 2 / 32768      # 16-bit file
    # continuation of the regenerated clip, a long clip and a loop
    s, st, files = h.extend("clip", 1, 3 * dur, *KNOBS, 1, 1, "off", None, s)
    assert st["tool"] == "extend" and sf.info(files[0]).frames == round(3 * dur * sr)
    s, st, _ = h.long(2.5 * dur, *KNOBS, 2, 1, "lufs", -20, s)
    assert st["tool"] == "long" and st["normalize"] == {"mode": "lufs", "target": -20.0}
    s, st, files = h.loop(2 * dur, False, "clip", 1, *KNOBS, 3, 1, "off", None, s)
    assert st["tool"] == "loop" and st["windows"] >= 2
    slots = h.render_clips(s, "magphase")
    assert slots[4]["loop"] is True and "plays looped" in slots[4]["label"]     # the loop's player loops
    # an uploaded file: any rate and channel count, made to sound like a class
    up = _tone(tmp_path / "mine.wav", 1.5)
    s, md = h.upload_source(str(up), s)
    assert "mine.wav" in md and "1.50 s" in md
    s, st, _ = h.vary(1, 0.5, 1, 4, s, "upload", "high", "euler", 3, 1.0)
    assert st["class"] == "high" and st["tool"] == "vary"
    s, st, _ = h.loop(None, True, "upload", None, *KNOBS, 0, 1, "off", None, s)
    assert st["windows"] == service.pipeline.windows_for("loop", source_seconds=1.5) and st["source"] is True
    # the history: every clip in order, numbered; keep, remove, export
    hist = h.history(s)
    assert [c["number"] for c in hist] == list(range(1, 9))
    assert [c["tool"] for c in hist] == ["generate", "generate", "regen", "extend", "long", "loop", "vary", "loop"]
    rows, keep, pick = h.render_history(s)
    assert len(rows) == 8 and pick["value"] == 8
    s, hist = h.keep([3, 4, 6], s)
    assert [c["number"] for c in hist if c["kept"]] == [3, 4, 6]
    z = zipfile.ZipFile(h.export("wav24", "off", None, s))
    names = sorted(z.namelist())
    assert len(names) == 6 and sum(n.endswith(".json") for n in names) == 3
    wavs = [n for n in names if n.endswith(".wav")]
    assert any("_regen_" in n for n in wavs) and any("_loop_" in n for n in wavs)
    side = json.loads(z.read(wavs[0][:-4] + ".json"))
    assert side["format"] == "wav24" and {"class", "sampler", "nfe", "guidance", "seed"} <= set(side)
    assert sf.info(io.BytesIO(z.read(wavs[0]))).subtype == "PCM_24"
    s, hist = h.keep([4], s)
    as_float = h.export("wav32f", "off", None, s)
    assert as_float.endswith(".wav") and sf.info(as_float).subtype == "FLOAT"
    one = h.export("flac", "peak", -3.0, s)
    assert one.endswith(".flac") and "_extend_" in one
    w, _ = sf.read(one)
    assert 20 * np.log10(np.abs(w).max()) == pytest.approx(-3.0, abs=0.05)
    s, hist = h.remove_unkept(s)
    assert [c["number"] for c in hist] == [4]
    s, st, _ = h.generate(*KNOBS, 9, 1, session=s)
    assert [c["number"] for c in h.history(s)] == [4, 9]                       # numbers are never reused


@pytest.mark.parametrize("call, message", [
    (lambda h, s: h.regenerate("clip", 1, 0.2, 0.1, 0, 0, 1.0, *KNOBS, 0, 1, "off", None, s), "not inside the clip"),
    (lambda h, s: h.regenerate("clip", 1, 0.0, 0.1, 3000, 1000, 1.0, *KNOBS, 0, 1, "off", None, s), "band"),
    (lambda h, s: h.extend("clip", 1, 0.1, *KNOBS, 0, 1, "off", None, s), "one model window"),
    (lambda h, s: h.long(MAX_TOOL_SECONDS + 1, *KNOBS, 0, 1, "off", None, s), f"{MAX_TOOL_SECONDS:g} s in the app"),
    (lambda h, s: h.extend("upload", 1, 1.0, *KNOBS, 0, 1, "off", None, s), "no uploaded file"),
    (lambda h, s: h.vary(3, 0.5, 1, 0, s), r"clip number 3 is out of range"),
    (lambda h, s: h.export("mp3", "off", None, dict(s, kept=[1])), "export format must be one of wav16, wav24, wav32f, flac"),
    (lambda h, s: h.export("wav16", "off", None, s), "tick the clips to keep"),
    (lambda h, s: h.keep(["x"], s), "whole numbers"),
    (lambda h, s: h.long(MAX_TOOL_SECONDS, "low", "euler", 50, 1.0, 0, 4, "off", None, s), "network evaluations"),
])
def test_tool_errors_are_one_line(service, call, message):
    import gradio as gr
    h = Handlers(service)
    s, _, _ = h.generate(*KNOBS, 0, 2)
    with pytest.raises(gr.Error, match=message) as e:
        call(h, s)
    assert "\n" not in str(e.value)


def test_uploads_are_checked_with_one_clear_line(service, tmp_path):
    import gradio as gr
    h = Handlers(service)
    ok = _tone(tmp_path / "take.flac", 0.8, sr=22050, channels=1)
    s, md = h.upload_source(str(ok), None)
    assert len(s["source"]["wave"]) == round(0.8 * service.sample_rate)
    cases = [(_tone(tmp_path / "long.ogg", 61, sr=8000, channels=1, fmt="OGG"), "over the 60 s limit"),
             (tmp_path / "notes.txt", "WAV, FLAC, OGG or MP3"),
             (tmp_path / "broken.wav", "unreadable")]
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    for path, msg in cases:
        with pytest.raises(gr.Error, match=msg) as e:
            h.upload_source(str(path), s)
        assert str(tmp_path) not in str(e.value)                 # the server's folders stay private
    assert s["source"]["wave"] is not None                       # a refused upload loses nothing


def test_tools_through_the_server(server, tmp_path):
    c = Client(server, verbose=False)
    named = c.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/upload_source", "/regenerate", "/extend", "/long", "/loop", "/history", "/keep", "/export",
            "/remove_unkept"} <= set(named)
    up = _tone(tmp_path / "source.mp3", 1.0, sr=48000, channels=2, fmt="MP3")
    status = c.predict(handle_file(str(up)), api_name="/upload_source")
    assert "source.mp3" in status
    st, files = c.predict("upload", 1, 0.1, 0.2, 0, 0, 1.0, *KNOBS, 3, 2, "off", -1, api_name="/regenerate")
    assert st["tool"] == "regen" and len(files) == 2 and [cl["seed"] for cl in st["clips"]] == [3, 4]
    st, files = c.predict("upload", 1, 2.0, *KNOBS, 0, 1, "off", -1, api_name="/extend")
    assert sf.info(files[0]).duration == pytest.approx(2.0, abs=1e-3)
    st, files = c.predict(0.6, False, "clip", 1, *KNOBS, 0, 1, "off", -1, api_name="/loop")
    assert st["tool"] == "loop"
    hist = c.predict(api_name="/history")
    assert [h["tool"] for h in hist] == ["regen", "regen", "extend", "loop"]
    c.predict([1, 4], api_name="/keep")
    z = c.predict("wav16", "off", -1, api_name="/export")
    assert zipfile.ZipFile(z).namelist() and len(zipfile.ZipFile(z).namelist()) == 4
    with pytest.raises(Exception, match="no clip #7"):
        c.predict([7], api_name="/keep")
    # a valid audio file outside the server's upload folder is not read, whoever names it
    outside = _tone(tmp_path / "outside.wav", 0.5, sr=8000, channels=1)
    r = httpx.post(f"{server}/gradio_api/call/upload_source",
                   json={"data": [{"path": str(outside), "meta": {"_type": "gradio.FileData"}}]})
    events = httpx.get(f"{server}/gradio_api/call/upload_source/{r.json()['event_id']}", timeout=60).text
    assert "event: error" in events and "not uploaded by a user" in events
