import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from edmsound.core.storage import latest_checkpoint, load_safetensors
from edmsound.core.edm import edm_loss
from edmsound.core.presets import get_preset
from edmsound.training.trainer import Trainer, TrainingDiverged

ROOT = Path(__file__).resolve().parents[2]


def _fixed_loss(trainer, den, n_draws=8):
    """EDM loss of ``den`` on the training clips with fixed sigma/noise draws."""
    g = torch.Generator().manual_seed(99)
    y = trainer.codec.encode(trainer.train_waves)
    lab = trainer.train_labels
    with torch.no_grad():
        return sum(float(edm_loss(den, y, lab, trainer.preset.edm, generator=g).mean()) for _ in range(n_draws)) / n_draws


def test_tiny_overfits_a_handful_of_clips(tmp_path):
    from conftest import write_tone_tree
    data = write_tone_tree(tmp_path / "data", per_class=2)
    preset = get_preset("tiny").replace_train(lr=3e-3, warmup_steps=20, checkpoint_every=10_000)
    tr = Trainer(preset, data, tmp_path / "run", steps=500, progress=False)
    before = _fixed_loss(tr, tr.ema)
    tr.run()
    after = _fixed_loss(tr, tr.ema)
    assert after < before / 10, (before, after)
    log = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert log[0].startswith("step,loss") and len(log) > 10


def test_resume_continues_from_the_same_state(tone_tree, tmp_path):
    preset = get_preset("tiny").replace_train(checkpoint_every=15)
    straight = Trainer(preset, tone_tree, tmp_path / "a", steps=30, progress=False)
    straight.run()
    first = Trainer(preset, tone_tree, tmp_path / "b", steps=15, progress=False)
    first.run()
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(preset, tone_tree, tmp_path / "b", steps=30, progress=False)
    resumed = Trainer(preset, tone_tree, tmp_path / "b", steps=30, resume=True, progress=False)
    assert resumed.step == 15
    resumed.run()
    for (k, a), (_, b) in zip(straight.raw_net.state_dict().items(), resumed.raw_net.state_dict().items()):
        assert torch.equal(a, b), k
    for a, b in zip(straight.ema.net.parameters(), resumed.ema.net.parameters()):
        assert torch.equal(a, b)
    assert latest_checkpoint(tmp_path / "b").name == "ckpt-00000030"
    # the log has no duplicated steps after the resume
    steps = [int(l.split(",")[0]) for l in (tmp_path / "b" / "log.csv").read_text().splitlines()[1:]]
    assert steps == sorted(set(steps))
    # where the training happened: one merged stretch on this machine
    segs = resumed.info()["segments"]
    assert [s["steps"] for s in segs] == [[0, 30]] and segs[0]["machine"] == resumed.info()["machine"]
    assert segs[0]["seconds"] == pytest.approx(resumed.wall_time, abs=0.2)


def test_resume_with_a_new_ema_halflife_starts_a_new_stretch(tone_tree, tmp_path):
    base = get_preset("tiny").replace_train(checkpoint_every=100, ema_halflife_steps=2.0, ema_rampup=1.0)
    Trainer(base, tone_tree, tmp_path / "r", steps=8, progress=False).run()
    longer = base.replace_train(ema_halflife_steps=50.0)
    tr = Trainer(longer, tone_tree, tmp_path / "r", steps=12, resume=True, progress=False)
    # the EMA decay follows the new half-life (capped by the ramp-up: step * 1.0 = 8 < 50)
    assert tr._ema_beta() == pytest.approx(0.5 ** (1 / 8))
    ema_before = [p.clone() for p in tr.ema.net.parameters()]
    tr.run()
    assert any(not torch.equal(a, b) for a, b in zip(ema_before, tr.ema.net.parameters()))
    segs = tr.info()["segments"]
    assert [(s["steps"], s["ema_halflife_steps"], s["lr"]) for s in segs] == \
        [([0, 8], 2.0, base.train.lr), ([8, 12], 50.0, base.train.lr)]
    # same knobs on the next resume: the stretch is extended, not split
    tr2 = Trainer(longer, tone_tree, tmp_path / "r", steps=14, resume=True, progress=False)
    tr2.run()
    assert [s["steps"] for s in tr2.info()["segments"]] == [[0, 8], [8, 14]]


def test_resume_and_init_with_a_new_training_noise_distribution(tone_tree, tmp_path):
    base = get_preset("tiny").replace_train(checkpoint_every=100)
    Trainer(base, tone_tree, tmp_path / "r", steps=6, progress=False).run()
    wide = base.replace_noise(p_mean=-1.0, p_std=1.5)
    assert (wide.edm.p_mean, wide.edm.p_std, wide.net) == (-1.0, 1.5, base.net)
    tr = Trainer(wide, tone_tree, tmp_path / "r", steps=10, resume=True, progress=False)   # same model: resumes
    assert (tr.preset.edm.p_mean, tr.preset.edm.p_std) == (-1.0, 1.5) and tr.step == 6
    tr.run()
    segs = tr.info()["segments"]
    assert [(s["steps"], s["p_mean"], s["p_std"]) for s in segs] == [([0, 6], -3.0, 1.0), ([6, 10], -1.0, 1.5)]
    cfg = json.loads((latest_checkpoint(tmp_path / "r") / "config.json").read_text())
    assert (cfg["preset"]["edm"]["p_mean"], cfg["preset"]["edm"]["p_std"]) == (-1.0, 1.5)
    # a warm start from the exported model with the preset's own distribution again is the same model too
    tr.export(tmp_path / "m")
    warm = Trainer(base, tone_tree, tmp_path / "w", steps=12, init=tmp_path / "m", progress=False)
    warm.run()
    assert [(s["steps"], s["p_mean"]) for s in warm.info()["segments"]] == [([0, 6], -3.0), ([6, 10], -1.0),
                                                                            ([10, 12], -3.0)]
    # the sampler's start (sigma_max, rho) is a sampling default, not the network: a warm start may change it,
    # and the export records it for generation
    loud = base.replace_sampling(sigma_max=80.0, rho=7.0)
    assert (loud.edm.sigma_max, loud.edm.rho, loud.edm.sigma_data) == (80.0, 7.0, base.edm.sigma_data)
    wl = Trainer(loud, tone_tree, tmp_path / "wl", steps=12, init=tmp_path / "m", progress=False)
    wl.run()
    wl.export(tmp_path / "m80")
    from edmsound.core.pipeline import EDMSoundPipeline
    pipe = EDMSoundPipeline(tmp_path / "m80", device="cpu")
    assert (pipe.preset.edm.sigma_max, pipe.preset.edm.rho) == (80.0, 7.0)
    # export may set the whole schedule; an inverted range is refused with one line
    from edmsound.cli import main
    main(["export", "--run", str(tmp_path / "m80"), "--out", str(tmp_path / "m15"), "--sigma-max", "15", "--rho",
          "2.5", "--sigma-min", "0.002"])
    edm = json.loads((tmp_path / "m15" / "config.json").read_text())["preset"]["edm"]
    assert (edm["sigma_min"], edm["sigma_max"], edm["rho"]) == (0.002, 15.0, 2.5)
    with pytest.raises(SystemExit) as e:
        main(["export", "--run", str(tmp_path / "m80"), "--out", str(tmp_path / "bad"), "--sigma-min", "100"])
    assert e.value.code == 2 and not (tmp_path / "bad").exists()
    # a different network is still refused
    other = dataclasses.replace(base, net=dataclasses.replace(base.net, dim=base.net.dim * 2))
    with pytest.raises(ValueError, match="different preset"):
        Trainer(other, tone_tree, tmp_path / "r", steps=14, resume=True, progress=False)


def test_cli_rejects_a_bad_training_noise_distribution(tone_tree, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for flag, bad, why in (("--p-std", "0", "> 0"), ("--p-std", "-1", "> 0"), ("--p-mean", "nan", "finite"),
                           ("--p-mean", "abc", "finite"), ("--sigma-max", "0", "> 0"), ("--rho", "inf", "> 0")):
        r = subprocess.run([sys.executable, "-m", "edmsound.cli", "train", "--preset", "tiny", "--data",
                            str(tone_tree), "--out", str(tmp_path / "run"), flag, bad],
                           env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and flag in r.stderr and why in r.stderr, r.stderr
        assert not (tmp_path / "run").exists()


def test_cli_rejects_a_bad_ema_halflife(tone_tree, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    for bad in ("0", "-5", "abc", "inf"):
        r = subprocess.run([sys.executable, "-m", "edmsound.cli", "train", "--preset", "tiny", "--data",
                            str(tone_tree), "--out", str(tmp_path / "run"), "--ema-halflife", bad],
                           env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "--ema-halflife" in r.stderr and "> 0" in r.stderr, r.stderr
        assert not (tmp_path / "run").exists()


def test_warm_start_keeps_the_history_of_older_model_dirs(tone_tree, tmp_path):
    preset = get_preset("tiny").replace_train(checkpoint_every=100)
    tr = Trainer(preset, tone_tree, tmp_path / "a", steps=6, progress=False)
    tr.run()
    tr.export(tmp_path / "m")
    info_path = tmp_path / "m" / "info.json"
    info = json.loads(info_path.read_text())
    del info["segments"]                                        # a model dir from before segment tracking
    info["machine"] = "old box"
    info_path.write_text(json.dumps(info))
    warm = Trainer(preset, tone_tree, tmp_path / "b", steps=10, init=tmp_path / "m", progress=False)
    # the fresh optimizer warms its learning rate up again from the warm start's step
    assert warm.step == 6 and warm._lr() == pytest.approx(preset.train.lr / preset.train.warmup_steps)
    warm.run()
    segs = warm.info()["segments"]
    assert [(s["machine"], s["steps"]) for s in segs] == [("old box", [0, 6]), (warm.info()["machine"], [6, 10])]
    assert sum(s["seconds"] for s in segs) == pytest.approx(warm.wall_time, abs=0.2)


def test_cooldown_takes_the_learning_rate_linearly_to_zero_and_resumes_on_the_same_schedule(tone_tree, tmp_path):
    preset = get_preset("tiny").replace_train(lr=1e-3, warmup_steps=4, cooldown_steps=10, checkpoint_every=8)
    tr = Trainer(preset, tone_tree, tmp_path / "run", steps=20, progress=False)
    seen = []
    for step in range(20):
        tr.step = step
        seen.append(tr._lr())
    # warm-up 1/4 .. 4/4, flat, then (20 - step) / 10 from step 10: the last step runs at a tenth, none at zero
    expected = [1e-3 * min(1.0, (k + 1) / 4, (20 - k) / 10) for k in range(20)]
    assert seen == pytest.approx(expected)
    assert seen[3] == pytest.approx(1e-3) and seen[15] == pytest.approx(5e-4) and seen[19] == pytest.approx(1e-4)
    # a run stopped and resumed ends on the same weights as one straight run
    straight = Trainer(preset, tone_tree, tmp_path / "a", steps=20, progress=False)
    straight.run()
    first = Trainer(preset, tone_tree, tmp_path / "b", steps=20, progress=False)
    first.max_minutes = 0.0                                     # stops (and checkpoints) after its first step
    first.run()
    assert first.step == 1
    resumed = Trainer(preset, tone_tree, tmp_path / "b", steps=20, resume=True, progress=False)
    resumed.run()
    for a, b in zip(straight.raw_net.parameters(), resumed.raw_net.parameters()):
        assert torch.equal(a, b)
    lrs = [float(l.split(",")[3]) for l in (tmp_path / "a" / "log.csv").read_text().splitlines()[1:]]
    assert lrs[-1] == 0.0                                       # the rate the schedule reaches at --steps
    seg = resumed.info()["segments"][-1]
    assert seg["lr_cooldown"] == [10, 20] and seg["steps"] == [0, 20]


def test_class_weights_draw_a_class_w_times_as_often_and_resume_on_the_same_draws(tmp_path):
    from conftest import write_tone_tree
    tree = write_tone_tree(tmp_path / "data", classes=("low", "mid", "high"), per_class=8)
    preset = get_preset("tiny").replace_train(checkpoint_every=8)
    tr = Trainer(preset, tree, tmp_path / "w", steps=6, class_weights={"high": 5.0, "mid": 1.0}, progress=False)
    assert tr.class_weights == {"high": 5.0}                    # a weight of 1 is the plain draw, not recorded
    n = torch.bincount(tr.train_labels, minlength=3).double()
    w = torch.tensor([5.0 if c == "high" else 1.0 for c in tr.classes], dtype=torch.float64)
    expected = (w * n / (w * n).sum()).numpy()
    draws = torch.cat([tr.draw() for _ in range(400)])          # 6,400 clips
    share = torch.bincount(tr.train_labels[draws], minlength=3).double().numpy() / len(draws)
    se = (expected * (1 - expected) / len(draws)) ** 0.5
    assert (abs(share - expected) < 5 * se).all(), (share, expected)
    assert share[tr.classes.index("high")] > 0.6                # 5 x 8 of 8 + 8 + 5 x 8 clips' weight, uniform 1/3
    # without weights every clip is as likely as any other
    plain = Trainer(preset, tree, tmp_path / "u", steps=6, progress=False)
    assert plain.item_weights is None and plain.class_weights == {}
    # stopped and resumed with the same weights: the same draws, the same weights as one straight run
    straight = Trainer(preset, tree, tmp_path / "a", steps=6, class_weights={"high": 5.0}, progress=False)
    straight.run()
    first = Trainer(preset, tree, tmp_path / "b", steps=6, class_weights={"high": 5.0}, progress=False)
    first.max_minutes = 0.0
    first.run()
    resumed = Trainer(preset, tree, tmp_path / "b", steps=6, resume=True, class_weights={"high": 5.0},
                      progress=False)
    resumed.run()
    for a, b in zip(straight.raw_net.parameters(), resumed.raw_net.parameters()):
        assert torch.equal(a, b)
    segs = resumed.info()["segments"]
    assert len(segs) == 1 and segs[0]["class_weights"] == {"high": 5.0} and segs[0]["steps"] == [0, 6]
    # a stretch with other weights is a stretch of its own
    more = Trainer(preset, tree, tmp_path / "b", steps=8, resume=True, progress=False)
    more.run()
    assert [s.get("class_weights") for s in more.info()["segments"]] == [{"high": 5.0}, None]
    with pytest.raises(ValueError, match="'loud': not a class of this data; its classes: high, low, mid"):
        Trainer(preset, tree, tmp_path / "x", steps=2, class_weights={"loud": 2.0}, progress=False)
    with pytest.raises(ValueError, match="must be a finite number > 0"):
        Trainer(preset, tree, tmp_path / "y", steps=2, class_weights={"low": 0.0}, progress=False)


@pytest.mark.parametrize("args, message", [
    (["--class-weight", "low"], "must be CLASS=W"),
    (["--class-weight", "low=-1"], "W a number > 0"),
    (["--class-weight", "low=2", "--class-weight", "low=3"], "names 'low' twice"),
    (["--class-weight", "loud=2"], "'loud': not a class of this data"),
])
def test_cli_class_weight_errors_are_one_line(tone_tree, tmp_path, capsys, args, message):
    from edmsound.cli import main
    with pytest.raises(SystemExit) as e:
        main(["train", "--preset", "tiny", "--data", str(tone_tree), "--out", str(tmp_path / "r"), "--steps", "2",
              "--no-progress", "--no-jemalloc", *args])
    err = capsys.readouterr().err.strip().splitlines()
    errors = [l for l in err if "error" in l]                   # argparse puts its usage lines before the error
    assert e.value.code != 0 and len(errors) == 1 and message in errors[0] and errors[0] == err[-1], err
    assert "Traceback" not in "\n".join(err)
    assert not (tmp_path / "r" / "config.json").exists()


def test_nan_guard_names_the_step_and_keeps_last_checkpoint(tone_tree, tmp_path):
    preset = get_preset("tiny").replace_train(checkpoint_every=10)
    tr = Trainer(preset, tone_tree, tmp_path / "run", steps=10, progress=False)
    tr.run()
    good = load_safetensors(latest_checkpoint(tmp_path / "run") / "model.safetensors")
    tr2 = Trainer(preset, tone_tree, tmp_path / "run", steps=20, resume=True, progress=False)
    with torch.no_grad():
        next(tr2.raw_net.parameters()).fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match="step 11"):
        tr2.run()
    ck = latest_checkpoint(tmp_path / "run")
    assert ck.name == "ckpt-00000010"
    after = load_safetensors(ck / "model.safetensors")
    assert all(torch.equal(good[k], after[k]) for k in good)


def test_cli_train_stop_resume_export(tone_tree, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "edmsound.cli", "train", "--preset", "tiny", "--data", str(tone_tree),
           "--out", str(tmp_path / "run"), "--no-progress", "--checkpoint-every", "5"]
    r = subprocess.run(cmd + ["--steps", "10"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(cmd + ["--steps", "20", "--resume", "--export", str(tmp_path / "model")], env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "resumed" in r.stdout and json.loads(r.stdout.strip().splitlines()[-1])["step"] == 20
    info = json.loads((tmp_path / "model" / "info.json").read_text())
    assert info["steps"] == 20
    from edmsound.core.model import load_denoiser
    den, preset, classes, _ = load_denoiser(tmp_path / "model")
    assert classes == ["high", "low"] and preset.name == "tiny"
    # export with other shipped sampling defaults (validated like the app's inputs)
    exp = [sys.executable, "-m", "edmsound.cli", "export", "--run", str(tmp_path / "run"), "--out"]
    r = subprocess.run(exp + [str(tmp_path / "m2"), "--sampler", "deis", "--nfe", "8", "--guidance", "3"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    _, p2, _, _ = load_denoiser(tmp_path / "m2")
    assert (p2.default_sampler, p2.default_nfe, p2.default_guidance) == ("deis", 8, 3.0)
    assert p2.net == preset.net and (tmp_path / "m2" / "model.safetensors").is_file()
    for bad, msg in ((["--sampler", "heun", "--nfe", "10"], "heun"), (["--guidance", "30"], "allowed [0, 20]"),
                     (["--sampler", "dpm"], "unknown sampler")):
        r = subprocess.run(exp + [str(tmp_path / "m3")] + bad, env=env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and msg in r.stderr and not (tmp_path / "m3").exists()


def test_ddp_two_processes_on_cpu(tone_tree, tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(
        "import sys, torch, hashlib\n"
        "from edmsound import get_preset\n"
        "from edmsound import Trainer, init_distributed\n"
        "torch.set_num_threads(1)\n"
        "world, rank = init_distributed('cpu')\n"
        "tr = Trainer(get_preset('tiny').replace_train(checkpoint_every=5), sys.argv[1], sys.argv[2], steps=6, progress=False)\n"
        "tr.run()\n"
        "h = hashlib.sha1(b''.join(p.detach().numpy().tobytes() for p in tr.raw_net.parameters())).hexdigest()\n"
        "open(f'{sys.argv[2]}-rank{rank}.txt', 'w').write(h)\n"
        "torch.distributed.destroy_process_group()\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", "29533", str(script), str(tone_tree), str(tmp_path / "run")],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    h0 = (tmp_path / "run-rank0.txt").read_text()
    h1 = (tmp_path / "run-rank1.txt").read_text()
    assert h0 == h1                                 # gradients were all-reduced: replicas agree
    ck = latest_checkpoint(tmp_path / "run")
    assert ck.name == "ckpt-00000006"
    assert json.loads((ck / "info.json").read_text())["world_size"] == 2


def test_whitened_run_measures_its_gains_once_and_keeps_them(tone_tree, tmp_path):
    base = get_preset("tiny").replace_train(checkpoint_every=100)
    plain = Trainer(base, tone_tree, tmp_path / "p", steps=4, progress=False)
    plain.run()
    plain.export(tmp_path / "m")
    # a warm start of the same network into the whitened representation
    tr = Trainer(base, tone_tree, tmp_path / "w", steps=6, init=tmp_path / "m", whiten=True, progress=False)
    gains = tr.preset.codec.freq_scale
    assert gains is not None and len(gains) == base.codec.num_bins and tr.step == 4
    spec = tr.codec.encode(tr.train_waves)
    rms = spec.double().pow(2).mean(dim=(0, 1, 3)).sqrt().numpy()
    free = (torch.tensor(gains) > 0.25) & (torch.tensor(gains) < 4.0)
    assert free.any()
    assert abs(rms[free.numpy()] - base.edm.sigma_data).max() < 1e-3
    tr.run()
    # the training record starts a new stretch where the gains start
    assert [(s["steps"], s["per_bin_gains"]) for s in tr.info()["segments"]] == [([0, 4], False), ([4, 6], True)]
    stored = json.loads((latest_checkpoint(tmp_path / "w") / "config.json").read_text())["preset"]["codec"]
    assert tuple(stored["freq_scale"]) == gains
    # resuming keeps the gains measured at the start, with or without the option
    again = Trainer(base, tone_tree, tmp_path / "w", steps=8, resume=True, progress=False)
    assert again.preset.codec.freq_scale == gains
    again.run()
    again.export(tmp_path / "mw")
    from edmsound.core.pipeline import EDMSoundPipeline
    pipe = EDMSoundPipeline(tmp_path / "mw", device="cpu")
    assert pipe.codec.config.freq_scale == gains
    wave = tr.train_waves[:2].double()
    assert (pipe.codec.decode(pipe.codec.encode(wave)) - wave).abs().max() < 1e-9
    # a run started without gains cannot take them up later
    with pytest.raises(ValueError, match="without per-bin gains"):
        Trainer(base, tone_tree, tmp_path / "p", steps=8, resume=True, whiten=True, progress=False)


def test_cli_refuses_gains_for_a_magnitude_representation(tone_tree, tmp_path, capsys):
    from edmsound.cli import main
    with pytest.raises(SystemExit) as e:
        main(["train", "--preset", "tiny", "--data", str(tone_tree), "--out", str(tmp_path / "r"), "--steps", "2",
              "--representation", "magnitude", "--freq-scale", "whiten", "--no-progress", "--no-jemalloc"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code != 0 and len(err) == 1 and "complex representation only" in err[0], err
    assert not (tmp_path / "r").exists()


def test_class_whitened_run_trains_each_class_at_its_own_scale(tone_tree, tmp_path):
    base = get_preset("tiny").replace_train(checkpoint_every=100)
    tr = Trainer(base, tone_tree, tmp_path / "c", steps=3, whiten_class=True, progress=False)
    table = tr.preset.codec.class_scale
    assert tr.preset.codec.freq_scale is not None                      # the per-bin gains come with it
    assert table is not None and len(table) == len(tr.classes)
    for c in range(len(tr.classes)):
        state = tr.codec.to_model(tr.codec.encode(tr.train_waves[tr.train_labels == c]), c)
        rms = state.double().pow(2).mean(dim=(0, 1, 3)).sqrt().numpy()
        free = (torch.tensor(table[c]) > 0.25) & (torch.tensor(table[c]) < 4.0)
        if free.any():
            assert abs(rms[free.numpy()] - base.edm.sigma_data).max() < 1e-3
    tr.run()
    assert [s["per_class_gains"] for s in tr.info()["segments"]] == [True]
    tr.export(tmp_path / "m")                                           # the model directory carries the table
    from edmsound.core.pipeline import EDMSoundPipeline
    assert EDMSoundPipeline(tmp_path / "m").codec.config.class_scale == table
    again = Trainer(base, tone_tree, tmp_path / "c", steps=4, resume=True, progress=False)
    assert again.preset.codec.class_scale == table
    plain = Trainer(base, tone_tree, tmp_path / "p", steps=2, progress=False)
    plain.run()
    with pytest.raises(ValueError, match="without per-class gains"):
        Trainer(base, tone_tree, tmp_path / "p", steps=4, resume=True, whiten_class=True, progress=False)


def test_clip_weights_draw_each_clip_by_its_weight_and_are_recorded(tmp_path):
    from conftest import write_tone_tree
    from edmsound.data.weights import write_clip_weights
    tree = write_tone_tree(tmp_path / "data", classes=("low", "high"), per_class=8)
    preset = get_preset("tiny")
    # one clip of each class weighted 9, the rest 1 (two clips not named in the file at all: 1 too)
    keys = [f"{c}/{c}_{i}.wav" for c in ("low", "high") for i in range(8)]
    weights = {k: (9.0 if k.endswith("_3.wav") else 1.0) for k in keys}
    named = [k for k in keys if k not in ("low/low_5.wav", "high/high_6.wav")]
    write_clip_weights(tmp_path / "w.csv", named, [weights[k] for k in named])
    tr = Trainer(preset, tree, tmp_path / "run", steps=2, clip_weights=tmp_path / "w.csv", progress=False)
    train_keys = [Path(s).relative_to(tree.resolve()).as_posix() for s in tr.train_sources]
    np.testing.assert_array_equal(tr.item_weights.numpy(), [weights[k] if k in named else 1.0 for k in train_keys])
    assert tr.clip_weights["clips"] == sum(k in named for k in train_keys)
    expected = tr.item_weights / tr.item_weights.sum()
    draws = torch.cat([tr.draw() for _ in range(500)]).numpy()     # 8,000 draws of the tiny preset's batch
    share = np.bincount(draws, minlength=len(expected)) / len(draws)
    se = (expected.numpy() * (1 - expected.numpy()) / len(draws)) ** 0.5
    assert (abs(share - expected.numpy()) < 5 * se + 1e-12).all()
    assert sorted(set(np.round(tr.item_weights.numpy(), 6))) == [1.0, 9.0]
    tr.run()
    seg = tr.info()["segments"][-1]
    assert seg["clip_weights"]["file"] == "w.csv" and len(seg["clip_weights"]["sha256"]) == 16
    assert seg["clip_weights"]["max"] == 9.0
    # with class weights too: the two multiply
    both = Trainer(preset, tree, tmp_path / "both", steps=2, clip_weights=tmp_path / "w.csv",
                   class_weights={"high": 2.0}, progress=False)
    hi = both.classes.index("high")
    np.testing.assert_allclose(both.item_weights.numpy(),
                               tr.item_weights.numpy() * np.where(tr.train_labels.numpy() == hi, 2.0, 1.0))
    # a file written for other data is refused, naming what it lacks
    write_clip_weights(tmp_path / "other.csv", ["low/low_0.wav", "hum/hum_0.wav"], [1.0, 2.0])
    with pytest.raises(ValueError, match=r"1 of its 2 clips are not in .* \(e\.g\. 'hum/hum_0\.wav'\)"):
        Trainer(preset, tree, tmp_path / "x", steps=2, clip_weights=tmp_path / "other.csv", progress=False)


@pytest.mark.parametrize("text, message", [
    ("clip,weight\nlow/low_0.wav,0\n", "row 2: the weight must be a finite number > 0, got '0'"),
    ("clip,weight\nlow/low_0.wav,nan\n", "the weight must be a finite number > 0"),
    ("clip,weight\nlow/low_0.wav,2\nlow/low_0.wav,3\n", "row 3: 'low/low_0.wav' appears twice"),
    ("name,w\nlow/low_0.wav,2\n", "the first row must be the header 'clip,weight'"),
    ("clip,weight\nlow/low_0.wav\n", "row 2: expected 2 fields"),
    ("clip,weight\n", "no rows after the header"),
])
def test_a_bad_clip_weights_file_is_one_line_and_trains_nothing(tmp_path, text, message):
    from conftest import write_tone_tree
    tree = write_tone_tree(tmp_path / "data")
    (tmp_path / "w.csv").write_text(text)
    r = subprocess.run([sys.executable, "-m", "edmsound.cli", "train", "--preset", "tiny", "--data", str(tree), "--out",
                        str(tmp_path / "run"), "--steps", "2", "--clip-weights", str(tmp_path / "w.csv"),
                        "--no-progress"], capture_output=True, text=True)
    assert r.returncode == 2
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "w.csv" in err[0], r.stderr
    assert not (tmp_path / "run" / "latest.json").exists()


def test_cli_training_into_a_used_run_directory_is_one_line_and_keeps_the_run(tone_tree, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "edmsound.cli", "train", "--preset", "tiny", "--data", str(tone_tree), "--out",
           str(tmp_path / "run"), "--steps", "2", "--no-progress"]
    assert subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300).returncode == 0
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert "already has a checkpoint" in lines[0] and "--resume" in lines[0]
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before
