"""Evaluation: audio embedders (embedders.py) and the distribution metrics on their embeddings (metrics.py),
text adherence (adherence.py), stereo metrics (stereo.py), the listening report (report.py).

Nothing is re-exported here, so that importing the metrics does not import torch, librosa or CREPE.
"""
