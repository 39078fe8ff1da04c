"""Diffusion math: EDM preconditioning and loss (edm), noise-level distributions (noise), samplers
(sampling) and classifier-free guidance (guidance)."""
