"""presto: text-to-music latent diffusion distilled with Presto! (step and layer distillation).

The library is plain Python/torch: it knows nothing of DVC, Prefect, Ray or MLflow.
"""

__version__ = "0.1.0"
