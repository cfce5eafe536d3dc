"""The evaluation sweep on a tiny checkpoint trained in the test: plan, cache, table, plots, CLI."""
import csv
import os
import json

import numpy as np
import pytest
import soundfile as sf

from edmsound.evaluation import points as P
from edmsound.evaluation import sweep as E
from edmsound.evaluation.points import SweepPoint, noise_seed, plan_sweep
from edmsound.evaluation.sweep import evaluate_sweep


# ------------------------------------------------------------------------------------------ planning
def test_plan_maps_invalid_heun_budgets_to_the_nearest_valid_one():
    pts, notes = plan_sweep(["heun", "deis"], [5, 10, 20], [1, 2])
    heun = sorted({(p.requested_nfe, p.nfe) for p in pts if p.sampler == "heun"})
    assert heun == [(5, 5), (10, 9), (20, 19)]                     # ties go to the lower budget
    assert sorted({p.nfe for p in pts if p.sampler == "deis"}) == [5, 10, 20]
    assert len(pts) == 12 and len(notes) == 2 and "NFE 10" in notes[0] and "using NFE 9" in notes[0]
    assert SweepPoint("heun", 9, 2.0, 10).key == "heun_nfe9_w2"
    assert SweepPoint("deis", 5, 1.5, 5).key == "deis_nfe5_w1p5"


def test_plan_skip_policy_and_duplicates():
    pts, notes = plan_sweep(["heun"], [9, 10, 11], [1], invalid_nfe="skip")
    assert [p.nfe for p in pts] == [9, 11] and "skipped" in notes[0]
    pts, _ = plan_sweep(["heun"], [9, 10], [1])                    # 10 -> 9 duplicates 9
    assert [(p.nfe, p.requested_nfe) for p in pts] == [(9, 9)]


def test_plan_explicit_points_extend_or_replace_the_grid():
    from edmsound.evaluation.points import parse_points
    extra = parse_points("heun:51:2, dpmpp_2m:10:4,dpmpp_2m:10:2")
    assert extra == [("heun", 51, 2.0), ("dpmpp_2m", 10, 4.0), ("dpmpp_2m", 10, 2.0)]
    pts, _ = plan_sweep(["dpmpp_2m"], [5, 10], [2], extra_points=extra)
    # the grid first, then the extra points; (dpmpp_2m, 10, 2) is already in the grid
    assert [p.key for p in pts] == ["dpmpp_2m_nfe5_w2", "dpmpp_2m_nfe10_w2", "heun_nfe51_w2", "dpmpp_2m_nfe10_w4"]
    pts, notes = plan_sweep([], [], [], extra_points=[("heun", 50, 1)])       # points only; 50 -> 49
    assert [(p.nfe, p.requested_nfe) for p in pts] == [(49, 50)] and "using NFE 49" in notes[0]
    with pytest.raises(ValueError, match="SAMPLER:NFE:GUIDANCE"):
        parse_points("heun:51")
    with pytest.raises(ValueError, match="integer NFE"):
        parse_points("heun:ten:2")
    with pytest.raises(ValueError, match="unknown sampler"):
        plan_sweep([], [], [], extra_points=[("dpm", 10, 1)])
    with pytest.raises(ValueError, match="or explicit points"):
        plan_sweep([], [5], [1])


def test_plan_rejects_bad_values_naming_the_allowed_ones():
    with pytest.raises(ValueError, match="unknown sampler 'dpm'.*heun"):
        plan_sweep(["dpm"], [5], [1])
    with pytest.raises(ValueError, match=r"NFE must be an integer in \[1, 200\]"):
        plan_sweep(["heun"], [0], [1])
    with pytest.raises(ValueError, match=r"allowed \[0, 20\]"):
        plan_sweep(["heun"], [5], [30])
    with pytest.raises(ValueError, match="invalid_nfe must be one of nearest, skip"):
        plan_sweep(["heun"], [5], [1], invalid_nfe="round")


def test_noise_seeds_are_disjoint_across_classes_and_clips():
    seeds = {noise_seed(0, c, i) for c in range(7) for i in range(64)}
    assert len(seeds) == 7 * 64
    assert noise_seed(2, 3, 4) == 2_300_004


def test_builtin_reference_is_disjoint_from_training_seeds():
    ref, desc = E.load_reference("builtin", ["rain", "gunshot"], 16000, 4000, per_class=3)
    assert all(s.startswith("synth://") and int(s.rsplit("/", 1)[1]) >= 7_000_000 for s in ref.sources)
    assert "base seed 7" in desc and ref.waves.shape == (6, 4000)
    with pytest.raises(ValueError, match="training set's base seed"):
        E.load_reference("builtin", ["rain"], 16000, 4000, per_class=2, seed=0)
    with pytest.raises(ValueError, match="not built-in classes"):
        E.load_reference("builtin", ["low"], 16000, 4000, per_class=2)


@pytest.mark.parametrize("small, large", [(2, 5), (5, 2), (3, 3)])
def test_builtin_references_are_the_clips_a_call_of_their_own_makes(small, large):
    classes = ["rain", "gunshot"]
    (a, a_desc), (b, b_desc) = E.load_references("builtin", classes, 16000, 4000, small, large)
    for ds, desc, n in ((a, a_desc, small), (b, b_desc, large)):
        alone, alone_desc = E.load_reference("builtin", classes, 16000, 4000, per_class=n)
        assert desc == alone_desc and ds.sources == alone.sources and ds.classes == alone.classes
        np.testing.assert_array_equal(ds.labels, alone.labels)
        np.testing.assert_array_equal(ds.waves, alone.waves)


def test_folder_references_read_each_size(world):
    root = str(world / "ref")
    (a, _), (b, _) = E.load_references(root, ["low"], 16000, 4000, 2, None)
    assert len(a) == 2 and len(b) == len(E.load_reference(root, ["low"], 16000, 4000, None)[0]) > 2
    (c, _), (d, _) = E.load_references(root, ["low"], 16000, 4000, 3, 3)
    assert c is d and len(c) == 3


# ------------------------------------------------------------------------------------------ the sweep
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny checkpoint, a held-out reference tree, a small random encoder, a classifier and an index."""
    from conftest import write_tone_tree
    from transformers import ClapAudioModelWithProjection

    from edmsound.evaluation.classifier import train_classifier
    from edmsound.data.folder import load_folder
    from edmsound.copydetect.pretrain import default_encoder_config
    from edmsound.copydetect.encoders import load_encoder, save_encoder_dir
    from edmsound.copydetect.index import CopyIndex
    from edmsound.core.presets import get_preset
    from edmsound.training.trainer import Trainer
    d = tmp_path_factory.mktemp("eval")
    write_tone_tree(d / "data")
    write_tone_tree(d / "ref", seed=1)
    tr = Trainer(get_preset("tiny"), d / "data", d / "run", steps=20, progress=False)
    tr.run()
    tr.export(d / "model")
    import torch
    torch.manual_seed(0)
    cfg, fe = default_encoder_config(projection_dim=32)
    save_encoder_dir(ClapAudioModelWithProjection(cfg), fe, d / "encoder", name="test-encoder",
                     window_seconds=0.5, hop_seconds=0.25)
    train_classifier(d / "data", d / "classifier", config=_clf_cfg(), epochs=3, batch_size=4, progress=False)
    enc = load_encoder(d / "encoder")
    ds = load_folder(d / "data", 8000, 2000, progress=False, verbose=False)
    CopyIndex.build(ds, enc, progress=False).save(d / "index")
    return d


def _clf_cfg():
    from edmsound.evaluation.classifier import ClassifierConfig
    return ClassifierConfig(sample_rate=8000, channels=(8, 16))


def _run(world, out, **kw):
    args = dict(reference=world / "ref", samplers=["heun", "dpmpp_2m"], nfes=[2, 3], guidances=[1, 2],
                n_per_class=3, encoder=world / "encoder", classifier=world / "classifier", index=world / "index",
                reference_per_class=0, kid_subsets=10, progress=False, log=lambda *_: None)
    model = kw.pop("model", world / "model")
    args.update(kw)
    return evaluate_sweep(model, out, **args)


@pytest.fixture(scope="module")
def swept(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep")
    return out, _run(world, out)


def test_sweep_writes_csv_markdown_and_plots(swept):
    out, res = swept
    rows = list(csv.DictReader((out / "results.csv").open()))
    gen = [r for r in rows if r["kind"] == "generated"]
    assert len(gen) == 8 * 3                                        # 8 configurations x (2 classes + overall)
    keys = {(r["sampler"], r["requested_nfe"], r["nfe"], r["guidance"]) for r in gen}
    assert ("heun", "2", "1", "1") in keys and ("dpmpp_2m", "2", "2", "2") in keys
    assert {r["class"] for r in gen} == {"high", "low", "overall"}
    for r in gen:
        assert float(r["fad"]) >= 0 and np.isfinite(float(r["kid"])) and float(r["kid_std"]) >= 0
        assert 0 <= float(r["accuracy"]) <= 1 and 0 <= float(r["copy_share"]) <= 1
        assert 1 - 1e-6 <= float(r["inception_score"]) <= 2 + 1e-6
        assert float(r["diversity_ratio"]) > 0
        assert -60 < float(r["level_gap_db"]) < 30
    base = [r for r in rows if r["kind"] == "baseline: training subset"]
    assert len(base) == 3 and all(float(r["fad_vs_baseline"]) == pytest.approx(1.0) for r in base)
    refrow = [r for r in rows if r["kind"] == "baseline: reference" and r["class"] == "overall"][0]
    assert refrow["fad"] == "" and float(refrow["accuracy"]) >= 0
    md = (out / "results.md").read_text()
    assert "## Overall" in md and "test-encoder" in md and "only comparable with the same encoder" in md
    assert "## Per class: FAD" in md and "## Per class: level gap dB" in md and "| heun | 1 (asked 2) | 1 |" in md and "note: heun: NFE 2" in md
    for m in ("fad", "kid", "accuracy", "map_at_10", "inception_score", "diversity_ratio", "copy_share"):
        p = out / "plots" / f"{m}.png"
        assert p.stat().st_size > 5000 and p.read_bytes()[:4] == b"\x89PNG"
    # the overview: 4 key metrics (rows) x one column per guidance scale, sized accordingly
    ov = (out / "plots" / "overview.png").read_bytes()
    width, height = int.from_bytes(ov[16:20], "big"), int.from_bytes(ov[20:24], "big")
    n_guid = len({r["guidance"] for r in gen})
    assert ov[:4] == b"\x89PNG" and height == round(4 * 2.6 * 90) and width == round((3.6 * n_guid + 0.8) * 90)
    js = json.loads((out / "results.json").read_text())
    assert js["settings"]["encoder"]["name"] == "test-encoder" and len(js["rows"]) == len(rows)
    # encoder-free fidelity: the reference against itself has no gap at all; every other set has 12 band gaps
    for r in js["rows"]:
        if r["class"] == "overall":
            continue
        assert len(r["band_gap_db"]) == 12
        if r["kind"] == "baseline: reference":
            assert r["level_gap_db"] == 0 and r["lufs_gap"] == 0 and r["true_peak_gap"] == 0
            assert max(abs(x) for x in r["band_gap_db"]) == 0
        assert r["lufs_p10"] <= r["lufs_median"] <= r["lufs_p90"]
        assert abs(r["band_gap_worst_db"]) == pytest.approx(max(abs(x) for x in r["band_gap_db"]))
        # each band gap with its standard error (the reference against itself too: two draws' worth)
        assert len(r["band_gap_se_db"]) == 12 and all(0 < x < 20 for x in r["band_gap_se_db"])
        assert r["band_gap_worst_se_db"] == r["band_gap_se_db"][r["band_gap_worst_band"]]
        assert 0.0 <= r["over_full_scale"] <= 1.0 and (r["kind"] == "generated" or r["over_full_scale"] == 0.0)
        # brightness: the centroid's percentiles, in order, and the reference against itself without a gap
        q = r["centroid_quantiles_hz"]
        assert q == sorted(q) and r["centroid_p10"] <= r["centroid_median"] <= r["centroid_p90"] < 8000
        if r["kind"] == "baseline: reference":
            assert r["centroid_gap_p10"] == r["centroid_gap_median"] == r["centroid_gap_p90"] == 0
    assert "### Brightness per class (spectral centroid)" in md
    first = next(r for r in js["rows"] if r["kind"] == "generated" and r["class"] == "low")
    assert f"| {first['centroid_median']:.0f} | {first['centroid_p90']:.0f} | {first['centroid_gap_p10']:+.0f} %" in md
    assert (out / "plots" / "brightness.png").read_bytes()[:4] == b"\x89PNG"
    assert "## Fidelity without a learned encoder" in md and "| floor |" in md and "### Band gaps (dB) per class" in md
    first = next(r for r in js["rows"] if r["kind"] == "generated" and r["class"] == "high")
    assert "| over 0 dBFS | floor |" in md and f"| {100 * first['over_full_scale']:.1f} % | 0.0 % |" in md
    cells = " | ".join(f"{g:+.1f} ± {e:.1f}" for g, e in zip(first["band_gap_db"], first["band_gap_se_db"]))
    assert cells in md and "class-bands beyond ±4 dB" in md
    assert (out / "plots" / "bands.png").read_bytes()[:4] == b"\x89PNG"


def test_sweep_caches_clips_with_fixed_noise_seeds(world, swept):
    from edmsound.core.pipeline import EDMSoundPipeline
    out, _ = swept
    wav = out / "clips" / "dpmpp_2m_nfe3_w2" / "low" / "low_0002.wav"
    data, sr = sf.read(str(wav), dtype="float32")
    pipe = EDMSoundPipeline(world / "model", device="cpu")
    direct = pipe.generate("low", n=1, sampler="dpmpp_2m", nfe=3, guidance=2.0,
                           seed=noise_seed(0, pipe.class_index("low"), 2))
    np.testing.assert_allclose(data, np.clip(direct.waves[0], -1, 1), atol=2 / 32768)
    meta = json.loads((wav.parent.parent / "meta.json").read_text())
    assert meta["nfe"] == 3 and meta["guidance"] == 2.0 and meta["generation"]["clips"] == 6


def test_sweep_reuses_cached_clips_and_regenerates_only_missing(world, swept, tmp_path, monkeypatch):
    import shutil

    from edmsound.core.pipeline import EDMSoundPipeline
    out0, res0 = swept
    out = tmp_path / "again"
    shutil.copytree(out0 / "clips", out / "clips")
    (out / "clips" / "heun_nfe3_w1" / "high" / "high_0001.wav").unlink()
    calls = []
    real = EDMSoundPipeline.generate

    def spy(self, class_name, n=1, **kw):
        calls.append((class_name, n, kw["sampler"], kw["nfe"], kw["seed"]))
        return real(self, class_name, n=n, **kw)
    monkeypatch.setattr(EDMSoundPipeline, "generate", spy)
    res = _run(world, out)
    assert calls == [("high", 1, "heun", 3, noise_seed(0, 0, 1))]
    f0 = {(r["kind"], r["sampler"], r["nfe"], r["guidance"], r["class"]): r["fad"] for r in res0["rows"]}
    f1 = {(r["kind"], r["sampler"], r["nfe"], r["guidance"], r["class"]): r["fad"] for r in res["rows"]}
    assert f0.keys() == f1.keys()
    finite = [k for k in f0 if np.isfinite(f0[k])]
    assert len(finite) == 8 * 3 + 3                                 # generated rows + training baseline
    assert all(f0[k] == pytest.approx(f1[k], rel=1e-5, abs=1e-9) for k in finite)
    calls.clear()
    _run(world, out, samplers=["dpmpp_2m"], nfes=[2], guidances=[1], regenerate=True)
    assert calls == [("high", 3, "dpmpp_2m", 2, noise_seed(0, 0, 0)), ("low", 3, "dpmpp_2m", 2, noise_seed(0, 1, 0))]


def test_sweep_refuses_clips_from_another_checkpoint(world, swept, tmp_path):
    import shutil
    out = tmp_path / "other"
    shutil.copytree(swept[0] / "clips", out / "clips")
    meta = out / "clips" / "heun_nfe1_w1" / "meta.json"
    m = json.loads(meta.read_text())
    m["ema_sha256"] = "0" * 64
    meta.write_text(json.dumps(m))
    with pytest.raises(ValueError, match="other settings.*--regenerate"):
        _run(world, out)


def test_sweep_refuses_clips_made_with_another_matching_eq(world, tmp_path):
    """Cached clips name the EQ they were made with: after the model's EQ changes, the same --out is refused, and
    --regenerate makes them again with it."""
    import shutil

    from edmsound.core.pipeline import EDMSoundPipeline
    from edmsound.core.spectral_eq import ClassEQ
    from edmsound.evaluation.matching_eq import write_class_eq
    model = tmp_path / "model"
    shutil.copytree(world / "model", model)
    one = dict(model=model, samplers=["heun"], nfes=[3], guidances=[1], n_per_class=2, precision="fp32")
    _run(world, tmp_path / "out", **one)
    meta = tmp_path / "out" / "clips" / "heun_nfe3_w1" / "meta.json"
    assert json.loads(meta.read_text())["matching_eq"] is None
    write_class_eq(model, ClassEQ((100.0, 1000.0), {"low": (-12.0, -12.0)}, {"nfe": 3}))
    with pytest.raises(ValueError, match=r"other settings \(matching_eq differ"):
        _run(world, tmp_path / "out", **one)
    _run(world, tmp_path / "out", regenerate=True, **one)
    assert len(json.loads(meta.read_text())["matching_eq"]) == 64
    data, _ = sf.read(str(meta.parent / "low" / "low_0001.wav"), dtype="float32")
    pipe = EDMSoundPipeline(model, device="cpu", bf16=False)
    seed = noise_seed(0, pipe.class_index("low"), 1)
    on, off = (pipe.generate("low", n=1, sampler="heun", nfe=3, seed=seed, eq=e).waves[0] for e in (True, False))
    # the tiny model's clips run far past full scale, so its few unclipped samples carry run-to-run noise: the
    # regenerated clip is compared as a whole with the clip made with the EQ and the one made without it
    err_on, err_off = (float(np.abs(data - np.clip(x, -1, 1)).mean()) for x in (on, off))
    assert err_on < 0.25 * err_off


def test_fidelity_gaps_have_their_own_larger_reference(world, tmp_path):
    """Level, loudness and band gaps compare with ``fidelity_reference_per_class`` held-out clips (here every clip
    of the reference tree), FAD and KID with ``reference_per_class`` of them (here 2)."""
    one = dict(samplers=["heun"], nfes=[3], guidances=[1], reference_per_class=2)
    same = _run(world, tmp_path / "same", fidelity_reference_per_class=0, **one)
    wide = _run(world, tmp_path / "wide", **one)
    for res in (same, wide):
        res["by"] = {(r["kind"], r["class"]): r for r in res["rows"]}
    for c in ("low", "high"):
        gen = ("generated", c)
        assert wide["by"][gen]["fad"] == same["by"][gen]["fad"]            # the same clips, the same FAD reference
        assert wide["by"][gen]["level_gap_db"] != same["by"][gen]["level_gap_db"]
        ref_same, ref_wide = same["by"][("baseline: reference", c)], wide["by"][("baseline: reference", c)]
        assert ref_same["level_gap_db"] == 0 and max(abs(x) for x in ref_same["band_gap_db"]) == 0
        assert max(abs(x) for x in ref_wide["band_gap_db"]) > 0.1          # 2 clips against all 4
    assert "2-2/class" in wide["settings"]["reference"] and "4-4/class" in wide["settings"]["fidelity_reference"]
    assert same["settings"]["fidelity_reference"] == same["settings"]["reference"]
    md = (tmp_path / "wide" / "results.md").read_text()
    assert f"- level, loudness and band gaps against: {wide['settings']['fidelity_reference']}" in md
    assert "level, loudness and band gaps against" not in (tmp_path / "same" / "results.md").read_text()


def test_cli_evaluate_dry_run_and_run(world, swept, tmp_path, capsys):
    import shutil

    from edmsound.cli import main
    out = tmp_path / "cli"
    argv = ["evaluate", "--checkpoint", str(world / "model"), "--reference", str(world / "ref"),
            "--samplers", "heun", "--nfe", "2", "--guidance", "1", "--n-per-class", "3", "--out", str(out),
            "--encoder", str(world / "encoder"), "--classifier", str(world / "classifier"), "--index", "none",
            "--reference-per-class", "0", "--kid-subsets", "5", "--no-progress"]
    main(argv + ["--dry-run"])
    text = capsys.readouterr().out
    assert "estimated generation time" in text and "6 clips to generate" in text and "using NFE 1" in text
    assert not (out / "results.csv").exists()
    main(argv + ["--dry-run", "--points", "euler:3:2,heun:1:1"])        # heun:1:1 is the grid's point again
    assert "2 configurations x 2 classes x 3 clips; 12 clips to generate" in capsys.readouterr().out
    main(argv[:5] + ["--samplers", "none", "--points", "euler:3:2"] + argv[11:] + ["--dry-run"])
    assert "1 configurations x 2 classes x 3 clips" in capsys.readouterr().out
    shutil.copytree(swept[0] / "clips" / "heun_nfe1_w1", out / "clips" / "heun_nfe1_w1")
    main(argv)
    text = capsys.readouterr().out
    assert "0 clips to generate" in text
    md = (out / "results.md").read_text()
    assert "copy-detection index: none" in md and "| heun | 1 (asked 2) | 1 |" in md
    for bad, err in ((["--samplers", "nope"], "unknown sampler 'nope'"),
                     (["--points", "heun:51"], "SAMPLER:NFE:GUIDANCE"),
                     (["--samplers", "none"], "--samplers none needs --points")):
        with pytest.raises(SystemExit) as e:
            main(argv + bad)
        assert e.value.code == 2 and err in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ guidance interval
def test_plan_and_parse_guidance_intervals():
    from edmsound.evaluation.points import parse_points
    assert parse_points("dpmpp_2m:10:3:0.05:1,heun:51:3") == [("dpmpp_2m", 10, 3.0, (0.05, 1.0)), ("heun", 51, 3.0)]
    with pytest.raises(ValueError, match=r"SAMPLER:NFE:GUIDANCE\[:SIGMA_LO:SIGMA_HI\]"):
        parse_points("dpmpp_2m:10:3:0.05")
    pts, _ = plan_sweep(["deis"], [5], [1, 3], guidance_interval="0.05,1",
                        extra_points=[("deis", 5, 3.0), ("deis", 5, 3.0, (0.05, 1.0)), ("deis", 5, 3.0, (0.1, 2))])
    # w = 1 never guides, so it carries no interval; the explicit (deis, 5, 3) without one is a new point;
    # the explicit one with the grid's interval is a duplicate
    assert [p.key for p in pts] == ["deis_nfe5_w1", "deis_nfe5_w3_i0p05-1", "deis_nfe5_w3", "deis_nfe5_w3_i0p1-2"]
    assert pts[1].interval == (0.05, 1.0) and pts[1].interval_text == "0.05:1" and pts[0].interval is None
    with pytest.raises(ValueError, match="0 <= lo < hi"):
        plan_sweep(["deis"], [5], [3], guidance_interval=(2, 1))
    with pytest.raises(ValueError, match="0 <= lo < hi"):
        plan_sweep([], [], [], extra_points=[("deis", 5, 3.0, (-1, 1))])


@pytest.fixture(scope="module")
def interval_sweep(world, swept, tmp_path_factory):
    import shutil
    out = tmp_path_factory.mktemp("interval")
    shutil.copytree(swept[0] / "clips" / "dpmpp_2m_nfe3_w2", out / "clips" / "dpmpp_2m_nfe3_w2")
    res = _run(world, out, samplers=[], nfes=[], guidances=[],
               points=[("dpmpp_2m", 3, 2.0), ("dpmpp_2m", 3, 2.0, (0.05, 1.0))])
    return out, res


def test_sweep_with_a_guidance_interval(world, interval_sweep):
    from edmsound.core.pipeline import EDMSoundPipeline
    out, res = interval_sweep
    rows = list(csv.DictReader((out / "results.csv").open()))
    gen = [r for r in rows if r["kind"] == "generated" and r["class"] == "overall"]
    assert sorted(r["guidance_interval"] for r in gen) == ["", "0.05:1"]
    meta = json.loads((out / "clips" / "dpmpp_2m_nfe3_w2_i0p05-1" / "meta.json").read_text())
    assert meta["guidance_interval"] == [0.05, 1.0] and meta["generation"]["clips"] == 6
    a, _ = sf.read(str(out / "clips" / "dpmpp_2m_nfe3_w2_i0p05-1" / "low" / "low_0000.wav"), dtype="float32")
    b, _ = sf.read(str(out / "clips" / "dpmpp_2m_nfe3_w2" / "low" / "low_0000.wav"), dtype="float32")
    pipe = EDMSoundPipeline(world / "model", device="cpu")
    direct = pipe.generate("low", n=1, sampler="dpmpp_2m", nfe=3, guidance=2.0, guidance_interval=(0.05, 1.0),
                           seed=noise_seed(0, pipe.class_index("low"), 0))
    np.testing.assert_allclose(a, np.clip(direct.waves[0], -1, 1), atol=2 / 32768)
    assert 0 < direct.settings["guided_nfe"] < 3 and np.abs(a - b).max() > 1e-3
    md = (out / "results.md").read_text()
    assert "| dpmpp_2m | 3 | 2 (σ∈(0.05, 1]) |" in md and "| dpmpp_2m | 3 | 2 |" in md
    assert (out / "plots" / "overview.png").stat().st_size > 5000


def test_quality_report_read_off_the_evaluation(world, interval_sweep, tmp_path, capsys):
    from edmsound.evaluation.quality import quality_targets
    from edmsound.cli import main
    out, res = interval_sweep
    overall = [r for r in res["rows"] if r["kind"] == "generated" and r["class"] == "overall"
               and r["guidance_interval"] == "0.05:1"][0]
    speed = {"sampler": "dpmpp_2m", "nfe": 3, "guidance": 2.0, "guidance_interval": [0.05, 1.0],
             "median_sec_per_clip": 0.5, "cpu": "test", "date": "today"}
    bars = {b["bar"]: b for b in quality_targets(res, "dpmpp_2m", 3, 2.0, (0.05, 1.0), speed)}
    acc = bars["category fit, mean"]
    assert acc["value"] == f"{overall['accuracy']:.3f}" and acc["met"] == (overall["accuracy"] >= 0.85)
    per = {r["class"]: r["accuracy"] for r in res["rows"] if r["kind"] == "generated" and r["class"] != "overall"
           and r["guidance_interval"] == "0.05:1"}
    assert bars["category fit, every class"]["met"] == (min(per.values()) >= 0.70)
    cs = overall["copy_share"]
    assert bars["copying: share above the training p95"]["met"] == (cs <= 0.10)
    assert bars["speed: one clip, median of 10"]["met"] is True
    assert bars["FAD / FAD(training subset)"]["met"] == (overall["fad_vs_baseline"] <= 2.5)
    # fidelity without an encoder: the worst class's level gap and the worst class-band, each with its floor
    gen = {r["class"]: r for r in res["rows"] if r["kind"] == "generated" and r["guidance_interval"] == "0.05:1"
           and r["class"] != "overall"}
    worst = max(gen.values(), key=lambda r: abs(r["level_gap_db"]))
    lv = bars["level gap, every class"]
    assert lv["met"] == (abs(worst["level_gap_db"]) <= 1.5)
    assert f"{worst['level_gap_db']:+.1f} ± {worst['level_gap_se_db']:.1f} dB" in lv["value"] and "floor" in lv["value"]
    band = bars["band gap, every class and band (12 bands)"]
    c, b = max(((r, i) for r in gen.values() for i in range(12)), key=lambda t: abs(t[0]["band_gap_db"][t[1]]))
    g, se = c["band_gap_db"][b], c["band_gap_se_db"][b]
    assert band["met"] == (abs(g) <= 4.0) and f"{g:+.1f} ± {se:.1f} dB" in band["value"] and "floor" in band["value"]
    beyond = sum(abs(x) > 4 for r in gen.values() for x in r["band_gap_db"])
    assert (f"{beyond} of 24 class-bands beyond ±4 dB" in band["value"]) == (beyond > 0)
    over = bars["clips reaching full scale (clipped in a 16- or 24-bit file), every class"]
    worst_over = max(r["over_full_scale"] for r in gen.values())
    assert over["met"] == (worst_over <= 0.05) and f"{100 * worst_over:.1f} %" in over["value"]
    assert "floor 0.0 %" in over["value"]                                 # real clips never reach full scale
    heun = [b for k, b in bars.items() if k.startswith("FAD at")]
    assert heun[0]["met"] is None and "heun:51:2" in heun[0]["value"]       # the sweep has no Heun-50 row
    other = quality_targets(res, "dpmpp_2m", 3, 2.0, (0.05, 1.0), dict(speed, nfe=10))
    assert other[-1]["met"] is None and "other settings" in other[-1]["value"]
    with pytest.raises(ValueError, match="--points dpmpp_2m:10:2"):
        quality_targets(res, "dpmpp_2m", 10, 2.0)
    # the CLI reads the shipped settings from a model directory
    assert main(["export", "--run", str(world / "model"), "--out", str(tmp_path / "m"), "--sampler", "dpmpp_2m",
                 "--nfe", "3", "--guidance", "2", "--guidance-interval", "0.05,1"]) is None
    (tmp_path / "speed.json").write_text(json.dumps(dict(speed, ema_sha256=res["settings"]["ema_sha256"])))
    capsys.readouterr()
    argv = ["quality-report", "--results", str(out), "--checkpoint", str(tmp_path / "m"), "--speed", str(tmp_path / "speed.json"),
            "--out", str(tmp_path / "quality.md")]
    main(argv)
    text = capsys.readouterr().out
    assert "σ ∈ (0.05, 1]" in text and "| speed: one clip, median of 10 | ≤ 1 s | 0.500 s (test, today) | ✔ met |" in text
    assert (tmp_path / "quality.md").read_text() == text
    with pytest.raises(SystemExit) as e:
        main(argv + ["--check"])                                   # the Heun bar is not measured -> not all met
    assert e.value.code == 1
    # a record that is no timing record: one line, no traceback, and the library says the same
    (tmp_path / "bad.json").write_text(json.dumps({"date": "today", "rows": [{"seconds": 0.5}]}))
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv[:-3] + [str(tmp_path / "bad.json")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "not a speed record" in err and "Traceback" not in err
    assert err.count("\n") == 1
    with pytest.raises(ValueError, match="not a speed record"):
        quality_targets(res, "dpmpp_2m", 3, 2.0, (0.05, 1.0), {"rows": []})
    # the speed is read for the evaluated weights only (by their EMA sha256)
    sha = res["settings"]["ema_sha256"]
    stale = quality_targets(res, "dpmpp_2m", 3, 2.0, (0.05, 1.0), dict(speed, ema_sha256="0" * 64))
    assert stale[-1]["met"] is None and "timed other weights" in stale[-1]["value"]
    unnamed = quality_targets(res, "dpmpp_2m", 3, 2.0, (0.05, 1.0), speed)[-1]
    assert unnamed["met"] is True and "does not name the weights" in unnamed["value"]
    # a side-by-side record (samplers.py --versus): this model's row, and its time against the first row's
    old_row = {"label": "old", "ema_sha256": "1" * 64, "sampler": "dpmpp_2m", "nfe": 3, "guidance": 2.0,
               "class_guidance": None, "guidance_interval": [0.05, 1.0], "median_all_classes": 0.4,
               "per_class_median": {"low": 0.4, "high": 0.4}}
    record = {"date": "today", "cpu": "test", "repeats": 6, "precision": ["fp32"],
              "rows": [old_row, dict(old_row, label="new", ema_sha256=sha, median_all_classes=0.6)]}
    side = quality_targets(res, "dpmpp_2m", 3, 2.0, (0.05, 1.0), record)[-1]
    assert side["bar"] == "speed: one clip, median over every class, side by side" and side["met"] is True
    assert side["value"] == "0.600 s (× 1.50 of old in the same run, test (fp32), today)"
    slow = dict(record, rows=[old_row, dict(record["rows"][1], median_all_classes=1.2)])
    assert quality_targets(res, "dpmpp_2m", 3, 2.0, (0.05, 1.0), slow)[-1]["met"] is False
    absent = quality_targets(res, "dpmpp_2m", 3, 2.0, (0.05, 1.0), dict(record, rows=[old_row]))[-1]
    assert absent["met"] is None and "not these weights" in absent["value"]
    (tmp_path / "compare.json").write_text(json.dumps(record))
    capsys.readouterr()
    main(argv[:-3] + [str(tmp_path / "compare.json")])
    assert ("| speed: one clip, median over every class, side by side | ≤ 1 s | 0.600 s (× 1.50 of old in the same "
            "run, test (fp32), today) | ✔ met |") in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["quality-report", "--results", str(out), "--checkpoint", str(world / "model"), "--speed", "none"])
    assert e.value.code == 2 and "Add it with --points" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ per-class guidance
def test_choose_rule_with_diversity_and_intervals():
    from edmsound.evaluation.calibrate import choose
    iv, hi = [0.1, 10.0], [2.0, 10.0]

    def row(w, fit, div, guided, interval=iv):
        return {"guidance": w, "fit": fit, "diversity_ratio": div, "guided_nfe": guided, "guidance_interval": interval}
    # the engine case: guided at mid noise levels it fits but loses variety; guided at the top level only it keeps
    # variety and fits less. No setting meets both targets -> the best worst margin (w 6 on (2, 10]).
    engine = [row(1, 0.25, 0.88, 0, None), row(2, 0.88, 0.60, 4), row(3, 1.0, 0.46, 4),
              row(4, 0.81, 0.78, 1, hi), row(6, 0.88, 0.72, 1, hi), row(8, 0.94, 0.66, 1, hi)]
    best = choose(engine, 0.9, 0.7)
    assert (best["guidance"], best["guidance_interval"]) == (6, hi)
    assert choose(engine, 0.9, None)["guidance"] == 8               # fit only: w 3 and w 8 fit; w 8 guides once
    assert choose(engine, 0.8, 0.7)["guidance"] == 4                # w 4 and w 6 (same cost) meet both: more diverse
    # feasible settings: the cheapest (fewest guided evaluations) wins over a more diverse, costlier one
    sneeze = [row(1, 0.3, 1.0, 0, None), row(4, 0.95, 0.90, 4), row(8, 0.92, 0.95, 1, hi), row(6, 0.92, 0.97, 4)]
    assert choose(sneeze, 0.9, 0.7)["guidance"] == 8
    assert choose([row(1, 0.95, 0.9, 0, None), row(2, 1.0, 0.95, 4)], 0.9, 0.7)["guidance"] == 1
    with pytest.raises(ValueError, match="no candidates"):
        choose([], 0.9)


def test_choose_rule_with_a_level_target():
    from edmsound.evaluation.calibrate import choose
    hi = [8.0, 20.0]

    def row(w, fit, div, level, guided):
        return {"guidance": w, "fit": fit, "diversity_ratio": div, "level_gap_db": level, "guided_nfe": guided,
                "guidance_interval": None if w == 1 else hi}
    # a few-step model's quiet class: unguided it fits but is 4 dB quiet; guiding its first jump brings it up
    dog = [row(1, 0.97, 0.9, -4.2, 0), row(1.25, 0.98, 0.88, -2.6, 1), row(1.5, 0.98, 0.85, -1.0, 1),
           row(2.5, 1.0, 0.6, +5.6, 1)]
    assert choose(dog, 0.9, 0.7)["guidance"] == 1                       # no level target: the cheapest
    assert choose(dog, 0.9, 0.7, 1.5)["guidance"] == 1.5
    assert choose(dog, 0.9, 0.7, 3.0)["guidance"] == 1.25                # both in range, same cost: more diverse
    # none within the level target: the closest in level among those meeting fit and diversity (not w 2.5)
    assert choose(dog, 0.9, 0.7, 0.5)["guidance"] == 1.5
    # ... unless a cheaper one is as close within the closest one's standard error: guidance that does not move
    # the level (a solver's first step of eight) is not paid for
    flat = [dict(row(1, 1.0, 0.93, -3.40, 0), level_gap_se_db=0.5), dict(row(0.75, 1.0, 0.93, -3.38, 1),
                                                                          level_gap_se_db=0.5)]
    assert choose(flat, 0.9, 0.8, 1.5)["guidance"] == 1
    assert choose([dict(r, level_gap_se_db=0.0) for r in flat], 0.9, 0.8, 1.5)["guidance"] == 0.75
    # a class that is too loud: a scale below 1 (guided, so costlier) is taken only because of the level target
    loud = [row(1, 1.0, 1.1, +2.4, 0), row(0.75, 0.99, 1.15, +1.1, 1)]
    assert choose(loud, 0.9, 0.7)["guidance"] == 1 and choose(loud, 0.9, 0.7, 1.5)["guidance"] == 0.75
    # rows without a measured level pass the level target; fit and diversity still decide
    unmeasured = [dict(r, level_gap_db=float("nan")) for r in dog]
    assert choose(unmeasured, 0.9, 0.7, 1.5)["guidance"] == 1
    # nothing meets fit and diversity: the old fallback (best worst margin), level aside
    assert choose([row(1, 0.2, 0.9, 0.0, 0), row(2, 0.6, 0.8, 9.0, 1)], 0.9, 0.7, 1.5)["guidance"] == 2


def test_choose_scale_rule():
    from edmsound.evaluation.calibrate import choose_scale
    rows = [{"guidance": 1.0, "fit": 0.6}, {"guidance": 2.0, "fit": 0.95}, {"guidance": 3.0, "fit": 1.0}]
    assert choose_scale(rows, 0.9) == 2.0 and choose_scale(rows, 0.5) == 1.0
    assert choose_scale(rows, 1.0) == 3.0
    never = [{"guidance": 1.0, "fit": 0.2}, {"guidance": 2.0, "fit": 0.4}, {"guidance": 3.0, "fit": 0.4}]
    assert choose_scale(never, 0.9) == 2.0                      # best fit, ties -> the smaller scale


@pytest.fixture(scope="module")
def calibrated(world, tmp_path_factory):
    """A copy of the world's model with per-class scales chosen by calibrate-guidance (CLI, --write)."""
    import shutil

    from edmsound.cli import main
    d = tmp_path_factory.mktemp("calib")
    shutil.copytree(world / "model", d / "model")
    main(["calibrate-guidance", "--checkpoint", str(d / "model"), "--scales", "2,1", "--min-fit", "0.5",
          "--n-per-class", "4", "--classifier", str(world / "classifier"), "--encoder", str(world / "encoder"),
          "--reference", str(world / "ref"), "--full-grid", "--intervals", "default,1:10", "--out", str(d / "cal"),
          "--write", "--no-progress"])
    return d


def test_calibration_measures_fit_with_the_classifier_and_stores_the_rule(world, calibrated):
    from edmsound.evaluation.calibrate import choose
    from edmsound.evaluation.classifier import load_classifier
    from edmsound.core.pipeline import EDMSoundPipeline
    res = json.loads((calibrated / "cal" / "calibration.json").read_text())
    s = res["settings"]
    assert s["scales"] == [1.0, 2.0] and s["seed"] == 1 and s["min_diversity"] == 0.7
    assert s["intervals"] == [None, [1.0, 10.0]]           # the tiny preset guides at every sigma by default
    # w = 1 (no guidance) once per class, w = 2 in both intervals
    assert sorted((r["class"], r["guidance"], str(r["guidance_interval"])) for r in res["rows"]) == sorted(
        (c, w, iv) for c in ("low", "high") for w, iv in ((1.0, "None"), (2.0, "None"), (2.0, "[1.0, 10.0]")))
    pipe = EDMSoundPipeline(calibrated / "model", device="cpu")
    clf = load_classifier(world / "classifier")
    for r in res["rows"]:
        ci = pipe.class_index(r["class"])
        g = pipe.generate(r["class"], n=4, seed=noise_seed(1, ci, 0), guidance=r["guidance"],
                          guidance_interval=r["guidance_interval"])
        p = clf.predict_proba(E._pcm16(g.waves), pipe.sample_rate)
        assert r["fit"] == pytest.approx(float(np.mean(p.argmax(1) == clf.classes.index(r["class"]))))
        assert r["diversity_ratio"] > 0 and r["guided_nfe"] == g.settings["guided_nfe"]
        nfe = pipe.preset.default_nfe
        if r["guidance"] == 1.0 or r["guidance_interval"] is None:
            assert r["guided_nfe"] == (0 if r["guidance"] == 1.0 else nfe)
        else:
            assert 0 < r["guided_nfe"] < nfe                    # sigma in (1, 10]: the first evaluations only
    for c in ("low", "high"):
        best = choose([r for r in res["rows"] if r["class"] == c], 0.5, 0.7)
        assert [r for r in res["rows"] if r["class"] == c and r["chosen"]] == [best]
        assert res["class_guidance"][c] == best["guidance"] and pipe.preset.guidance_for(c) == best["guidance"]
        iv = pipe.preset.guidance_interval_for(c)
        if best["guidance"] != 1.0:
            assert iv == (None if best["guidance_interval"] is None else tuple(best["guidance_interval"]))
        assert (c in res["class_guidance_interval"]) == (best["guidance"] != 1.0 and best["guidance_interval"] is not None)
    md = (calibrated / "cal" / "calibration.md").read_text()
    assert "| class | w | guided for | category fit |" in md and "Chosen: " in md and "σ ∈ (1, 10]" in md
    png = (calibrated / "cal" / "calibration.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000


def test_per_class_scales_drive_generation_service_and_evaluation(world, calibrated, tmp_path):
    from edmsound.evaluation.quality import quality_targets
    from edmsound.evaluation.calibrate import write_class_guidance
    from edmsound.core.pipeline import EDMSoundPipeline
    from edmsound.app.service import EDMSoundService
    model = tmp_path / "model"
    import shutil
    shutil.copytree(calibrated / "model", model)
    write_class_guidance(model, {"low": 1.0, "high": 2.5})
    with pytest.raises(ValueError, match="not in the checkpoint"):
        write_class_guidance(model, {"nope": 2.0})
    pipe = EDMSoundPipeline(model, device="cpu")
    lo, hi = pipe.generate("low", seed=3), pipe.generate("high", seed=3)
    assert lo.settings["guidance"] == 1.0 and lo.settings["guided_nfe"] == 0
    assert hi.settings["guidance"] == 2.5 and hi.settings["guided_nfe"] > 0
    assert pipe.generate("high", seed=3, guidance=1.0).settings["guided_nfe"] == 0      # explicit wins
    svc = EDMSoundService(pipe, index=None)
    assert svc.defaults["class_guidance"] == {"low": 1.0, "high": 2.5}
    assert svc.generate("high", seed=3, write_files=False).settings["guidance"] == 2.5
    # evaluate: a 'class' point generates each class at its own scale, identical to the fixed-scale clips
    out = tmp_path / "ev"
    res = _run(world, out, model=model, samplers=[], nfes=[], guidances=[],
               points=[("dpmpp_2m", 3, 2.5), ("dpmpp_2m", 3, "class"), ("dpmpp_2m", 3, 1.0)])
    res_dir = out / "clips"
    key = [p for p in os.listdir(res_dir) if "cls" in p][0]
    assert key == "dpmpp_2m_nfe3_wcls-2p5-1"                     # checkpoint class order: high, low
    for c, fixed in (("low", "dpmpp_2m_nfe3_w1"), ("high", "dpmpp_2m_nfe3_w2p5")):
        a, _ = sf.read(str(res_dir / key / c / f"{c}_0000.wav"), dtype="float32")
        b, _ = sf.read(str(res_dir / fixed / c / f"{c}_0000.wav"), dtype="float32")
        np.testing.assert_array_equal(a, b)
    rows = [r for r in res["rows"] if r["kind"] == "generated" and r["guidance"] == "class"]
    assert {r["guidance_per_class"] for r in rows} == {"high=2.5 low=1"}
    assert "| dpmpp_2m | 3 | per class |" in (out / "results.md").read_text()
    bars = {b["bar"]: b for b in quality_targets(res, "dpmpp_2m", 3, "class")}
    overall = [r for r in rows if r["class"] == "overall"][0]
    assert bars["category fit, mean"]["value"] == f"{overall['accuracy']:.3f}"
    assert "heun:51:class" in [b for k, b in bars.items() if k.startswith("FAD at")][0]["value"]
    with pytest.raises(ValueError, match="calibrate-guidance"):
        P.plan_sweep([], [], [], extra_points=[("dpmpp_2m", 3, "class")])
    assert P.parse_points("heun:51:class:0.1:10") == [("heun", 51, "class", (0.1, 10.0))]


def test_calibration_stops_at_an_unguided_setting_that_meets_both_targets(world, calibrated):
    """'low' is recognised without guidance and keeps its variety: nothing is cheaper than w = 1, so no guided
    setting of either interval is generated (and its diversity really is measured)."""
    from edmsound.evaluation.calibrate import calibrate_class_guidance
    res = calibrate_class_guidance(calibrated / "model", scales=(1, 2), min_fit=0.5, min_diversity=0.7,
                                   intervals=["default", "1:10"], n_per_class=4, classes=["low"],
                                   classifier=world / "classifier", encoder=world / "encoder",
                                   reference=world / "ref", progress=False, log=lambda *_: None)
    [row] = res["rows"]
    assert row["guidance"] == 1.0 and row["fit"] >= 0.5 and row["diversity_ratio"] >= 0.7 and row["chosen"]
    assert res["class_guidance"] == {"low": 1.0} and res["class_guidance_interval"] == {}
    with pytest.raises(ValueError, match="min_diversity"):
        calibrate_class_guidance(calibrated / "model", min_diversity=5, classifier=world / "classifier")


def test_calibration_with_a_level_target_measures_level_and_picks_the_closest(world, calibrated):
    """With a level target each candidate's level gap is the generated clips' mean RMS dBFS minus the real clips';
    a target no setting can meet (0.01 dB) takes the cheapest candidate as close in level as the closest one (within
    its standard error) among those meeting fit."""
    from edmsound.core.pipeline import EDMSoundPipeline
    from edmsound.evaluation.calibrate import calibrate_class_guidance, calibration_markdown
    from edmsound.evaluation.fidelity import rms_dbfs
    res = calibrate_class_guidance(calibrated / "model", scales=(2, 1, 0.5), min_fit=0.01, min_diversity=None,
                                   max_level_gap=0.01, n_per_class=4, classes=["low"],
                                   classifier=world / "classifier", encoder=world / "encoder",
                                   reference=world / "ref", progress=False, log=lambda *_: None)
    rows = res["rows"]
    assert [r["guidance"] for r in rows] == [1.0, 2.0, 0.5]            # 1 first, then up, then below 1
    pipe = EDMSoundPipeline(calibrated / "model", device="cpu")
    ref = E.load_reference(str(world / "ref"), ["low"], pipe.sample_rate, pipe.codec.num_samples, 200,
                           E.REFERENCE_SEED, False)[0]
    ref_db = float(rms_dbfs(ref.waves[ref.labels == ref.classes.index("low")]).mean())
    for r in rows:
        g = pipe.generate("low", n=4, seed=noise_seed(1, pipe.class_index("low"), 0), guidance=r["guidance"],
                          guidance_interval=r["guidance_interval"])
        assert r["level_gap_db"] == pytest.approx(float(rms_dbfs(E._pcm16(g.waves)).mean()) - ref_db, abs=1e-6)
    [best] = [r for r in rows if r["chosen"]]
    fitting = [r for r in rows if r["fit"] >= 0.01]
    assert fitting and all(r["level_gap_se_db"] > 0 for r in rows)
    closest = min(fitting, key=lambda r: abs(r["level_gap_db"]))
    assert abs(best["level_gap_db"]) <= abs(closest["level_gap_db"]) + closest["level_gap_se_db"]
    assert best["guided_nfe"] == min(r["guided_nfe"] for r in fitting
                                     if abs(r["level_gap_db"]) <= abs(closest["level_gap_db"]) + closest["level_gap_se_db"])
    assert res["settings"]["max_level_gap"] == 0.01
    md = calibration_markdown(res)
    assert "level gap dB" in md and "level within ±0.01 dB" in md
    with pytest.raises(ValueError, match="needs real clips"):
        calibrate_class_guidance(calibrated / "model", max_level_gap=1.5, reference=None,
                                 classifier=world / "classifier")
    with pytest.raises(ValueError, match="max_level_gap must be a positive"):
        calibrate_class_guidance(calibrated / "model", max_level_gap=-1, classifier=world / "classifier")


def test_per_class_interval_in_evaluation_and_quality_report(world, calibrated, tmp_path):
    """A class calibrated with its own guidance interval: the 'class' point generates it there (same clips as a
    fixed point with that interval), the rows and the quality report name it, a speed record for it matches."""
    import shutil

    from edmsound.evaluation.quality import quality_targets
    from edmsound.evaluation.calibrate import write_class_guidance
    model = tmp_path / "model"
    shutil.copytree(calibrated / "model", model)
    write_class_guidance(model, {"low": 1.0, "high": 2.5}, {"high": (1.0, 10.0)})
    out = tmp_path / "ev"
    res = _run(world, out, model=model, samplers=[], nfes=[], guidances=[],
               points=[("dpmpp_2m", 3, 2.5, (1.0, 10.0)), ("dpmpp_2m", 3, "class")])
    keys = sorted(os.listdir(out / "clips"))
    key = [k for k in keys if "cls" in k][0]
    assert key.startswith("dpmpp_2m_nfe3_wcls-2p5-1_ci") and "dpmpp_2m_nfe3_w2p5_i1-10" in keys
    a, _ = sf.read(str(out / "clips" / key / "high" / "high_0001.wav"), dtype="float32")
    b, _ = sf.read(str(out / "clips" / "dpmpp_2m_nfe3_w2p5_i1-10" / "high" / "high_0001.wav"), dtype="float32")
    np.testing.assert_array_equal(a, b)
    meta = json.loads((out / "clips" / key / "meta.json").read_text())
    assert meta["class_guidance_interval"] == {"high": [1.0, 10.0]}
    rows = [r for r in res["rows"] if r["kind"] == "generated" and r["guidance"] == "class"]
    assert {r["guidance_per_class"] for r in rows} == {"high=2.5@1:10 low=1"}
    speed = {"sampler": "dpmpp_2m", "nfe": 3, "guidance": 2.5, "class": "high", "guidance_interval": [1.0, 10.0],
             "base_guidance_interval": None, "class_guidance": "high=2.5@1:10 low=1", "guided_nfe": 1,
             "median_sec_per_clip": 0.4, "cpu": "test", "date": "today"}
    bars = {b["bar"]: b for b in quality_targets(res, "dpmpp_2m", 3, "class", None, speed)}
    assert bars["speed: one clip, median of 10"]["met"] is True
    assert "high at w 2.5, 1 guided evaluations" in bars["speed: one clip, median of 10"]["value"]
    stale = quality_targets(res, "dpmpp_2m", 3, "class", None, dict(speed, class_guidance="high=2.5 low=1"))
    assert [b for b in stale if b["bar"].startswith("speed")][0]["met"] is None


def test_speed_record_of_the_same_weights_at_two_settings_is_read_by_the_per_class_guidance():
    # one network timed twice in one run, without and with a guided class (a guide model attached): the row for
    # the evaluated settings is the one read, not the first with these weights
    from edmsound.evaluation.quality import speed_for_weights
    base = {"label": "old", "ema_sha256": "1" * 64, "sampler": "dpmpp_2m", "nfe": 8, "guidance": 1.0,
            "class_guidance": "a=1 b=1", "guidance_interval": None, "median_all_classes": 0.8,
            "per_class_median": {"a": 0.8, "b": 0.8}}
    plain = dict(base, label="plain", ema_sha256="2" * 64, median_all_classes=0.7)
    guided = dict(plain, label="guided", class_guidance="a=1 b=3@0.5:3", median_all_classes=0.9)
    record = {"date": "today", "cpu": "test", "repeats": 6, "precision": ["fp32"], "rows": [base, plain, guided]}
    row, _ = speed_for_weights(record, "2" * 64, "a=1 b=3@0.5:3")
    assert row["label"] == "guided" and row["median_sec_per_clip"] == 0.9
    assert row["versus"]["ratio"] == pytest.approx(0.9 / 0.8)
    row, _ = speed_for_weights(record, "2" * 64, "a=1 b=1")
    assert row["label"] == "plain" and row["median_sec_per_clip"] == 0.7
    row, _ = speed_for_weights(record, "2" * 64)                      # no settings given: the first such row
    assert row["label"] == "plain"


def test_calibration_measures_level_against_its_own_larger_reference(world, calibrated):
    """The diversity column compares with reference_per_class real clips, the level with the fidelity reference
    (by default every clip up to 2,000 per class); 0 takes the diversity's clips for the level too."""
    from edmsound.core.pipeline import EDMSoundPipeline
    from edmsound.evaluation.calibrate import calibrate_class_guidance, calibration_markdown
    from edmsound.evaluation.fidelity import rms_dbfs
    pipe = EDMSoundPipeline(calibrated / "model", device="cpu")
    g = pipe.generate("low", n=4, seed=noise_seed(1, pipe.class_index("low"), 0))
    gen_db = float(rms_dbfs(E._pcm16(g.waves)).mean())
    want = {}
    for per in (2, None):
        ref = E.load_reference(str(world / "ref"), ["low"], pipe.sample_rate, pipe.codec.num_samples, per,
                               E.REFERENCE_SEED, False)[0]
        want[per] = gen_db - float(rms_dbfs(ref.waves[ref.labels == ref.classes.index("low")]).mean())
    assert abs(want[2] - want[None]) > 0.01                    # two real clips are not the whole set
    common = dict(scales=(1,), min_fit=0.01, min_diversity=None, n_per_class=4, classes=["low"],
                  classifier=world / "classifier", encoder=world / "encoder", reference=world / "ref",
                  reference_per_class=2, progress=False, log=lambda *_: None)
    res = calibrate_class_guidance(calibrated / "model", **common)
    assert res["rows"][0]["level_gap_db"] == pytest.approx(want[None], abs=1e-6)
    assert res["settings"]["level_reference_per_class"] == E.FIDELITY_REFERENCE_PER_CLASS
    assert "minus that of 2000 real clips per class" in calibration_markdown(res)
    res0 = calibrate_class_guidance(calibrated / "model", fidelity_reference_per_class=0, **common)
    assert res0["rows"][0]["level_gap_db"] == pytest.approx(want[2], abs=1e-6)
    assert res0["rows"][0]["diversity_ratio"] == pytest.approx(res["rows"][0]["diversity_ratio"])
    with pytest.raises(ValueError, match="fidelity_reference_per_class"):
        calibrate_class_guidance(calibrated / "model", fidelity_reference_per_class=-1, **common)


def test_calibration_takes_more_clips_than_one_generate_call(world, calibrated):
    """More clips per class than one pipeline call makes: clip i still comes from noise seed base + i."""
    from edmsound.core.pipeline import EDMSoundPipeline
    from edmsound.evaluation.calibrate import calibrate_class_guidance
    from edmsound.evaluation.fidelity import rms_dbfs
    n = E.MAX_CLIPS_PER_CALL + 2
    res = calibrate_class_guidance(calibrated / "model", scales=(1,), min_fit=0.01, min_diversity=None, n_per_class=n,
                                   classes=["low"], classifier=world / "classifier", encoder=world / "encoder",
                                   reference=world / "ref", progress=False, log=lambda *_: None)
    pipe = EDMSoundPipeline(calibrated / "model", device="cpu")
    base = noise_seed(1, pipe.class_index("low"), 0)
    waves = np.concatenate([pipe.generate("low", n=E.MAX_CLIPS_PER_CALL, seed=base).waves,
                            pipe.generate("low", n=2, seed=base + E.MAX_CLIPS_PER_CALL).waves])
    ref = E.load_reference(str(world / "ref"), ["low"], pipe.sample_rate, pipe.codec.num_samples, None,
                           E.REFERENCE_SEED, False)[0]
    want = float(rms_dbfs(E._pcm16(waves)).mean() - rms_dbfs(ref.waves[ref.labels == ref.classes.index("low")]).mean())
    assert res["rows"][0]["level_gap_db"] == pytest.approx(want, abs=1e-6)
