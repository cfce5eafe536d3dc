"""The Gradio app: the service, the handlers called directly, a real server on localhost called through
gradio_client (named endpoints, 8 concurrent requests, bad inputs, what the server serves), and
``python app.py`` started as a process.

Nothing here depends on the quality of the still-training default model: a tiny checkpoint is trained in
the test (20 steps on a two-class tone set) and a copy index of that set is built with the shipped encoder
and head (see :func:`app_assets`)."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import gradio as gr  # noqa: E402
import httpx  # noqa: E402
from gradio_client import Client  # noqa: E402

from edmsound.app.ui import Handlers, build_demo, launch_kwargs  # noqa: E402
from edmsound.app.service import (MAX_K, MAX_NFE, MAX_VARIATIONS, SEED_MAX, Clip, EDMSoundService, nfe_slider_spec,
    snap_nfe)

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),  # gradio + pandas 3
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]
BAD_INPUTS = [  # (class, sampler, nfe, guidance, seed, n) -> message naming the allowed range / values
    (("low", "heun", 4, 1.0, 0, 1), r"NFE 4 is not valid for heun: allowed odd values in \[1, 49\].*3, 5"),
    (("low", "euler", 0, 1.0, 0, 1), r"NFE 0 is out of range: allowed \[1, 50\]"),
    (("low", "euler", 999, 1.0, 0, 1), r"NFE 999 is out of range: allowed \[1, 50\]"),
    (("low", "euler", "ten", 1.0, 0, 1), r"NFE must be an integer in \[1, 50\]"),
    (("low", "euler", 2.5, 1.0, 0, 1), r"NFE must be an integer in \[1, 50\]"),
    (("low", "euler", 3, 25.0, 0, 1), r"guidance scale 25 is out of range: allowed \[0, 20\]"),
    (("low", "euler", 3, "loud", 0, 1), r"guidance scale must be a number in \[0, 20\]"),
    (("low", "euler", 3, 1.0, -1, 1), r"seed -1 is out of range: allowed \[0, 2147483647\]"),
    (("low", "euler", 3, 1.0, 0, 5), r"number of variations 5 is out of range: allowed \[1, 4\]"),
    (("low", "euler", 3, 1.0, 0, 0), r"number of variations 0 is out of range: allowed \[1, 4\]"),
    (("mid", "euler", 3, 1.0, 0, 1), r"unknown class 'mid'; valid: high, low"),
    (("low", "dpm", 3, 1.0, 0, 1), r"unknown sampler 'dpm'; valid: euler, heun"),
    (("../../etc/passwd", "euler", 3, 1.0, 0, 1), r"unknown class '../../etc/passwd'"),
]


# ------------------------------------------------------------------------------------------ fixtures
def app_assets(base: Path) -> tuple[Path, Path, Path]:
    """(checkpoint, index, data) for the app tests, built once per session under ``base``: a tiny model
    trained for 20 steps on a two-class tone set (``low``/``high``, 8 kHz, 0.3 s) and an index of that set
    built with the shipped encoder + head. Shared with test_app_browser.py."""
    from conftest import write_tone_tree

    from edmsound.copydetect.encoders import load_encoder
    from edmsound.copydetect.index import CopyIndex
    from edmsound.core.presets import get_preset
    from edmsound.training.trainer import Trainer
    model, index, data = base / "model", base / "index", base / "data"
    if not (model / "config.json").is_file():
        write_tone_tree(data)
        tr = Trainer(get_preset("tiny"), data, base / "run", steps=20, progress=False)
        tr.run()
        tr.export(model)
    if not (index / "index.json").is_file():
        CopyIndex.build(data, load_encoder("default", head="default"), progress=False).save(index)
    return model, index, data


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(service) -> tuple[gr.Blocks, str]:
    demo = build_demo(service)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True,
                            **launch_kwargs(quiet=True))
    return demo, url.rstrip("/")


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    return app_assets(tmp_path_factory.getbasetemp() / "app_assets")


@pytest.fixture(scope="module")
def service(assets):
    model, index, _ = assets
    svc = EDMSoundService.from_paths(model, index=index, device="cpu")
    yield svc
    svc.close()


@pytest.fixture(scope="module")
def server(service):
    demo, url = launch(service)
    yield url
    demo.close()


@pytest.fixture(scope="module")
def client(server):
    return Client(server, verbose=False)


# ------------------------------------------------------------------------------------------ service
def test_generate_16bit_wavs_nfe_counted_and_figures(service):
    r = service.generate("low", "heun", 3, 2.0, seed=5, n=2, figures="realimag")
    assert [c.seed for c in r.clips] == [5, 6] and r.settings["nfe"] == 3 and r.settings["n"] == 2
    for key in ("seconds", "real_time_factor", "sample_rate", "class", "sampler", "guidance", "seed"):
        assert key in r.settings
    assert r.settings["real_time_factor"] > 0 and r.settings["sample_rate"] == service.sample_rate == 8000
    for c in r.clips:
        info = sf.info(str(c.path))
        assert info.subtype == "PCM_16" and info.samplerate == 8000 and info.frames == len(c.wave)
        assert c.path.resolve().is_relative_to(service.workdir.resolve())
        sr, pcm = c.audio
        assert sr == 8000 and pcm.dtype == np.int16
        assert c.wav_bytes()[:4] == b"RIFF" and c.spec.shape == tuple(service.pipeline.codec.shape)
    assert len(r.figures) == 2 and r.figures[0].dtype == np.uint8 and r.figures[0].shape[2] == 3
    # reproducible: a single call with seed 6 gives clip 2 of the batch
    again = service.generate("low", "heun", 3, 2.0, seed=6, n=1, write_files=False)
    # to rounding, which this untrained test model's loud guided clips (peaks ~10-20) amplify: relative to the peak
    scale = max(1.0, float(np.abs(r.clips[1].wave).max()))
    np.testing.assert_allclose(again.clips[0].wave, r.clips[1].wave, atol=5e-4 * scale, rtol=0)
    assert np.abs(again.clips[0].wave - r.clips[0].wave).max() > 1e-2 * scale      # another seed is another clip


def test_progress_reports_every_step(service):
    calls = []
    service.generate("high", "dpmpp_2m", 4, 1.0, seed=0, n=1, write_files=False,
                     progress=lambda done, total, desc: calls.append((done, total)))
    assert calls[0] == (0, 4) and calls[-1] == (4, 4) and len(calls) == 5


@pytest.mark.parametrize("args,message", BAD_INPUTS)
def test_service_rejects_bad_values_naming_the_range(service, args, message):
    with pytest.raises(ValueError, match=message):
        service.generate(*args, write_files=False)


def test_nfe_slider_only_allows_valid_budgets():
    heun = nfe_slider_spec("heun")
    values = list(range(heun["minimum"], heun["maximum"] + 1, heun["step"]))
    assert heun["step"] == 2 and all(v % 2 == 1 for v in values) and values[-1] == MAX_NFE - 1
    euler = nfe_slider_spec("euler")
    assert euler == {"minimum": 1, "maximum": MAX_NFE, "step": 1}
    assert snap_nfe("heun", 10) == 9 and snap_nfe("edm_stochastic", 1) == 1 and snap_nfe("euler", 10) == 10


def test_neighbours_percentiles_risk_and_side_by_side(service):
    clip = service.generate("high", "euler", 4, 2.0, seed=3, n=1).clips[0]
    res = service.neighbours(clip, k=3)
    assert 1 <= len(res.neighbours) <= 3 and res.same_class and res.scope == "high"
    sims = [(nb.similarity + nb.signal_similarity) / 2 for nb in res.neighbours]     # ranked by both tiers
    assert sims == sorted(sims, reverse=True) and [nb.rank for nb in res.neighbours] == list(range(1, len(sims) + 1))
    assert all(-1 <= nb.signal_similarity <= 1 and set(nb.evidence) <= {"embedding", "signal"} for nb in res.neighbours)
    for nb in res.neighbours:
        assert nb.class_name == "high" and 0 <= nb.percentile <= 100 and nb.wave is not None
        assert sf.info(str(nb.path)).subtype == "PCM_16" and nb.spec.shape == clip.spec.shape
    assert res.risk["level"] in ("high", "low") and "95th percentile" in res.risk["text"]
    d = res.to_dict()
    assert d["neighbours"][0]["source"].endswith(".wav")
    assert d["threshold_p95"] == pytest.approx(res.threshold, abs=1e-6)
    sbs = service.side_by_side(res, rank=1, mode="magphase")
    assert sbs["pairs"] and any(p["best"] for p in sbs["pairs"]) and sbs["matrix"].shape[0] >= 1
    assert sbs["query_image"].ndim == 3 and sbs["neighbour_image"].ndim == 3
    assert len(sbs["query_marks"]) == len(sbs["train_marks"]) == len(sbs["pairs"])
    with pytest.raises(ValueError, match=r"k \(neighbours\) 11 is out of range: allowed \[1, 10\]"):
        service.neighbours(clip, k=MAX_K + 1)
    with pytest.raises(ValueError, match=r"neighbour rank"):
        service.side_by_side(res, rank=99)


def test_a_copied_training_clip_is_flagged(service, assets):
    """A training clip played back as if generated: top-1 is that clip, above the training p95."""
    _, _, data = assets
    src = data / "low" / "low_1.wav"
    wave, sr = sf.read(str(src), dtype="float32")
    assert sr == service.sample_rate
    fake = Clip(wave=wave, spec=service.encode(wave), sample_rate=sr, class_name="low", seed=0,
                settings={}, name="copy_of_low_1")
    res = service.neighbours(fake, k=2, write_files=False)
    top = res.neighbours[0]
    assert Path(top.source).name == "low_1.wav" and top.similarity > 0.999
    assert top.above_p95 and res.risk["level"] == "high" and top.evidence == ("embedding", "signal")
    assert top.signal_similarity > 0.999 and top.to_dict()["copy"] is True
    assert res.risk["text"].startswith("closer to a training clip than training recordings are to each other")


def test_missing_index_runs_without_neighbours(assets, tmp_path):
    model, _, _ = assets
    svc = EDMSoundService.from_paths(model, index=tmp_path / "no-such-index", device="cpu")
    try:
        assert not svc.has_index and "not found" in svc.index_note
        clip = svc.generate("low", "euler", 2, 1.0, 0, 1).clips[0]
        with pytest.raises(ValueError, match="neighbours panel is unavailable: copy index not found"):
            svc.neighbours(clip)
        demo = build_demo(svc)               # the UI builds, with the panel replaced by a note
        assert "neighbours-unavailable" in str(demo.config)
    finally:
        svc.close()
    with pytest.raises(FileNotFoundError):
        EDMSoundService.from_paths(model, index=tmp_path / "no-such-index", device="cpu", require_index=True)


def test_service_temp_dir_is_removed_on_close(assets):
    model, _, _ = assets
    svc = EDMSoundService.from_paths(model, device="cpu")
    path = svc.generate("low", "euler", 1, 1.0, 0, 1).clips[0].path
    assert path.is_file()
    svc.close()
    assert not path.exists() and not svc.workdir.exists()


# ------------------------------------------------------------------------------------------ handlers
def test_handlers_called_directly(service):
    h = Handlers(service)
    session, settings, paths = h.generate("high", "dpmpp_2m", 4, 2.0, 3, 2)
    assert settings["nfe"] == 4 and len(paths) == 2 and len(session["clips"]) == 2
    out = h.render_after_generate(session, "magphase")
    n = MAX_VARIATIONS
    assert len(out) == 3 * n + 2
    groups, audios, images, summary, pick = out[:n], out[n:2 * n], out[2 * n:3 * n], out[3 * n], out[3 * n + 1]
    assert [g["visible"] for g in groups] == [True, True, False, False]
    assert audios[0]["value"].endswith(".wav") and images[1]["value"].shape[2] == 3 and audios[2]["value"] is None
    assert "NFE counted **4**" in summary and "real-time factor" in summary
    assert f"({service.pipeline.device}, {service.pipeline.precision})" in summary and settings["precision"] in (
        "bf16", "fp32")
    assert [v for _, v in pick["choices"]] == [1, 2] and pick["value"] == 1

    session2, nb_json, nb_files = h.neighbours(2, 3, session)
    assert nb_json["clip"] == 2 and nb_json["name"] == session["clips"][1].name
    assert len(nb_files) == len(nb_json["neighbours"])
    assert session2["neighbours"] is not None and session["neighbours"] is None
    out = h.render_neighbours(session2, "realimag")
    badge, rows, wins = out[0], out[1], out[2]
    assert "95th percentile" in badge and "copy-risk" in badge
    assert len(rows) == len(nb_json["neighbours"]) and rows[0][0] == 1 and wins
    vis = out[3:3 + MAX_K]
    assert sum(bool(v["visible"]) for v in vis) == len(rows)
    assert out[-1]["value"] == 1
    assert h.render_neighbours(session2, "magphase", 2)[-1]["value"] == (2 if len(rows) >= 2 else 1)
    q_audio, t_audio, q_img, t_img, pairs, matrix_md = h.side_by_side(session2, 1, "magphase")
    assert q_audio.endswith(".wav") and t_audio.endswith(".wav") and q_img.ndim == t_img.ndim == 3
    assert pairs and pairs[0][0] == "A" and "cosine similarity" in matrix_md
    # a view toggle redraws only the images, reusing the pair's window marks (nothing is embedded again)
    embedded = []
    real = service.index.embed_queries
    service.index.embed_queries = lambda *a, **k: embedded.append(1) or real(*a, **k)
    try:
        view = h.rerender_view(session2, "realimag")
    finally:
        service.index.embed_queries = real
    assert len(view) == MAX_VARIATIONS + MAX_K + 2 and not embedded
    assert view[-2].shape == q_img.shape and not np.array_equal(view[-2], q_img)      # another view, same marks
    assert view[0]["label"].endswith("real + imaginary") and view[0]["value"].ndim == 3

    state, cmp_json, cmp_paths = h.compare("low", 0, 4, 1.0, ["euler", "heun", "euler"])
    assert [s["sampler"] for s in cmp_json["samplers"]] == ["euler", "heun"] and len(cmp_paths) == 2
    assert cmp_json["samplers"][1]["nfe"] == 3 and "odd budgets" in cmp_json["samplers"][1]["note"]
    out = h.render_compare(state, "realimag")
    k = len(service.samplers)
    assert [bool(v["visible"]) for v in out[:k]].count(True) == 2 and "### heun" in out[k + 1]


def test_handler_errors_are_gr_errors(service):
    h = Handlers(service)
    with pytest.raises(gr.Error, match=r"allowed \[1, 50\]"):
        h.generate("low", "euler", 99, 1.0, 0, 1)
    with pytest.raises(gr.Error, match="call generate first"):
        h.neighbours(1, 5, None)
    session, _, _ = h.generate("low", "euler", 2, 1.0, 0, 2)
    with pytest.raises(gr.Error, match=r"clip number 3 is out of range: allowed \[1, 2\]"):
        h.neighbours(3, 5, session)
    with pytest.raises(gr.Error, match=r"k \(neighbours\) 0 is out of range: allowed \[1, 10\]"):
        h.neighbours(1, 0, session)
    with pytest.raises(gr.Error, match="choose at least one sampler"):
        h.compare("low", 0, 4, 1.0, [])
    # the UI helpers
    upd = h.sampler_changed("heun", 10)
    assert upd["step"] == 2 and upd["minimum"] == 1 and upd["value"] == 9 and "odd values" in upd["info"]
    assert h.sampler_changed("euler", 9)["step"] == 1
    assert 0 <= h.random_seed() <= SEED_MAX


# ------------------------------------------------------------------------------------------ server
def test_api_has_exactly_the_named_endpoints(client):
    api = client.view_api(print_info=False, return_format="dict")
    named = api["named_endpoints"]
    assert set(named) == {"/generate", "/neighbours", "/compare", "/stop", "/vary", "/regenerate", "/extend", "/long",
                          "/loop", "/upload_source", "/history", "/keep", "/remove_unkept", "/export"}
    assert not api["unnamed_endpoints"]
    assert [p["parameter_name"] for p in named["/generate"]["parameters"]] == \
        ["class_name", "sampler", "nfe", "guidance", "seed", "n", "level", "target", "model"]
    assert [p["parameter_name"] for p in named["/neighbours"]["parameters"]] == ["clip_number", "k"]


def test_client_sees_each_clips_level_and_normalises_only_when_asked(client):
    from edmsound.audio import loudness
    settings, files = client.predict("low", "euler", 3, 1.0, 7, 2, api_name="/generate")   # level defaults: off
    assert settings["normalize"] is None
    for c, f in zip(settings["clips"], files):
        wave, sr = sf.read(f, dtype="float64")
        assert c["normalization"] is None
        assert c["level"]["lufs"] == pytest.approx(loudness.integrated_lufs(wave, sr), abs=0.1)   # 16-bit rounding
        assert c["level"]["true_peak_dbtp"] == pytest.approx(loudness.true_peak_dbtp(wave, sr), abs=0.1)
    settings, files = client.predict("low", "euler", 3, 1.0, 7, 2, "peak", -3.0, api_name="/generate")
    assert settings["normalize"] == {"mode": "peak", "target": -3.0}
    for c, f in zip(settings["clips"], files):
        wave, _ = sf.read(f, dtype="float64")
        assert loudness.sample_peak_dbfs(wave) == pytest.approx(-3.0, abs=0.01)
        assert c["normalization"]["mode"] == "peak" and c["normalization"]["before"]["sample_peak_dbfs"] != -3.0
    with pytest.raises(Exception, match=r"peak target must be in \[-60, 0\] dBFS"):
        client.predict("low", "euler", 3, 1.0, 7, 1, "peak", 6.0, api_name="/generate")


def test_client_generate_neighbours_compare(client):
    settings, files = client.predict("low", "euler", 3, 1.0, 7, 2, api_name="/generate")
    assert settings["nfe"] == 3 and [c["seed"] for c in settings["clips"]] == [7, 8] and len(files) == 2
    for f in files:
        info = sf.info(f)
        assert info.subtype == "PCM_16" and info.samplerate == 8000
    nb, nb_files = client.predict(2, 3, api_name="/neighbours")       # the session remembers the clips
    assert nb["clip"] == 2 and nb["seed"] == 8 and 1 <= len(nb["neighbours"]) <= 3
    assert nb["risk"]["level"] in ("high", "low") and len(nb_files) == len(nb["neighbours"])
    assert all(sf.info(f).subtype == "PCM_16" for f in nb_files)
    cmp, cmp_files = client.predict("high", 1, 4, 1.0, ["euler", "heun"], api_name="/compare")
    assert [(s["sampler"], s["nfe"]) for s in cmp["samplers"]] == [("euler", 4), ("heun", 3)] and len(cmp_files) == 2


def test_eight_concurrent_requests_all_succeed(server):
    def one(i):
        c = Client(server, verbose=False)
        settings, files = c.predict(["low", "high"][i % 2], "dpmpp_2m", 3, 2.0, 100 + i, 1, api_name="/generate")
        return i, settings, files

    t0 = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    for i, settings, files in results:
        assert settings["seed"] == 100 + i and settings["class"] == ["low", "high"][i % 2]
        assert settings["nfe"] == 3 and len(files) == 1 and sf.info(files[0]).subtype == "PCM_16"
    assert time.perf_counter() - t0 < 120


def test_bad_inputs_through_the_api_and_the_server_keeps_serving(client):
    from gradio_client.exceptions import AppError
    for args, message in BAD_INPUTS:
        with pytest.raises(AppError, match=message):
            client.predict(*args, api_name="/generate")
    with pytest.raises(AppError, match=r"allowed \[0, 20\]"):
        client.predict("low", 0, 3, -1, ["euler"], api_name="/compare")
    with pytest.raises(AppError, match="unknown sampler 'nope'"):
        client.predict("low", 0, 3, 1.0, ["nope"], api_name="/compare")
    fresh = Client(client.src, verbose=False)
    with pytest.raises(AppError, match="call generate first"):
        fresh.predict(1, 5, api_name="/neighbours")
    fresh.predict("high", "euler", 2, 1.0, 0, 1, api_name="/generate")
    with pytest.raises(AppError, match=r"clip number 2 is out of range: allowed \[1, 1\]"):
        fresh.predict(2, 5, api_name="/neighbours")
    # still serving, for this client and a new one
    settings, files = client.predict("high", "heun", 5, 1.5, 1, 1, api_name="/generate")
    assert settings["nfe"] == 5 and len(files) == 1
    assert fresh.predict(1, 2, api_name="/neighbours")[0]["clip"] == 1


def test_server_serves_only_its_own_files(server, service, assets):
    model, index, data = assets
    for path in [ROOT / "app.py", ROOT / "checkpoints" / "encoder" / "config.json", model / "config.json",
                 index / "index.json", data / "low" / "low_0.wav", service.workdir, Path("/etc/passwd")]:
        for prefix in ("/gradio_api/file=", "/file="):
            r = httpx.get(f"{server}{prefix}{path}")
            assert r.status_code in (403, 404), (prefix, path, r.status_code)
    r = httpx.get(f"{server}/gradio_api/file=app.py")
    assert r.status_code in (403, 404)
    # a generated file is served (from gradio's cache, not from anywhere the client names)
    c = Client(server, verbose=False, download_files=False)
    _, files = c.predict("low", "euler", 1, 1.0, 0, 1, api_name="/generate")
    url = files[0]["url"]
    assert url.startswith(server) and "/gradio_api/file=" in url
    assert httpx.get(url).content[:4] == b"RIFF"
    # uploads (sources for the tools) are capped by the server before the tools' own 20 MB check
    r = httpx.post(f"{server}/gradio_api/upload", files={"files": ("big.wav", b"\0" * 26_500_000)})
    assert r.status_code == 413


# ------------------------------------------------------------------------------------------ app.py
def _load_app_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("edmsound_app_main", ROOT / "app.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_app_flags_and_defaults(monkeypatch):
    app = _load_app_module()
    monkeypatch.delenv("SPACE_ID", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)
    a = app.parse_args([])
    assert (a.host, a.port, a.share, a.index, a.no_index, a.checkpoint) == ("127.0.0.1", 7860, False, None, False,
                                                                            None)
    found = [Path(p) for p in app.default_checkpoints()]       # the embedded models, the default first
    assert found[0] == ROOT / "checkpoints" / "default"
    assert all((p / "ema.safetensors").is_file() and p.parent == ROOT / "checkpoints" for p in found)
    assert app.parse_args(["--checkpoint", "a", "--checkpoint", "b"]).checkpoint == ["a", "b"]
    monkeypatch.setenv("SPACE_ID", "user/edmsound")
    assert app.parse_args([]).host == "0.0.0.0"
    a = app.parse_args(["--checkpoint", "x", "--index", "y", "--host", "0.0.0.0", "--port", "9000", "--share"])
    assert (a.checkpoint, a.index, a.host, a.port, a.share) == (["x"], "y", "0.0.0.0", 9000, True)
    env = {k: v for k, v in os.environ.items() if k != "GRADIO_ANALYTICS_ENABLED"}
    out = subprocess.run([sys.executable, "-c", "import app, os, sys; print(os.environ['GRADIO_ANALYTICS_ENABLED'], "
                          "'gradio' in sys.modules)"], cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_python_app_py_serves_and_rejects_a_missing_index(assets, tmp_path):
    model, index, _ = assets
    env = {k: v for k, v in os.environ.items() if k != "GRADIO_ANALYTICS_ENABLED"}
    bad = subprocess.run([sys.executable, "app.py", "--checkpoint", str(model), "--index", str(tmp_path / "nope"),
                          "--port", str(free_port())], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert bad.returncode != 0 and "nope" in bad.stderr
    port = free_port()
    proc = subprocess.Popen([sys.executable, "app.py", "--checkpoint", str(model), "--index", str(index),
                             "--port", str(port)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 240
        while True:
            try:
                if httpx.get(url + "/config", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            assert time.time() < deadline, "app.py did not start"
            time.sleep(0.5)
        c = Client(url, verbose=False)
        settings, files = c.predict("high", "euler", 2, 1.0, 0, 1, api_name="/generate")
        assert settings["nfe"] == 2 and re.search(r"high_euler_nfe2_w1_seed0\.wav$", files[0])
        assert c.predict(1, 2, api_name="/neighbours")[0]["k"] >= 1
    finally:
        proc.terminate()                    # SIGTERM: app.py closes the server and cleans up,
        time.sleep(0.3)
        proc.terminate()                    # and a repeated one does not interrupt that
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    out = proc.stdout.read()
    assert proc.returncode == 0 and "Traceback" not in out, out
    from edmsound.core.runtime import find_jemalloc
    assert ("memory allocator: jemalloc" in out) == (find_jemalloc() is not None), out
    workdir = re.search(r"generated audio is kept in (\S+)", out).group(1)
    assert workdir.startswith(tempfile.gettempdir()) and not Path(workdir).exists()


def test_a_request_over_the_cost_cap_is_refused_naming_the_limit(service, client):
    from edmsound.app.service import MAX_COST
    with pytest.raises(ValueError, match=rf"the limit is {MAX_COST} per request"):
        service.compare("low", 0, MAX_NFE, 3.0, list(service.samplers))
    assert service.check_cost(MAX_NFE, MAX_VARIATIONS, True) <= MAX_COST       # every generate fits
    with pytest.raises(Exception, match=rf"network evaluations .* the limit is {MAX_COST}"):
        client.predict("high", 1, MAX_NFE, 3.0, list(service.samplers), api_name="/compare")
    settings, _ = client.predict("low", "euler", 3, 1.0, 7, 1, api_name="/generate")   # still serving
    assert settings["nfe"] == 3


def test_visitors_see_no_server_paths(service, client):
    assert "/" not in service.info()["checkpoint"]
    settings, _ = client.predict("low", "euler", 3, 1.0, 7, 1, api_name="/generate")
    assert "/" not in settings["checkpoint"] and str(service.pipeline.checkpoint) not in str(settings)


def test_one_session_runs_one_request_at_a_time():
    from edmsound.app.ui import SessionGate
    gate = SessionGate(1)
    gate.enter("a")
    with pytest.raises(ValueError, match="already has 1 request"):
        gate.enter("a")
    gate.enter("b")                                   # other visitors are not held up
    gate.leave("a")
    gate.enter("a")
    gate.leave("a")
    gate.leave("b")
    assert gate._active == {}


def test_gradio_cache_is_private_to_the_process(server):
    d = os.environ["GRADIO_TEMP_DIR"]
    assert os.stat(d).st_mode & 0o777 == 0o700
    shared = Path(tempfile.gettempdir()) / "gradio"
    shared.mkdir(exist_ok=True)
    planted = shared / "planted_by_another_program.txt"
    planted.write_text("not yours")
    try:
        r = httpx.get(f"{server}/gradio_api/file={planted}")
        assert r.status_code in (403, 404) and "not yours" not in r.text
    finally:
        planted.unlink()


def test_a_session_cannot_run_two_requests_at_once_through_the_server(server):
    c = Client(server, verbose=False)
    jobs = [c.submit("low", "dpmpp_2m", MAX_NFE, 3.0, 1 + i, MAX_VARIATIONS, api_name="/generate") for i in range(2)]
    outcomes = []
    for j in jobs:
        try:
            j.result(timeout=300)
            outcomes.append("ok")
        except Exception as e:
            outcomes.append(str(e))
    assert outcomes.count("ok") == 1
    refused = next(o for o in outcomes if o != "ok")
    assert "already has 1 request(s) running" in refused and "the limit is 1 at a time" in refused


def test_every_response_carries_the_security_headers(server, client):
    _, files = client.predict("low", "euler", 3, 1.0, 7, 1, api_name="/generate")
    for path in ("/", "/gradio_api/info", "/gradio_api/file=" + files[0] if files[0].startswith("/") else "/"):
        r = httpx.get(f"{server}{path}")
        assert r.headers.get("x-content-type-options") == "nosniff", path
        assert r.headers.get("referrer-policy") == "strict-origin-when-cross-origin"
        assert "microphone=()" in r.headers.get("permissions-policy", "")


def test_a_running_generate_can_be_cancelled(server):
    """The Cancel button's endpoint, against the real server: the running request stops at its next step and
    the session can generate again at once."""
    c = Client(server, verbose=False)
    job = c.submit("high", "dpmpp_2m", MAX_NFE, 3.0, 5, MAX_VARIATIONS, api_name="/generate")
    time.sleep(0.3)
    c.predict(api_name="/stop")
    with pytest.raises(Exception, match="cancelled: the request was stopped"):
        job.result(timeout=120)
    settings, files = c.predict("low", "euler", 3, 1.0, 7, 1, api_name="/generate")   # the session goes on
    assert settings["nfe"] == 3 and len(files) == 1


def test_variations_of_a_generated_clip_through_the_server(server):
    c = Client(server, verbose=False)
    with pytest.raises(Exception, match="generate first"):
        c.predict(1, 0.5, 1, 0, api_name="/vary")
    settings, files = c.predict("low", "euler", 4, 1.0, 7, 1, api_name="/generate")
    src, _ = sf.read(files[0], dtype="float64")
    vs, vfiles = c.predict(1, 0.02, 2, 30, api_name="/vary")
    assert vs["variation"]["strength"] == 0.02 and vs["nfe"] == 4 and vs["sampler"] == "euler" and len(vfiles) == 2
    assert [cl["seed"] for cl in vs["clips"]] == [30, 31]
    for f in vfiles:
        w, _ = sf.read(f, dtype="float64")
        assert np.linalg.norm(w - src) / np.linalg.norm(src) < 0.1          # low strength: near the source
    with pytest.raises(Exception, match=r"strength must be in \(0, 1\]"):
        c.predict(1, 0.0, 1, 0, api_name="/vary")
