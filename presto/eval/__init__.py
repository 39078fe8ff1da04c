"""Evaluation: audio embedders (embedders.py) and the distribution metrics on their embeddings (metrics.py).

Nothing is re-exported here, so that importing the metrics does not import torch, librosa or CREPE.
"""
