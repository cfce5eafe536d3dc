"""Replication analysis: stitching copies are localised per window, and the report (markdown, figures,
WAVs, CSV) is written from class-per-folder and sidecar layouts through the CLI path."""
from edmsound.cli import main as cli_main
import csv
import json
import os
import warnings

import numpy as np
import pytest
import soundfile as sf

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

from edmsound.copydetect.report import load_generated, stitching_analysis  # noqa: E402
from edmsound.audio.io import AudioLoadWarning  # noqa: E402
from edmsound.data.folder import AudioSet
from edmsound.copydetect.encoders import load_encoder  # noqa: E402
from edmsound.copydetect.index import CopyIndex  # noqa: E402
from edmsound.data.synth import CLASSES, clip_seed, synth_uri, synthesize  # noqa: E402

SR, SECONDS, PER_CLASS = 16000, 1.016, 6
PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    waves, labels, sources = [], [], []
    for ci, c in enumerate(CLASSES):
        for i in range(PER_CLASS):
            s = clip_seed(0, ci, i)
            waves.append(synthesize(c, s, SR, SECONDS))
            labels.append(ci)
            sources.append(synth_uri(c, s))
    data = AudioSet(np.stack(waves), np.array(labels), list(CLASSES), sources, SR)
    idx = CopyIndex.build(data, load_encoder("default", head="default"), progress=False)
    path = idx.save(tmp_path_factory.mktemp("copies") / "index")
    return data, CopyIndex.load(path), path


def halves(a, b):
    n = len(a)
    return np.concatenate([a[: n // 2], b[n // 2:]]).astype(np.float32)


def test_stitched_clip_reports_both_sources_in_the_right_windows(built):
    data, idx, _ = built
    a, b = 3 * PER_CLASS + 0, 3 * PER_CLASS + 4                  # two keyboard clips
    res = idx.search([halves(data.waves[a], data.waves[b])], k=2, same_class="keyboard", sample_rate=SR)[0]
    w = {x.query_offset: x for x in res.windows}
    assert w[0.0].source == data.sources[a] and w[0.0].train_offset == 0.0
    assert w[0.5].source == data.sources[b] and w[0.5].train_offset == 0.5
    assert w[0.0].similarity > 0.99 and w[0.5].similarity > 0.95
    assert {m.source for m in res} == {data.sources[a], data.sources[b]}
    hop = idx.encoder_info["hop_seconds"]
    st = stitching_analysis(res, idx.threshold(95, "keyboard"), hop)
    assert st["stitching"] and "different training clips" in st["reason"]
    assert set(st["sources"]) == {data.sources[a], data.sources[b]}
    # an unmodified training clip is a plain copy, not a stitching one
    plain = idx.search([data.waves[a]], k=1, same_class="keyboard", sample_rate=SR)[0]
    assert not stitching_analysis(plain, idx.threshold(95, "keyboard"), hop)["stitching"]
    # nor is a copy delayed by a fraction of a hop (query windows snap to different indexed windows)
    late = np.concatenate([np.zeros(1500, np.float32), data.waves[a]])[: len(data.waves[a])]
    delayed = idx.search([late], k=1, same_class="keyboard", sample_rate=SR)[0]
    assert delayed[0].source == data.sources[a]
    assert not stitching_analysis(delayed, idx.threshold(95, "keyboard"), hop)["stitching"]
    # one clip's two halves swapped: one source, non-aligned offsets
    x = data.waves[a]
    n = len(x) // 2
    swapped = np.concatenate([x[n:2 * n], x[:n]])
    st = stitching_analysis(idx.search([swapped], k=1, same_class="keyboard", sample_rate=SR)[0],
                            idx.threshold(95, "keyboard"), hop)
    assert st["stitching"] and "non-aligned" in st["reason"]


def _write(path, wave):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, wave, SR, subtype="FLOAT")


def run_cli(argv):
    """Through the real `edmsound` entry point (cli_copy is registered there)."""
    cli_main(argv)


def test_report_is_written_with_figures_wavs_and_csv(built, tmp_path, capsys):
    data, idx, path = built
    gen = tmp_path / "generated"
    _write(gen / "rain" / "copy_of_rain.wav", data.waves[5 * PER_CLASS + 2] * 0.7)      # a scaled copy
    _write(gen / "dog_bark" / "stitched.wav", halves(data.waves[1], data.waves[3]))
    for ci in (0, 5, 6):
        for i in range(3):
            c = CLASSES[ci]
            _write(gen / c / f"fresh_{i}.wav", synthesize(c, clip_seed(4, ci, i), SR, SECONDS))
    (gen / "rain" / "broken.wav").write_bytes(b"RIFF not audio")
    out = tmp_path / "report"
    with pytest.warns(AudioLoadWarning, match="broken.wav"):
        run_cli(["copies", "--generated", str(gen), "--index", str(path), "--out", str(out), "--top", "3",
                 "--no-progress"])
    assert "report:" in capsys.readouterr().out
    md = (out / "report.md").read_text()
    assert "histograms.png" in md and "Stitching copies" in md and "≥0.95" in md
    assert (out / "histograms.png").read_bytes().startswith(PNG)
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert len(rows) == 11                                         # broken.wav skipped
    by = {os.path.basename(r["file"]): r for r in rows}
    copy = by["copy_of_rain.wav"]
    assert copy["top1_source"] == data.sources[5 * PER_CLASS + 2] and float(copy["top1_similarity"]) > 0.99
    assert copy["above_train_p95"] == "1" and copy["stitching"] == "0"
    assert by["stitched.wav"]["stitching"] == "1"
    fresh = [float(r["top1_similarity"]) for r in rows if os.path.basename(r["file"]).startswith("fresh")]
    assert len(fresh) == 9 and max(fresh) < float(copy["top1_similarity"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["per_class"]["rain"]["bins"][">=0.95"] >= 1
    assert summary["per_class"]["all"]["generated"] == 11
    top = summary["top_pairs"][0]
    assert top["source"] in (data.sources[5 * PER_CLASS + 2], data.sources[1])
    for key in ("generated_wav", "training_wav", "figure"):
        assert (out / top[key]).is_file()
    assert (out / top["figure"]).read_bytes().startswith(PNG)
    train_wav, sr = sf.read(out / top["training_wav"], dtype="float32")
    assert sr == SR and len(train_wav) == data.waves.shape[1]      # re-synthesised from its synth:// URI


def test_flat_folder_with_sidecars_and_all_classes(built, tmp_path):
    data, idx, path = built
    gen = tmp_path / "flat"
    _write(gen / "a.wav", data.waves[2 * PER_CLASS + 1])            # gunshot copy
    (gen / "a.json").write_text(json.dumps({"class": "gunshot", "seed": 1}))
    _write(gen / "b.wav", data.waves[0])
    (gen / "b.json").write_text(json.dumps({"class": "not_a_class"}))
    _write(gen / "c.wav", data.waves[0])                             # no sidecar
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        clips = load_generated(gen, SR, idx.classes)
    assert [(os.path.basename(c.path), c.class_name) for c in clips] == [("a.wav", "gunshot")]
    msgs = " ".join(str(w.message) for w in rec)
    assert "not_a_class" in msgs and "c.wav" in msgs
    out = tmp_path / "report"
    with pytest.warns(AudioLoadWarning) as rec:
        run_cli(["copies", "--generated", str(gen), "--index", str(path), "--out", str(out), "--all-classes",
                 "--top", "1", "--no-progress"])
    assert any("c.wav" in str(w.message) for w in rec)
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert len(rows) == 1 and rows[0]["top1_source"] == data.sources[2 * PER_CLASS + 1]
    assert "all classes" in (out / "report.md").read_text()
    with pytest.raises(FileNotFoundError, match="JSON sidecars"):
        load_generated(_empty(tmp_path), SR, idx.classes)


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return d
