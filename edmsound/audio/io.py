"""Reading and writing clips: any soundfile-readable file as mono float32 at a given rate; 16-bit PCM WAV out."""
from __future__ import annotations

import io

import numpy as np
import soundfile as sf
import soxr

AUDIO_EXTENSIONS = (".wav", ".flac", ".ogg")


class AudioLoadWarning(UserWarning):
    pass


def load_audio(path, sample_rate: int) -> np.ndarray:
    """Read a file as mono float32 at ``sample_rate``. Raises on unreadable/empty files."""
    data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    if data.shape[0] == 0:
        raise ValueError("file has no samples")
    wave = data.mean(axis=1)
    if sr != sample_rate:
        wave = soxr.resample(wave, sr, sample_rate, quality="HQ").astype(np.float32)
    if not np.all(np.isfinite(wave)):
        raise ValueError("file contains NaN or Inf samples")
    return wave


def fit_length(wave: np.ndarray, num_samples: int) -> np.ndarray:
    """Cut to ``num_samples`` or zero-pad at the end."""
    if len(wave) >= num_samples:
        return wave[:num_samples]
    return np.pad(wave, (0, num_samples - len(wave)))




def to_pcm16(wave: np.ndarray) -> np.ndarray:
    """Float wave -> int16 with clipping at full scale."""
    return (np.clip(wave, -1.0, 1.0 - 1.0 / 32768) * 32768).round().astype(np.int16)


def write_wav(path, wave: np.ndarray, sample_rate: int):
    """A 16-bit PCM WAV file."""
    sf.write(str(path), to_pcm16(wave), sample_rate, subtype="PCM_16")


def wav_bytes(wave: np.ndarray, sample_rate: int) -> bytes:
    """A 16-bit PCM WAV file in memory."""
    buf = io.BytesIO()
    sf.write(buf, to_pcm16(np.asarray(wave, np.float32)), int(sample_rate), format="WAV", subtype="PCM_16")
    return buf.getvalue()
