"""A user's uploaded source clip: checked cheaply (presence, format, size, header length) before it is decoded,
then read as mono float32 at the model's rate; every refusal is one :class:`UploadError` line naming the file."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import soundfile as sf

from .io import AudioReadError, check_sample_rate, load_audio

__all__ = ["UPLOAD_MAX_BYTES", "UPLOAD_MAX_SECONDS", "UPLOAD_FORMATS", "UPLOAD_EXTENSIONS", "SILENCE_PEAK_DBFS",
           "UploadError", "read_upload"]

UPLOAD_MAX_BYTES = 20 * 1024 * 1024
UPLOAD_MAX_SECONDS = 60.0
UPLOAD_FORMATS = ("wav", "flac", "ogg", "mp3")
# OGG covers Vorbis and Opus streams (.oga, .opus)
UPLOAD_EXTENSIONS = (".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3")
SILENCE_PEAK_DBFS = -80.0      # a clip whose sample peak is below this is refused as silent

_ALLOWED = "WAV, FLAC, OGG or MP3"
_MB = 1024 * 1024


class UploadError(ValueError):
    """An uploaded file that cannot be used as a source clip; the message is one line for the user."""


def _round_up(value: float, digits: int = 1) -> float:
    scale = 10 ** digits
    return math.ceil(value * scale) / scale


def _megabytes(num_bytes: int) -> str:
    mb = num_bytes / _MB
    return f"{_round_up(mb):.1f} MB" if mb >= 1 else f"{mb:.3g} MB"


def _strip_path(reason: str, path: Path) -> str:
    """A library message with the server-side path (if any) reduced to the file's base name."""
    for text in (str(path), str(path.resolve())):
        reason = reason.replace(f"Error opening {text!r}: ", "").replace(text, path.name)
    return reason


def _header(path: Path, name: str) -> sf._SoundFileInfo:
    try:
        return sf.info(str(path))
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        reason = f"unreadable ({_strip_path(msg, path)[:200]})"
    except OSError as e:
        reason = f"unreadable ({e.strerror or type(e).__name__})"
    raise UploadError(f"'{name}' is {reason}; upload a valid {_ALLOWED} file")


def read_upload(path, sample_rate: int, max_bytes: int = UPLOAD_MAX_BYTES,
                max_seconds: float = UPLOAD_MAX_SECONDS) -> np.ndarray:
    """An uploaded clip as mono float32 at ``sample_rate`` (any rate is resampled with soxr, any channel count
    averaged). Refused with :class:`UploadError`, in this order, when the file is missing, its extension is not
    WAV/FLAC/OGG/MP3, it is larger than ``max_bytes``, it is unreadable or empty, it is longer than
    ``max_seconds`` (read from the header, before decoding) or it is silent (peak below -80 dBFS).
    Only the file's base name appears in a message, never its directory."""
    sample_rate = check_sample_rate(sample_rate)
    path = Path(path)
    name = path.name

    if not path.is_file():
        raise UploadError(f"'{name}' was not found; upload a {_ALLOWED} file")

    ext = path.suffix.lower()
    if ext not in UPLOAD_EXTENSIONS:
        shown = f"'{ext}'" if ext else "none"
        raise UploadError(f"'{name}' is not a supported audio file (extension {shown}); "
                          f"upload {_ALLOWED} ({', '.join(UPLOAD_EXTENSIONS)})")

    size = path.stat().st_size
    if size > max_bytes:
        raise UploadError(f"'{name}' is {_megabytes(size)}, over the {_megabytes(max_bytes)} upload limit; "
                          f"upload a shorter or compressed clip")

    info = _header(path, name)
    limit = f"{max_seconds:g} s"
    if info.samplerate > 0 and info.frames / info.samplerate > max_seconds:
        raise UploadError(f"'{name}' is {_round_up(info.frames / info.samplerate):.1f} s long, over the "
                          f"{limit} limit; trim it to {limit} or less")

    try:
        wave = load_audio(path, sample_rate)
    except AudioReadError as e:
        raise UploadError(f"'{name}' is {_strip_path(e.reason, path)}; upload a valid {_ALLOWED} file") from None
    seconds = len(wave) / sample_rate
    if seconds > max_seconds:           # the header under-stated the length
        raise UploadError(f"'{name}' is {_round_up(seconds):.1f} s long, over the {limit} limit; "
                          f"trim it to {limit} or less")

    if float(np.max(np.abs(wave))) < 10.0 ** (SILENCE_PEAK_DBFS / 20.0):
        raise UploadError(f"'{name}': the clip is silent (peak below {SILENCE_PEAK_DBFS:g} dBFS); "
                          f"upload a clip with audible sound")
    return wave
