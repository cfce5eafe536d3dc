"""Several models in one app: the shipped model and a few-step student side by side (found under a checkpoints
folder, loaded once with one shared copy index, chosen per request), through the handlers and a real server."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ["HF_HUB_OFFLINE"] = "1"

import gradio as gr  # noqa: E402
from gradio_client import Client  # noqa: E402

from edmsound.app.service import EDMSoundService  # noqa: E402
from edmsound.app.ui import Handlers  # noqa: E402
from edmsound.core.storage import find_models  # noqa: E402

from test_app import app_assets, launch  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),
              pytest.mark.filterwarnings("ignore:The copy keyword is deprecated")]


def as_student(model: Path, out: Path, budget: int = 2) -> Path:
    """The tiny model's weights under a consistency-model config (what `consistency-tune` exports): it then
    samples with the consistency sampler at 1..budget steps only."""
    shutil.copytree(model, out)
    cfg = json.loads((out / "config.json").read_text())
    cfg["preset"].update(student_nfe=budget, student_sampler="consistency", default_sampler="consistency",
                         default_nfe=budget, default_guidance=1.0)
    (out / "config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def shelf(tmp_path_factory):
    """A checkpoints folder: the model as `default`, a student, and things that are not generative models."""
    model, index, _ = app_assets(tmp_path_factory.getbasetemp() / "app_assets")
    root = tmp_path_factory.mktemp("shelf")
    shutil.copytree(model, root / "default")
    as_student(model, root / "default-2step")
    (root / "encoder").mkdir()
    (root / "encoder" / "config.json").write_text(json.dumps({"architectures": ["ClapModel"]}))
    (root / "encoder" / "ema.safetensors").write_bytes(b"")
    (root / "notes").mkdir()
    return root, index


@pytest.fixture(scope="module")
def family(shelf):
    root, index = shelf
    fam = EDMSoundService.load_family(find_models(root), index=index, device="cpu")
    yield fam
    for s in fam.values():
        s.close()


def test_models_are_found_default_first_and_share_one_index(shelf, family):
    root, _ = shelf
    assert [p.name for p in find_models(root)] == ["default", "default-2step"]
    assert list(family) == ["default", "default-2step"]
    default, student = family.values()
    assert student.index is default.index and default.has_index
    assert student.samplers == ["consistency"] and "consistency model, 1 to 2 steps" in student.pipeline.summary
    assert "diffusion model" in default.pipeline.summary
    assert student.workdir != default.workdir


def test_a_model_with_other_classes_is_refused_by_name(shelf, tmp_path):
    root, index = shelf
    other = shutil.copytree(root / "default", tmp_path / "other")
    cfg = json.loads((other / "config.json").read_text())
    cfg["classes"] = ["hum", "hiss"]
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="model 'other' makes other classes"):
        EDMSoundService.load_family([root / "default", other], device="cpu")
    with pytest.raises(ValueError, match="both called 'default'"):
        EDMSoundService.load_family([root / "default", root / "default"], device="cpu")


def test_handlers_switch_models_per_request(family):
    h = Handlers(family)
    sampler, nfe, guidance, line, cmp_samplers, _ = h.model_changed("default-2step", "low", 8)
    assert sampler["choices"] == ["consistency"] and sampler["value"] == "consistency"
    assert (nfe["minimum"], nfe["maximum"], nfe["value"]) == (1, 2, 2) and "[1, 2]" in nfe["info"]
    assert "consistency model" in line and cmp_samplers["value"] == ["consistency"]
    back = h.model_changed("default", "low", 2)
    assert "dpmpp_2m" in back[0]["choices"] and back[1]["maximum"] == 50

    session, settings, paths = h.generate("low", "consistency", 2, 1.0, 4, 2, model="default-2step")
    assert settings["checkpoint"] == "default-2step" and settings["sampler"] == "consistency" and len(paths) == 2
    assert all(Path(p).resolve().is_relative_to(family["default-2step"].workdir.resolve()) for p in paths)
    out = h.render_after_generate(session, "magphase")
    assert out[8]["value"].ndim == 3                     # drawn with the student's own codec
    # a variation of the student's clip is made by the student, whatever the menu says now
    _, vs, _ = h.vary(1, 0.5, 1, 9, session, model="default")
    assert vs["checkpoint"] == "default-2step" and vs["sampler"] == "consistency"
    # without a model: the first one (the shipped default)
    _, s2, _ = h.generate("low", "euler", 3, 1.0, 0, 1)
    assert s2["checkpoint"] == "default"
    with pytest.raises(gr.Error, match=r"unknown sampler 'euler'; valid: consistency"):
        h.generate("low", "euler", 3, 1.0, 0, 1, model="default-2step")
    with pytest.raises(gr.Error, match=r"consistency at NFE 1 to 2 only \(got consistency at NFE 3\)"):
        h.generate("low", "consistency", 3, 1.0, 0, 1, model="default-2step")
    with pytest.raises(gr.Error, match=r"unknown model 'nope'; valid: default, default-2step"):
        h.generate("low", "euler", 3, 1.0, 0, 1, model="nope")
    _, cmp_json, _ = h.compare("high", 0, 2, 1.0, ["consistency"], model="default-2step")
    assert cmp_json["checkpoint"] == "default-2step" and [(s["sampler"], s["nfe"]) for s in cmp_json["samplers"]] == \
        [("consistency", 2)]


def test_the_server_takes_the_model_per_call(family):
    demo, url = launch(family)
    try:
        c = Client(url, verbose=False)
        params = c.view_api(print_info=False, return_format="dict")["named_endpoints"]["/generate"]["parameters"]
        model = [p for p in params if p["parameter_name"] == "model"][0]
        assert model["parameter_default"] == "default"
        settings, files = c.predict("high", "consistency", 1, 1.0, 0, 1, "off", 0, "default-2step",
                                    api_name="/generate")
        assert settings["checkpoint"] == "default-2step" and settings["nfe"] == 1 and len(files) == 1
        settings, _ = c.predict("high", "euler", 2, 1.0, 0, 1, api_name="/generate")
        assert settings["checkpoint"] == "default"
        with pytest.raises(Exception, match="unknown model"):
            c.predict("high", "euler", 2, 1.0, 0, 1, "off", 0, "missing", api_name="/generate")
    finally:
        demo.close()


@pytest.mark.browser
@pytest.mark.skipif(not Path("/usr/bin/chromium").exists(), reason="Debian chromium not installed")
def test_the_model_menu_in_chromium(family):
    """Choose the student in the page: the sampler menu and the NFE slider follow it, and Generate uses it."""
    from playwright.sync_api import expect, sync_playwright
    from test_app_browser import CHROMIUM, FLAGS
    demo, url = launch(family)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(url, wait_until="domcontentloaded")
                expect(page.locator("#model-dropdown")).to_be_visible(timeout=60_000)
                page.locator("#model-dropdown input").click()
                page.get_by_role("option", name=re.compile(r"^default-2step")).click()
                expect(page.locator("#model-line")).to_contain_text("consistency model", timeout=30_000)
                expect(page.locator("#sampler-dropdown input")).to_have_value("consistency", timeout=30_000)
                rng = page.locator("#nfe-slider input[type=range]")
                expect(rng).to_have_attribute("max", "2", timeout=30_000)
                page.locator("#generate-btn").click()
                expect(page.locator("#settings-summary")).to_contain_text("consistency · NFE counted 2",
                                                                          timeout=120_000)
            finally:
                browser.close()
    finally:
        demo.close()
