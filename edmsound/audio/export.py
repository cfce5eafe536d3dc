"""Exporting kept clips: encoding as 16/24-bit or 32-bit float WAV or FLAC, file names from a clip's settings, the
optional loudness normalisation, and a zip of audio files with their JSON sidecars (written atomically)."""
from __future__ import annotations

import io
import json
import os
import re
import tempfile
import zipfile
from pathlib import Path
from typing import Iterable

import numpy as np
import soundfile as sf

from . import loudness
from .io import check_sample_rate, to_pcm16

__all__ = ["EXPORT_FORMATS", "FLAC_SUBTYPE", "check_format", "keeps_overs", "extension", "encode_clip",
           "export_name", "export_clip", "export_zip", "write_export"]

EXPORT_FORMATS = ("wav16", "wav24", "wav32f", "flac")
# FLAC is written 24-bit when the bundled libsndfile supports it (1.2.2 does), else 16-bit.
FLAC_SUBTYPE = "PCM_24" if "PCM_24" in sf.available_subtypes("FLAC") else "PCM_16"

_CONTAINER = {"wav16": ("WAV", "PCM_16", ".wav"), "wav24": ("WAV", "PCM_24", ".wav"),
              "wav32f": ("WAV", "FLOAT", ".wav"), "flac": ("FLAC", FLAC_SUBTYPE, ".flac")}
_NAME_KEYS = ("class", "sampler", "nfe", "guidance")


def check_format(fmt) -> str:
    """``fmt`` as one of :data:`EXPORT_FORMATS` (case and surrounding spaces ignored), or a ValueError."""
    name = str(fmt).strip().lower() if fmt is not None else ""
    if name not in EXPORT_FORMATS:
        raise ValueError(f"export format must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
    return name


def keeps_overs(fmt: str) -> bool:
    """Whether format ``fmt`` stores samples beyond full scale as they are (32-bit float WAV) instead of clipping
    them."""
    return _CONTAINER[check_format(fmt)][1] == "FLOAT"


def extension(fmt: str) -> str:
    """The file extension of format ``fmt`` (``.wav`` or ``.flac``)."""
    return _CONTAINER[check_format(fmt)][2]


def _pcm24(x: np.ndarray) -> np.ndarray:
    """Float wave -> 24-bit integers (clipped at full scale), left-aligned in int32 as libsndfile expects."""
    q = (np.clip(x, -1.0, 1.0 - 2.0 ** -23) * 2.0 ** 23).round().astype(np.int32)
    return q << 8


def encode_clip(wave, sample_rate: int, fmt: str) -> bytes:
    """One mono clip as file bytes: ``wav16`` (PCM_16 WAV), ``wav24`` (PCM_24 WAV), ``wav32f`` (32-bit float WAV)
    or ``flac`` (FLAC, :data:`FLAC_SUBTYPE`). The fixed-point formats clip samples beyond full scale (never wrap
    them); ``wav32f`` keeps them, so a clip that peaks above 0 dBFS can be turned down later without distortion."""
    fmt = check_format(fmt)
    sample_rate = check_sample_rate(sample_rate)
    x = loudness._mono(wave)                         # checked as the level measures check it
    container, subtype, _ = _CONTAINER[fmt]
    data = (x.astype(np.float32) if subtype == "FLOAT" else
            to_pcm16(np.clip(x, -1.0, 1.0)) if subtype == "PCM_16" else _pcm24(np.clip(x, -1.0, 1.0)))
    buf = io.BytesIO()
    sf.write(buf, data, sample_rate, format=container, subtype=subtype)
    return buf.getvalue()


def _safe(text: str) -> str:
    """One name part with runs of other characters as ``_`` and no leading/trailing ``._-``."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("._-")


def export_name(settings: dict, seed: int, fmt: str, index: int | None = None) -> str:
    """File name of an exported clip, the generator's stem (``edmsound.core.pipeline.clip_stem``) with the tool
    after the class when the settings name one, e.g. ``footsteps_loop_dpmpp_2m_nfe8_w1_seed3.wav`` (guidance
    written with ``:g``, ``.`` -> ``p``: 1.0 -> ``w1``, 2.5 -> ``w2p5``). ``index`` >= 2 appends ``-{index}``
    (how :func:`export_zip` tells duplicates apart). In each part, runs of characters outside ``[A-Za-z0-9_.-]``
    become ``_`` and leading/trailing ``._-`` are dropped (``../dog bark`` -> ``dog_bark``)."""
    ext = _CONTAINER[check_format(fmt)][2]
    missing = [k for k in _NAME_KEYS if k not in settings]
    if missing:
        raise ValueError(f"settings lack {', '.join(map(repr, missing))} needed for the file name")
    try:
        guidance = f"{float(settings['guidance']):g}".replace(".", "p")
    except (TypeError, ValueError):
        raise ValueError(f"settings 'guidance' must be a number, got {settings['guidance']!r}") from None
    tool = settings.get("tool")
    parts = [str(settings["class"])] + ([str(tool)] if tool else []) + \
        [str(settings["sampler"]), f"nfe{settings['nfe']}", f"w{guidance}", f"seed{seed}"]
    stem = "_".join(p for p in map(_safe, parts) if p)
    if index is not None and int(index) >= 2:
        stem += f"-{int(index)}"
    return stem + ext


def _seed_of(settings: dict) -> int:
    if "seed" not in settings:
        raise ValueError("settings lack 'seed' needed for the file name")
    return settings["seed"]


def _render(wave, sample_rate: int, settings: dict, fmt: str, mode: str | None,
            target: float | None) -> tuple[bytes, dict]:
    x = loudness._mono(wave)
    report = None
    if mode is not None:
        x, rep = loudness.normalize(x, sample_rate, mode, target)
        report = rep.to_dict()
    if not keeps_overs(fmt):
        x = np.clip(x, -1.0, 1.0)                    # what the file holds, so the sidecar's level is the file's
    sidecar = dict(settings)
    sidecar.update(seed=_seed_of(settings), format=fmt, sample_rate=sample_rate,
                   level=loudness.measure(x, sample_rate).to_dict(), normalization=report)
    return encode_clip(x, sample_rate, fmt), sidecar


def export_clip(wave, sample_rate: int, settings: dict, fmt: str = "wav16", normalize: str | None = None,
                target: float | None = None) -> tuple[str, bytes, dict]:
    """One clip ready to save: (file name, file bytes, sidecar). ``normalize`` ``"peak"``/``"lufs"`` with
    ``target`` applies :func:`edmsound.audio.loudness.normalize` first; ``settings`` must hold ``"seed"``. The
    sidecar is the settings plus ``seed``, ``format``, ``sample_rate``, ``level`` (measured on the exported
    samples) and ``normalization`` (the report, or None)."""
    fmt = check_format(fmt)
    sample_rate = check_sample_rate(sample_rate)
    mode, target = loudness.check_target(normalize, target)
    name = export_name(settings, _seed_of(settings), fmt)
    data, sidecar = _render(wave, sample_rate, settings, fmt, mode, target)
    return name, data, sidecar


def _json_value(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


def export_zip(items: Iterable[tuple[np.ndarray, dict]], sample_rate: int, fmt: str = "wav16",
               normalize: str | None = None, target: float | None = None) -> bytes:
    """A zip (deflated) of (wave, settings) clips: each audio file named by :func:`export_name` next to a
    ``<same stem>.json`` sidecar (as :func:`export_clip`'s, with ``file`` added); a name already taken gets a
    ``-2``, ``-3``, ... suffix. Format, rate and normalisation are checked before anything is encoded."""
    fmt = check_format(fmt)
    sample_rate = check_sample_rate(sample_rate)
    mode, target = loudness.check_target(normalize, target)
    items = list(items)
    if not items:
        raise ValueError("nothing to export: no clips given")
    ext = _CONTAINER[fmt][2]
    taken: set[str] = set()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for wave, settings in items:
            seed = _seed_of(settings)
            name, index = export_name(settings, seed, fmt), 1
            while name.lower() in taken:
                index += 1
                name = export_name(settings, seed, fmt, index=index)
            taken.add(name.lower())
            data, sidecar = _render(wave, sample_rate, settings, fmt, mode, target)
            sidecar["file"] = name
            zf.writestr(name, data)
            zf.writestr(name[: -len(ext)] + ".json", json.dumps(sidecar, indent=2, default=_json_value))
    return buf.getvalue()


def write_export(path, items: Iterable[tuple[np.ndarray, dict]], sample_rate: int, fmt: str = "wav16",
                 normalize: str | None = None, target: float | None = None) -> Path:
    """:func:`export_zip` written to ``path`` atomically (a temporary file in the same folder, then
    ``os.replace``), so a reader never sees a partial zip. Returns the path."""
    path = Path(path)
    data = export_zip(items, sample_rate, fmt=fmt, normalize=normalize, target=target)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o644)        # mkstemp's 0600 would make the export private to this user
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path
