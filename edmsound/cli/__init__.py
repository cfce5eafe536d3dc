"""The ``edmsound`` command line: a thin layer over the library's public API, one module per command family.

- :mod:`.train`: ``data synth|info``, ``train``, ``distill``, ``export``
- :mod:`.generate`: ``generate``, ``samplers``
- :mod:`.copy`: ``encoder train|finetune-head|convert-laion``, ``index build|query``, ``copies``
- :mod:`.evaluate`: ``classifier train``, ``evaluate``, ``ablate``, ``calibrate-guidance``, ``calibrate-eq``,
  ``coverage``, ``quality-report``
"""
from __future__ import annotations

import argparse
import os
import sys

from . import copy, evaluate, generate, train

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError,
               PermissionError)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edmsound", description="EDMSound: class-conditional sound generation on complex "
                                "spectrograms, copy detection and evaluation. `edmsound COMMAND --help` for each.")
    p.add_argument("--debug", action="store_true",
                   help="show the full traceback of an error (also: EDMSOUND_DEBUG=1)")
    sub = p.add_subparsers(dest="command", required=True)
    for family in (train, generate, copy, evaluate):
        family.register(sub)
    return p


def main(argv=None):
    """Run one command. A user error (a bad value, a missing file) ends in one line on stderr and exit status 2;
    ``--debug`` or ``EDMSOUND_DEBUG=1`` shows the traceback instead."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except USER_ERRORS as e:
        if args.debug or os.environ.get("EDMSOUND_DEBUG") == "1":
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
