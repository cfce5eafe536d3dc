"""Reading and writing clips: every format the bundled libsndfile decodes (WAV, FLAC, Ogg Vorbis/Opus, MP3,
AIFF, ...) as mono float32 at a given rate, with one error type naming the file and the library's reason;
16-bit PCM WAV out."""
from __future__ import annotations

import io

import numpy as np
import soundfile as sf
import soxr

# File extensions of the containers libsndfile reads, the same for training, indexing, queries and the app.
AUDIO_EXTENSIONS = (".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aiff", ".aif", ".aifc",
                    ".au", ".snd", ".caf", ".w64", ".rf64")


class AudioLoadWarning(UserWarning):
    pass


class AudioReadError(ValueError):
    """A file that cannot be used as audio; ``reason`` is the library's (or our) one-line explanation."""

    def __init__(self, path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def check_sample_rate(sample_rate) -> int:
    """``sample_rate`` as a positive int, or a ValueError saying what is allowed."""
    try:
        sr = int(sample_rate)
    except (TypeError, ValueError):
        sr = 0
    if sr <= 0 or sr != sample_rate:
        raise ValueError(f"sample rate must be a positive whole number of Hz, got {sample_rate!r}")
    return sr


def load_audio(path, sample_rate: int) -> np.ndarray:
    """Read a file as mono float32 at ``sample_rate``. Raises :class:`AudioReadError` on unreadable or
    empty files (with libsndfile's message) and on NaN/Inf samples."""
    sample_rate = check_sample_rate(sample_rate)
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        msg = msg.replace(f"Error opening {str(path)!r}: ", "")       # the path is named once, by the caller
        raise AudioReadError(path, f"unreadable ({msg[:200]})") from None
    except OSError as e:
        raise AudioReadError(path, f"unreadable ({e.strerror or e})") from None
    if data.shape[0] == 0:
        raise AudioReadError(path, "empty (the file has no samples)")
    wave = data.mean(axis=1)
    if not np.all(np.isfinite(wave)):
        raise AudioReadError(path, "unreadable (the file contains NaN or Inf samples)")
    if sr != sample_rate:
        wave = soxr.resample(wave, sr, sample_rate, quality="HQ").astype(np.float32)
    return np.ascontiguousarray(wave, np.float32)


def fit_length(wave: np.ndarray, num_samples: int) -> np.ndarray:
    """Cut to ``num_samples`` or zero-pad at the end."""
    if len(wave) >= num_samples:
        return wave[:num_samples]
    return np.pad(wave, (0, num_samples - len(wave)))


PCM16_MAX = 1.0 - 2.0 ** -15      # the largest 16-bit sample (32767 / 32768)


def to_pcm16(wave: np.ndarray) -> np.ndarray:
    """Float wave -> int16 with clipping at full scale (-1.0 … :data:`PCM16_MAX`)."""
    return (np.clip(wave, -1.0, PCM16_MAX) * 32768).round().astype(np.int16)


def write_wav(path, wave: np.ndarray, sample_rate: int):
    """A 16-bit PCM WAV file."""
    sf.write(str(path), to_pcm16(wave), sample_rate, subtype="PCM_16")


def wav_bytes(wave: np.ndarray, sample_rate: int) -> bytes:
    """A 16-bit PCM WAV file in memory."""
    buf = io.BytesIO()
    sf.write(buf, to_pcm16(np.asarray(wave, np.float32)), int(sample_rate), format="WAV", subtype="PCM_16")
    return buf.getvalue()
