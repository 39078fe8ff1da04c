"""Distillation of the EDM teacher: Presto-S (step distillation, presto_s) and Presto-L (layer dropping,
presto_l)."""
