"""Autoguidance (guidance away from a weaker version of the model): the exact combination on analytic
denoisers, then a guide model attached to a tiny trained checkpoint through the API, the pipeline and the CLI."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from edmsound.core.analytic import ClassConditionalMixture, GaussianMixture
from edmsound.core.guidance import GuidedDenoiser, check_reference
from edmsound.core.pipeline import EDMSoundPipeline
from edmsound.training.export import attach_guide, export_model

ROOT = Path(__file__).resolve().parents[2]


def mixture(spread):
    # two classes of 1-D two-mode data; ``spread`` widens every mode (a "bad" model blurs the data)
    a = GaussianMixture([0.5, 0.5], [[-0.3], [0.3]], [spread ** 2] * 2)
    b = GaussianMixture([1.0], [[0.4]], [spread ** 2])
    return ClassConditionalMixture([a, b], [0.5, 0.5])


class Counting:
    def __init__(self, den):
        self.den, self.calls, self.null_class = den, [], den.null_class

    def __call__(self, x, sigma, labels):
        self.calls.append(labels.clone())
        return self.den(x, sigma, labels)


# ------------------------------------------------------------------------------------------ the combination
@pytest.mark.parametrize("w", [0.0, 0.5, 2.0, 3.5])
def test_guided_step_is_reference_plus_w_times_the_difference(w):
    good, bad = Counting(mixture(0.03)), Counting(mixture(0.12))
    labels = torch.tensor([0, 1, 0])
    x = torch.tensor([[-0.5], [0.1], [0.7]], dtype=torch.float64)
    sigma = torch.full((3,), 0.2, dtype=torch.float64)
    out = GuidedDenoiser(good, labels, w, reference=bad)(x, sigma)
    d_good, d_bad = good.den(x, sigma, labels), bad.den(x, sigma, labels)
    torch.testing.assert_close(out, d_bad + w * (d_good - d_bad), rtol=0, atol=1e-12)
    # the weaker model is asked for the same classes, never for the null class
    assert all(bool((c == labels).all()) for c in bad.calls)
    if w != 0.0:
        assert not torch.allclose(out, d_good)


def test_scale_one_makes_no_reference_call_and_interval_limits_it():
    good, bad = Counting(mixture(0.03)), Counting(mixture(0.12))
    x = torch.zeros(2, 1, dtype=torch.float64)
    GuidedDenoiser(good, torch.tensor([0, 1]), 1.0, reference=bad)(x, torch.full((2,), 1.0, dtype=torch.float64))
    assert bad.calls == []
    g = GuidedDenoiser(good, torch.tensor([0, 1]), 2.0, interval=(0.5, 3.0), reference=bad)
    g(x, torch.full((2,), 5.0, dtype=torch.float64))        # above the interval: conditional only
    assert bad.calls == [] and g.plain_calls == 1
    g(x, torch.full((2,), 1.0, dtype=torch.float64))
    assert len(bad.calls) == 1 and g.guided_calls == 1


def test_guidance_away_from_a_blurrier_gaussian_shrinks_by_the_closed_form():
    # one Gaussian class N(mu, s^2): D(x) = mu + k (x - mu) with k = s^2 / (s^2 + sigma^2); a weaker model with
    # S > s has a larger k, so w > 1 gives k_w = k_bad + w (k_good - k_bad) < k_good: a narrower class
    mu, s, S, sig, w = 0.4, 0.05, 0.15, 0.1, 1.2
    good, bad = mixture(s), mixture(S)
    labels = torch.ones(1, dtype=torch.long)
    x = torch.tensor([[0.7]], dtype=torch.float64)
    sigma = torch.full((1,), sig, dtype=torch.float64)
    k_g, k_b = s ** 2 / (s ** 2 + sig ** 2), S ** 2 / (S ** 2 + sig ** 2)
    k_w = k_b + w * (k_g - k_b)
    guided = GuidedDenoiser(good, labels, w, reference=bad)(x, sigma)
    assert float(guided) == pytest.approx(mu + k_w * (0.7 - mu), abs=1e-12)
    assert 0 < k_w < k_g


@pytest.mark.parametrize("bad", ["auto", "uncond", 3])
def test_reference_names_are_checked(bad):
    with pytest.raises(ValueError, match="default, null, guide"):
        check_reference(bad)


# ------------------------------------------------------------------------------------------ a tiny checkpoint
@pytest.fixture
def guided_ckpt(tiny_ckpt, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_ckpt, d)
    return d


def test_attach_guide_round_trip_and_pipeline(guided_ckpt, tmp_path):
    kw = dict(n=2, seed=3, nfe=6, guidance=2.5)
    plain = EDMSoundPipeline(guided_ckpt, device="cpu", bf16=False)   # fp32: the tolerance is the fp16-stored guide's
    assert plain.guide is None and plain.resolve_reference("default") == "null"
    cfg_clip = plain.generate("low", **kw)
    with pytest.raises(ValueError, match="has no guide model"):
        plain.generate("low", guidance_reference="guide", **kw)

    # the guide is the model itself: guidance away from an identical model changes nothing
    note = attach_guide(guided_ckpt, guided_ckpt, weights="ema", note="itself")
    assert note == "itself" and (guided_ckpt / "guide.safetensors").is_file()
    same = EDMSoundPipeline(guided_ckpt, device="cpu", bf16=False)
    assert same.preset.guide == "itself" and same.resolve_reference() == "guide"
    unguided = same.generate("low", n=2, seed=3, nfe=6, guidance=1.0)
    g = same.generate("low", **kw)
    torch.testing.assert_close(g.specs, unguided.specs, rtol=0, atol=2e-3)   # float16-stored guide
    assert g.settings["guidance_reference"] == "guide" and g.settings["guided_nfe"] > 0
    # classifier-free guidance is still there on request, and gives what the checkpoint gave before
    null = same.generate("low", guidance_reference="null", **kw)
    assert null.settings["guidance_reference"] == "null"
    torch.testing.assert_close(null.specs, cfg_clip.specs)

    # a different guide (the raw training weights) moves the clips; editing tools use it as well
    note = attach_guide(guided_ckpt, guided_ckpt, weights="model")
    assert note.startswith("step 20 (model weights)")
    other = EDMSoundPipeline(guided_ckpt, device="cpu", bf16=False)
    moved = other.generate("low", **kw)
    assert not torch.allclose(moved.specs, unguided.specs, atol=1e-2)
    looped = other.loop("low", n=1, seed=1, nfe=6, guidance=2.0)
    assert looped.settings["guidance_reference"] == "guide"

    # exporting the directory carries the guide along; removing it restores classifier-free guidance
    export_model(guided_ckpt, tmp_path / "exported")
    assert (tmp_path / "exported" / "guide.safetensors").is_file()
    assert EDMSoundPipeline(tmp_path / "exported", device="cpu").preset.guide == note
    assert attach_guide(guided_ckpt, None) is None
    assert not (guided_ckpt / "guide.safetensors").exists()
    assert EDMSoundPipeline(guided_ckpt, device="cpu").guide is None


def test_attach_guide_refuses_another_network(guided_ckpt, tmp_path):
    cfg = json.loads((guided_ckpt / "config.json").read_text())
    other = tmp_path / "other"
    shutil.copytree(guided_ckpt, other)
    cfg["classes"] = list(reversed(cfg["classes"]))
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="other classes"):
        attach_guide(guided_ckpt, other)
    cfg["classes"] = list(reversed(cfg["classes"]))
    cfg["preset"]["net"]["dim"] = 2 * cfg["preset"]["net"]["dim"]
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="another network or representation"):
        attach_guide(guided_ckpt, other)
    assert not (guided_ckpt / "guide.safetensors").exists()


def _cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "edmsound.cli", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


def test_cli_attach_guide_and_generate(guided_ckpt, tmp_path):
    r = _cli("generate", "--checkpoint", str(guided_ckpt), "--class", "low", "--nfe", "6", "--guidance", "2",
             "--guidance-reference", "guide", "--out", str(tmp_path / "o1"), "--no-figures")
    assert r.returncode == 2 and "has no guide model" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = _cli("attach-guide", "--checkpoint", str(guided_ckpt), "--guide", str(tmp_path / "missing"))
    assert r.returncode == 2 and "missing" in r.stderr
    r = _cli("attach-guide", "--checkpoint", str(guided_ckpt), "--guide", str(guided_ckpt), "--weights", "model")
    assert r.returncode == 0, r.stderr
    assert "autoguidance" in r.stdout
    r = _cli("generate", "--checkpoint", str(guided_ckpt), "--class", "low", "--nfe", "6", "--guidance", "2",
             "--out", str(tmp_path / "o2"), "--no-figures")
    assert r.returncode == 0, r.stderr
    assert "autoguidance" in r.stdout
    meta = json.loads(next((tmp_path / "o2").glob("*.json")).read_text())
    assert meta["guidance_reference"] == "guide" and meta["guided_nfe"] > 0


def test_app_service_says_which_guidance_it_runs(guided_ckpt):
    from edmsound.app.service import EDMSoundService
    from edmsound.app.ui import _settings_md, guidance_info
    plain = EDMSoundService(EDMSoundPipeline(guided_ckpt, device="cpu"), index=None)
    assert plain.defaults["guide"] is None
    assert guidance_info(plain.defaults, "low").startswith("1 = conditional, 0 = unconditional")
    attach_guide(guided_ckpt, guided_ckpt, weights="model", note="the raw weights")
    svc = EDMSoundService(EDMSoundPipeline(guided_ckpt, device="cpu"), index=None)
    assert svc.defaults["guide"] == "the raw weights"
    assert "weaker guide model (autoguidance)" in guidance_info(svc.defaults, "low")
    r = svc.generate("low", guidance=2.0, seed=1, nfe=6, write_files=False)
    assert r.settings["guidance_reference"] == "guide"
    assert "away from the weaker guide model (autoguidance)" in _settings_md(r.settings)
    r1 = svc.generate("low", guidance=1.0, seed=1, nfe=6, write_files=False)
    assert r1.settings["guidance_reference"] is None and "autoguidance" not in _settings_md(r1.settings)
