"""Copy detection (the paper's replication analysis): CLAP-style window embeddings, the triplet-loss
copy-detection head, the FAISS index of a training set, and the report on generated clips.
Depends on :mod:`edmsound.audio`, :mod:`edmsound.core` and :mod:`edmsound.data`.
"""
