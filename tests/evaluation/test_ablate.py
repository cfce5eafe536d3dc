"""`edmsound ablate`: variants as preset overlays, trained with the same steps and seeds, resumed, evaluated alike."""
import csv

import pytest

from edmsound.core.presets import get_preset
from edmsound.evaluation.ablate import parse_variants, variant_preset


def test_variants_are_overlays_and_unknown_ones_are_named():
    p = variant_preset(get_preset("tiny"), "l1+no-attention")
    assert p.train.loss == "l1" and p.net.attention is False and p.codec.representation == "complex"
    assert variant_preset(get_preset("tiny"), "mel").codec.representation == "mel"
    assert variant_preset(get_preset("tiny"), "base") == get_preset("tiny")
    with pytest.raises(ValueError, match="unknown variant 'dropout'; valid: base, l1, no-attention"):
        parse_variants("base,dropout")
    with pytest.raises(ValueError, match="listed twice"):
        parse_variants("base,base")


def test_ablate_trains_resumes_and_tabulates(tone_tree, tmp_path, capsys):
    from edmsound.cli import main
    argv = ["ablate", "--data", str(tone_tree), "--out", str(tmp_path / "abl"), "--preset", "tiny",
            "--variants", "base,no-norm+magnitude", "--steps", "2", "--batch-size", "2", "--n-per-class", "2",
            "--reference", str(tone_tree), "--classifier", "none", "--no-progress"]
    main(argv)
    rows = list(csv.DictReader(open(tmp_path / "abl" / "ablation.csv")))
    assert [r["variant"] for r in rows] == ["base", "no-norm+magnitude"]
    assert all(float(r["fad"]) >= 0 and float(r["seconds_per_clip"]) > 0 and r["steps"] == "2" for r in rows)
    assert (tmp_path / "abl" / "ablation.png").stat().st_size > 5000
    scored = {v: (tmp_path / "abl" / v / "eval" / "results.csv").stat().st_mtime_ns for v in ("base",
                                                                                            "no-norm+magnitude")}
    main(argv)                                             # finished variants are not trained or scored again
    assert "resumed" in capsys.readouterr().out
    assert scored == {v: (tmp_path / "abl" / v / "eval" / "results.csv").stat().st_mtime_ns for v in scored}
    again = list(csv.DictReader(open(tmp_path / "abl" / "ablation.csv")))
    assert [r["fad"] for r in again] == [r["fad"] for r in rows]
