"""Orchestration: one Prefect flow per stage, dispatching the stage body to Ray and recording it in MLflow.

Thin on purpose: no model code lives here.
"""
