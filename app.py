#!/usr/bin/env python
"""EDMSound Gradio app: ``python app.py`` (or ``make run``) serves the embedded models from checkpoints/ (the
shipped default and any few-step student exported beside it, chosen in the app's Model menu).

    python app.py [--checkpoint DIR ...] [--index DIR | --no-index] [--host HOST] [--port PORT] [--share]
                  [--device cpu|cuda]

Nothing is downloaded: the model, the copy-detection encoder and the index are local files. On a Hugging
Face Space (SPACE_ID set) it listens on 0.0.0.0; it uses CUDA when present. Started as a script it re-executes
itself once with jemalloc preloaded when the library is installed (EDMSOUND_NO_JEMALLOC=1: not). See docs/app.md.
"""
from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")   # before gradio is imported (no telemetry)
os.environ.setdefault("HF_HUB_OFFLINE", "1")                 # local weights only
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import argparse  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parent
CHECKPOINTS = ROOT / "checkpoints"
DEFAULT_CHECKPOINT = CHECKPOINTS / "default"
DEFAULT_INDEX = ROOT / "checkpoints" / "index"


def parse_args(argv=None) -> argparse.Namespace:
    from edmsound.cli.args import add_precision
    on_space = bool(os.environ.get("SPACE_ID"))
    p = argparse.ArgumentParser(description="EDMSound app: generate foley, inspect training neighbours, "
                                            "compare samplers.")
    p.add_argument("--checkpoint", action="append", default=None, metavar="DIR",
                   help="exported model directory; repeat it to serve several (the first opens by default). "
                        "Default: every model under checkpoints/ (the embedded default first)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--index", default=None,
                   help="copy-detection index directory (default: checkpoints/index; when that is missing the "
                        "app runs without the neighbours panel). An explicit --index must load.")
    g.add_argument("--no-index", action="store_true", help="run without the neighbours panel")
    p.add_argument("--host", default="0.0.0.0" if on_space else "127.0.0.1",
                   help="address to listen on (default 127.0.0.1; 0.0.0.0 when SPACE_ID is set)")
    p.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)),
                   help="port (default 7860)")
    p.add_argument("--share", action="store_true", help="create a public gradio.live link (needs network)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    add_precision(p)
    return p.parse_args(argv)


def default_checkpoints() -> list[str]:
    """Every model directory under checkpoints/ (the default first); the default's path when there is none, so
    the error names it."""
    from edmsound.core.storage import find_models
    return [str(p) for p in find_models(CHECKPOINTS)] or [str(DEFAULT_CHECKPOINT)]


def _stop(signum, frame):
    # once: gradio closes the server on this and the service's temp dir is removed at exit; a second signal
    # (a supervisor that repeats it, Ctrl-C twice) must not interrupt that clean-up
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise KeyboardInterrupt


def main(argv=None) -> None:
    args = parse_args(argv)
    if argv is None:              # started as a script: serve under jemalloc when installed (faster generation;
        from edmsound.core.runtime import reexec_with_jemalloc  # EDMSOUND_NO_JEMALLOC=1 turns it off)
        reexec_with_jemalloc(sys.argv[1:], script=__file__)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("edmsound").setLevel(logging.INFO)
    from edmsound.app.ui import build_demo, launch_kwargs
    from edmsound.app.service import EDMSoundService

    checkpoints = args.checkpoint or default_checkpoints()
    for ck in checkpoints:
        if not Path(ck).is_dir():
            sys.exit(f"error: checkpoint directory {ck} not found")
    if args.no_index:
        index, required = None, False
    elif args.index is not None:
        index, required = args.index, True
        if not Path(index).exists():            # fail before the model loads
            sys.exit(f"error: copy index {index} not found (build one with 'edmsound index build', "
                     "or run with --no-index)")
    else:
        index, required = str(DEFAULT_INDEX), False
    try:
        services = EDMSoundService.load_family(checkpoints, index=index, device=args.device,
                                               require_index=required, precision=args.precision)
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    service = next(iter(services.values()))
    if not service.has_index:
        print(f"note: neighbours panel off: {service.index_note}", file=sys.stderr)
    from edmsound.core.runtime import jemalloc_loaded
    log = logging.getLogger("edmsound.app")
    log.info("memory allocator: %s", "jemalloc" if jemalloc_loaded() else "default (jemalloc not found or disabled)")
    for name, svc in services.items():
        log.info("model %s: %s, %s on %s; generated audio is kept in %s (removed at exit)", name,
                 svc.pipeline.summary, svc.pipeline.precision, svc.pipeline.device, svc.workdir)
    signal.signal(signal.SIGTERM, _stop)
    demo = build_demo(services)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, **launch_kwargs())


if __name__ == "__main__":
    main()
