"""EDMSound: class-conditional diffusion on complex STFT spectrograms (Zhu et al., 2023)."""
__version__ = "0.1.0"
