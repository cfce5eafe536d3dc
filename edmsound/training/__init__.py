"""Training: the EDM trainer (single process or torchrun), resumable training checkpoints and the export of
model directories. Depends on :mod:`edmsound.core` and :mod:`edmsound.data`.
"""
