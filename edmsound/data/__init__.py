"""Training data: class-per-folder datasets, the built-in procedural foley synthesizer, and augmentations.
Depends on :mod:`edmsound.audio` and :mod:`edmsound.core`.
"""
