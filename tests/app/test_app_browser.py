"""End to end in headless Chromium: pick a class, click Generate, find an audio player, a spectrogram and
the training neighbours (copy-risk badge, neighbour players and spectrograms, side-by-side view), toggle the
spectrogram view, and save a screenshot.

Debian's ``chromium`` (/usr/bin/chromium) is driven by Playwright's Python API through ``executable_path``;
no browser is downloaded. The app runs on the tiny test checkpoint + index of test_app.py. To render the
README screenshot from the shipped default instead::

    EDMSOUND_APP_CHECKPOINT=checkpoints/default EDMSOUND_APP_INDEX=checkpoints/index \\
    EDMSOUND_APP_SCREENSHOT=assets/app.png python -m pytest tests/app/test_app_browser.py
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from test_app import app_assets, launch

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run"]
ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.filterwarnings("ignore:'future.no_silent_downcasting' is deprecated"),   # gradio's queue + pandas 3
    pytest.mark.filterwarnings("ignore:The copy keyword is deprecated"),
    pytest.mark.skipif(not Path(CHROMIUM).exists(),
                       reason=f"Debian chromium not installed at {CHROMIUM} (apt-get install chromium)"),
]


def wait_idle(page, timeout):
    """Until no component shows gradio's progress overlay (every queued event has finished)."""
    page.wait_for_function("() => document.querySelectorAll('[data-testid=\"status-tracker\"]:not(.hide)')"
                           ".length === 0", timeout=timeout)
    page.wait_for_timeout(500)


def set_number(page, elem_id: str, value: str) -> None:
    """Type a value into a gradio Number and commit it (blur), waiting until the field holds it, so that a click
    right after sends this value and not the one before."""
    field = page.locator(f"#{elem_id} input")
    for attempt in range(3):                  # a re-render may put the old value back: type it again
        field.fill(value)
        field.press("Tab")
        try:
            page.wait_for_function("([sel, v]) => Math.abs(parseFloat(document.querySelector(sel).value) - v) < 1e-6",
                                   arg=[f"#{elem_id} input", float(value)], timeout=5_000)
            break
        except Exception:
            if attempt == 2:
                raise
    page.wait_for_timeout(200)


def expect_result(page, selector: str, text: str, timeout) -> None:
    """``selector`` comes to contain ``text``; on failure the app's error messages are part of the report."""
    from playwright.sync_api import expect
    try:
        expect(page.locator(selector)).to_contain_text(text, timeout=timeout)
    except AssertionError as e:
        raise AssertionError(f"{e}\nerror messages on the page: {page.locator('.toast-body').all_inner_texts()}") \
            from None


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    from edmsound.app.service import EDMSoundService
    ckpt, index = os.environ.get("EDMSOUND_APP_CHECKPOINT"), os.environ.get("EDMSOUND_APP_INDEX")
    if ckpt is None:
        ckpt, index, _ = app_assets(tmp_path_factory.getbasetemp() / "app_assets")
    svc = EDMSoundService.from_paths(ckpt, index=index, device="cpu", require_index=index is not None)
    demo, url = launch(svc)
    yield url, svc
    demo.close()
    svc.close()


def test_generate_and_neighbours_in_chromium(app_url, tmp_path):
    from playwright.sync_api import expect, sync_playwright
    url, svc = app_url
    slow = "EDMSOUND_APP_CHECKPOINT" in os.environ          # the real default model on a shared CPU
    timeout = 600_000 if slow else 120_000
    klass = os.environ.get("EDMSOUND_APP_CLASS", svc.classes[-1])
    outside = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("request", lambda r: outside.append(r.url)
                    if not r.url.startswith((url, "blob:", "data:")) else None)
            page.goto(url, wait_until="domcontentloaded")
            expect(page.locator("#generate-btn")).to_be_visible(timeout=60_000)

            # pick a class, generate
            page.locator("#class-dropdown input").click()
            page.get_by_role("option", name=klass, exact=True).click()
            expect(page.locator("#class-dropdown input")).to_have_value(klass)
            page.locator("#generate-btn").click()

            # an audio player and a spectrogram
            spec = page.locator("#clip-spec-0 img")
            expect(spec).to_be_visible(timeout=timeout)
            expect(page.locator("#clip-audio-0 audio").first).to_be_attached(timeout=timeout)
            expect(page.locator("#clip-audio-0 a[download]")).to_have_attribute(
                "download", re.compile(rf"^{klass}_.*\.wav$"), timeout=timeout)      # a 16-bit WAV download
            expect(page.locator("#settings-summary")).to_contain_text("NFE counted", timeout=timeout)
            expect(page.locator("#settings-summary")).to_contain_text("real-time factor")

            # the neighbours: badge, table, a player and a spectrogram per neighbour, side by side
            expect(page.locator("#risk-badge .copy-risk")).to_be_visible(timeout=timeout)
            expect(page.locator("#risk-badge")).to_contain_text("95th percentile")
            expect(page.locator("#neighbour-table")).to_contain_text(klass, timeout=timeout)
            expect(page.locator("#nb-audio-0 audio").first).to_be_attached(timeout=timeout)
            page.locator("#nb-spec-0").scroll_into_view_if_needed()
            expect(page.locator("#nb-spec-0 img")).to_be_visible(timeout=timeout)
            page.locator("#sbs-nb-spec").scroll_into_view_if_needed()
            expect(page.locator("#sbs-nb-spec img")).to_be_visible(timeout=timeout)
            expect(page.locator("#sbs-gen-spec img")).to_be_visible(timeout=timeout)
            expect(page.locator("#pairs-table")).to_contain_text("A", timeout=timeout)

            # toggling the view re-renders the spectrogram (no new generation)
            before = spec.get_attribute("src")
            page.locator("#view").get_by_text("real + imaginary").click()
            expect(spec).not_to_have_attribute("src", before, timeout=timeout)
            page.locator("#view").get_by_text("log magnitude + phase").click()
            expect(spec).to_be_visible(timeout=timeout)

            wait_idle(page, timeout)
            page.evaluate("window.scrollTo(0, 0)")
            shot = tmp_path / "app.png"
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 20_000
            if os.environ.get("EDMSOUND_APP_SCREENSHOT"):
                dest = Path(os.environ["EDMSOUND_APP_SCREENSHOT"])
                dest = dest if dest.is_absolute() else ROOT / dest
                dest.parent.mkdir(parents=True, exist_ok=True)
                from PIL import Image                      # 256-colour PNG: a third of the size, same look
                Image.open(shot).convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE,
                                                         dither=Image.Dither.NONE).save(dest, optimize=True)

            # the NFE slider follows the sampler: Heun only offers odd budgets
            page.locator("#sampler-dropdown input").click()
            page.get_by_role("option", name="heun", exact=True).click()
            rng = page.locator("#nfe-slider input[type=range]")
            expect(rng).to_have_attribute("step", "2", timeout=30_000)
            assert int(rng.get_attribute("min")) % 2 == 1 and int(rng.input_value()) % 2 == 1
            nfe = int(rng.input_value())
            page.locator("#generate-btn").click()
            expect(page.locator("#settings-summary")).to_contain_text(f"heun · NFE counted {nfe}", timeout=timeout)
            wait_idle(page, timeout)
            page.locator("#sampler-dropdown input").click()
            page.get_by_role("option", name=svc.defaults["sampler"], exact=True).click()
            expect(rng).to_have_attribute("step", "1", timeout=30_000)
        finally:
            browser.close()
    assert not outside, f"the page fetched something outside the app: {outside[:5]}"


def test_sound_design_tools_and_session_export_in_chromium(app_url, tmp_path):
    """Each tool once from the page: upload a file, vary it, regenerate a region, continue, loop (the player
    loops), then keep two clips in the Session tab and export them as a zip."""
    import zipfile

    import numpy as np
    import soundfile as sf
    from playwright.sync_api import expect, sync_playwright
    url, svc = app_url
    slow = "EDMSOUND_APP_CHECKPOINT" in os.environ
    timeout = 600_000 if slow else 120_000
    dur = svc.pipeline.codec.num_samples / svc.sample_rate
    src = tmp_path / "my take.flac"
    t = np.arange(int(1.5 * 44100)) / 44100
    sf.write(src, 0.3 * np.sin(2 * np.pi * 220 * t), 44100)
    summary = "#settings-summary"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100}, accept_downloads=True)
            page.goto(url, wait_until="domcontentloaded")
            expect(page.locator("#generate-btn")).to_be_visible(timeout=60_000)

            page.locator("#upload-source input[type=file]").set_input_files(str(src))
            expect(page.locator("#upload-status")).to_contain_text("my take.flac", timeout=timeout)
            expect(page.locator("#source-kind input[value=upload]")).to_be_checked(timeout=timeout)   # chosen
            page.locator("#vary-btn").click()
            expect_result(page, summary, "variation", timeout)
            wait_idle(page, timeout)

            page.locator("#source-kind").get_by_text("a clip of the last generation").click()
            page.get_by_role("tab", name="Region").click()
            set_number(page, "region-start", f"{dur / 4:.3f}")
            set_number(page, "region-end", f"{dur / 2:.3f}")
            page.locator("#region-btn").click()
            expect_result(page, summary, "region regenerated", timeout)
            wait_idle(page, timeout)

            page.get_by_role("tab", name="Extend").click()
            set_number(page, "extend-seconds", f"{3 * dur:.3f}")
            page.locator("#extend-btn").click()
            expect_result(page, summary, "continued", timeout)
            expect(page.locator(summary)).to_contain_text("windows", timeout=timeout)
            wait_idle(page, timeout)

            page.get_by_role("tab", name="Loop").click()
            set_number(page, "loop-seconds", f"{2 * dur:.3f}")
            page.locator("#loop-btn").click()
            expect_result(page, summary, "seamless loop", timeout)
            expect(page.locator("#clip-audio-0")).to_contain_text("plays looped", timeout=timeout)
            wait_idle(page, timeout)

            page.get_by_role("tab", name="Session").click()
            table = page.locator("#history-table")
            for tool in ("vary", "regen", "extend", "loop"):
                expect(table).to_contain_text(tool, timeout=timeout)
            boxes = page.locator("#keep label")
            expect(boxes).to_have_count(4, timeout=timeout)
            boxes.nth(1).click()
            boxes.nth(3).click()
            wait_idle(page, timeout)
            for i in (1, 3):            # both ticks stand once the answers to them are in
                expect(boxes.nth(i).locator("input")).to_be_checked(timeout=timeout)
            page.locator("#export-btn").click()
            link = page.locator("#export-file a[download]").first
            expect(link).to_be_attached(timeout=timeout)
            with page.expect_download(timeout=timeout) as dl:
                link.click()
            path = tmp_path / "export.zip"
            dl.value.save_as(path)
            names = zipfile.ZipFile(path).namelist()
            assert len(names) == 4 and any("_regen_" in n for n in names) and any("_loop_" in n for n in names)
        finally:
            browser.close()
