"""The diffusion core: presets, the complex-spectrogram codec, EDM preconditioning and loss, the Efficient U-Net,
noise schedules, ODE samplers, classifier-free guidance, model directories on disk, and the generation pipeline.
Depends on :mod:`edmsound.audio` only.
"""
