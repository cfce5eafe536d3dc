"""The ``edmsound`` command line: a thin layer over the library's public API, one module per command family.

- :mod:`.train`: ``data synth|info``, ``train``, ``export``
- :mod:`.generate`: ``generate``, ``samplers``
- :mod:`.copy`: ``encoder train|finetune-head|convert-laion``, ``index build|query``, ``copies``
- :mod:`.evaluate`: ``classifier train``, ``evaluate``, ``calibrate-guidance``, ``quality-report``
"""
from __future__ import annotations

import argparse

from . import copy, evaluate, generate, train


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edmsound", description="EDMSound: class-conditional sound generation on complex "
                                "spectrograms, copy detection and evaluation. `edmsound COMMAND --help` for each.")
    sub = p.add_subparsers(dest="command", required=True)
    for family in (train, generate, copy, evaluate):
        family.register(sub)
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.func(args)
