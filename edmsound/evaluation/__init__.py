"""Evaluation: embedding metrics (FAD, KID, diversity), encoder-free fidelity (level, loudness, spectral
envelope), the class classifier, the sampler x NFE x guidance sweep, per-class guidance calibration and the quality
report. Depends on the core, data and copy-detection packages.
"""
