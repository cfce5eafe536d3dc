"""Every count, rate and duration option of every command refuses 0 and negatives when the command line is read —
one line naming the option and what it allows — before any data is loaded or any folder is written."""
import argparse

import pytest

from edmsound.cli import build_parser, main

COUNTS = {"--steps", "--batch-size", "--checkpoint-every", "--threads", "--n", "--n-per-class", "--per-class",
          "--epochs", "--kid-subsets", "--views", "--nlist", "--nprobe", "-k", "--sample-rate"}
AMOUNTS = {"--lr", "--max-minutes", "--seconds", "--margin", "--query-hop"}


def _commands(parser, path=()):
    """(command words, its parser) for every leaf command."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                if any(isinstance(a, argparse._SubParsersAction) for a in sub._actions):
                    yield from _commands(sub, path + (name,))
                else:
                    yield path + (name,), sub


def _required(sub) -> list[str]:
    """A value for each required option that the option's own type accepts."""
    argv = []
    for a in sub._actions:
        if a.required and a.option_strings:
            value = a.choices[0] if a.choices else ("1" if a.type is not None else "x")
            argv += [a.option_strings[-1], str(value)]
    return argv


def _guarded():
    rows = []
    for words, sub in _commands(build_parser()):
        for a in sub._actions:
            names = set(a.option_strings) & (COUNTS | AMOUNTS)
            if names:
                rows.append((words, sub, sorted(names)[0]))
    return rows


GUARDED = _guarded()


def test_the_guarded_options_are_found():
    """The walk reaches the commands that train, generate, evaluate and index (so the checks below check them)."""
    seen = {" ".join(words) for words, _, _ in GUARDED}
    for command in ("train", "consistency-tune", "match-spectrum", "generate", "evaluate", "encoder train",
                    "index build", "classifier train", "data synth"):
        assert command in seen, command
    assert len(GUARDED) >= 50


@pytest.mark.parametrize("words,sub,option", GUARDED, ids=[f"{' '.join(w)} {o}" for w, _, o in GUARDED])
def test_zero_and_negatives_are_refused_at_once(words, sub, option, capsys):
    parser = build_parser()
    base = list(words) + _required(sub)
    good = parser.parse_args(base + [option, "3"])
    assert getattr(good, next(a.dest for a in sub._actions if option in a.option_strings)) == 3
    for bad in ("0", "-1", "nan"):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(base + [option, bad])
        assert e.value.code == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"argument {option}" in last and "> 0" in last and repr(bad) in last, last


def test_a_refused_value_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", str(tmp_path), "--out", str(out), "--batch-size", "0"])
    assert e.value.code == 2 and not out.exists()
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("argument --batch-size: must be a whole number > 0, got '0'"), err
    assert "Traceback" not in "\n".join(err)


def test_counts_that_may_be_zero_refuse_only_negatives(capsys):
    parser = build_parser()
    assert parser.parse_args(["copies", "--generated", "g", "--index", "i", "--out", "o", "--top", "0"]).top == 0
    with pytest.raises(SystemExit):
        parser.parse_args(["copies", "--generated", "g", "--index", "i", "--out", "o", "--top", "-1"])
    assert "argument --top: must be a whole number >= 0, got '-1'" in capsys.readouterr().err
