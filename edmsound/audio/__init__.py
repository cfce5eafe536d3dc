"""Audio in and out: reading clips, writing 16-bit WAV, and measuring a clip's level (BS.1770 loudness, true
peak) with the opt-in normalisation policy. Depends on nothing else in the package.
"""
