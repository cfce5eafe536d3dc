"""The Gradio app over :class:`edmsound.service.EDMSoundService`: ``build_demo(service) -> gr.Blocks``
(one model, or several keyed by name: a **Model** menu then picks the shipped model or one of its few-step
students, and every generating endpoint takes ``model``).

Tabs: **Generate** (controls, one player + spectrogram per clip, settings / NFE counted / wall time /
real-time factor, and the **training neighbours** panel with a copy-risk badge and a side-by-side view of
matching windows) and **Compare samplers** (one class, seed, NFE and guidance across samplers).

Named API endpoints (``gradio_client``): ``/generate``, ``/neighbours`` (for a clip of the caller's last
``/generate``: the session state travels with the client) and ``/compare``. Every other event is
private (UI only). Handlers receive raw values (``preprocess=False``) and the service validates them, so
a bad value is a ``gr.Error`` naming the allowed range whether it comes from the UI or the API.

State: the clips a user generated live in ``gr.State`` (per session); the module keeps no mutable state.
"""
from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")   # before gradio is imported

import contextlib  # noqa: E402
import functools  # noqa: E402
import html  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import secrets  # noqa: E402
import threading  # noqa: E402
from collections.abc import Mapping  # noqa: E402
from types import MappingProxyType  # noqa: E402

import gradio as gr  # noqa: E402

from .. import UPLOAD_EXTENSIONS, format_guidance_interval  # noqa: E402
from .service import (DEFAULT_K, MAX_K, MAX_TOOL_SECONDS, MAX_VARIATIONS, MODE_LABELS, SEED_MAX, EDMSoundService,
    as_int)

__all__ = ["build_demo", "Handlers", "launch_kwargs", "QUEUE_SIZE", "CONCURRENCY"]

log = logging.getLogger("edmsound.app")

QUEUE_SIZE = 32          # requests waiting at most (more are refused: "queue is full")
CONCURRENCY = 2          # model / index / plotting jobs running at once, all events together
MAX_UPLOAD = "25mb"      # the server's hard cap on a posted file; the tools' own limit (20 MB, 60 s) names itself
STATE_TTL_S = 3600       # a session's clips are dropped an hour after they were made
HISTORY_MAX = 48         # clips a session's history holds (the oldest leave first)
HISTORY_HEADERS = ("#", "clip", "tool", "class", "seconds", "LUFS", "true peak (dBTP)", "kept")
TOOL_NAMES = MappingProxyType({"vary": "variation", "regen": "region regenerated", "extend": "continued",
                               "long": "long clip", "loop": "seamless loop"})
SOURCE_CHOICES = (("a clip of the last generation", "clip"), ("the uploaded file", "upload"))
EXPORT_CHOICES = (("WAV 16-bit", "wav16"), ("WAV 24-bit", "wav24"),
                  ("WAV 32-bit float (keeps peaks above 0 dBFS)", "wav32f"), ("FLAC", "flac"))
VIEW_CHOICES = tuple((label, mode) for mode, label in MODE_LABELS.items())
NB_HEADERS = ("rank", "similarity", "percentile", "class", "training clip", "generated window (s)",
              "training window (s)", "> p95")
WIN_HEADERS = ("generated window (s)", "best training clip", "training window (s)", "similarity", "≥ p95",
               "neighbour #")
PAIR_HEADERS = ("pair", "generated window (s)", "neighbour window (s)", "similarity", "≥ p95")
LEVEL_CHOICES = (("as generated", "off"), ("peak (dBFS)", "peak"), ("loudness (LUFS)", "lufs"))
LEVEL_DEFAULT_TARGET = {"off": -1.0, "peak": -1.0, "lufs": -14.0}
RISK_STYLE = MappingProxyType({"high": ("#7f1d1d", "#fee2e2", "#dc2626", "⚠ copy risk"),
                               "low": ("#14532d", "#dcfce7", "#16a34a", "✓ no sign of copying"),
                               "unknown": ("#374151", "#f3f4f6", "#9ca3af", "? copy risk unknown")})


_CACHE_DIR: list[str] = []


def private_cache_dir() -> str:
    """Gradio's file cache in a folder of this process alone (mode 0700, removed at exit), so the file route
    reaches only what this app wrote, not other programs' files in the shared system temp folder. A
    ``GRADIO_TEMP_DIR`` set by the operator is kept."""
    import atexit
    import shutil
    import tempfile
    if os.environ.get("GRADIO_TEMP_DIR") and not _CACHE_DIR:
        return os.environ["GRADIO_TEMP_DIR"]
    if not _CACHE_DIR:
        d = tempfile.mkdtemp(prefix="edmsound-gradio-")       # 0700
        atexit.register(shutil.rmtree, d, True)
        _CACHE_DIR.append(d)
        os.environ["GRADIO_TEMP_DIR"] = d
    return _CACHE_DIR[0]


class SessionGate:
    """At most ``limit`` compute requests of one browser session at a time: one visitor cannot fill the
    shared compute slots with a burst while others wait."""

    def __init__(self, limit: int = 1):
        self.limit = int(limit)
        self._lock = threading.Lock()
        self._active: dict[str, int] = {}
        self._stop: set[str] = set()

    def cancel(self, session_id: str | None) -> bool:
        """Ask this session's running request to stop (at its next sampler step); False when none runs."""
        with self._lock:
            if session_id is None or session_id not in self._active:
                return False
            self._stop.add(session_id)
            return True

    def cancelled(self, session_id: str | None) -> bool:
        return session_id is not None and session_id in self._stop

    @contextlib.contextmanager
    def running(self, session_id: str | None):
        """``with gate.running(sid) as stopped:`` holds the session's slot; ``stopped()`` says Cancel was pressed."""
        self.enter(session_id)
        try:
            yield lambda: self.cancelled(session_id)
        finally:
            self.leave(session_id)

    def enter(self, session_id: str | None) -> None:
        if session_id is None:
            return
        with self._lock:
            n = self._active.get(session_id, 0)
            if n >= self.limit:
                raise ValueError(f"this session already has {n} request(s) running (the limit is {self.limit} at a "
                                 "time): wait for it to finish or press Cancel")
            self._active[session_id] = n + 1

    def leave(self, session_id: str | None) -> None:
        if session_id is None:
            return
        with self._lock:
            n = self._active.get(session_id, 0) - 1
            if n <= 0:
                self._active.pop(session_id, None)
                self._stop.discard(session_id)
            else:
                self._active[session_id] = n


class SecurityHeaders:
    """ASGI middleware adding response headers every page and file of the app gets: no MIME sniffing (a
    served file is never run as another type), no full referrer to other sites, no camera, microphone or
    location. No frame restrictions: Hugging Face Spaces shows the app in a frame."""
    HEADERS = ((b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"strict-origin-when-cross-origin"),
               (b"permissions-policy", b"camera=(), microphone=(), geolocation=()"))

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                have = {k.lower() for k, _ in headers}
                headers += [(k, v) for k, v in self.HEADERS if k not in have]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, send_with_headers)


def launch_kwargs(**overrides) -> dict:
    """The settings ``app.py`` and the tests launch with (uploads capped, security headers, system fonts,
    no SSR)."""
    from starlette.middleware import Middleware
    kw = dict(max_file_size=MAX_UPLOAD, ssr_mode=False, show_error=True, footer_links=["api", "settings"],
              app_kwargs={"middleware": [Middleware(SecurityHeaders)]},
              theme=gr.themes.Soft(font=["ui-sans-serif", "system-ui", "sans-serif"],
                                   font_mono=["ui-monospace", "monospace"]))
    kw.update(overrides)
    return kw


def _guard(fn):
    """ValueError -> gr.Error with the message (the allowed range); anything else -> logged + gr.Error."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except ValueError as e:
            raise gr.Error(str(e), print_exception=False) from None
        except Exception as e:  # noqa: BLE001 - the app must keep serving
            log.exception("handler %s failed", fn.__name__)
            raise gr.Error(f"internal error ({type(e).__name__}): {e}", print_exception=False) from None
    return wrapper


class Cancelled(ValueError):
    """The visitor pressed Cancel: the running request stops at its next sampler step."""


def _progress_adapter(progress, cancelled=lambda: False):
    def report(done, total, desc):
        if cancelled():
            raise Cancelled("cancelled: the request was stopped before it finished")
        try:
            progress((int(done), int(total)), desc=desc, unit="steps")
        except Exception:  # noqa: BLE001 - progress is cosmetic; never fail a generation because of it
            pass
    return report


def _player(label: str, elem_id: str, **kw) -> gr.Audio:
    """A read-only player of a WAV file the service wrote (with a download button)."""
    return gr.Audio(label=label, type="filepath", interactive=False, buttons=["download"], elem_id=elem_id, **kw)


def _figure(label: str, elem_id: str, **kw) -> gr.Image:
    """A rendered spectrogram figure (PNG; the figure carries its own titles)."""
    return gr.Image(label=label, show_label=False, type="numpy", format="png", interactive=False,
                    buttons=["download", "fullscreen"], elem_id=elem_id, **kw)


def _mode(mode) -> str:
    return mode if mode in MODE_LABELS else "magphase"


def _fmt(x, nd=3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"


def _risk_html(risk: dict | None, note: str = "") -> str:
    if not risk:
        msg = note or "Generate a clip to see its nearest training clips."
        return f"<div class='copy-risk-empty' style='padding:10px;color:#6b7280'>{html.escape(msg)}</div>"
    fg, bg, border, title = RISK_STYLE.get(risk.get("level"), RISK_STYLE["unknown"])
    return (f"<div class='copy-risk copy-risk-{html.escape(str(risk.get('level')))}' style='padding:10px 14px;"
            f"border-radius:8px;border:2px solid {border};background:{bg};color:{fg}'>"
            f"<b style='font-size:1.05em'>{title}</b> &nbsp;{html.escape(risk.get('text', ''))}</div>")


def _settings_md(settings: dict) -> str:
    seeds = str(settings["seed"]) if settings.get("n", 1) == 1 else \
        f"{settings['seed']}–{settings['seed'] + settings['n'] - 1}"
    interval = settings.get("guidance_interval")
    guided = "" if interval is None or settings["guidance"] == 1.0 else \
        f" for {format_guidance_interval(interval)} ({settings.get('guided_nfe', '?')} of the evaluations)"
    if settings.get("guidance_reference") == "guide":
        guided += " away from the weaker guide model (autoguidance)"
    tool = settings.get("tool")
    windows = f" × {settings['windows']} windows = {settings['nfe_total']}" if "nfe_total" in settings else ""
    length = f" · **{settings['audio_seconds']:.2f} s**" if tool in ("extend", "long", "loop") else ""
    return (f"**{settings['class']}**" + (f" · *{TOOL_NAMES.get(tool, tool)}*" if tool else "") + length +
            f" · {settings['sampler']} · NFE counted **{settings['nfe']}**{windows} · "
            f"guidance {settings['guidance']:g}{guided} · seed {seeds} · wall time **{settings['seconds']:.2f} s** · "
            f"real-time factor **{settings['real_time_factor']:.2f}** ({settings['device']}, {settings['precision']})")


class Handlers:
    """The event handlers of the app, as plain methods over one service (the tests call them directly).

    Each returns the values of its outputs; a bad value raises ``gr.Error`` naming the allowed range.
    ``session`` is the per-user ``gr.State``: ``{"clips": [Clip], "settings": dict, "neighbours":
    NeighbourResult | None}``; compare results live in a second state."""

    def __init__(self, service, per_session: int = 1):
        """``service``: one :class:`EDMSoundService`, or several keyed by model name (the first is the default;
        see :meth:`EDMSoundService.load_family`)."""
        self.services = dict(service) if isinstance(service, Mapping) else {service.checkpoint_name: service}
        if not self.services:
            raise ValueError("no model to serve")
        self.svc = next(iter(self.services.values()))
        self.gate = SessionGate(per_session)

    def use(self, model) -> EDMSoundService:
        """The service of the chosen model (None or '': the first one); an unknown name is refused naming the
        models served."""
        if model in (None, ""):
            return self.svc
        if not isinstance(model, str) or model not in self.services:
            raise ValueError(f"unknown model {model!r}; valid: {', '.join(self.services)}")
        return self.services[model]

    def of(self, clip) -> EDMSoundService:
        """The service of the model that made ``clip`` (its spectrogram is drawn with that model's codec)."""
        return self.services.get((getattr(clip, "settings", None) or {}).get("checkpoint"), self.svc)

    # --- generate --------------------------------------------------------------------------------
    @_guard
    def generate(self, class_name, sampler, nfe, guidance, seed, n, level="off", target=None, session=None,
                 model=None, request: gr.Request = None, progress=gr.Progress()):
        svc = self.use(model)
        with self.gate.running(getattr(request, "session_hash", None)) as stopped:
            res = svc.generate(class_name, sampler, nfe, guidance, seed, n,
                                    progress=_progress_adapter(progress, stopped), normalize=level, target=target)
        return _after(session, res), res.to_dict(), res.paths

    def _clip_slots(self, session, mode):
        clips = (session or {}).get("clips") or []
        groups, audios, images = [], [], []
        for i in range(MAX_VARIATIONS):
            if i < len(clips):
                c = clips[i]
                groups.append(gr.update(visible=True))
                looped = c.settings.get("tool") == "loop"
                audios.append(gr.update(value=str(c.path), loop=looped,
                                        label=f"Clip {i + 1} · seed {c.seed} · {c.level_text or '16-bit WAV'}"
                                              + (" · plays looped" if looped else "")))
                images.append(gr.update(value=self.of(c).spectrogram_image(c.spec, mode, f"clip {i + 1}: {c.name}"),
                                        label=f"Clip {i + 1} · {MODE_LABELS[mode]}"))
            else:
                groups.append(gr.update(visible=i == 0))
                audios.append(gr.update(value=None, loop=False))
                images.append(None)
        return groups + audios + images

    @_guard
    def render_clips(self, session, mode):
        """Players + spectrograms of the session's clips (4 groups, 4 audios, 4 images) + the summary."""
        mode = _mode(mode)
        clips = (session or {}).get("clips") or []
        summary = _settings_md(session["settings"]) if clips else ""
        return self._clip_slots(session, mode) + [summary]

    @_guard
    def render_after_generate(self, session, mode):
        clips = (session or {}).get("clips") or []
        pick = gr.update(choices=[(f"Clip {i + 1} (seed {c.seed})", i + 1) for i, c in enumerate(clips)], value=1)
        return self.render_clips(session, mode) + [pick]

    # --- neighbours ------------------------------------------------------------------------------
    @_guard
    def neighbours(self, clip_number, k, session):
        clips = (session or {}).get("clips") or []
        if not self.svc.has_index:
            raise ValueError(f"the neighbours panel is unavailable: {self.svc.index_note}")
        if not clips:
            raise ValueError("no generated clips in this session: call generate first (neighbours are searched "
                             "for the clips of your last generation)")
        i = as_int(1 if clip_number is None else clip_number, "clip number", 1, len(clips))
        res = self.of(clips[i - 1]).neighbours(clips[i - 1], DEFAULT_K if k is None else k, clip_number=i)
        session = dict(session, neighbours=res)
        return session, res.to_dict(), [str(nb.path) for nb in res.neighbours if nb.path is not None]

    def _nb_slots(self, res, mode):
        vis, infos, audios, images = [], [], [], []
        nbs = res.neighbours if res is not None else []
        for j in range(MAX_K):
            if j < len(nbs):
                nb = nbs[j]
                vis.append(gr.update(visible=True))
                flag = (f" · **copy ({' + '.join(nb.evidence)})**" if nb.evidence else
                        " · **above p95**" if nb.above_p95 else "")
                sig = "" if nb.signal_similarity is None else f" · signal {nb.signal_similarity:.3f}"
                infos.append(f"**#{nb.rank}** · similarity **{nb.similarity:.3f}**{sig} · percentile "
                             f"{_fmt(nb.percentile, 1)}{flag}  \n{nb.class_name} · `{nb.source}`"
                             + (f"  \n_{nb.note}_" if nb.note else ""))
                audios.append(str(nb.path) if nb.path is not None else None)
                images.append(self.of(res.query).neighbour_image(nb, mode))
            else:
                vis.append(gr.update(visible=False))
                infos.append("")
                audios.append(None)
                images.append(None)
        return vis + infos + audios + images

    @_guard
    def render_neighbours(self, session, mode, pair=None):
        """Badge, neighbour table, window table, MAX_K neighbour slots (row, info, audio, image), pair choices
        (``pair`` kept when it is one of the neighbours, else the top-1)."""
        mode = _mode(mode)
        res = (session or {}).get("neighbours")
        if res is None:
            return [_risk_html(None), None, None] + self._nb_slots(None, mode) + [gr.update(choices=[], value=None)]
        rows = [[nb.rank, round(nb.similarity, 4), _fmt(nb.percentile, 1), nb.class_name, nb.source,
                 f"{nb.query_offset:.2f}", f"{nb.train_offset:.2f}", "yes" if nb.above_p95 else ""]
                for nb in res.neighbours]
        wins = [[f"{w['query_offset']:.2f}", w["source"], f"{w['train_offset']:.2f}", round(w["similarity"], 4),
                 "yes" if w["matched"] else "", w.get("neighbour_rank") or ""] for w in res.windows]
        ranks = [nb.rank for nb in res.neighbours]
        pair = gr.update(choices=[(f"#{nb.rank} {nb.source} ({nb.similarity:.3f})", nb.rank)
                                  for nb in res.neighbours],
                         value=pair if pair in ranks else (ranks[0] if ranks else None))
        head = (f"Clip {res.clip_number} ({res.query.name}): top-{len(res.neighbours)} training clips of "
                f"{res.scope}; similarity = cosine, max over {res.window_seconds:g} s windows; percentile within "
                f"the training set's own top-1 distribution; training p95 = {_fmt(res.threshold)}")
        badge = _risk_html(res.risk) + f"<div style='margin-top:6px;font-size:0.9em'>{html.escape(head)}</div>"
        return [badge, rows, wins] + self._nb_slots(res, mode) + [pair]

    @_guard
    def side_by_side(self, session, rank, mode):
        """Generated + neighbour players, spectrograms with matching windows, pair table, similarity matrix."""
        mode = _mode(mode)
        res = (session or {}).get("neighbours")
        if res is None or not res.neighbours:
            return [None, None, None, None, None, ""]
        sbs = self.of(res.query).side_by_side(res, res.neighbours[0].rank if rank is None else rank, mode)
        res.shown_pair = sbs                         # kept, so a view toggle redraws without recomputing
        nb = sbs["neighbour"]
        w = res.window_seconds
        rows = [[p["label"], f"{p['query_offset']:.2f}–{p['query_offset'] + w:.2f}",
                 f"{p['train_offset']:.2f}–{p['train_offset'] + w:.2f}", p["similarity"],
                 "yes" if p["above_p95"] else ("best pair" if p["best"] else "")] for p in sbs["pairs"]]
        m = sbs["matrix"]
        if m is not None:
            heads = " | ".join(f"{o:.2f}s" for o in sbs["train_offsets"])
            lines = [f"| generated \\ neighbour | {heads} |", "|---" * (m.shape[1] + 1) + "|"]
            lines += [f"| {sbs['query_offsets'][i]:.2f}s | " + " | ".join(f"{v:.3f}" for v in m[i]) + " |"
                      for i in range(m.shape[0])]
            matrix_md = "Window-pair cosine similarity (rows: generated windows, columns: neighbour windows):\n\n" \
                + "\n".join(lines)
        else:
            matrix_md = f"_{nb.note}_"
        return [str(res.query.path) if res.query.path else None, str(nb.path) if nb.path else None,
                sbs["query_image"], sbs["neighbour_image"], rows, matrix_md]

    @_guard
    def rerender_view(self, session, mode):
        """A spectrogram-view toggle: only the images change. The clip spectrograms, the neighbours' and the
        side-by-side pair (its window marks reused: no embedding is recomputed); players and tables stay."""
        mode = _mode(mode)
        clips = (session or {}).get("clips") or []
        out = [gr.update(value=self.of(clips[i]).spectrogram_image(clips[i].spec, mode, f"clip {i + 1}: {clips[i].name}"),
                         label=f"Clip {i + 1} · {MODE_LABELS[mode]}") if i < len(clips) else gr.update()
               for i in range(MAX_VARIATIONS)]
        res = (session or {}).get("neighbours")
        nbs = res.neighbours if res is not None else []
        nb_svc = self.of(res.query) if res is not None else self.svc
        out += [nb_svc.neighbour_image(nbs[j], mode) if j < len(nbs) else gr.update() for j in range(MAX_K)]
        shown = getattr(res, "shown_pair", None) if res is not None else None
        if shown is None:
            return out + [gr.update(), gr.update()]
        q = res.query
        return out + [nb_svc.spectrogram_image(q.spec, mode, f"generated: {q.name} (matching windows shaded)",
                                               shown["query_marks"]),
                      nb_svc.neighbour_image(shown["neighbour"], mode, shown["train_marks"])]

    @_guard
    def rerender(self, session, mode, pair=None):
        """Everything the spectrogram view shows, in one event (so the last toggle always wins): the clip
        slots + summary, the neighbours panel and the side-by-side view."""
        clips = self.render_clips(session, mode)
        nbs = self.render_neighbours(session, mode, pair)
        pair_now = nbs[-1].get("value") if isinstance(nbs[-1], dict) else None
        return clips + nbs + self.side_by_side(session, pair_now, mode)

    @_guard
    def vary(self, clip_number, strength, n, seed, session, source="clip", class_name=None, sampler=None, nfe=None,
             guidance=None, model=None, request: gr.Request = None, progress=gr.Progress()):
        """Variations of the source: clip ``clip_number`` of this session's last generation (with its model,
        class, sampler, NFE and guidance) or the uploaded file (with the given ones); ``strength`` in (0, 1]."""
        wave, src = self._source(session, source, clip_number)
        st = src.settings if src is not None else {"class": class_name, "sampler": sampler, "nfe": nfe,
                                                   "guidance": guidance}
        svc = self.of(src) if src is not None else self.use(model)
        with self.gate.running(getattr(request, "session_hash", None)) as stopped:
            res = svc.edit("vary", wave, st["class"], st["sampler"], st["nfe"], st["guidance"], seed, n,
                                strength=strength, progress=_progress_adapter(progress, stopped))
        return _after(session, res), res.to_dict(), res.paths

    # --- sound-designer tools --------------------------------------------------------------------
    @staticmethod
    def _source(session, source, clip_number):
        """(wave, Clip or None) of the chosen source: a clip of the last generation or the uploaded file."""
        session = session or {}
        if source == "upload":
            up = session.get("source")
            if up is None:
                raise ValueError("no uploaded file in this session: upload a WAV, FLAC, OGG or MP3 clip first "
                                 "(at most 20 MB and 60 s)")
            return up["wave"], None
        if source not in (None, "clip"):
            raise ValueError(f"unknown source {source!r}; valid: clip, upload")
        clips = session.get("clips") or []
        if not clips:
            raise ValueError("no generated clips in this session: generate first, then use one of them as the "
                             "source (or upload a file)")
        i = as_int(1 if clip_number is None else clip_number, "clip number", 1, len(clips))
        return clips[i - 1].wave, clips[i - 1]

    def _tool(self, tool, session, request, progress, source=None, clip_number=None, class_name=None,
              sampler=None, nfe=None, guidance=None, seed=0, n=1, level="off", target=None, model=None, **params):
        svc = self.use(model)
        wave = None
        if source is not None:
            wave, _ = self._source(session, source, clip_number)
        with self.gate.running(getattr(request, "session_hash", None)) as stopped:
            res = svc.edit(tool, wave, class_name, sampler, nfe, guidance, seed, n, normalize=level,
                                target=target, progress=_progress_adapter(progress, stopped), **params)
        return _after(session, res), res.to_dict(), res.paths

    @_guard
    def upload_source(self, path, session):
        """An uploaded file becomes this session's source (read, checked and resampled once)."""
        if not path:
            raise ValueError("no file: upload a WAV, FLAC, OGG or MP3 clip (at most 20 MB and 60 s)")
        wave, name = self.svc.read_source(path)
        session = dict(session or {}, source={"wave": wave, "name": name})
        sec = len(wave) / self.svc.sample_rate
        return session, f"Source: **{html.escape(name)}**, {sec:.2f} s at {self.svc.sample_rate} Hz"

    @_guard
    def regenerate(self, source, clip_number, start, end, low_hz, high_hz, strength, class_name, sampler, nfe,
                   guidance, seed, n, level, target, session, model=None, request: gr.Request = None,
                   progress=gr.Progress()):
        """Regenerate the span [start, end) s of the source (a band low_hz-high_hz Hz, 0 = open) and keep the
        rest; ``strength`` 1 makes the region anew, lower starts from its own content."""
        band = (None if not low_hz else low_hz, None if not high_hz else high_hz)
        st = None if strength is None or float(strength) >= 1.0 else strength
        return self._tool("regen", session, request, progress, source, clip_number, class_name, sampler, nfe,
                          guidance, seed, n, level, target, model, span=(start, end), band=band, strength=st)

    @_guard
    def extend(self, source, clip_number, seconds, class_name, sampler, nfe, guidance, seed, n, level, target,
               session, model=None, request: gr.Request = None, progress=gr.Progress()):
        """Continue the source to ``seconds`` in total."""
        return self._tool("extend", session, request, progress, source, clip_number, class_name, sampler, nfe,
                          guidance, seed, n, level, target, model, seconds=seconds)

    @_guard
    def long(self, seconds, class_name, sampler, nfe, guidance, seed, n, level, target, session, model=None,
             request: gr.Request = None, progress=gr.Progress()):
        """A clip of ``seconds`` made window by window."""
        return self._tool("long", session, request, progress, None, None, class_name, sampler, nfe, guidance,
                          seed, n, level, target, model, seconds=seconds)

    @_guard
    def loop(self, seconds, from_source, source, clip_number, class_name, sampler, nfe, guidance, seed, n, level,
             target, session, model=None, request: gr.Request = None, progress=gr.Progress()):
        """A seamless loop of ``seconds``; with ``from_source``, the source made to loop seamlessly."""
        return self._tool("loop", session, request, progress, source if from_source else None, clip_number,
                          class_name, sampler, nfe, guidance, seed, n, level, target, model,
                          seconds=None if from_source else seconds)

    # --- the session: history, keep, export ---------------------------------------------------------
    @_guard
    def render_history(self, session):
        """The history table, the Keep choices (and what is kept) and the clip picker."""
        history = (session or {}).get("history") or []
        kept = set((session or {}).get("kept") or ())
        rows = [[c.uid, c.name, c.settings.get("tool") or "generate", c.class_name,
                 round(len(c.wave) / c.sample_rate, 2), (c.level or {}).get("lufs"),
                 (c.level or {}).get("true_peak_dbtp"), "yes" if c.uid in kept else ""] for c in history]
        choices = [(f"#{c.uid} {c.name}", c.uid) for c in history]
        return (rows, gr.update(choices=choices, value=[c.uid for c in history if c.uid in kept]),
                gr.update(choices=choices, value=history[-1].uid if history else None))

    def render_table(self, session):
        """The history table alone: after a tick in Keep, the ticks stay as the user left them (a re-render of the
        choices from an earlier tick's answer would undo a later tick) and the clip picker stays where it was."""
        return self.render_history(session)[0]

    @_guard
    def history(self, session):
        """The session's clips (oldest first) with their settings and whether each is kept."""
        kept = set((session or {}).get("kept") or ())
        return [dict(c.to_dict(), settings=c.settings, kept=c.uid in kept)
                for c in (session or {}).get("history") or []]

    @_guard
    def keep(self, numbers, session):
        """Keep exactly the clips ``numbers`` (their # in the history); the others stay until removed."""
        history = (session or {}).get("history") or []
        have = {c.uid for c in history}
        try:
            chosen = {int(x) for x in (numbers or [])}
        except (TypeError, ValueError):
            raise ValueError(f"clip numbers must be whole numbers from the history, got {numbers!r}") from None
        unknown = sorted(chosen - have)
        if unknown:
            raise ValueError(f"no clip #{unknown[0]} in this session's history; have: "
                             f"{', '.join(str(u) for u in sorted(have)) or 'none'}")
        session = dict(session or {}, kept=sorted(chosen))
        return session, self.history(session)

    @_guard
    def remove_unkept(self, session):
        """Drop every clip of the history that is not kept."""
        kept = set((session or {}).get("kept") or ())
        history = [c for c in (session or {}).get("history") or [] if c.uid in kept]
        session = dict(session or {}, history=history)
        return session, self.history(session)

    @_guard
    def export(self, fmt, level, target, session):
        """The kept clips as one file (a single clip) or a zip with JSON sidecars."""
        kept = set((session or {}).get("kept") or ())
        clips = [c for c in (session or {}).get("history") or [] if c.uid in kept]
        if not clips:
            raise ValueError("nothing to export: tick the clips to keep in the session's history first")
        return str(self.svc.export(clips, fmt, level, target))

    @_guard
    def play(self, number, session):
        """A history clip's player (its WAV written again if the first one has expired)."""
        history = {c.uid: c for c in (session or {}).get("history") or []}
        if number not in history:
            raise ValueError("pick a clip of this session's history")
        c = history[number]
        if c.path is None or not c.path.exists():
            c.path = self.svc.write_clip(c)
        return gr.update(value=str(c.path), loop=c.settings.get("tool") == "loop",
                         label=f"#{c.uid} {c.name} · {c.level_text}")

    def stop(self, request: gr.Request = None) -> None:
        """Cancel: this session's running generate or compare stops at its next sampler step."""
        self.gate.cancel(getattr(request, "session_hash", None))

    # --- compare ---------------------------------------------------------------------------------
    @_guard
    def compare(self, class_name, seed, nfe, guidance, samplers, model=None, request: gr.Request = None,
                progress=gr.Progress()):
        svc = self.use(model)
        with self.gate.running(getattr(request, "session_hash", None)) as stopped:
            res = svc.compare(class_name, seed, nfe, guidance, samplers, progress=_progress_adapter(progress, stopped))
        return res, res.to_dict(), res.paths

    @_guard
    def render_compare(self, result, mode):
        """For each registry sampler slot: column visibility, title, audio, image."""
        mode = _mode(mode)
        entries = result.entries if result is not None else []
        vis, titles, audios, images = [], [], [], []
        for j in range(self.compare_slots):
            if j < len(entries):
                e = entries[j]
                s = e.clip.settings
                vis.append(gr.update(visible=True))
                titles.append(f"### {e.sampler}\nNFE counted **{s['nfe']}** · {s['seconds']:.2f} s · RTF "
                              f"{s['real_time_factor']:.2f}" + (f"  \n_{e.note}_" if e.note else ""))
                audios.append(str(e.clip.path))
                images.append(self.of(e.clip).spectrogram_image(e.clip.spec, mode, f"{e.sampler} · NFE {s['nfe']}"))
            else:
                vis.append(gr.update(visible=False))
                titles.append("")
                audios.append(None)
                images.append(None)
        return vis + titles + audios + images

    # --- small UI helpers ------------------------------------------------------------------------
    @property
    def compare_slots(self) -> int:
        """Columns of the compare tab: the most samplers any served model takes."""
        return max(len(s.samplers) for s in self.services.values())

    def _known(self, model) -> EDMSoundService | None:
        return self.services.get(model) if model not in (None, "") else self.svc

    def sampler_changed(self, sampler, nfe, model=None):
        """The NFE slider for ``sampler``: its min/step/max allow valid budgets only (Heun: odd values)."""
        svc = self._known(model)
        if svc is None or sampler not in svc.samplers:
            return gr.update()
        spec = svc.nfe_slider(sampler)
        return gr.update(value=svc.snap_nfe(sampler, nfe), info=f"{sampler}: {svc.nfe_rule(sampler)}", **spec)

    def class_changed(self, class_name, model=None):
        """The guidance slider moves to the class's default scale (calibrated per class, if the checkpoint is)
        and its note names the class's guidance interval."""
        svc = self._known(model)
        w = None if svc is None else svc.defaults["class_guidance"].get(class_name)
        return gr.update() if w is None else gr.update(value=w, info=guidance_info(svc.defaults, class_name))

    def model_changed(self, model, class_name, nfe, cmp_class=None):
        """Another model: its samplers (with its default), its NFE budgets, its guidance default for the class,
        a line on what it is, and the compare tab's samplers."""
        svc = self._known(model)
        if svc is None:
            return [gr.update()] * 6
        d = svc.defaults
        sampler = d["sampler"]
        return [gr.update(choices=svc.samplers, value=sampler),
                gr.update(value=d["nfe"], info=f"{sampler}: {svc.nfe_rule(sampler)}", **svc.nfe_slider(sampler)),
                self.class_changed(class_name, model),
                model_line(svc),
                gr.update(choices=svc.samplers, value=svc.samplers),
                self.class_changed(class_name if cmp_class is None else cmp_class, model)]

    @staticmethod
    def level_changed(level):
        """The target box follows the normalisation mode (hidden when off)."""
        mode = level if level in LEVEL_DEFAULT_TARGET else "off"
        unit = {"peak": "Target peak (dBFS, -60…0)", "lufs": "Target loudness (LUFS, -60…-5)"}.get(mode, "")
        return gr.update(visible=mode != "off", value=LEVEL_DEFAULT_TARGET[mode], label=unit or "Target")

    @staticmethod
    def random_seed():
        return secrets.randbelow(SEED_MAX + 1)


def _use_upload() -> str:
    """After an upload, the tools work on it."""
    return "upload"


def _after(session, res) -> dict:
    """The session after a generation: its clips are the result's (the tools and neighbours use them); every
    clip joins the history with the next number; the upload and what is kept stay."""
    old = session or {}
    uid = int(old.get("next_uid") or 1)
    for c in res.clips:
        c.uid = uid
        uid += 1
    history = (list(old.get("history") or []) + list(res.clips))[-HISTORY_MAX:]
    have = {c.uid for c in history}
    return {"clips": res.clips, "settings": res.to_dict(), "neighbours": None, "history": history, "next_uid": uid,
            "kept": [u for u in old.get("kept") or () if u in have], "source": old.get("source")}


def model_line(svc: EDMSoundService) -> str:
    """What the chosen model is and how fast it samples by default, for the line under the model menu."""
    d = svc.defaults
    return (f"`{svc.checkpoint_name}`: {svc.pipeline.summary}; opens on {d['sampler']} at NFE {d['nfe']} "
            f"({svc.nfe_rule(d['sampler'])})")


def guidance_info(defaults: dict, class_name: str) -> str:
    """The guidance slider's note: what the scale means, where (noise levels) it applies for ``class_name``,
    and whether the default follows the class."""
    gi = defaults["class_guidance_interval"][class_name]
    per_class = (len(set(defaults["class_guidance"].values())) > 1
                 or len({None if v is None else tuple(v) for v in defaults["class_guidance_interval"].values()}) > 1)
    scale = ("1 = this model alone, above 1 = further away from its weaker guide model (autoguidance)"
             if defaults.get("guide") else "1 = conditional, 0 = unconditional")
    return (scale + ("" if gi is None else f"; applied for {format_guidance_interval(gi)}")
            + ("; the default follows the class" if per_class else ""))


def build_demo(service) -> gr.Blocks:
    """The whole app for one loaded service, or for several keyed by model name (the first is the default; see
    :meth:`EDMSoundService.load_family`). Queue: CONCURRENCY jobs at once, QUEUE_SIZE waiting."""
    private_cache_dir()
    h = Handlers(service)
    svc = h.svc
    d = svc.defaults
    classes, samplers = svc.classes, svc.samplers
    nfe0 = svc.nfe_slider(d["sampler"])
    heavy = dict(concurrency_limit=CONCURRENCY, concurrency_id="compute")
    ui_only = dict(api_visibility="private", **heavy)
    info = svc.info()

    # ------------------------------------------------------------------------------ layout
    with gr.Blocks(title="EDMSound", analytics_enabled=False, delete_cache=(1800, 3600)) as demo:
        session = gr.State(None, time_to_live=STATE_TTL_S)         # this user's clips + neighbours
        compare_state = gr.State(None, time_to_live=STATE_TTL_S)   # this user's last comparison
        idx_line = (f"copy index: {info['index']['clips']} training clips / {info['index']['windows']} windows, "
                    f"encoder `{info['index']['encoder']}`" if info["index"] else
                    f"copy index: none ({svc.index_note}) — neighbours panel off")
        many = len(h.services) > 1
        where = (f"{len(h.services)} models" if many else f"Checkpoint `{info['checkpoint']}`")
        gr.Markdown(f"# EDMSound\nClass-conditional diffusion on complex STFT spectrograms (Zhu et al. 2023). "
                    f"{where} on **{info['device']}** ({info['precision']}), "
                    f"{info['sample_rate']} Hz, {info['seconds']:g} s clips, {len(classes)} classes · {idx_line}.")
        with gr.Row(visible=many):
            model = gr.Dropdown([(f"{name} — {s.pipeline.summary}", name) for name, s in h.services.items()],
                                value=next(iter(h.services)), label="Model", elem_id="model-dropdown", scale=1)
            model_md = gr.Markdown(model_line(svc), elem_id="model-line")

        with gr.Tab("Generate", id="generate"):
            with gr.Row():
                with gr.Column(scale=1, min_width=300):
                    cls = gr.Dropdown(classes, value=classes[0], label="Class", elem_id="class-dropdown")
                    sampler = gr.Dropdown(samplers, value=d["sampler"], label="Sampler", elem_id="sampler-dropdown")
                    nfe = gr.Slider(value=d["nfe"], label="NFE (network evaluations)", elem_id="nfe-slider",
                                    info=f"{d['sampler']}: {svc.nfe_rule(d['sampler'])}", **nfe0)
                    guidance = gr.Slider(*info["guidance_range"], value=d["class_guidance"][classes[0]], step=0.1,
                                         label="Guidance scale", info=guidance_info(d, classes[0]),
                                         elem_id="guidance-slider")
                    with gr.Row(equal_height=True):
                        seed = gr.Number(value=0, precision=0, minimum=0, maximum=SEED_MAX, label="Seed",
                                         elem_id="seed", scale=3)
                        dice = gr.Button("Random seed", scale=1, min_width=80, elem_id="seed-random")
                    n = gr.Slider(1, MAX_VARIATIONS, value=1, step=1, label="Variations (seed, seed+1, …)",
                                  elem_id="variations")
                    with gr.Row(equal_height=True):
                        level = gr.Radio(list(LEVEL_CHOICES), value="off", label="Level",
                                         info="each clip's LUFS and true peak are shown; normalise only if you ask",
                                         elem_id="level-mode", scale=2)
                        target = gr.Number(value=LEVEL_DEFAULT_TARGET["off"], label="Target", visible=False,
                                           elem_id="level-target", scale=1)
                    go = gr.Button("Generate", variant="primary", elem_id="generate-btn")
                    stop = gr.Button("Cancel", variant="stop", elem_id="cancel-btn")
                    view = gr.Radio(list(VIEW_CHOICES), value="magphase", label="Spectrogram view", elem_id="view")
                with gr.Column(scale=3):
                    summary = gr.Markdown("", elem_id="settings-summary")
                    groups, audios, images = [], [], []
                    for i in range(MAX_VARIATIONS):
                        with gr.Group(visible=i == 0) as g:
                            audios.append(_player(f"Clip {i + 1}", f"clip-audio-{i}"))
                            images.append(_figure(f"Clip {i + 1} spectrogram", f"clip-spec-{i}"))
                        groups.append(g)
                    with gr.Accordion("Settings used and WAV files", open=False):
                        settings = gr.JSON(label="Settings used", elem_id="settings-json")
                        files = gr.File(label="16-bit WAV files", file_count="multiple", interactive=False,
                                        elem_id="wav-files")
                    with gr.Accordion("Sound-design tools", open=True, elem_id="tools"):
                        gr.Markdown("Work on a **source**: a clip of the last generation or your own file. The "
                                    "tools use the class, sampler, NFE, guidance, seed and variations above "
                                    "(variations of a generated clip keep that clip's settings).")
                        with gr.Row(equal_height=True):
                            src_kind = gr.Radio(list(SOURCE_CHOICES), value="clip", label="Source",
                                                elem_id="source-kind", scale=3)
                            vary_clip = gr.Number(value=1, precision=0, minimum=1, maximum=MAX_VARIATIONS,
                                                  label="Clip", elem_id="vary-clip", scale=1)
                        upload = gr.File(label="Upload a source: WAV, FLAC, OGG or MP3, at most 20 MB and 60 s "
                                               "(any sample rate)", file_types=list(UPLOAD_EXTENSIONS), type="filepath",
                                         file_count="single", elem_id="upload-source", height=150)
                        upload_md = gr.Markdown("", elem_id="upload-status")
                        with gr.Tab("Vary", id="tool-vary"):
                            vary_strength = gr.Slider(0.05, 1.0, value=0.4, step=0.05, label="Variation strength",
                                                      info="0 keeps the clip, 1 is a fresh generation",
                                                      elem_id="vary-strength")
                            vary_btn = gr.Button("Vary", elem_id="vary-btn")
                        with gr.Tab("Region", id="tool-region"):
                            with gr.Row():
                                rg_start = gr.Number(value=0.3, label="From (s)", elem_id="region-start", minimum=0)
                                rg_end = gr.Number(value=0.6, label="To (s)", elem_id="region-end", minimum=0)
                                rg_low = gr.Number(value=0, label="Band from (Hz, 0 = all)", elem_id="region-low",
                                                   minimum=0)
                                rg_high = gr.Number(value=0, label="Band to (Hz, 0 = all)", elem_id="region-high",
                                                    minimum=0)
                            rg_strength = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Region strength",
                                                    info="1 makes the region anew; lower keeps more of it",
                                                    elem_id="region-strength")
                            rg_btn = gr.Button("Regenerate region", elem_id="region-btn")
                        with gr.Tab("Extend", id="tool-extend"):
                            ex_seconds = gr.Number(value=4.0, label=f"Total length (s, up to {MAX_TOOL_SECONDS:g})",
                                                   elem_id="extend-seconds", minimum=1, maximum=MAX_TOOL_SECONDS)
                            with gr.Row():
                                ex_btn = gr.Button("Continue the source", elem_id="extend-btn")
                                long_btn = gr.Button("Long clip from nothing", elem_id="long-btn")
                        with gr.Tab("Loop", id="tool-loop"):
                            lp_seconds = gr.Number(value=2.0, label=f"Loop length (s, up to {MAX_TOOL_SECONDS:g})",
                                                   elem_id="loop-seconds", minimum=1, maximum=MAX_TOOL_SECONDS)
                            with gr.Row():
                                lp_btn = gr.Button("Make a loop", elem_id="loop-btn")
                                lp_src_btn = gr.Button("Make the source loop", elem_id="loop-source-btn")
                            lp_from = gr.Checkbox(value=False, visible=False)
                            lp_from_src = gr.Checkbox(value=True, visible=False)

            with gr.Column(elem_id="neighbours-panel"):
                gr.Markdown("## Training neighbours\nThe nearest clips of the training set (FAISS index of "
                            "window embeddings, as in the paper's copy detection). A clip whose top-1 similarity "
                            "exceeds what training clips reach with each other (their 95th percentile) deserves a "
                            "listen; windows matching different training clips hint at a *stitching copy*.")
                if not svc.has_index:
                    gr.Markdown(f"**Neighbours panel unavailable:** {html.escape(svc.index_note)}. Start the app "
                                "with `--index DIR` (an index built by `edmsound index build`).",
                                elem_id="neighbours-unavailable")
                with gr.Row(visible=svc.has_index):
                    pick = gr.Radio([("Clip 1", 1)], value=1, label="Generated clip", elem_id="neighbour-clip",
                                    scale=2)
                    k = gr.Slider(1, MAX_K, value=DEFAULT_K, step=1, label="k (neighbours)", elem_id="neighbour-k",
                                  scale=2)
                    find = gr.Button("Find neighbours", elem_id="neighbours-btn", scale=1)
                badge = gr.HTML(_risk_html(None, "" if svc.has_index else "no copy index loaded"),
                                elem_id="risk-badge", visible=svc.has_index)
                with gr.Column(visible=svc.has_index):
                    nb_table = gr.Dataframe(headers=list(NB_HEADERS), interactive=False, wrap=True,
                                            label="Top-k training neighbours", elem_id="neighbour-table")
                    nb_vis, nb_info, nb_audio, nb_img = [], [], [], []
                    for j in range(MAX_K):
                        with gr.Row(visible=False, equal_height=False) as r:
                            with gr.Column(scale=1, min_width=260):
                                nb_info.append(gr.Markdown(elem_id=f"nb-info-{j}"))
                                nb_audio.append(_player(f"Neighbour #{j + 1}", f"nb-audio-{j}"))
                            with gr.Column(scale=3):
                                nb_img.append(_figure(f"Neighbour #{j + 1} spectrogram", f"nb-spec-{j}", height=260))
                        nb_vis.append(r)
                    gr.Markdown("### Side by side\nThe generated clip and one neighbour; each generated window is "
                                "paired with its most similar neighbour window, pairs at or above the training "
                                "p95 share a letter (the best pair is always shown). Both clips are embedded "
                                "again here (the neighbour from its re-synthesised audio), so similarities can "
                                "differ from the index's in the third decimal.")
                    pair = gr.Dropdown(choices=[], value=None, label="Neighbour", elem_id="pair-dropdown")
                    with gr.Row(equal_height=False):
                        with gr.Column(min_width=360):
                            sbs_q_audio = _player("Generated", "sbs-gen-audio")
                            sbs_q_img = _figure("Generated · matching windows", "sbs-gen-spec")
                        with gr.Column(min_width=360):
                            sbs_t_audio = _player("Neighbour", "sbs-nb-audio")
                            sbs_t_img = _figure("Neighbour · matching windows", "sbs-nb-spec")
                    pairs_table = gr.Dataframe(headers=list(PAIR_HEADERS), interactive=False,
                                               label="Matching window pairs", elem_id="pairs-table")
                    win_table = gr.Dataframe(headers=list(WIN_HEADERS), interactive=False, wrap=True,
                                             label="Best training window of each generated window (windows "
                                                   "matching different clips above p95 = stitching)",
                                             elem_id="windows-table")
                    matrix_md = gr.Markdown(elem_id="pair-matrix")
                    with gr.Accordion("Neighbour details (JSON) and WAV files", open=False):
                        nb_json = gr.JSON(label="Neighbours", elem_id="neighbours-json")
                        nb_files = gr.File(label="Neighbour WAVs", file_count="multiple", interactive=False)

        with gr.Tab("Session", id="session"):
            gr.Markdown("Every clip of this session, with its settings. Tick the ones to **keep**, then export "
                        "them: one file, or a zip with a JSON sidecar per clip (file names carry class, tool, "
                        "sampler, NFE, guidance and seed). Clips stay for an hour after your last action.")
            hist_table = gr.Dataframe(headers=list(HISTORY_HEADERS), interactive=False, wrap=True,
                                      label="History", elem_id="history-table")
            keep = gr.CheckboxGroup([], value=[], label="Keep", elem_id="keep")
            with gr.Row(equal_height=True):
                hist_pick = gr.Dropdown([], value=None, label="Play clip", elem_id="history-pick", scale=1)
                hist_audio = _player("History clip", "history-audio", scale=3)
            with gr.Row(equal_height=True):
                ex_fmt = gr.Radio(list(EXPORT_CHOICES), value="wav16", label="Format", elem_id="export-format")
                ex_level = gr.Radio(list(LEVEL_CHOICES), value="off", label="Level at export",
                                    elem_id="export-level")
                ex_target = gr.Number(value=LEVEL_DEFAULT_TARGET["off"], label="Target", visible=False,
                                      elem_id="export-target")
            with gr.Row():
                rm_btn = gr.Button("Remove clips not kept", elem_id="remove-btn")
                exp_btn = gr.Button("Export kept clips", variant="primary", elem_id="export-btn")
            exp_file = gr.File(label="Export", interactive=False, elem_id="export-file")
            hist_json = gr.JSON(visible=False)

        with gr.Tab("Compare samplers", id="compare"):
            gr.Markdown("Same class, seed, NFE and guidance across samplers. Heun-type samplers spend odd budgets "
                        "only (2 evaluations per step, 1 for the last): with an even NFE they use NFE − 1.")
            with gr.Row():
                c_cls = gr.Dropdown(classes, value=classes[0], label="Class", elem_id="cmp-class")
                c_seed = gr.Number(value=0, precision=0, minimum=0, maximum=SEED_MAX, label="Seed", elem_id="cmp-seed")
                c_nfe = gr.Slider(1, svc.max_nfe, value=min(6, svc.max_nfe), step=1, label="NFE", elem_id="cmp-nfe")
                c_guid = gr.Slider(*info["guidance_range"], value=d["class_guidance"][classes[0]], step=0.1, label="Guidance scale",
                                   elem_id="cmp-guidance")
            c_samplers = gr.CheckboxGroup(samplers, value=samplers, label="Samplers", elem_id="cmp-samplers")
            with gr.Row():
                c_view = gr.Radio(list(VIEW_CHOICES), value="magphase", label="Spectrogram view", elem_id="cmp-view")
                c_go = gr.Button("Compare", variant="primary", elem_id="compare-btn")
                c_stop = gr.Button("Cancel", variant="stop", elem_id="cmp-cancel-btn")
            c_vis, c_title, c_audio, c_img = [], [], [], []
            slots = h.compare_slots
            for j in range(0, slots, 2):
                with gr.Row():
                    for jj in range(j, min(j + 2, slots)):
                        name = samplers[jj] if not many and jj < len(samplers) else f"sampler {jj + 1}"
                        with gr.Column(visible=False, min_width=380) as col:
                            c_title.append(gr.Markdown(elem_id=f"cmp-title-{jj}"))
                            c_audio.append(_player(name, f"cmp-audio-{jj}", show_label=False))
                            c_img.append(_figure(f"{name} spectrogram", f"cmp-spec-{jj}"))
                        c_vis.append(col)
            with gr.Accordion("Settings used and WAV files", open=False):
                c_settings = gr.JSON(label="Settings used")
                c_files = gr.File(label="16-bit WAV files", file_count="multiple", interactive=False)

        # -------------------------------------------------------------------------- events
        clip_outputs = groups + audios + images + [summary]
        nb_outputs = [badge, nb_table, win_table] + nb_vis + nb_info + nb_audio + nb_img + [pair]
        sbs_outputs = [sbs_q_audio, sbs_t_audio, sbs_q_img, sbs_t_img, pairs_table, matrix_md]

        sampler.change(h.sampler_changed, [sampler, nfe, model], [nfe], api_visibility="private", queue=False,
                       preprocess=False)
        model.change(h.model_changed, [model, cls, nfe, c_cls], [sampler, nfe, guidance, model_md, c_samplers, c_guid],
                     api_visibility="private", queue=False, preprocess=False)
        dice.click(h.random_seed, None, [seed], api_visibility="private", queue=False)
        level.change(h.level_changed, [level], [target], api_visibility="private", queue=False, preprocess=False)
        cls.change(h.class_changed, [cls, model], [guidance], api_visibility="private", queue=False,
                   preprocess=False)
        c_cls.change(h.class_changed, [c_cls, model], [c_guid], api_visibility="private", queue=False,
                     preprocess=False)

        gen_event = go.click(
            h.generate, [cls, sampler, nfe, guidance, seed, n, level, target, session, model],
            [session, settings, files],
            api_name="generate",
            api_description="Generate 1-4 clips: returns the settings used (NFE counted, wall time, real-time "
                            "factor; per clip its name, LUFS and true peak) and the 16-bit WAV files. `level`: "
                            "'off' (default, the clips as the model made them), 'peak' or 'lufs' with `target` "
                            "(dBFS or LUFS). `model`: which served model (default: the first).",
            preprocess=False, show_progress_on=[audios[0], images[0], summary], **heavy)
        rendered = gen_event.success(h.render_after_generate, [session, view], clip_outputs + [pick], preprocess=False,
                                     **ui_only)
        made = dict(preprocess=False, show_progress_on=[audios[0], images[0], summary], **heavy)
        knobs = [cls, sampler, nfe, guidance, seed, n, level, target]
        tool_events = {
            "vary": vary_btn.click(
                h.vary, [vary_clip, vary_strength, n, seed, session, src_kind, cls, sampler, nfe, guidance, model],
                [session, settings, files], api_name="vary",
                api_description="Variations (1-4) of the source: clip `clip_number` of this session's last "
                                "generation (with its class, sampler, NFE and guidance) or, with source='upload', "
                                "the file of /upload_source (with the given class, sampler, NFE, guidance): "
                                "`strength` in (0, 1] (0 keeps the clip, 1 is a fresh generation).", **made),
            "regen": rg_btn.click(
                h.regenerate, [src_kind, vary_clip, rg_start, rg_end, rg_low, rg_high, rg_strength] + knobs + [session, model],
                [session, settings, files], api_name="regenerate",
                api_description="Regenerate the span [start, end) seconds of the source (source='clip' with "
                                "`clip_number`, or 'upload'), optionally only the band [low_hz, high_hz] Hz (0 = "
                                "open), and keep the rest: outside the STFT overlap at the border the samples are "
                                "the source's. `strength` 1 makes the region anew.", **made),
            "extend": ex_btn.click(
                h.extend, [src_kind, vary_clip, ex_seconds] + knobs + [session, model], [session, settings, files],
                api_name="extend",
                api_description=f"Continue the source to `seconds` in total (up to {MAX_TOOL_SECONDS:g} s), one "
                                "model window at a time, joined in one inverse STFT.", **made),
            "long": long_btn.click(
                h.long, [ex_seconds] + knobs + [session, model], [session, settings, files], api_name="long",
                api_description=f"A clip of `seconds` (up to {MAX_TOOL_SECONDS:g} s) made window by window.",
                **made),
            "loop": lp_btn.click(
                h.loop, [lp_seconds, lp_from, src_kind, vary_clip] + knobs + [session, model],
                [session, settings, files],
                api_name="loop",
                api_description="A seamless loop of `seconds` (its end flows into its start); with from_source="
                                "True, the source made to loop seamlessly (its wrap point remade).", **made),
            "loop-source": lp_src_btn.click(
                h.loop, [lp_seconds, lp_from_src, src_kind, vary_clip] + knobs + [session, model],
                [session, settings, files], api_visibility="private", **made),
        }
        upload.upload(h.upload_source, [upload, session], [session, upload_md], api_name="upload_source",
                      api_description="Upload a source clip (WAV/FLAC/OGG/MP3, at most 20 MB and 60 s, any rate) "
                                      "for the tools with source='upload'.", **heavy) \
            .success(_use_upload, None, [src_kind], api_visibility="private", queue=False)
        hist_outputs = [hist_table, keep, hist_pick]
        rendered_tools = []
        for ev in [gen_event] + list(tool_events.values()):
            ev.success(h.render_history, [session], hist_outputs, preprocess=False, **ui_only)
            if ev is not gen_event:
                rendered_tools.append(ev.success(h.render_after_generate, [session, view], clip_outputs + [pick],
                                                 preprocess=False, **ui_only))
        # always_last: a tick made while the previous one is answered runs next, with every tick in it (the
        # default "once" would drop it, leaving it shown as kept but not exported)
        keep.input(h.keep, [keep, session], [session, hist_json], api_name="keep", preprocess=False,
                   api_description="Keep exactly the clips `numbers` (their # in /history); /export exports them.",
                   trigger_mode="always_last", **heavy) \
            .success(h.render_table, [session], [hist_table], preprocess=False, **ui_only)
        rm_btn.click(h.remove_unkept, [session], [session, hist_json], api_name="remove_unkept", preprocess=False,
                     api_description="Remove every clip of the history that is not kept.", **heavy) \
            .success(h.render_history, [session], hist_outputs, preprocess=False, **ui_only)
        hist_btn = gr.Button(visible=False)
        hist_btn.click(h.history, [session], [hist_json], api_name="history", preprocess=False,
                       api_description="This session's clips (oldest first): number, name, tool, class, seconds, "
                                       "level, settings and whether each is kept.", **heavy)
        exp_btn.click(h.export, [ex_fmt, ex_level, ex_target, session], [exp_file], api_name="export",
                      preprocess=False,
                      api_description="The kept clips as one file or a zip with JSON sidecars: `fmt` wav16, wav24, "
                                      "wav32f (32-bit float, keeps peaks above full scale) or flac; `level` 'off', "
                                      "'peak' or 'lufs' with `target`.", **heavy)
        ex_level.change(h.level_changed, [ex_level], [ex_target], api_visibility="private", queue=False,
                        preprocess=False)
        hist_pick.input(h.play, [hist_pick, session], [hist_audio], api_visibility="private", preprocess=False,
                        **heavy)

        def then_show_neighbours(event):
            return event.success(h.render_neighbours, [session, view], nb_outputs, preprocess=False, **ui_only) \
                        .success(h.side_by_side, [session, pair, view], sbs_outputs, preprocess=False, **ui_only)

        then_show_neighbours(find.click(
            h.neighbours, [pick, k, session], [session, nb_json, nb_files], api_name="neighbours",
            api_description="Top-k training neighbours of clip `clip_number` (1-based) of this session's last "
                            "/generate call: similarity, class, percentile, copy-risk verdict, window matches, "
                            "and the neighbours' WAV files.",
            preprocess=False, show_progress_on=[badge], **heavy))
        if svc.has_index:          # neighbours of clip 1 right after generating, and when another clip is picked
            for done in [rendered] + rendered_tools:
                then_show_neighbours(done.success(h.neighbours, [pick, k, session], [session, nb_json, nb_files],
                                                  preprocess=False, show_progress_on=[badge], **ui_only))
            then_show_neighbours(pick.input(h.neighbours, [pick, k, session], [session, nb_json, nb_files],
                                            preprocess=False, show_progress_on=[badge], **ui_only))
            pair.input(h.side_by_side, [session, pair, view], sbs_outputs, preprocess=False, **ui_only)
        view.input(h.rerender_view, [session, view], images + nb_img + [sbs_q_img, sbs_t_img], preprocess=False,
                   trigger_mode="always_last", **ui_only)

        cmp_event = c_go.click(
            h.compare, [c_cls, c_seed, c_nfe, c_guid, c_samplers, model], [compare_state, c_settings, c_files],
            api_name="compare",
            api_description="One clip per sampler with the same class, seed, NFE and guidance: settings per "
                            "sampler (NFE counted, wall time, RTF) and the 16-bit WAV files.",
            preprocess=False, show_progress_on=[c_settings] + c_title[:1], **heavy)
        cmp_outputs = c_vis + c_title + c_audio + c_img
        cmp_event.success(h.render_compare, [compare_state, c_view], cmp_outputs, preprocess=False, **ui_only)
        stop.click(h.stop, None, None, queue=False, api_name="stop",
                   api_description="Stop this session's running generate or compare at its next sampler step "
                                   "(it then ends with the error 'cancelled: ...').")
        c_stop.click(h.stop, None, None, queue=False, api_visibility="private")
        c_view.input(h.render_compare, [compare_state, c_view], cmp_outputs, preprocess=False,
                     trigger_mode="always_last", **ui_only)

    demo.queue(default_concurrency_limit=CONCURRENCY, max_size=QUEUE_SIZE)
    return demo
