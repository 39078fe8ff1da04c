"""Stands in for MLflow in unit tests: a stage `Tracker` (stages/base.py) that records every call in memory."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class RecordingTracker:
    """Records what a stage reports, in call order; folders are read at call time, as tests pass temporary ones."""

    def __init__(self) -> None:
        self.metrics: list[tuple[int | None, dict[str, float]]] = []  # (step, metrics)
        self.artifacts: list[tuple[str | None, list[str]]] = []  # (subdir, file names)
        self.texts: dict[str, str] = {}
        self.tags: dict[str, str] = {}
        self.models: list[dict[str, Any]] = []  # {name, files: {part: file names}, config, alias}

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.metrics.append((step, dict(metrics)))

    def log_artifact(self, path: str | Path, subdir: str | None = None) -> None:
        path = Path(path)
        names = sorted(p.name for p in path.iterdir()) if path.is_dir() else [path.name]
        self.artifacts.append((subdir, names))

    def log_text(self, text: str, name: str) -> None:
        self.texts[name] = text

    def set_tags(self, tags: dict[str, str]) -> None:
        self.tags |= tags

    def log_model(self, name: str, files: dict[str, Path], config: dict[str, Any], alias: str | None) -> None:
        """Records what each bundle folder holds: the bundle exists only during the call."""
        held = {part: sorted(p.name for p in Path(folder).iterdir()) for part, folder in files.items()}
        self.models.append({"name": name, "files": held, "config": config, "alias": alias})

    def steps_with(self, key: str) -> list[int | None]:
        """The steps of the metrics calls that reported `key`, in order."""
        return [step for step, m in self.metrics if key in m]

    def by_step(self) -> dict[int | None, dict[str, float]]:
        """The metrics of each step, merged in call order."""
        merged: dict[int | None, dict[str, float]] = {}
        for step, m in self.metrics:
            merged.setdefault(step, {}).update(m)
        return merged

    def artifact_files(self) -> list[str]:
        """Every logged file name, in order, whatever its subdir."""
        return [name for _, names in self.artifacts for name in names]
